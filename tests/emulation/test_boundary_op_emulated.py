"""The CUDA wrappers of mhc::boundary_fwd / boundary_bwd (mhc/boundary.py), end to end on the CPU: the wrappers run on
CPU tensors with ``mhc._cuda._launch`` replaced by a launcher that executes each compiled kernel's generated CUDA
source in the emulation (cuda_emu.py). This checks the glue no GPU has run: argument order against each TileLang
program's parameters, the allocations, the split and slice counts, the chaining into pre_finalize, and the
backward's use of mhc::pre_mapping_bwd (CPU kernels here) before the boundary backward kernel.

Against the unfused CPU ops on the same inputs (their post_res is the PyTorch reference, so activations agree to one
rounding, not bit for bit; bit for bit against the post_res kernel is test_boundary_emulated.py's check): x_next
and d_layer_output, d_residual within one output rounding, d_h_post, d_h_res within fp32 summation order, d_phi,
d_alpha, d_bias bit for bit (the same mhc::pre_mapping_bwd); proj within the TF32 budget of float64, and the
coefficients and layer input within 2e-5 / one rounding of float64 recomputed from the kernel's own statistics."""

from __future__ import annotations

import pytest
import torch

import mhc  # noqa: F401  (registers the ops)
from mhc import _cuda
from mhc import boundary as B
from mhc import reference as ref
from tl_kernels import boundary as tl_boundary
from tl_kernels import post_res, pre_finalize

from .cuda_emu import EmulatedKernel

SETTINGS = (20, 2.0, 1e-6, 0.0)
_TL = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _emulated_launch(device, kernel, *args):
    names = [str(p.name).removesuffix("_handle") for p in kernel.prim_func.params]
    assert len(names) == len(args), (names, len(args))
    named = dict(zip(names, args, strict=True))
    emu = EmulatedKernel(kernel)
    if "num_slices" in named:  # pre_finalize_fwd
        S, T = named["proj_part"].shape[:2]
        extra, grid = {"num_splits": S, "num_tokens": T}, (-(-T // pre_finalize.TOKENS), named["num_slices"])
    elif "proj_part" in named:  # boundary_fwd
        S, T = named["proj_part"].shape[:2]
        extra, grid = {"num_splits": S, "num_tokens": T}, (-(-T // tl_boundary.BM), S)
    else:  # boundary_bwd: post_res's mapping
        T, n, C = named["residual"].shape
        extra = {"num_tokens": T}
        grid = -(-T // post_res._plan(n, C, _TL[named["residual"].dtype]).tpb)
    emu(**named, **extra, grid=grid)


@pytest.fixture
def emulated_cuda(monkeypatch):
    monkeypatch.setattr(_cuda, "_launch", _emulated_launch)
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
    for k in (4, 5, 6):  # d_phi, d_alpha, d_bias: the same mhc::pre_mapping_bwd call on both sides
        assert torch.equal(got[k], want[k])
    for k in (0, 1):  # d_layer_output, d_residual: the kernel's FMA order vs the reference's einsum, one rounding
        scale = want[k].double().abs().max().item()
        torch.testing.assert_close(got[k].double(), want[k].double(), rtol=ulp, atol=1e-6 * scale)
    for k in (2, 3):  # d_h_post, d_h_res: fp32 sums over C in a different order
        scale = want[k].double().abs().max().item()
        torch.testing.assert_close(got[k].double(), want[k].double(), rtol=1e-5, atol=1e-5 * scale)
