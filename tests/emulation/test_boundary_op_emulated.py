"""The CUDA wrappers of mhc::boundary_fwd / boundary_bwd (mhc/boundary.py), end to end on the CPU: the wrappers run on
CPU tensors with ``mhc._cuda._launch`` replaced by a launcher that binds each compiled kernel's dynamic sizes and
grid from its TIR and executes its generated CUDA source in the emulation (cuda_emu.py). This checks the glue no GPU
has run: argument order against each TileLang program's parameters, the allocations, the split and slice counts,
the chaining into pre_finalize, and the backward's five launches (pre_finalize_bwd, sinkhorn_bwd, the fused
boundary backward, pre_reduce_bwd, the d_h reduction).

Against the unfused CPU ops on the same inputs (their post_res is the PyTorch reference, so activations agree to one
rounding, not bit for bit; bit for bit against the kernels is test_boundary_emulated.py's check and, for the whole
backward, ``test_fused_backward_against_the_unfused_cuda_path``): x_next and d_layer_output, d_residual within one
output rounding, d_h_post, d_h_res within fp32 summation order, d_phi within the TF32 budget and d_alpha, d_bias
within 1e-4 (the GPU check's tolerances); proj within the TF32 budget of float64, and the coefficients and layer
input within 2e-5 / one rounding of float64 recomputed from the kernel's own statistics."""

from __future__ import annotations

import pytest
import torch

import mhc  # noqa: F401  (registers the ops)
from mhc import _cuda
from mhc import boundary as B
from mhc import reference as ref
from profiling import families

from .cuda_emu import EmulatedKernel

SETTINGS = (20, 2.0, 1e-6, 0.0)
_TL = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@pytest.fixture
def emulated_cuda(monkeypatch):
    monkeypatch.setattr(_cuda, "_launch", _bound_launch([]))
    monkeypatch.setattr(_cuda, "_num_sms", lambda device: 2)  # small grids: several splits at these T


