"""mhc.reference against an independent float64 implementation (plain loops over tokens, the paper's exp-domain
Eq. 9), its hand-written backward against autograd, and the properties the paper states."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mhc import reference as ref

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------- independent math


def naive_sinkhorn(L: torch.Tensor, iters: int) -> torch.Tensor:
    """Eq. 9 literally, one matrix: M = exp(L); iters x (divide each column by its sum, then each row)."""
    M = L.exp()
    n = M.shape[0]
    for _ in range(iters):
        for j in range(n):
            s = sum(M[i, j] for i in range(n))
            for i in range(n):
                M[i, j] = M[i, j] / s
        for i in range(n):
            s = sum(M[i, j] for j in range(n))
            for j in range(n):
                M[i, j] = M[i, j] / s
    return M


def naive_site(x, phi, alpha, bias, F, iters, post_mult, rms_eps):
    """Eq. 3 and 14-19, token by token with explicit loops, float64."""
    Tn, n, C = x.shape
    out = torch.empty_like(x)
    lis, posts, ress = [], [], []
    for t in range(Tn):
        vec = [x[t, i, c] for i in range(n) for c in range(C)]
        r = math.sqrt(sum(v * v for v in vec) / (n * C) + rms_eps)
        m = n * n + 2 * n
        proj = [sum(vec[k] * phi[k, col] for k in range(n * C)) for col in range(m)]
        group = [0] * n + [1] * n + [2] * (n * n)
        lg = [alpha[group[col]] * proj[col] / r + bias[col] for col in range(m)]
        h_pre = [1 / (1 + math.exp(-lg[i])) for i in range(n)]
        h_post = [post_mult / (1 + math.exp(-lg[n + i])) for i in range(n)]
        L = torch.tensor([[lg[2 * n + i * n + j] for j in range(n)] for i in range(n)], dtype=F64)
        H = naive_sinkhorn(L, iters)
        li = torch.tensor([sum(h_pre[i] * x[t, i, c] for i in range(n)) for c in range(C)], dtype=F64)
        y = F(li)
        for i in range(n):
            for c in range(C):
                out[t, i, c] = sum(H[i, j] * x[t, j, c] for j in range(n)) + h_post[i] * y[c]
        lis.append(li)
        posts.append(torch.tensor(h_post, dtype=F64))
        ress.append(H)
    return out, torch.stack(lis), torch.stack(posts), torch.stack(ress)


def make_params(n, C, dtype=F64, scale=0.3):
    m = ref.num_coefficients(n)
    phi = torch.randn(n * C, m, dtype=dtype) * scale
    alpha = torch.tensor([0.9, 1.1, 1.3], dtype=dtype)
    bias = torch.randn(m, dtype=dtype) * 0.5
    return phi, alpha, bias


# ---------------------------------------------------------------------------------------------------- against loops


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_site_matches_naive_loops(n):
    T, C = 3, 5
    x = torch.randn(T, n, C, dtype=F64)
    phi, alpha, bias = make_params(n, C)
    W = torch.randn(C, C, dtype=F64) * 0.5

    def F(v):
        return torch.tanh(v @ W)

    params = ref.SiteParams(phi, alpha, bias, iters=20, post_mult=2.0, rms_eps=1e-6)
    got = ref.site(x, F, params)
    want, li, hp, hr = naive_site(x, phi, alpha, bias, F, 20, 2.0, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    layer_input, h_post, h_res, *_ = ref.pre_mapping(x, phi, alpha, bias, 20, 2.0, 1e-6)
    torch.testing.assert_close(layer_input, li, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_post, hp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_res, hr, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,iters,std", [(2, 1, 1.0), (4, 20, 1.0), (4, 20, 3.0), (6, 7, 2.0), (8, 20, 1.0)])
def test_sinkhorn_log_domain_equals_eq9(n, iters, std):
    L = torch.randn(5, n, n, dtype=F64) * std
    want = torch.stack([naive_sinkhorn(L[t].clone(), iters) for t in range(L.shape[0])])
    torch.testing.assert_close(ref.sinkhorn(L, iters), want, rtol=1e-12, atol=1e-13)


def test_sinkhorn_eps_guards_every_sum():
    """eps > 0 divides by (sum + eps) at every step (exp domain, checked on moderate logits)."""
    L = torch.randn(4, 4, 4, dtype=F64)
    eps, iters = 1e-3, 5
    M = L.exp()
    for _ in range(iters):
        M = M / (M.sum(-2, keepdim=True) + eps)
        M = M / (M.sum(-1, keepdim=True) + eps)
    torch.testing.assert_close(ref.sinkhorn(L, iters, eps), M, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------- backward = autograd


def _autograd_vjp(fn, inputs, grads):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return torch.autograd.grad(outs, inputs, grads, allow_unused=True)


@pytest.mark.parametrize("eps", [0.0, 1e-4])
@pytest.mark.parametrize("n,iters", [(1, 3), (2, 5), (4, 20), (7, 10)])
def test_sinkhorn_backward_equals_autograd(n, iters, eps):
    L = torch.randn(6, n, n, dtype=F64) * 2
    g = torch.randn(6, n, n, dtype=F64)
    (want,) = _autograd_vjp(lambda z: ref.sinkhorn(z, iters, eps), [L], [g])
    torch.testing.assert_close(ref.sinkhorn_backward(g, L, iters, eps), want, rtol=1e-10, atol=1e-12)


def test_post_res_backward_equals_autograd():
    T, n, C = 4, 3, 7
    ins = [
        torch.randn(T, C, dtype=F64),
        torch.randn(T, n, C, dtype=F64),
        torch.rand(T, n, dtype=F64),
        torch.rand(T, n, n, dtype=F64),
    ]
    g = torch.randn(T, n, C, dtype=F64)
    want = _autograd_vjp(ref.post_res, ins, [g])
    got = ref.post_res_backward(g, *ins)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_pre_mapping_backward_equals_autograd(n):
    T, C = 5, 6
    x = torch.randn(T, n, C, dtype=F64)
    phi, alpha, bias = make_params(n, C)
    iters, pm, reps, seps = 8, 2.0, 1e-6, 0.0
    outs = ref.pre_mapping(x, phi, alpha, bias, iters, pm, reps, seps)
    grads = [torch.randn_like(o) for o in outs[:4]]

    def fn(x, phi, alpha, bias):
        return ref.pre_mapping(x, phi, alpha, bias, iters, pm, reps, seps)[:4]

    want = _autograd_vjp(fn, [x, phi, alpha, bias], grads)
    _, h_post, _, h_pre, proj, rinv = outs
    got = ref.pre_mapping_backward(*grads, x, phi, alpha, bias, h_pre, h_post, proj, rinv, iters, pm, seps)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 16), seed=st.integers(0, 2**31 - 1), std=st.floats(0.0, 1.0))
def test_sinkhorn_rows_exact_columns_within_truncation(n, seed, std):
    """Rows sum to 1 (the last step normalises rows); at logit std <= 1 and 20 iterations the column error stays
    within the truncation error (docs/spec.md §3.3 measured <= 7.8e-4 at n=4, std 1; we allow 1e-2 for n up to 16)."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(8, n, n, generator=g, dtype=F64) * std
    H = ref.sinkhorn(L, 20)
    assert (H >= 0).all()
    torch.testing.assert_close(H.sum(-1), torch.ones(8, n, dtype=F64), rtol=0, atol=1e-6)
    assert (H.sum(-2) - 1).abs().max().item() < 1e-2


