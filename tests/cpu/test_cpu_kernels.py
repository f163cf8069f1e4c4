"""The fast CPU kernels of mhc._cpu against the reference (the spec): exp-domain Sinkhorn forward and backward, the
log-domain fallback for extreme logits, NaN per token, eps, and the pre-mapping forward and backward.

Tolerances: measured differences are ~5e-7 (fp32 forward, absolute on values in [0, 1]), ~1e-6 relative (fp32
backward) and ~1e-15 (fp64); the tests allow 2-4x that."""

from __future__ import annotations

import pytest
import torch

from mhc import _cpu, ops
from mhc import reference as ref

F32, F64 = torch.float32, torch.float64
TOL = {F32: (2e-6, 5e-6), F64: (1e-13, 1e-12)}  # (forward atol, backward atol relative to max |grad|)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("n", [1, 2, 4, 16])
@pytest.mark.parametrize("eps", [0.0, 1e-2])
@pytest.mark.parametrize("std", [1.0, 8.0])
def test_sinkhorn_matches_reference(dtype, n, eps, std):
    L = torch.randn(65, n, n, dtype=dtype) * std
    G = torch.randn_like(L)
    fwd_tol, bwd_tol = TOL[dtype]
    got = _cpu.sinkhorn_forward(L, 20, eps)
    want = ref.sinkhorn(L, 20, eps)
    torch.testing.assert_close(got, want, rtol=0, atol=fwd_tol)
    g_got = _cpu.sinkhorn_backward(G, L, 20, eps)
    g_want = ref.sinkhorn_backward(G, L, 20, eps)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=bwd_tol * G.abs().max().item())  # n=1: the grad is 0


def test_moderate_logits_take_the_exp_domain_and_extreme_ones_the_reference():
    L = torch.randn(64, 4, 4) * 3
    L[5] = torch.randn(4, 4) * 1e4
    L[9, 1] = -1e4  # one row far below the rest: underflows in the exp domain
    _, redo = _cpu._exp_iterates(_cpu._token_last(L), 20, 0.0)
    assert redo.nonzero().flatten().tolist() == [5, 9]


@pytest.mark.parametrize("scale", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_extreme_logits_are_finite_and_equal_the_reference(scale, eps):
    L = torch.randn(32, 4, 4) * scale
    G = torch.randn_like(L)
    got = _cpu.sinkhorn_forward(L, 20, eps)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref.sinkhorn(L, 20, eps), rtol=0, atol=2e-6)
    g = _cpu.sinkhorn_backward(G, L, 20, eps)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, ref.sinkhorn_backward(G, L, 20, eps), rtol=1e-5, atol=1e-5)
    if eps == 0.0:  # with eps > 0 an all-underflowed row sums to 0 in both
        assert (got.sum(-1) - 1).abs().max() < 1e-5


def test_nan_stays_in_its_token():
    L = torch.randn(6, 4, 4)
    L[2, 1, 3] = float("nan")
    out = _cpu.sinkhorn_forward(L, 20, 0.0)
    assert torch.isnan(out[2]).all()
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(out[keep], ref.sinkhorn(L[keep], 20), rtol=0, atol=2e-6)
    g = _cpu.sinkhorn_backward(torch.ones_like(L), L, 20, 0.0)
    assert torch.isnan(g[2]).all() and torch.isfinite(g[keep]).all()


def test_chunking_gives_the_same_result(monkeypatch):
    L = torch.randn(50, 4, 4) * 2
    G = torch.randn_like(L)
    whole = _cpu.sinkhorn_forward(L, 20, 0.0), _cpu.sinkhorn_backward(G, L, 20, 0.0)
    monkeypatch.setattr(_cpu, "_CHUNK", 7)
    torch.testing.assert_close(_cpu.sinkhorn_forward(L, 20, 0.0), whole[0], rtol=0, atol=0)
    torch.testing.assert_close(_cpu.sinkhorn_backward(G, L, 20, 0.0), whole[1], rtol=0, atol=0)


def test_the_ops_dispatch_to_the_cpu_kernels(monkeypatch):
    """The registered CPU kernel is what torch.ops.mhc.* runs for CPU tensors (not the reference)."""
    calls = []
    real = _cpu.sinkhorn_forward
    monkeypatch.setattr(_cpu, "sinkhorn_forward", lambda *a: calls.append(1) or real(*a))
    ops.sinkhorn_fwd(torch.randn(3, 4, 4), 20, 0.0)
    assert calls


@pytest.mark.parametrize("act,coef", [(F32, F32), (torch.bfloat16, F32), (F64, F64)])
@pytest.mark.parametrize("n,C", [(1, 8), (4, 16), (3, 24)])
def test_pre_mapping_matches_reference(act, coef, n, C):
    T, m = 37, ref.num_coefficients(n)
    x = torch.randn(T, n, C).to(act)
    phi = torch.randn(n * C, m, dtype=coef) * 0.2
    alpha = torch.tensor([0.8, 1.1, 1.3], dtype=coef)
    bias = torch.randn(m, dtype=coef) * 0.5
    settings = (20, 2.0, 1e-6, 1e-6)
    got = _cpu.pre_mapping_fwd(x, phi, alpha, bias, *settings)
    want = ref.pre_mapping(x, phi, alpha, bias, *settings)
    tol = 1e-12 if coef == F64 else 2e-6
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        rt = 2**-8 if a.dtype == torch.bfloat16 else 0  # one bf16 rounding of layer_input
        torch.testing.assert_close(a, b, rtol=rt, atol=tol * max(1.0, b.abs().max().item()))
    grads = [torch.randn_like(o) for o in want[:4]]
    _, h_post, _, h_pre, proj, rinv = want
    args = [*grads, x, phi, alpha, bias, h_pre, h_post, proj, rinv, 20, 2.0, 1e-6]
    got_b = _cpu.pre_mapping_bwd(*args)
    want_b = ref.pre_mapping_backward(*args)
    btol = 1e-12 if coef == F64 else 5e-6
    for a, b in zip(got_b, want_b, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = b.abs().max().item()
        rt = 2**-7 if a.dtype == torch.bfloat16 else 0  # d_residual: one bf16 rounding, summed in another order
        torch.testing.assert_close(a, b, rtol=rt, atol=btol * scale)


def test_pre_mapping_ignores_autocast():
    x = torch.randn(16, 4, 32)
    phi = torch.randn(128, 24) * 0.1
    alpha, bias = torch.ones(3), torch.zeros(24)
    plain = ops.pre_mapping_fwd(x, phi, alpha, bias, 20, 2.0, 1e-6, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = ops.pre_mapping_fwd(x, phi, alpha, bias, 20, 2.0, 1e-6, 0.0)
    for a, b in zip(under, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