def _inputs(T, n, C, dt, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = n * n + 2 * n
    y = torch.randn(T, C, generator=g).to(dt)
    x = torch.randn(T, n, C, generator=g).to(dt)
    h_post = torch.rand(T, n, generator=g) * 2
    h_res = ref.sinkhorn(torch.randn(T, n, n, generator=g), 20)
    phi = torch.randn(n * C, m, generator=g) / (n * C) ** 0.5
    return y, x, h_post, h_res, phi, torch.tensor([0.8, 0.6, 1.1]), torch.randn(m, generator=g) * 0.5


@pytest.mark.parametrize("n,C,dt,T", [(4, 128, torch.bfloat16, 70), (2, 64, torch.float32, 3)])
def test_cuda_wrappers_end_to_end(emulated_cuda, n, C, dt, T):
    args = _inputs(T, n, C, dt)
    assert B.fused_reason(args[1], args[2], args[3], args[4], SETTINGS[0]) is None
    fused = B._boundary_fwd_cuda(*args, *SETTINGS)
    plain = B.composed_fwd(*args, *SETTINGS)  # the CPU ops: reference post_res, fast CPU pre-mapping
    assert [(o.shape, o.dtype) for o in fused] == [(o.shape, o.dtype) for o in plain]
    ulp = 2**-7 if dt != torch.float32 else 2**-23
    # x_next: one rounding of the kernel's fp32 FMA chain vs the reference's einsum (the CPU post_res op); bit for
    # bit against the post_res kernel is test_boundary_emulated.py's check
    exact = ref.post_res(*(a.double() for a in args[:4]))
    assert ((fused[0].double() - exact).abs() <= ulp * exact.abs() + 1e-6).all(), "x_next"
    xv, phi64 = fused[0].double().reshape(T, -1), args[4].double()
    assert ((fused[5].double() - xv @ phi64).abs() <= 2**-10 * (xv.abs() @ phi64.abs())).all(), "proj (TF32)"
    torch.testing.assert_close(fused[6].double(), ref.rms_inv(fused[0].double(), 1e-6), rtol=1e-5, atol=0)
    # coefficients against float64 from the kernel's own proj and rinv (as tests/gpu/test_pre_mapping_gpu.py): the
    # CPU path's coefficients differ more (fp32 instead of TF32 products, x_next rounded by the reference's einsum)
    alpha, bias = args[5].double(), args[6].double()
    logits = ref.coefficient_logits(fused[5].double(), fused[6].double(), alpha, bias, n)
    pre, post, res = ref.split_coefficients(logits, n)
    want = {2: 2.0 * torch.sigmoid(post), 3: ref.sinkhorn(res, 20), 4: torch.sigmoid(pre)}
    for k, w in want.items():
        torch.testing.assert_close(fused[k].double(), w, rtol=0, atol=2e-5)
    li = ref.pre_apply(fused[0].double(), fused[4].double())  # with the kernel's h_pre: one output rounding
    assert ((fused[1].double() - li).abs() <= ulp * li.abs() + 1e-6).all(), "layer_input"

    g = torch.Generator().manual_seed(9)
    grads = [torch.randn(o.shape, generator=g).to(o.dtype) for o in fused[:5]]
    x_next, _li, h_post_n, _hr, h_pre_n, proj, rinv = fused
    bwd_args = (*grads, *args[:4], x_next, *args[4:], h_pre_n, h_post_n, proj, rinv, 20, 2.0, 0.0)
    got = B._boundary_bwd_cuda(*bwd_args)
    want = B.composed_bwd(*bwd_args)
    # d_phi, d_alpha, d_bias: the emulated kernels against the CPU ops' float64-accurate values, with the GPU check's
    # tolerances (profiling/families.py, check_pre_mapping)
    saved = (h_pre_n, h_post_n, proj, rinv)
    mag_x, mag_phi = families.backward_magnitudes(grads[1:], x_next, *args[4:], saved, 20, 0.0, 2.0)
    assert families.budget(got[4], want[4], mag_phi, families.PRE_TF32[dt]).ok, "d_phi"
    for k in (5, 6):
        assert families.compare(got[k], want[k], atol=1e-4 * float(want[k].abs().max()), rtol=1e-4).ok, k
    # d_layer_output, d_residual, d_h_post, d_h_res: post_res's backward on g = grad_x_next + d x_next, whose
    # pre-mapping part is TF32 on the kernels' side and fp32 on the CPU's: the budget of d x_next (the GPU check's,
    # PRE_TF32 + ACT_RTOL of its magnitudes) carried through post_res's backward with absolute values
    y64, x64, hp64, hr64 = (a.double() for a in args[:4])
    mag_g = mag_x + grads[0].double().abs()
    mags = (
        (hp64[..., None] * mag_g).sum(1),
        torch.einsum("tij,tic->tjc", hr64, mag_g),
        (mag_g * y64.abs()[:, None, :]).sum(-1),
        torch.einsum("tic,tjc->tij", mag_g, x64.abs()),
    )
    frac = families.PRE_TF32[dt] + families.ACT_RTOL[dt]
    for k, mag in enumerate(mags):
        err = families.budget(got[k], want[k], mag, frac)
        assert err.ok, (k, err)


def _bound_launch(log):
    """A launcher that binds the dynamic sizes and the grid from the kernel's TIR (profiling.model.bounds._bind),
    logs the kernel's name and runs its generated source in the emulation."""
    from profiling.model.bounds import _bind

    cache: dict[int, EmulatedKernel] = {}

    def launch(device, kernel, *args):
        emu = cache.setdefault(id(kernel), EmulatedKernel(kernel))
        scalars, grid, _ = _bind(kernel, args)
        named = dict(scalars)
        pf = kernel.prim_func
        for param, arg in zip(pf.params, args, strict=True):
            named[pf.buffer_map[param].name if param in pf.buffer_map else param.name] = arg
        log.append(pf.attrs["global_symbol"])
        emu(**{k: v for k, v in named.items() if k in emu.names}, grid=grid[:2] if grid[1] > 1 else grid[0])

    return launch


@pytest.mark.parametrize(
    "n,C,dt,T,sms", [(4, 128, torch.bfloat16, 70, 2), (2, 64, torch.float32, 3, 1), (8, 64, torch.float16, 40, 132)]
)
def test_fused_backward_against_the_unfused_cuda_path(monkeypatch, n, C, dt, T, sms):
    """``_boundary_bwd_cuda`` (the fully fused backward: pre_finalize_bwd, sinkhorn_bwd, boundary_bwd_fused,
    and its reduction: d_phi, d_alpha, d_bias, d_h) against ``_boundary_bwd_unfused_cuda`` (mhc::pre_mapping_bwd's four kernels and
    boundary_bwd), every kernel emulated: d_layer_output, d_residual, d_alpha, d_bias bit for bit; d_h_post, d_h_res
    within fp32 summation order; d_phi within the TF32 budget of float64 (mhc.boundary.boundary_backward_reference),
    as the unfused path's; the launch sequence; bitwise reproducible."""
    log: list[str] = []
    monkeypatch.setattr(_cuda, "_launch", _bound_launch(log))
    monkeypatch.setattr(_cuda, "_num_sms", lambda device: sms)
    monkeypatch.setattr(_cuda, "DISABLED", set())
    args = _inputs(T, n, C, dt, seed=2)
    fwd = B._boundary_fwd_cuda(*args, *SETTINGS)
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(o.shape, generator=g).to(o.dtype) for o in fwd[:5]]
    x_next, _li, h_post_n, _hr, h_pre_n, proj, rinv = fwd
    bwd_args = (*grads, *args[:4], x_next, *args[4:], h_pre_n, h_post_n, proj, rinv, 20, 2.0, 0.0)
    log.clear()
    got = B._boundary_bwd_cuda(*bwd_args)
    assert log == ["pre_finalize_bwd", "sinkhorn_bwd", "boundary_bwd_fused", "boundary_reduce_bwd"], log
    plain = B._boundary_bwd_unfused_cuda(*bwd_args)
    for k in (0, 1, 5, 6):  # d_layer_output, d_residual, d_alpha, d_bias
        assert torch.equal(got[k], plain[k]), f"output {k} differs from the unfused CUDA path"
    for k in (2, 3):  # d_h_post, d_h_res
        scale = plain[k].abs().max().item()
        torch.testing.assert_close(got[k], plain[k], rtol=1e-5, atol=1e-6 * scale)
    # d_phi against the float64 VJP, with the TF32 budget of the GPU check (profiling/families.py), as the unfused
    want = B.boundary_backward_reference(*(a.double() if isinstance(a, torch.Tensor) else a for a in bwd_args))
    saved = (h_pre_n, h_post_n, proj, rinv)
    _mag_x, mag_phi = families.backward_magnitudes(grads[1:], x_next, *args[4:], saved, 20, 0.0, 2.0)
    for d_phi in (got[4], plain[4]):
        err = families.budget(d_phi, want[4], mag_phi, families.PRE_TF32[dt])
        assert err.ok, err
    again = B._boundary_bwd_cuda(*bwd_args)
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True)), "not bitwise reproducible"