def test_sinkhorn_column_error_shrinks_with_iterations():
    L = torch.randn(256, 4, 4, dtype=F64)
    errs = [(ref.sinkhorn(L, k).sum(-2) - 1).abs().max().item() for k in (1, 5, 20, 80)]
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert errs[2] < 1e-2  # docs/spec.md §3.3: 7.8e-4 at std 1, 20 iterations


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("magnitude", [1e2, 1e3, 1e4, 1e6])
def test_sinkhorn_extreme_logits_finite_and_row_stochastic(magnitude, dtype):
    L = (torch.rand(64, 4, 4, dtype=F64) * 2 - 1) * magnitude
    L[0] = magnitude  # constant matrix: uniform answer
    L[1] = -magnitude
    L[2, :, 0] = -magnitude  # a column far below the others: underflows to zero in the exp domain
    L[2, :, 1:] = magnitude
    H = ref.sinkhorn(L.to(dtype), 20)
    assert torch.isfinite(H).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(H.sum(-1), torch.ones(64, 4, dtype=dtype), rtol=0, atol=tol)
    torch.testing.assert_close(H[0], torch.full((4, 4), 0.25, dtype=dtype))
    g = ref.sinkhorn_backward(torch.randn_like(H), L.to(dtype), 20)
    assert torch.isfinite(g).all()


