"""16-byte alignment (the ops refuse a misaligned view, the public functions copy it), the CUDA wrappers' fallback
to the reference (unsupported shapes, disabled families, one warning per configuration), and the device guard.

The CUDA wrappers in mhc._cuda are plain functions: called with CPU tensors they exercise the decision and the
fallback without a GPU (the kernel launch itself is replaced where a test needs it)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mhc
from mhc import _checks, _cuda
from mhc import reference as ref

T, N, C = 5, 4, 64


def _misaligned(shape, dtype=torch.float32, elems=1):
    """A contiguous view of ``shape`` at storage offset ``elems`` (``elems * itemsize`` bytes: not 16-aligned)."""
    numel = torch.Size(shape).numel()
    base = torch.randn(numel + elems).to(dtype)
    return base[elems:].view(shape)


# ---------------------------------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
def test_ops_refuse_misaligned_data_with_name_and_byte_offset(fake):
    L = _misaligned((T, N, N))  # offset 1 float = 4 bytes
    y, x = torch.randn(T, C).bfloat16(), _misaligned((T, N, C), torch.bfloat16, elems=3)  # 6 bytes
    h_post, h_res = torch.rand(T, N), torch.rand(T, N, N)
    ctx = FakeTensorMode() if fake else contextlib.nullcontext()
    with ctx as mode:
        if fake:
            L, y, x, h_post, h_res = (mode.from_tensor(t) for t in (L, y, x, h_post, h_res))
        with pytest.raises(ValueError, match=r"mhc::sinkhorn_fwd: expected logits to start on a 16-byte boundary, "
                           r"got a view at byte offset 4"):  # fmt: skip
            torch.ops.mhc.sinkhorn_fwd(L, 20, 0.0)
        with pytest.raises(ValueError, match=r"residual .*byte offset 6 \(storage_offset 3 x 2 B\)"):
            torch.ops.mhc.post_res_fwd(y, x, h_post, h_res)
        with pytest.raises(ValueError, match="grad_out.*byte offset 4"):
            torch.ops.mhc.sinkhorn_bwd(L, torch.randn(T, N, N) if not fake else mode.from_tensor(torch.randn(T, N, N)),
                                       20, 0.0)  # fmt: skip


def test_pre_mapping_ops_check_alignment():
    n, c = 2, 64
    m = n * n + 2 * n
    residual, phi = torch.randn(T, n, c), torch.randn(n * c, m)
    alpha, bias = torch.ones(3), _misaligned((m,))
    with pytest.raises(ValueError, match="pre_mapping_fwd: expected bias to start on a 16-byte boundary"):
        torch.ops.mhc.pre_mapping_fwd(residual, phi, alpha, bias, 20, 2.0, 1e-6, 0.0)
    outs = torch.ops.mhc.pre_mapping_fwd(residual, phi, alpha, bias.clone(), 20, 2.0, 1e-6, 0.0)
    layer_input, h_post, h_res, h_pre, proj, rinv = outs
    grads = [torch.randn_like(t) for t in (layer_input, h_post, h_res, h_pre)]
    grads[1] = _misaligned(tuple(h_post.shape))
    with pytest.raises(ValueError, match="pre_mapping_bwd: expected grad_h_post to start on a 16-byte boundary"):
        torch.ops.mhc.pre_mapping_bwd(*grads, residual, phi, alpha, bias.clone(), h_pre, h_post, proj, rinv,
                                      20, 2.0, 0.0)  # fmt: skip


def test_aligned_views_at_nonzero_offsets_are_accepted():
    base = torch.randn(4 + T * N * N)
    L = base[4:].view(T, N, N)  # 16 bytes in
    assert L.storage_offset() == 4
    torch.testing.assert_close(torch.ops.mhc.sinkhorn_fwd(L, 20, 0.0), ref.sinkhorn(L, 20))


def test_public_functions_copy_misaligned_inputs_and_go_on():
    L = _misaligned((T, N, N)).requires_grad_(False)
    torch.testing.assert_close(mhc.sinkhorn(L), ref.sinkhorn(L.clone()))
    y = _misaligned((T, C), torch.bfloat16, elems=1)
    x = _misaligned((T, N, C), torch.bfloat16, elems=5)
    h_post, h_res = _misaligned((T, N)), _misaligned((T, N, N))
    want = ref.post_res(y.clone(), x.clone(), h_post.clone(), h_res.clone())
    torch.testing.assert_close(mhc.post_res(y, x, h_post, h_res), want)
    n, c = 2, 64
    m = n * n + 2 * n
    got = mhc.pre_mapping(_misaligned((T, n, c)), _misaligned((n * c, m)) * 0.02, torch.ones(3), _misaligned((m,)))
    assert all(torch.isfinite(t).all() for t in got)


def test_backward_with_misaligned_incoming_gradient():
    """torch.cat's backward hands each input a narrow view of the gradient: the autograd glue copies it."""
    L = torch.randn(T, N, N, requires_grad=True)
    H = mhc.sinkhorn(L)
    extra = torch.randn(1, requires_grad=True)
    (torch.cat([extra, H.flatten()]) * torch.arange(1 + H.numel())).sum().backward()
    g = torch.arange(1 + H.numel(), dtype=torch.float32)[1:].view_as(H)
    torch.testing.assert_close(L.grad, ref.sinkhorn_backward(g, L.detach(), 20))


