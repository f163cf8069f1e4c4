"""The generated CUDA source of the Sinkhorn kernels, executed on the CPU (see cuda_emu.py), against the float64
reference: register and shared-memory variants (n = 1 .. 16), eps = 0 and eps > 0, partial last blocks, outputs
past T untouched. Every test runs twice (the ``approx_mode`` fixture): with each exp2f/__log2f/__fdividef result
moved up, then down, by its documented worst-case error (ex2.approx 2 ulp, lg2.approx 2**-22, __fdividef 2 ulp),
subnormals flushed as under -ftz=true, so the tolerances hold at the hardware's bounds, not only against libm."""

from __future__ import annotations

import pytest
import torch

from mhc import reference as ref
from tl_kernels import sinkhorn

from .cuda_emu import EmulatedKernel

pytestmark = pytest.mark.usefixtures("approx_mode")

# eps > 0 cases use eps = 0.3: ignoring eps would change the result by ~0.2 (asserted below), far above the tolerance
# (eps = 0 runs the factored exp domain: K, H in registers for n <= 10, with 64 and 32 tokens per block in the n = 7, 8
# backward, in the tile rows for n = 16; eps > 0 the log domain)
CASES = [
    (1, 20, 0.0), (2, 20, 0.3), (4, 20, 0.0), (4, 1, 0.0), (4, 2, 0.0), (4, 1, 0.3), (7, 20, 0.0), (8, 20, 0.0),
    (10, 20, 0.0), (12, 5, 0.3), (16, 20, 0.0),
]  # fmt: skip
#: tl_kernels/sinkhorn.py measures max |err| <= 5.4e-7 (forward) and <= 7.7e-8 * max|grad_out| (backward) with the
#: approximate math at its error bounds (4.2e-7 and 1.3e-7 with exact libm)
FWD_ATOL, BWD_ATOL = 1e-6, 4e-7


def _tpb(kernel) -> int:
    return kernel.threads


@pytest.mark.parametrize("n,iters,eps", CASES, ids=[f"n{c[0]}-it{c[1]}-eps{c[2]}" for c in CASES])
def test_sinkhorn_generated_source_on_cpu(n, iters, eps):
    fwd = EmulatedKernel(sinkhorn.sinkhorn_fwd_kernel(n, iters, eps))
    bwd = EmulatedKernel(sinkhorn.sinkhorn_bwd_kernel(n, iters, eps))
    for kernel in (fwd, bwd):
        for T in (1, kernel.threads + 3):
            Tp = T + kernel.threads + 1
            L = torch.randn(Tp, n, n) * 2
            g = torch.randn(Tp, n, n)
            L[T:], g[T:] = float("nan"), float("nan")
            grid = -(-T // kernel.threads)
            out = torch.full((Tp, n, n), float("nan"))
            if kernel is fwd:
                kernel(logits=L, out=out, num_tokens=T, grid=grid)
                want = ref.sinkhorn(L[:T].double(), iters, eps)
                atol = FWD_ATOL
                if eps:
                    assert (want - ref.sinkhorn(L[:T].double(), iters, 0.0)).abs().max() > 1000 * atol
            else:
                kernel(grad_out=g, logits=L, grad_logits=out, num_tokens=T, grid=grid)
                want = ref.sinkhorn_backward(g[:T].double(), L[:T].double(), iters, eps)
                atol = BWD_ATOL * float(g[:T].abs().max())
                if eps and n > 1:
                    no_eps = ref.sinkhorn_backward(g[:T].double(), L[:T].double(), iters, 0.0)
                    assert (want - no_eps).abs().max() > 1000 * atol
            assert out[T:].isnan().all(), "written past num_tokens"
            assert not out[:T].isnan().any(), "some outputs were never written"
            torch.testing.assert_close(out[:T].double(), want, rtol=0, atol=atol)


def test_sinkhorn_emulation_extreme_logits_stay_finite():
    n, iters = 4, 20
    fwd = EmulatedKernel(sinkhorn.sinkhorn_fwd_kernel(n, iters, 0.0))
    L = (torch.rand(5, n, n) * 2 - 1) * 1e4
    L[1, :, 0] = -1e4  # a column that underflows to zero in the exp domain
    out = torch.empty(5, n, n)
    fwd(logits=L, out=out, num_tokens=5, grid=1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(5, n), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [4, 8])
def test_sinkhorn_emulation_nan_stays_in_its_token(n):
    """A NaN logit sends its token down the forward's log-domain fallback (the exp-domain path's sums are NaN):
    that token's matrix is NaN, every other token is finite and matches the reference."""
    fwd = EmulatedKernel(sinkhorn.sinkhorn_fwd_kernel(n, 20, 0.0))
    L = torch.randn(6, n, n) * 2
    L[3, 1, 0] = float("nan")
    out = torch.empty(6, n, n)
    fwd(logits=L, out=out, num_tokens=6, grid=1)
    assert out[3].isnan().any()
    keep = [0, 1, 2, 4, 5]
    torch.testing.assert_close(out[keep].double(), ref.sinkhorn(L[keep].double(), 20), rtol=0, atol=1e-6)


def test_sinkhorn_log_domain_forward_stays_reachable_and_agrees():
    """The previous (log-domain) forward, kept for GPU timing comparisons, against the exp-domain default."""
    L = torch.randn(9, 4, 4) * 2
    outs = []
    for exp_domain in (True, False):
        kernel = EmulatedKernel(sinkhorn.sinkhorn_fwd_kernel(4, 20, 0.0, exp_domain))
        out = torch.empty(9, 4, 4)
        kernel(logits=L, out=out, num_tokens=9, grid=1)
        outs.append(out)
    assert "__fdividef" in sinkhorn.sinkhorn_fwd_kernel(4, 20, 0.0).get_kernel_source()
    assert "__fdividef" not in sinkhorn.sinkhorn_fwd_kernel(4, 20, 0.0, False).get_kernel_source()
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[0].double(), ref.sinkhorn(L.double(), 20), rtol=0, atol=1e-6)


