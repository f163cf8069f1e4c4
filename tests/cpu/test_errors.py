"""Bad input gets a clear ValueError/TypeError naming the expected and the received value, in eager mode and under
FakeTensorMode (what torch.compile traces with), before anything runs. Fake CUDA tensors need no GPU; the CUDA
kernels' own limits are not errors (the ops fall back to the reference), so they trace."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mhc
from mhc import reference as ref

T, N, C = 3, 4, 64
M = ref.num_coefficients(N)


def good_pre(device="cpu"):
    return dict(
        residual=torch.randn(T, N, C, device=device, dtype=torch.bfloat16),
        phi=torch.randn(N * C, M, device=device),
        alpha=torch.ones(3, device=device),
        bias=torch.zeros(M, device=device),
    )


def good_post(device="cpu"):
    return dict(
        layer_output=torch.randn(T, C, device=device, dtype=torch.bfloat16),
        residual=torch.randn(T, N, C, device=device, dtype=torch.bfloat16),
        h_post=torch.rand(T, N, device=device),
        h_res=torch.rand(T, N, N, device=device),
    )


def call_pre(**kw):
    settings = {k: kw.pop(k) for k in ("iters", "post_mult", "rms_eps", "sinkhorn_eps") if k in kw}
    return mhc.pre_mapping(kw["residual"], kw["phi"], kw["alpha"], kw["bias"], **settings)


def call_post(**kw):
    return mhc.post_res(kw["layer_output"], kw["residual"], kw["h_post"], kw["h_res"])


PRE_CASES = [
    # (id, changes, error, words that must appear in the message)
    ("rank", dict(residual=torch.randn(N * C)), ValueError, ["residual", "[..., n, C]", f"({N * C},)"]),
    ("phi-shape-wrong-n", dict(phi=torch.randn(N * C, 15)), ValueError, ["phi", f"({N * C}, {M})", "15"]),
    ("phi-C-mismatch", dict(phi=torch.randn(N * 32, M)), ValueError, ["phi", f"({N * C}, {M})", f"({N * 32}, {M})"]),
    ("alpha-shape", dict(alpha=torch.ones(2)), ValueError, ["alpha", "(3,)", "(2,)"]),
    ("bias-shape", dict(bias=torch.zeros(M + 1)), ValueError, ["bias", f"({M},)", f"({M + 1},)"]),
    ("residual-int", dict(residual=torch.ones(T, N, C, dtype=torch.int32)), TypeError, ["residual", "int32"]),
    ("phi-bf16", dict(phi=torch.randn(N * C, M, dtype=torch.bfloat16)), TypeError, ["phi", "bfloat16", "float32"]),
    ("alpha-dtype-mix", dict(alpha=torch.ones(3, dtype=torch.float64)), TypeError, ["alpha", "float64", "float32"]),
    ("device-mix", dict(bias=torch.zeros(M, device="meta")), ValueError, ["device", "meta", "cpu"]),
    ("iters", dict(iters=0), ValueError, ["iters", ">= 1", "0"]),
    ("iters-type", dict(iters=2.5), TypeError, ["iters", "int", "float"]),
    ("post-mult", dict(post_mult=-1.0), ValueError, ["post_mult", "> 0", "-1.0"]),
    ("rms-eps", dict(rms_eps=float("nan")), ValueError, ["rms_eps", "nan"]),
    ("sinkhorn-eps", dict(sinkhorn_eps=-1e-6), ValueError, ["sinkhorn_eps", ">= 0"]),
]

POST_CASES = [
    ("rank", dict(residual=torch.randn(N * C, dtype=torch.bfloat16)), ValueError, ["residual", "[..., n, C]"]),
    (
        "C-mismatch",
        dict(layer_output=torch.randn(T, 32, dtype=torch.bfloat16)),
        ValueError,
        ["layer_output", "(3, 64)"],
    ),
    ("T-mismatch", dict(layer_output=torch.randn(T + 1, C, dtype=torch.bfloat16)), ValueError, ["(3, 64)", "(4, 64)"]),
    ("h_post-n", dict(h_post=torch.rand(T, N + 1)), ValueError, ["h_post", "(3, 4)", "(3, 5)"]),
    ("h_res-n", dict(h_res=torch.rand(T, N, N - 1)), ValueError, ["h_res", "(3, 4, 4)", "(3, 4, 3)"]),
    ("dtype-mix", dict(layer_output=torch.randn(T, C)), TypeError, ["layer_output", "float32", "bfloat16"]),
    ("coef-bf16", dict(h_post=torch.rand(T, N, dtype=torch.bfloat16)), TypeError, ["h_post", "bfloat16"]),
    ("coef-mix", dict(h_res=torch.rand(T, N, N, dtype=torch.float64)), TypeError, ["h_res", "float64", "float32"]),
    ("device-mix", dict(h_res=torch.rand(T, N, N, device="meta")), ValueError, ["device", "meta", "cpu"]),
]

SINKHORN_CASES = [
    ("rank", dict(logits=torch.randn(4)), ValueError, ["logits", "[..., n, n]", "(4,)"]),
    ("not-square", dict(logits=torch.randn(T, 4, 3)), ValueError, ["logits", "[..., n, n]", "(3, 4, 3)"]),
    ("dtype", dict(logits=torch.randn(T, 4, 4, dtype=torch.bfloat16)), TypeError, ["logits", "bfloat16"]),
    ("iters", dict(iters=0), ValueError, ["iters", ">= 1"]),
    ("eps", dict(eps=-1.0), ValueError, ["eps", ">= 0"]),
]


def _fake(mode, v):
    """A fake copy of v; a meta tensor (the eager device-mix case) becomes a fake CUDA tensor, which needs no GPU."""
    if not isinstance(v, torch.Tensor):
        return v
    if v.device.type == "meta":
        with mode:
            return torch.empty(v.shape, dtype=v.dtype, device="cuda")
    return mode.from_tensor(v)


def _expect(call, kw, error, words, fake):
    ctx = contextlib.nullcontext()
    if fake:
        ctx = FakeTensorMode()
        kw = {k: _fake(ctx, v) for k, v in kw.items()}
        words = ["cuda" if w == "meta" else w for w in words]
    with ctx, pytest.raises(error) as info:
        call(**kw)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
@pytest.mark.parametrize("case", PRE_CASES, ids=[c[0] for c in PRE_CASES])
def test_pre_mapping_errors(case, fake):
    _, change, error, words = case
    kw = {**good_pre(), **change}
    _expect(call_pre, kw, error, words, fake)


@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
@pytest.mark.parametrize("case", POST_CASES, ids=[c[0] for c in POST_CASES])
def test_post_res_errors(case, fake):
    _, change, error, words = case
    kw = {**good_post(), **change}
    _expect(call_post, kw, error, words, fake)


@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
@pytest.mark.parametrize("case", SINKHORN_CASES, ids=[c[0] for c in SINKHORN_CASES])
def test_sinkhorn_errors(case, fake):
    _, change, error, words = case
    kw = {"logits": torch.randn(T, 4, 4), "iters": 20, "eps": 0.0, **change}
    _expect(lambda logits, iters, eps: mhc.sinkhorn(logits, iters, eps=eps), kw, error, words, fake)


def test_device_mix_between_cpu_and_cuda_under_fake_mode():
    """A fake CUDA tensor needs no GPU: a CPU/CUDA mix is refused at trace time."""
    kw = good_post()
    with FakeTensorMode() as mode:
        kw = {k: mode.from_tensor(v) for k, v in kw.items()}
        kw["h_res"] = torch.empty(T, N, N, device="cuda")
        with pytest.raises(ValueError, match="one device.*cuda"):
            call_post(**kw)


@pytest.mark.parametrize("n, c", [(4, 96), (3, 64)], ids=["C=96", "n=3"])
def test_cuda_kernel_limits_are_not_errors_under_fake_mode(n, c):
    """Shapes the CUDA kernels do not support trace fine: at run time they fall back to the reference
    (tests/cpu/test_fallback_alignment.py)."""
    with FakeTensorMode():
        y = torch.empty(T, c, device="cuda", dtype=torch.bfloat16)
        x = torch.empty(T, n, c, device="cuda", dtype=torch.bfloat16)
        out = mhc.post_res(y, x, torch.empty(T, n, device="cuda"), torch.empty(T, n, n, device="cuda"))
        assert out.shape == (T, n, c) and out.device.type == "cuda"
        assert mhc.sinkhorn(torch.empty(2, 17, 17, device="cuda")).shape == (2, 17, 17)


def test_cpu_has_no_kernel_limits():
    """The CPU reference takes any n and C."""
    y, x = torch.randn(2, 5), torch.randn(2, 3, 5)
    out = mhc.post_res(y, x, torch.rand(2, 3), torch.rand(2, 3, 3))
    assert out.shape == (2, 3, 5)
    assert mhc.sinkhorn(torch.randn(1, 20, 20)).shape == (1, 20, 20)


def test_nan_logits_propagate_without_error():
    L = torch.randn(3, 4, 4)
    L[1, 0, 0] = float("nan")
    L.requires_grad_(True)
    H = mhc.sinkhorn(L)
    assert torch.isnan(H[1]).any() and torch.isfinite(H[0]).all() and torch.isfinite(H[2]).all()
    H.sum().backward()
    assert torch.isfinite(L.grad[0]).all() and torch.isfinite(L.grad[2]).all()


def test_non_tensor_input_is_a_type_error():
    kw = good_post()
    kw["h_post"] = [[0.5] * N] * T
    with pytest.raises(TypeError, match="h_post.*torch.Tensor.*list"):
        call_post(**kw)


def test_what_arrives_under_torch_compile_fullgraph():
    """README: under torch.compile(fullgraph=True) Dynamo re-raises our errors as its own RuntimeError subclasses
    whose message carries the original ValueError/TypeError and its text; without fullgraph a check in the mhc.*
    functions graph-breaks and the ValueError itself arrives."""
    from torch._dynamo.exc import TorchRuntimeError, Unsupported

    torch._dynamo.reset()
    kw = good_pre()
    kw["phi"] = kw["phi"][:-1].clone()

    def public(residual, phi, alpha, bias):
        return mhc.pre_mapping(residual, phi, alpha, bias)[0]

    def raw_op(residual, phi, alpha, bias):
        return torch.ops.mhc.pre_mapping_fwd(residual, phi, alpha, bias, 20, 2.0, 1e-6, 0.0)[0]

    def python_check(logits):
        return mhc.sinkhorn(logits, iters=0)

    want = r"ValueError\('mhc::pre_mapping_fwd: expected phi of shape \(256, 24\).*got \(255, 24\)'\)"
    for fn in (public, raw_op):  # the check that fires runs on fake tensors inside the op
        with pytest.raises(TorchRuntimeError, match=want):
            torch.compile(fn, backend="eager", fullgraph=True)(**kw)
    with pytest.raises(Unsupported, match=r"ValueError\('mhc.sinkhorn: expected iters >= 1, got 0'\)"):
        torch.compile(python_check, backend="eager", fullgraph=True)(torch.randn(2, N, N))
    assert issubclass(TorchRuntimeError, RuntimeError) and issubclass(Unsupported, RuntimeError)
    with pytest.raises(ValueError, match="mhc.sinkhorn: expected iters >= 1, got 0"):
        torch.compile(python_check, backend="eager")(torch.randn(2, N, N))