@pytest.mark.parametrize(
    "fn", [lambda z, it: torch.ops.mhc.sinkhorn_fwd(z, it, 0.0), mhc.sinkhorn], ids=["op", "public"]
)
def test_torch_compile_refuses_misaligned_input_at_trace_time(fn):
    """Dynamo cannot read storage offsets, so inside a compiled region the public function does not copy: the op's
    fake check refuses the view while tracing, with the same message."""
    L = _misaligned((T, N, N))
    with pytest.raises(Exception, match="expected logits to start on a 16-byte boundary, got a view at byte offset 4"):
        torch.compile(lambda z: fn(z, 20), fullgraph=True, backend="eager")(L)
    aligned = L.clone()
    torch.testing.assert_close(torch.compile(mhc.sinkhorn, fullgraph=True)(aligned), ref.sinkhorn(aligned))


def test_aligned_contiguous_copies_only_when_needed():
    t = torch.randn(16)
    assert _checks.aligned_contiguous(t) is t
    v = t[1:5]
    a = _checks.aligned_contiguous(v)
    assert a.storage_offset() == 0 and torch.equal(a, v)
    assert _checks.aligned_contiguous(t[4:8]).data_ptr() == t[4:8].data_ptr()


# ---------------------------------------------------------------------------------------------------- fallback


@pytest.mark.parametrize(
    "family, shape, words",
    [
        ("post_res", dict(n=3, C=64), "n=3"),
        ("post_res", dict(n=4, C=96), "C=96"),
        ("post_res", dict(n=4, C=64, numel=2**31), "2**31"),
        ("post_res", dict(n=4, C=64, dtypes=(torch.bfloat16, torch.float64)), "float64"),
        ("sinkhorn", dict(n=17), "n=17"),
        ("sinkhorn", dict(n=4, numel=2**31 + 5), "2**31"),
        ("pre_mapping", dict(n=3, C=64), "n=3"),
        ("pre_mapping", dict(n=4, C=96), "C=96"),
        ("pre_mapping", dict(n=4, C=65600), "C=65600"),
        ("fused_everything", dict(n=4, C=64), "no CUDA kernel"),
    ],
)
def test_unsupported_decision(family, shape, words):
    assert words in _checks.cuda_kernel_unsupported(family, **shape)