def _run_both(direction, n, L, g=None):
    """The default kernel and the log-domain one (exp_domain=False) on the same inputs."""
    outs = []
    for exp_domain in (True, False):
        build = getattr(sinkhorn, f"sinkhorn_{direction}_kernel")
        kernel = EmulatedKernel(build(n, 20, 0.0, exp_domain))
        out = torch.full_like(L, float("nan"))
        grid = -(-L.shape[0] // kernel.threads)
        if direction == "fwd":
            kernel(logits=L, out=out, num_tokens=L.shape[0], grid=grid)
        else:
            kernel(grad_out=g, logits=L, grad_logits=out, num_tokens=L.shape[0], grid=grid)
        outs.append(out)
    return outs


@pytest.mark.parametrize("n", [4, 16])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_exp_domain_runs_and_its_fallback_is_the_log_domain_kernel(direction, n):
    """Tokens 0-4 have moderate logits: the factored exp-domain path computes them (its rounding differs from the
    log-domain kernel's in some bits) to the same accuracy. Token 5 has a row 200 below the rest, whose exps
    underflow (a row sum of 0): it takes the fallback and matches the log-domain kernel bit for bit. n = 4 keeps K
    (and H) in registers, n = 16 in the thread's tile rows, whose fallback reloads the token from global memory."""
    L = torch.randn(6, n, n) * 2
    L[5, 2, :] -= 200.0
    g = torch.randn(6, n, n)
    new, old = _run_both(direction, n, L, g)
    if direction == "fwd":
        want, atol = ref.sinkhorn(L.double(), 20), FWD_ATOL
    else:
        want, atol = ref.sinkhorn_backward(g.double(), L.double(), 20), BWD_ATOL * float(g.abs().max())
    torch.testing.assert_close(new[:5].double(), want[:5], rtol=0, atol=atol)
    # the log-domain backward's offsets carry ~ulp(200) absolute error here (module docstring): 4x the tolerance
    torch.testing.assert_close(new[5].double(), want[5], rtol=0, atol=4 * atol)
    assert torch.equal(new[5], old[5]), "the fallback token must be the log-domain kernel's result"
    assert not torch.equal(new[:5], old[:5]), "moderate logits must take the exp-domain path"


@pytest.mark.parametrize("n", [4, 16])
def test_backward_nan_stays_in_its_token(n):
    """NaN in one token's grad_out (its H goes non-finite: the fallback) or logits (the recompute's sums): that
    token's gradient is NaN, the others match the reference."""
    L = torch.randn(6, n, n) * 2
    g = torch.randn(6, n, n)
    g[1, 0, 3] = float("nan")
    L[3, 2, 1] = float("nan")
    new, _ = _run_both("bwd", n, L, g)
    assert new[1].isnan().any() and new[3].isnan().any()
    keep = [0, 2, 4, 5]
    want = ref.sinkhorn_backward(g[keep].double(), L[keep].double(), 20)
    torch.testing.assert_close(new[keep].double(), want, rtol=0, atol=BWD_ATOL * float(g[keep].abs().max()))


@pytest.mark.parametrize("span", [160.0, 200.0, 1000.0])
def test_logits_spanning_160_or_more_stay_finite_and_accurate(span):
    """Logits spanning >= 160 in a token (a permutation lifted by ``span`` over N(0, 4) noise): in fp32 the other
    entries' exps underflow, which in other projects' exp-domain kernels gave a hard permutation with zero gradient.
    Here such tokens take the log-domain fallback: outputs and gradients are finite and match float64."""
    n, T = 4, 6
    L = torch.randn(T, n, n) * 2
    for t in range(T):
        L[t, torch.arange(n), torch.randperm(n)] += span
    g = torch.randn(T, n, n)
    fwd = EmulatedKernel(sinkhorn.sinkhorn_fwd_kernel(n, 20, 0.0))
    bwd = EmulatedKernel(sinkhorn.sinkhorn_bwd_kernel(n, 20, 0.0))
    out, grad = torch.empty(T, n, n), torch.empty(T, n, n)
    fwd(logits=L, out=out, num_tokens=T, grid=1)
    bwd(grad_out=g, logits=L, grad_logits=grad, num_tokens=T, grid=1)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(out.double(), ref.sinkhorn(L.double(), 20), rtol=0, atol=FWD_ATOL)
    # the log-domain offsets carry ~ulp(span) absolute error (module docstring): the tolerance scales with it
    atol = BWD_ATOL * float(g.abs().max()) * max(1.0, span / 50)
    torch.testing.assert_close(grad.double(), ref.sinkhorn_backward(g.double(), L.double(), 20), rtol=0, atol=atol)