def test_fused_backward_without_grad_h_pre(monkeypatch):
    """``grad_h_pre'`` None (an unused ``h_pre'``: autograd's gradient is not materialised, so no zero-fill launch)
    gives bit for bit the outputs of an explicit zero ``grad_h_pre'``, through pre_finalize_bwd's ``grad_pre=False``
    variant; the unfused path accepts None as well."""
    n, C, dt, T = 4, 128, torch.bfloat16, 70
    log: list[str] = []
    monkeypatch.setattr(_cuda, "_launch", _bound_launch(log))
    monkeypatch.setattr(_cuda, "_num_sms", lambda device: 2)
    monkeypatch.setattr(_cuda, "DISABLED", set())
    args = _inputs(T, n, C, dt, seed=3)
    fwd = B._boundary_fwd_cuda(*args, *SETTINGS)
    g = torch.Generator().manual_seed(8)
    grads = [torch.randn(o.shape, generator=g).to(o.dtype) for o in fwd[:4]]
    x_next, _li, h_post_n, _hr, h_pre_n, proj, rinv = fwd
    rest = (*args[:4], x_next, *args[4:], h_pre_n, h_post_n, proj, rinv, 20, 2.0, 0.0)
    got = B._boundary_bwd_cuda(*grads, None, *rest)
    want = B._boundary_bwd_cuda(*grads, torch.zeros_like(h_pre_n), *rest)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    plain = B._boundary_bwd_unfused_cuda(*grads, None, *rest)
    for k in (0, 1, 5, 6):
        assert torch.equal(got[k], plain[k]), k