@pytest.mark.parametrize(
    "family, shape",
    [("post_res", dict(n=8, C=7168, numel=2**31 - 1)), ("sinkhorn", dict(n=16)), ("pre_mapping", dict(n=1, C=64))],
)
def test_supported_decision(family, shape):
    assert _checks.cuda_kernel_unsupported(family, **shape) is None


def test_unsupported_shape_falls_back_with_one_warning_per_configuration(monkeypatch):
    monkeypatch.setattr(_cuda, "_WARNED", set())
    y, x = torch.randn(T, 96).bfloat16(), torch.randn(T, 3, 96).bfloat16()
    h_post, h_res = torch.rand(T, 3), torch.rand(T, 3, 3)
    with pytest.warns(UserWarning, match=r"mhc::post_res_fwd: running the PyTorch reference on CUDA: n=3"):
        out = _cuda.post_res_fwd(y, x, h_post, h_res)
    torch.testing.assert_close(out, ref.post_res(y, x, h_post, h_res))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same configuration again: silent
        _cuda.post_res_fwd(y, x, h_post, h_res)
    with pytest.warns(UserWarning, match="post_res_bwd"):
        _cuda.post_res_bwd(torch.randn_like(x), y, x, h_post, h_res)
    with pytest.warns(UserWarning, match="sinkhorn_fwd.*n=17"):
        _cuda.sinkhorn_fwd(torch.randn(2, 17, 17), 20, 0.0)


def test_float64_runs_the_reference_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L = torch.randn(T, N, N, dtype=torch.float64)
        torch.testing.assert_close(_cuda.sinkhorn_fwd(L, 20, 0.0), ref.sinkhorn(L, 20))


def test_disabled_family_runs_the_reference(monkeypatch):
    monkeypatch.setattr(_cuda, "_WARNED", set())
    monkeypatch.setattr(_cuda, "DISABLED", set())
    _cuda.disable_kernels("sinkhorn")
    L = torch.randn(T, N, N)
    with pytest.warns(UserWarning, match="sinkhorn kernels are disabled"):
        torch.testing.assert_close(_cuda.sinkhorn_bwd(torch.ones_like(L), L, 20, 0.0),
                                   ref.sinkhorn_backward(torch.ones_like(L), L, 20))  # fmt: skip
    _cuda.enable_kernels()
    assert _cuda.fallback_reason("sinkhorn", n=4) is None
    with pytest.raises(ValueError, match="expected a family in.*got 'sinkhorns'"):
        _cuda.disable_kernels("sinkhorns")


def test_disable_env_variable_is_parsed():
    assert _cuda._parse_disabled(" post_res , sinkhorn,") == {"post_res", "sinkhorn"}
    with pytest.warns(UserWarning, match="unknown kernel families.*'bogus'"):
        assert _cuda._parse_disabled("bogus,post_res") == {"post_res"}


# ---------------------------------------------------------------------------------------------------- device guard


def test_kernel_launches_inside_a_device_guard(monkeypatch):
    """TileLang's stub calls cudaSetDevice and never restores it: every launch runs inside torch.cuda.device(...)."""
    events = []

    @contextlib.contextmanager
    def guard(device):
        events.append(("enter", torch.device(device)))
        yield
        events.append(("exit", torch.device(device)))

    def fake_builder(*config):
        def kernel(*args):
            events.append(("launch", config))
            args[-1].copy_(ref.sinkhorn(args[0], config[1], config[2]))

        return kernel

    import tl_kernels.sinkhorn as tl_sinkhorn

    monkeypatch.setattr(torch.cuda, "device", guard)
    monkeypatch.setattr(tl_sinkhorn, "sinkhorn_fwd_kernel", fake_builder)
    L = torch.randn(T, N, N)
    out = _cuda.sinkhorn_fwd(L, 20, 0.0)
    assert events == [("enter", L.device), ("launch", (N, 20, 0.0)), ("exit", L.device)]
    torch.testing.assert_close(out, ref.sinkhorn(L, 20))
