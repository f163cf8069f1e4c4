"""Sinkhorn TileLang kernels on a GPU against the float64 reference (marked `gpu`, skipped without CUDA).

Tolerances: fp32 log-domain iteration with hardware exp2/log2 (relative error about 2**-22 each) over 2*iters
half-steps: forward entries within 2e-5 absolute of float64, backward within rtol 1e-3 / atol 1e-4 times the largest
incoming gradient (the backward sums 2*iters correction terms).
"""

from __future__ import annotations

import pytest
import torch

import mhc
from mhc import reference as ref

pytestmark = pytest.mark.gpu

STREAMS = (1, 2, 3, 4, 6, 8, 12, 16)
TOKENS = (1, 7, 4096, 65537)


def _logits(T, n, std=2.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(T, n, n, device="cuda", generator=g) * std


def _fwd_poisoned(L, iters, eps):
    from tl_kernels.sinkhorn import sinkhorn_fwd_kernel

    out = torch.full_like(L, float("nan"))
    sinkhorn_fwd_kernel(L.shape[-1], iters, eps)(L, out)
    return out


def _bwd_poisoned(g, L, iters, eps):
    from tl_kernels.sinkhorn import sinkhorn_bwd_kernel

    out = torch.full_like(L, float("nan"))
    sinkhorn_bwd_kernel(L.shape[-1], iters, eps)(g, L, out)
    return out


@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize("T", TOKENS)
def test_forward_and_backward_match_reference(T, n, eps):
    iters = 20
    L = _logits(T, n)
    want = ref.sinkhorn(L.double(), iters, eps)
    got = _fwd_poisoned(L, iters, eps)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want.float(), rtol=0, atol=2e-5)
    g = torch.randn_like(L)
    want_g = ref.sinkhorn_backward(g.double(), L.double(), iters, eps)
    got_g = _bwd_poisoned(g, L, iters, eps)
    assert not got_g.isnan().any()
    torch.testing.assert_close(got_g, want_g.float(), rtol=1e-3, atol=1e-4 * float(g.abs().max()))


@pytest.mark.parametrize("iters", [1, 10])
def test_other_iteration_counts(iters):
    L = _logits(513, 4)
    torch.testing.assert_close(mhc.sinkhorn(L, iters), ref.sinkhorn(L.double(), iters).float(), rtol=0, atol=2e-5)


@pytest.mark.parametrize("magnitude", [1e2, 1e4])
@pytest.mark.parametrize("n", [4, 8, 16])
def test_extreme_logits_stay_finite_and_row_stochastic(n, magnitude):
    L = (torch.rand(4096, n, n, device="cuda") * 2 - 1) * magnitude
    L[0] = magnitude
    L[1, :, 0] = -magnitude
    H = mhc.sinkhorn(L)
    assert torch.isfinite(H).all()
    torch.testing.assert_close(H.sum(-1), torch.ones(4096, n, device="cuda"), rtol=0, atol=1e-4)
    torch.testing.assert_close(H, ref.sinkhorn(L.double()).float(), rtol=0, atol=1e-4)
    g = torch.ops.mhc.sinkhorn_bwd(torch.randn_like(L), L, 20, 0.0)
    assert torch.isfinite(g).all()


def test_nan_propagates_to_its_token_only():
    L = _logits(300, 4)
    L[123, 1, 2] = float("nan")
    H = mhc.sinkhorn(L)
    assert H[123].isnan().any()
    keep = torch.ones(300, dtype=torch.bool, device="cuda")
    keep[123] = False
    assert torch.isfinite(H[keep]).all()


def test_zero_tokens():
    L = torch.empty(0, 4, 4, device="cuda", requires_grad=True)
    H = mhc.sinkhorn(L)
    H.sum().backward()
    assert H.shape == (0, 4, 4) and L.grad.shape == (0, 4, 4)


def test_bitwise_deterministic():
    L = _logits(16384, 4)
    g = torch.randn_like(L)
    a = (mhc.sinkhorn(L), torch.ops.mhc.sinkhorn_bwd(g, L, 20, 0.0))
    b = (mhc.sinkhorn(L), torch.ops.mhc.sinkhorn_bwd(g, L, 20, 0.0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_opcheck_on_cuda():
    L = _logits(37, 4).requires_grad_(True)
    torch.library.opcheck(torch.ops.mhc.sinkhorn_fwd.default, [L, 20, 0.0])
    torch.library.opcheck(torch.ops.mhc.sinkhorn_bwd.default, [torch.randn_like(L), L.detach(), 20, 0.0])


def test_torch_compile_and_cuda_graph():
    L = _logits(1024, 4).requires_grad_(True)

    def f(z):
        return mhc.sinkhorn(z, 20).square().sum()

    want = torch.autograd.grad(f(L), L)[0]
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(L), L)[0]
    assert torch.equal(got, want)
    static = L.detach().clone()
    mhc.sinkhorn(static)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mhc.sinkhorn(static)
    new = _logits(1024, 4, seed=3)
    static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, mhc.sinkhorn(new))