def test_sinkhorn_nan_propagates_to_its_token_only():
    L = torch.randn(3, 4, 4, dtype=F64)
    L[1, 2, 3] = float("nan")
    H = ref.sinkhorn(L, 20)
    assert torch.isnan(H[1]).any()
    assert torch.isfinite(H[0]).all() and torch.isfinite(H[2]).all()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), post_mult=st.floats(0.5, 4.0))
def test_coefficient_ranges(n, seed, post_mult):
    g = torch.Generator().manual_seed(seed)
    C = 8
    x = torch.randn(5, n, C, generator=g, dtype=F64)
    m = ref.num_coefficients(n)
    phi = torch.randn(n * C, m, generator=g, dtype=F64) * 0.3
    alpha = torch.rand(3, generator=g, dtype=F64)
    bias = torch.randn(m, generator=g, dtype=F64)
    _, h_post, h_res, h_pre, *_ = ref.pre_mapping(x, phi, alpha, bias, 20, post_mult)
    assert ((h_pre > 0) & (h_pre < 1)).all()
    assert ((h_post > 0) & (h_post < post_mult)).all()
    assert (h_res >= 0).all()


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_zero_phi_and_bias_give_uniform_h_res(n):
    C = 16
    x = torch.randn(7, n, C, dtype=F64)
    m = ref.num_coefficients(n)
    zeros = torch.zeros(n * C, m, dtype=F64)
    _, h_post, h_res, h_pre, *_ = ref.pre_mapping(x, zeros, torch.ones(3, dtype=F64), torch.zeros(m, dtype=F64))
    torch.testing.assert_close(h_res, torch.full_like(h_res, 1.0 / n), rtol=0, atol=1e-15)
    torch.testing.assert_close(h_pre, torch.full_like(h_pre, 0.5))
    torch.testing.assert_close(h_post, torch.ones_like(h_post))  # 2 * sigmoid(0)


def test_n1_site_is_a_plain_residual():
    """n = 1: h_res is exactly 1; with zero phi and bias, h_post = 2*sigmoid(0) = 1 and h_pre = 1/2, which a sublayer
    that starts with its own RMSNorm (the paper's setting) cannot see, so the site is exactly x + F(x)."""
    T, C = 6, 32
    x = torch.randn(T, 1, C, dtype=F64)
    W = torch.randn(C, C, dtype=F64)

    def F(v):  # pre-norm sublayer (no eps: scale invariant)
        return (v / v.square().mean(-1, keepdim=True).sqrt()) @ W

    params = ref.SiteParams(torch.zeros(C, 3, dtype=F64), torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64))
    torch.testing.assert_close(ref.site(x, F, params), x + F(x[:, 0])[:, None], rtol=1e-13, atol=1e-13)
    phi, alpha, bias = make_params(1, C)
    h_res = ref.pre_mapping(x, phi, alpha, bias)[2]
    assert torch.equal(h_res, torch.ones_like(h_res))


def test_dtypes_follow_inputs_and_math_is_fp32_at_least():
    x = torch.randn(4, 4, 64, dtype=torch.bfloat16)
    phi, alpha, bias = make_params(4, 64, torch.float32)
    li, h_post, h_res, h_pre, proj, rinv = ref.pre_mapping(x, phi, alpha, bias)
    assert li.dtype == torch.bfloat16
    assert {t.dtype for t in (h_post, h_res, h_pre, proj, rinv)} == {torch.float32}
    want = ref.pre_mapping(x.double(), phi.double(), alpha.double(), bias.double())
    torch.testing.assert_close(h_res, want[2].float(), rtol=1e-5, atol=1e-6)
    out = ref.post_res(li, x, h_post, h_res)
    assert out.dtype == torch.bfloat16
    want_out = ref.post_res(li.double(), x.double(), h_post.double(), h_res.double())
    torch.testing.assert_close(out, want_out.to(torch.bfloat16))  # one rounding of the fp32 result
