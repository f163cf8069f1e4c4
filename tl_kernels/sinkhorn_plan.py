"""Compile-time plans of the Sinkhorn kernels (:mod:`tl_kernels.sinkhorn`): how many tokens a block holds, how
the per-token n x n matrices are split between registers and shared memory, and the shared-memory layouts.

One token per thread, ``tokens_per_block`` (tpb) threads per block: tpb = min(128, SMEM_BUDGET_BYTES // bytes per
token), rounded down to whole warps when >= 32.

Layouts (fp32 elements; tx = the thread, i.e. the token within the block):

* staging tile: token tx's row-major n x n matrix at ``tile[tx * pitch + i * n + j]``; ``pitch`` = n * n rounded up
  to an odd number, so that a warp reading element q of its own tokens touches bank (tx * pitch + q) % 32, a
  permutation of the 32 banks (conflict-free);
* backward history (the forward recompute's scalings u_t, v_t, or offsets a_t, b_t, for t < iters): vector v (0: u
  or a, 1: v or b) of step slot t of token tx at :func:`hist_index`: vector-major (``((t * 2 + v) * tpb + tx) * n +
  i``, each thread's n floats contiguous, so they move as 64- or 128-bit accesses) unless n is a multiple of 8, then
  token-minor (``((t * 2 + v) * n + i) * tpb + tx``, 32-bit accesses to 32 consecutive banks); both conflict-free
  (:func:`hist_vectors_contiguous`).

Register placement is decided from an estimate of live fp32 values per thread against REG_BUDGET (168, which keeps
ptxas at or under 255 registers with zero spills at tpb = 128); the registers ptxas then uses are listed per
configuration in docs/benchmarks.md.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

__all__ = [
    "EXP_DOMAIN_REGS_MAX_N", "MAX_N", "Plan", "bwd_plan", "check_args", "fwd_plan", "hist_index",
    "hist_vectors_contiguous", "uses_exp_domain",
]  # fmt: skip

MAX_N = 16
SMEM_BUDGET_BYTES = 99 * 1024  # per block; the brief's ceiling is 100 KB
MAX_TOKENS_PER_BLOCK = 128
# Estimated live fp32 values per thread above which a per-token matrix is moved from registers to shared memory.
REG_BUDGET = 168
#: Largest n whose factored exp-domain backward keeps K and H (2 n * n floats) and four n-vectors in registers:
#: ptxas gives n = 8, 9, 10 168, 236, 248 registers with 0 spills (32 tokens per block there). Above it K and H
#: live in the thread's rows of the two staging tiles.
EXP_DOMAIN_REGS_MAX_N = 10


@dataclass(frozen=True)
class Plan:
    """Compile-time decisions for one (kind, n, iters, eps); all sizes in fp32 elements unless named *_bytes."""

    n: int
    iters: int
    eps: float
    tokens_per_block: int  # = threads per block: one token per thread
    pitch: int  # floats between consecutive tokens in a staging tile (odd => bank-conflict-free row access)
    logits_in_regs: bool  # logits in registers (else read from the thread's row of the logits tile)
    grad_in_regs: bool  # bwd: running gradient in registers (else in the thread's row of the grad tile)
    p_in_regs: bool  # bwd: keep P_t in registers and get Q_t = P_t * row factor (else recompute Q_t with exp2)
    smem_bytes: int
    est_regs: int  # the estimate the placement was decided with (ptxas' counts: docs/benchmarks.md)


def check_args(n, iters, eps) -> tuple[int, int, float]:
    """Validate and normalise the compile-time arguments (numpy integers and int eps are accepted)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= MAX_N:
        raise ValueError(f"sinkhorn: n must be an int in [1, {MAX_N}], got {n!r}")
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 1:
        raise ValueError(f"sinkhorn: iters must be an int >= 1, got {iters!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0.0:
        raise ValueError(f"sinkhorn: eps must be a finite float >= 0, got {eps!r}")
    return int(n), int(iters), float(eps)


def token_pitch(n: int) -> int:
    """Odd token stride (in floats) of a staging tile: thread t reading element q of its own token touches bank
    (t * pitch + q) % 32, which is a permutation of the 32 banks across a warp when pitch is odd."""
    return n * n + (1 - (n * n) % 2)


def fit_tokens_per_block(bytes_per_token: int, kind: str, n: int, iters: int) -> int:
    fit = SMEM_BUDGET_BYTES // bytes_per_token
    if fit < 1:
        raise ValueError(
            f"sinkhorn {kind}: n={n}, iters={iters} needs {bytes_per_token} B of shared memory per token, "
            f"more than the {SMEM_BUDGET_BYTES} B per-block budget; use fewer iterations"
        )
    tpb = min(MAX_TOKENS_PER_BLOCK, fit)
    return tpb - tpb % 32 if tpb >= 32 else tpb  # whole warps when possible


def fwd_plan(n: int, iters: int, eps: float) -> Plan:
    n, iters, eps = check_args(n, iters, eps)
    pitch = token_pitch(n)
    base = 3 * n + 24  # offset vectors a, b, one temporary vector, scalars
    logits_in_regs = base + n * n <= REG_BUDGET
    tpb = fit_tokens_per_block(4 * pitch, "fwd", n, iters)
    return Plan(
        n=n,
        iters=iters,
        eps=eps,
        tokens_per_block=tpb,
        pitch=pitch,
        logits_in_regs=logits_in_regs,
        grad_in_regs=False,
        p_in_regs=False,
        smem_bytes=4 * pitch * tpb,
        est_regs=base + (n * n if logits_in_regs else 0),
    )


def bwd_plan(n: int, iters: int, eps: float) -> Plan:
    n, iters, eps = check_args(n, iters, eps)
    pitch = token_pitch(n)
    # Peak register pressure is in the backward sweep: up to three n*n matrices (P, logits, gradient) plus seven
    # n-vectors. Greedy placement by value: a register-resident P saves n*n exp2 per iteration (the MUFU pipe is
    # the bottleneck), register-resident logits save 3*n*n shared loads per iteration, the gradient 2*n*n.
    est = 7 * n + 24
    placed = []
    for _name in ("p", "logits", "grad"):
        fits = est + n * n <= REG_BUDGET
        placed.append(fits)
        est += n * n if fits else 0
    p_in_regs, logits_in_regs, grad_in_regs = placed
    # Two staging tiles (logits, grad) plus the offset history a_t, b_t for t = 1..iters-1 (a_R, b_R stay in
    # registers) of every token.
    per_token = 2 * pitch + 2 * (iters - 1) * n
    tpb = fit_tokens_per_block(4 * per_token, "bwd", n, iters)
    return Plan(
        n=n,
        iters=iters,
        eps=eps,
        tokens_per_block=tpb,
        pitch=pitch,
        logits_in_regs=logits_in_regs,
        grad_in_regs=grad_in_regs,
        p_in_regs=p_in_regs,
        smem_bytes=4 * per_token * tpb,
        est_regs=est,
    )


def hist_vectors_contiguous(n: int) -> bool:
    """Whether the backward's history keeps each thread's n-vector contiguous (``vector-major``) instead of
    token-minor. Contiguous vectors let nvcc load and store a vector with 64- or 128-bit shared accesses (n = 4: one
    LDS.128 instead of four LDS), and they stay conflict-free when the thread stride, in units of the access width,
    is odd: n odd (32-bit), n = 2 mod 4 (64-bit), n = 4 mod 8 (128-bit). For n = 0 mod 8 a 128-bit access would
    conflict 2- or 4-way, so those keep the token-minor layout (32-bit accesses, 32 consecutive banks per warp)."""
    return n % 8 != 0


def hist_index(n: int, tpb: int, t, v: int, i: int, tx):
    """Index of entry i of history vector (t, v) (v = 0: u_t or a_t, v = 1: v_t or b_t) of thread tx's token."""
    if hist_vectors_contiguous(n):
        return ((t * 2 + v) * tpb + tx) * n + i
    return ((t * 2 + v) * n + i) * tpb + tx


def uses_exp_domain(plan: Plan) -> bool:
    """The factored exp domain serves eps = 0 (every n; eps > 0 stays in the log domain)."""
    return plan.eps == 0.0
