"""Sinkhorn-Knopp projection of the mHC residual mixing matrix (arXiv 2512.24880 Eq. 9): forward and backward.

Math (fp32 throughout; the same loop as ``mhc/reference.py``)
-------------------------------------------------------------
Per token, with L the n x n logits (rows i, columns j)::

    z = L
    for t in 1..iters:
        z[:, j] -= log(sum_i exp(z[i, j]) + eps)      # columns first ...
        z[i, :] -= log(sum_j exp(z[i, j]) + eps)      # ... then rows
    out = exp(z)

eps = 0 is exactly the paper's Eq. 9 (M0 = exp(L), then iters x (divide columns by their sums, then rows)), so
every row of ``out`` sums to 1. eps > 0 only changes each divisor from S to S + eps (rows then sum to S/(S + eps)).

Every log(sum exp + eps) is a shifted log-sum-exp (``normalize``): exp(x) = ex2(x * log2 e) and log = lg2 * ln 2,
one MUFU instruction each, with arguments kept in natural units until that multiply. All exp arguments are <= ~0.35
and the largest >= ~-0.35, so no exp of an unnormalised value is ever formed. For eps > 0 the shift is K = k ln 2
with the integer k = round(max(max z, ln eps) / ln 2) (1.5 * 2**23 rounding trick), so eps * exp(-K) = eps * 2**-k
is built from exponent bits: the eps term costs no MUFU op (shifts >= 2**20, i.e. logits >= ~1e6, use the exact
max; eps is negligible there). Finite logits of any size give no Inf/NaN; NaN propagates to its token.

Forward, log domain (eps > 0, and the fallback of the factored exp domain below): z itself is kept (registers, or
the thread's shared tile row for n >= 11) and updated in place, as the fp32 reference does, so huge logits lose no
accuracy to large offsets.

Backward (both domains): the exact derivative of the truncated iteration (the paper's choice). A half-step z' = z -
log(sum_d exp(z) + eps) along d has the VJP g <- g - exp(z') * sum_d(g), and out = exp(z) gives g = grad_out * out.
The log-domain recompute keeps z factorised as z[i, j] = L[i, j] + a[i] + b[j] (a column step rewrites b, a row step
a), so with a_t, b_t the offsets after iteration t (a_0 = b_0 = 0), P_t = exp(L + a_t[i] + b_t[j]) (after row step
t) and Q_t = exp(L + a_{t-1}[i] + b_t[j]) (after column step t)::

    g = grad_out * P_R
    for t = R..1:  g -= P_t * rowsum(g)[i];  g -= Q_t * colsum(g)[j]

Only the logits are read: the forward is recomputed on chip, recording a_t, b_t for t < R (2 * (iters - 1) * n
floats per token, not 2 * iters * n * n; a_R, b_R stay in registers). Q_t = P_t * exp(a_{t-1} - a_t)[i], and that
row factor equals rowsum(Q_t) + eps <= n + eps, so the product cannot overflow and an underflow costs at most
(n + eps) * 2**-149: one exp per row instead of n. The offsets carry an absolute error ~ulp(max |L|), so gradients
are as accurate as the fp32 reference for moderate logits and degrade only for |L| ~ 1e4 (where Sinkhorn is
saturated and the gradient is ~0 anyway).

Factored exp domain (eps = 0: the default, forward and backward, every n)
-------------------------------------------------------------------------
With K = exp(L - colmax(L)) (entries in [0, 1], every column's largest exactly 1; the shift cancels in the first
column step), the iterates are Q_t = diag(u_{t-1}) K diag(v_t) and P_t = diag(u_t) K diag(v_t) with u_0 = 1::

    v_t = 1 / (K^T u_{t-1})        u_t = 1 / (K v_t)        out = diag(u_R) K diag(v_R)

so a half-step is n dot products of length n (n * n FFMA) and n reciprocals (``__fdividef(1, s)``: MUFU.RCP,
rcp.approx, 1 ulp), and K is never rewritten. The backward works on H = G / K (entrywise): G = grad_out * P_R
becomes H = grad_out * u_R[i] * v_R[j], and the two VJPs of step t become rank-one updates that need no exp::

    H -= (u_t[i] * sum_j K H) v_t[j]          (row step t)
    H -= u_{t-1}[i] (v_t[j] * sum_i K H)      (column step t)

with G = K * H at the end: 4 FFMA per entry and iteration, no MUFU. The recompute records u_t, v_t for t < R
(2 * (iters - 1) * n floats per token, the same history as the log domain's a_t, b_t). The iteration is the fp32
reference's up to rounding; it is not a reformulation of the gradient. The scalings are recomputed from K at every
half-step, so rounding does not accumulate across iterations the way in-place scaling or log-domain offsets do.

Fallback: each normalising sum is tracked in a running minimum (one FMNMX). A token whose sums fall below 2**-64
(e.g. a row whose logits all sit more than ~44 below their columns' maxima), whose final scalings are not finite
(NaN or Inf logits), or whose backward result overflows or is not finite (huge or NaN grad_out), is recomputed in
the log domain from the staged logits: the same code as ``exp_domain=False`` builds, which is bit for bit what
such a token gets (tested in the emulation). Above 2**-64 a term flushed to zero (< 2**-126) changes its sum by
< 2**-62.

Accuracy (the tolerances the emulation asserts, ``pytest tests/emulation/test_sinkhorn_emulated.py``): against
float64, with every ex2/lg2/rcp.approx result moved by its documented worst-case error in either direction and
subnormals flushed, max |out - ref| <= 1e-6 and max |grad - ref| <= 4e-7 * max|grad_out| for N(0, 4) logits, n in
1..16; logits spanning 160 or more within a token stay finite and within 4e-7 * max|grad_out| * max(1, span / 50)
of float64 (through the fallback). Measured errors per n and logit scale: docs/benchmarks.md, "Sinkhorn".

Layouts and call contracts
--------------------------
All tensors are contiguous float32 ``[T, n, n]`` (row-major n x n per token) on the GPU; T = ``num_tokens`` is
dynamic (one binary per (n, iters, eps)); T = 0 must not be launched (zero-size grid), any T >= 1 is safe.

* ``sinkhorn_fwd_kernel(n, iters, eps)(logits, out)``
* ``sinkhorn_bwd_kernel(n, iters, eps)(grad_out, logits, grad_logits)``

Supported: 1 <= n <= 16, finite eps >= 0, iters >= 1 as long as one token's backward state fits the shared-memory
budget, i.e. iters - 1 <= (SMEM_BUDGET_BYTES / 4 - 2 * pitch) / (2n) (the forward alone has no limit); anything
else raises ValueError in the ``*_program`` functions.

Design
------
One token per thread, up to 128 tokens (threads) per block; plans, register placement and the shared-memory layouts
are in :mod:`tl_kernels.sinkhorn_plan`, the device-code building blocks in :mod:`tl_kernels.sinkhorn_emit`. A block
owns tpb * n * n contiguous floats: they are copied global -> shared coalesced (thread tx moves elements k * tpb +
tx, guarded by ``token < T``, missing tokens zero-filled and never stored) into a padded, conflict-free staging tile;
the output leaves the same way. Everything per token uses local arrays indexed by compile-time constants only (all
loops over n are unrolled), so it stays in registers; the iteration loops stay rolled. Exactly two barriers per
kernel (after the staging load, before the staging store; see ``sinkhorn_emit.PASS_CONFIGS``).

* Forward: eps = 0 runs the factored exp-domain iteration (above) on K in place of z (registers for n <= 10, with a
  register copy of the logits for the fallback; else the thread's tile row, and the fallback reloads the token from
  global memory), u and v in the two offset vectors; eps > 0 the log domain on z. Shared memory = tpb * pitch * 4 B.
* Backward: two staging tiles (logits; grad_out, which also carries the result out) plus the history of u_t, v_t
  (exp domain) or a_t, b_t (log domain): (2 * pitch + 2 * (iters - 1) * n) * 4 B per token. Exp domain (eps = 0): K
  and H in registers for n <= EXP_DOMAIN_REGS_MAX_N = 10, else in the rows of the two tiles (the fallback then
  reloads logits and grad_out from global memory); the recompute with its first and last iterations peeled (the last
  records nothing), then one pass over the rows per step (the pending column VJP of step t + 1 and the row VJP of
  step t share u_t). Log domain (eps > 0, and the fallback): the sweep loop fuses "column VJP of step t+1" and "row
  VJP of step t" into one pass over the rows, so each element of g is read and written once per iteration; P (kept
  from the previous sweep), L and g are placed greedily in registers, otherwise L/g live in the tile rows and Q_t is
  recomputed with exp.
* Flush-to-zero for the whole kernel (:data:`COMPILE_CONFIGS`, ``nvcc -ftz=true``): ex2/lg2 become their .ftz forms
  and ptxas drops the denormal fixups around them. Only results below 2**-126 change, to 0; every normalising sum is
  >= 0.7 in the log domain and >= 2**-64 on the exp-domain path. Kernels embedding this device code
  (tl_kernels/pre_finalize.py) compile with the same flags.

Verification without a GPU: the generated CUDA source runs on the CPU (tests/emulation: one std::thread per CUDA
thread, run one at a time between barriers; adversarial schedules and approximate math; AddressSanitizer) against
the float64 reference and autograd for n = 1..16, iters in {1, 2, 20}, eps in {0, 0.3}, partial last blocks: no
out-of-bounds access, every output written, nothing past T written; deleting either barrier of either kernel is
detected (tests/emulation/test_barrier_mutations.py). It cannot check timing or GPU memory-model subtleties.
Registers, shared memory, SASS per iteration and the performance model's time bounds per configuration:
docs/benchmarks.md, "Sinkhorn", each beside its command.
"""

from __future__ import annotations

import functools

import tilelang.language as T

from . import _common
from .sinkhorn_emit import (
    FLT_MAX,
    PASS_CONFIGS,
    Matrix,
    add,
    base_emitters,
    expf,
    factored_emitters,
    fence,
    forward_iteration,
    tree,
)
from .sinkhorn_plan import EXP_DOMAIN_REGS_MAX_N, SMEM_BUDGET_BYTES, bwd_plan, fwd_plan, hist_index, uses_exp_domain

__all__ = [
    "COMPILE_CONFIGS",
    "SMEM_BUDGET_BYTES",
    "forward_in_registers",
    "sinkhorn_bwd_kernel",
    "sinkhorn_bwd_program",
    "sinkhorn_fwd_kernel",
    "sinkhorn_fwd_program",
]

#: nvcc -ftz=true for every Sinkhorn kernel and every kernel embedding its device code (module docstring).
COMPILE_CONFIGS = {"tl.device_compile_flags": ["-ftz=true"]}

# The plans under their former private names, for callers outside the family (mhc/_cuda.py checks the backward's
# shared-memory budget with _bwd_plan).
_fwd_plan, _bwd_plan, _uses_exp_domain = fwd_plan, bwd_plan, uses_exp_domain


def forward_in_registers(n: int, iters: int, eps: float):
    """The Sinkhorn forward device code of :func:`sinkhorn_fwd_program`, for other kernels (the fused pre-mapping):
    a macro ``(z, a, b, w)`` where ``z`` is a thread-local ``(n * n,)`` fp32 array holding one token's logits
    (row-major); afterwards ``z`` holds h_res. Needs the register variant of the plan (n <= 10); a, b, w are local
    ``(n,)`` scratch arrays."""
    plan = fwd_plan(n, iters, eps)
    if not plan.logits_in_regs:
        raise ValueError(f"sinkhorn: forward_in_registers supports n <= 10, got n={n}")
    iterate = forward_iteration(plan)

    @T.macro
    def run(z, a, b, w):
        iterate(Matrix(n, z, None, None), a, b, w, None, None, None, None)

    return run


def sinkhorn_fwd_program(n: int, iters: int, eps: float, exp_domain: bool = True):
    """TileLang program ``kernel(logits[T, n, n] fp32, out[T, n, n] fp32)``; see the module docstring.
    ``exp_domain=False`` builds the previous log-domain forward, kept for timing comparisons on a GPU."""
    plan = fwd_plan(n, iters, eps)
    n, iters, tpb, pitch = plan.n, plan.iters, plan.tokens_per_block, plan.pitch
    load_tile, store_tile, _, _ = base_emitters(plan)
    iterate = forward_iteration(plan, exp_domain)
    num_tokens = T.dynamic("num_tokens")

    @T.prim_func
    def sinkhorn_fwd(
        logits: T.Tensor((num_tokens, n, n), T.float32),
        out: T.Tensor((num_tokens, n, n), T.float32),
    ):
        T.annotate_pass_configs(PASS_CONFIGS)
        with T.Kernel(T.ceildiv(num_tokens, tpb), threads=tpb) as bx:
            tx = T.get_thread_binding()
            tile = T.alloc_shared((tpb * pitch,), T.float32)
            a = T.alloc_local((n,), T.float32)
            b = T.alloc_local((n,), T.float32)
            w = T.alloc_local((n,), T.float32)
            lg_regs = T.alloc_local((n * n,), T.float32) if plan.logits_in_regs else None
            lg = Matrix(n, lg_regs, tile, tx * pitch)  # the iterate z, initialised with the logits

            load_tile(logits, tile, bx, tx, num_tokens)
            T.sync_threads()  # from here on every thread touches only its own tile row until the store
            if plan.logits_in_regs:
                for q in T.unroll(n * n):
                    lg_regs[q] = tile[tx * pitch + q]
            iterate(lg, a, b, w, logits, bx, tx, num_tokens)
            if plan.logits_in_regs:  # h_res into the thread's own tile row (the shared variant has it there already)
                for q in T.unroll(n * n):
                    tile[tx * pitch + q] = lg_regs[q]
            T.sync_threads()  # the store reads other threads' tile rows
            store_tile(tile, out, bx, tx, num_tokens)

    return sinkhorn_fwd


def sinkhorn_bwd_program(n: int, iters: int, eps: float, exp_domain: bool = True):
    """TileLang program ``kernel(grad_out[T, n, n], logits[T, n, n], grad_logits[T, n, n])``, all fp32.
    ``exp_domain=False`` builds the previous log-domain-only backward, kept for timing comparisons on a GPU."""
    plan = bwd_plan(n, iters, eps)
    n, iters, tpb, pitch = plan.n, plan.iters, plan.tokens_per_block, plan.pitch
    use_exp = exp_domain and uses_exp_domain(plan)
    iterate_scalings, _, exp_sweep, reload_row, factored_ok = factored_emitters(plan)
    load_tile, store_tile, col_step, row_step = base_emitters(plan)
    num_tokens = T.dynamic("num_tokens")

    @T.macro
    def record(hist, tx, t, v, vec):
        # Offsets after iteration t + 1 (v = 0: a, v = 1: b), kept for t + 1 < iters only.
        if t < iters - 1:
            for i in T.unroll(n):
                hist[hist_index(n, tpb, t, v, i, tx)] = vec[i]

    @T.macro
    def sweep(lg, g, p, a_cur, b_cur, a_nxt, b_nxt, cs, cs_nxt, prow, col_vjp, row_vjp, init):
        """One sweep over the rows of the token, for backward step t (a_cur = a_t, b_cur = b_t; a_nxt = a_{t+1},
        b_nxt = b_{t+1}, cs_nxt = colsum of dL/dz after the column step t+1):
          col_vjp: g -= Q_{t+1} * cs_nxt[j]   with Q_{t+1} = exp(lg + a_t[i] + b_{t+1}[j])  (column step t+1)
          row_vjp: g -= P_t * rowsum_i(g)     with P_t = exp(lg + a_t[i] + b_t[j])          (row step t)
                   and cs[j] += g (the column sums the next sweep's col_vjp needs)
          init:    g = grad_out * P_R first (t = R)."""
        for i in T.unroll(n):
            if lg.regs is None or g.regs is None:
                fence()  # one row live: no merged or hoisted shared loads (CSE_NOTE)
            if col_vjp:
                if plan.p_in_regs:
                    # p holds P_{t+1}; Q_{t+1} = P_{t+1} * exp(a_t - a_{t+1}) and that row factor is
                    # rowsum(Q_{t+1}) + eps <= n + eps, so the product cannot overflow.
                    rf = expf(a_cur[i] - a_nxt[i])
                    for j in T.unroll(n):
                        g.buf[g.idx(i, j)] -= p[i * n + j] * rf * cs_nxt[j]
                else:
                    for j in T.unroll(n):
                        qv = expf(lg.buf[lg.idx(i, j)] + a_cur[i] + b_nxt[j])
                        g.buf[g.idx(i, j)] -= qv * cs_nxt[j]
            if row_vjp:
                for j in T.unroll(n):
                    prow[j] = expf(lg.buf[lg.idx(i, j)] + a_cur[i] + b_cur[j])
                if init:
                    for j in T.unroll(n):
                        g.buf[g.idx(i, j)] = g.tile[g.row_base + i * n + j] * prow[j]
                rs = tree(add, [g.buf[g.idx(i, j)] for j in range(n)])
                for j in T.unroll(n):
                    g.buf[g.idx(i, j)] -= prow[j] * rs
                    cs[j] += g.buf[g.idx(i, j)]
                if plan.p_in_regs:
                    for j in T.unroll(n):
                        p[i * n + j] = prow[j]

    @T.macro
    def exp_domain_backward(kk, hh, tile_g, hist, tx, u, v, cc, cs, mn, acc, ok):
        """The factored exp-domain backward (eps = 0). kk holds the logits and becomes K; hh becomes H = G / K (from
        grad_out in tile_g's row) and then the gradient G. Registers (n <= EXP_DOMAIN_REGS_MAX_N): the result goes to
        tile_g's row only when ok; tile rows otherwise (kk, hh = the rows of tile_l, tile_g). ok[0] = 0 sends the
        token to the log-domain path."""
        iterate_scalings(kk, u, v, mn, hist, tx)  # the forward recompute, recording u_t, v_t for t < R
        ok[0] = T.if_then_else(factored_ok(u, v, mn), T.int32(1), T.int32(0))
        if ok[0] != 0:
            # H = G / K with G = grad_out * P_R = grad_out * K * u_R v_R^T.
            for i in T.unroll(n):
                if hh.regs is None:
                    fence()  # one row live: no merged or hoisted shared loads (CSE_NOTE)
                for j in T.unroll(n):
                    hh.buf[hh.idx(i, j)] = tile_g[tx * pitch + i * n + j] * u[i] * v[j]
            exp_sweep(kk, hh, u, v, cc, cs, False)  # step R
            if iters > 1:
                for k in T.serial(iters - 1):  # steps t = R - 1 .. 1: u_t, v_t sit in slot t - 1 = R - 2 - k
                    slot = iters - 2 - k
                    for i in T.unroll(n):
                        u[i] = hist[hist_index(n, tpb, slot, 0, i, tx)]
                        v[i] = hist[hist_index(n, tpb, slot, 1, i, tx)]
                    exp_sweep(kk, hh, u, v, cc, cs, True)
            # The column VJP of step 1 (u_0 = 1), then G = K * H; |G| summed to catch an overflow or NaN.
            acc[0] = T.float32(0)
            for i in T.unroll(n):
                if hh.regs is None:
                    fence()  # one row live: no merged or hoisted shared loads (CSE_NOTE)
                for j in T.unroll(n):
                    hh.buf[hh.idx(i, j)] = kk.buf[kk.idx(i, j)] * (hh.buf[hh.idx(i, j)] - cc[j])
                    acc[0] = acc[0] + T.abs(hh.buf[hh.idx(i, j)])
            if acc[0] <= T.float32(FLT_MAX):
                if hh.regs is not None:
                    for q in T.unroll(n * n):
                        tile_g[tx * pitch + q] = hh.regs[q]
            else:  # an overflow in H (or NaN/Inf in grad_out): the log-domain path decides
                ok[0] = T.int32(0)

    @T.macro
    def log_domain_backward(lg, g, p, lg_regs, tile_l, tile_g, hist, tx, a, b, w, a_nxt, b_nxt, cs, cs_nxt, prow):
        """The log-domain backward (every plan; the fallback of the exp-domain one): result in tile_g's row."""
        if plan.logits_in_regs:
            for q in T.unroll(n * n):
                lg_regs[q] = tile_l[tx * pitch + q]
        for i in T.unroll(n):
            a[i] = T.float32(0)
            b[i] = T.float32(0)

        # Forward recompute, recording the cumulative offsets after every half-step but the last two.
        for t in T.serial(iters):
            col_step(lg, a, b, w, False)
            if iters > 1:
                record(hist, tx, t, 1, b)
            row_step(lg, a, b, w, False)
            if iters > 1:
                record(hist, tx, t, 0, a)

        # Backward. a, b now hold a_R, b_R and play a_cur, b_cur: sweep t = R (init + row VJP of step R).
        for j in T.unroll(n):
            cs[j] = T.float32(0)
        sweep(lg, g, p, a, b, a_nxt, b_nxt, cs, cs_nxt, prow, False, True, True)
        # Sweeps t = R-1 .. 1: column VJP of step t+1, then row VJP of step t.
        if iters > 1:
            for k in T.serial(iters - 1):
                t = iters - 2 - k  # hist slot of a_{t'}, b_{t'} with t' = iters - 1 - k
                for i in T.unroll(n):
                    a_nxt[i] = a[i]
                    b_nxt[i] = b[i]
                    cs_nxt[i] = cs[i]
                    cs[i] = T.float32(0)
                    a[i] = hist[hist_index(n, tpb, t, 0, i, tx)]
                    b[i] = hist[hist_index(n, tpb, t, 1, i, tx)]
                sweep(lg, g, p, a, b, a_nxt, b_nxt, cs, cs_nxt, prow, True, True, False)
        # Last sweep: column VJP of step 1, with a_0 = 0.
        for i in T.unroll(n):
            a_nxt[i] = a[i]
            b_nxt[i] = b[i]
            cs_nxt[i] = cs[i]
            a[i] = T.float32(0)
        sweep(lg, g, p, a, b, a_nxt, b_nxt, cs, cs_nxt, prow, True, False, False)

        if plan.grad_in_regs:
            for i in T.unroll(n):
                for j in T.unroll(n):
                    tile_g[tx * pitch + i * n + j] = g.buf[g.idx(i, j)]

    @T.prim_func
    def sinkhorn_bwd(
        grad_out: T.Tensor((num_tokens, n, n), T.float32),
        logits: T.Tensor((num_tokens, n, n), T.float32),
        grad_logits: T.Tensor((num_tokens, n, n), T.float32),
    ):
        T.annotate_pass_configs(PASS_CONFIGS)
        with T.Kernel(T.ceildiv(num_tokens, tpb), threads=tpb) as bx:
            tx = T.get_thread_binding()
            tile_l = T.alloc_shared((tpb * pitch,), T.float32)
            tile_g = T.alloc_shared((tpb * pitch,), T.float32)
            # hist[hist_index(n, tpb, t, v, i, tx)], t < iters - 1: u_{t+1} or a_{t+1} (v = 0) and v_{t+1} or b_{t+1}
            # (v = 1) of thread tx's token; layout and conflict-freedom in tl_kernels/sinkhorn_plan.py.
            hist = T.alloc_shared(((iters - 1) * 2 * n * tpb,), T.float32) if iters > 1 else None
            a = T.alloc_local((n,), T.float32)
            b = T.alloc_local((n,), T.float32)
            w = T.alloc_local((n,), T.float32)
            a_nxt = T.alloc_local((n,), T.float32)
            b_nxt = T.alloc_local((n,), T.float32)
            cs = T.alloc_local((n,), T.float32)
            cs_nxt = T.alloc_local((n,), T.float32)
            prow = T.alloc_local((n,), T.float32)
            p = T.alloc_local((n * n,), T.float32) if plan.p_in_regs else None
            lg_regs = T.alloc_local((n * n,), T.float32) if plan.logits_in_regs else None
            g_regs = T.alloc_local((n * n,), T.float32) if plan.grad_in_regs else None
            lg = Matrix(n, lg_regs, tile_l, tx * pitch)  # the logits
            g = Matrix(n, g_regs, tile_g, tx * pitch)  # running gradient; tile_g holds grad_out until the init sweep
            ok = T.alloc_local((1,), T.int32)

            load_tile(logits, tile_l, bx, tx, num_tokens)
            load_tile(grad_out, tile_g, bx, tx, num_tokens)
            T.sync_threads()  # from here on every thread touches only its own tile rows and hist column
            ok[0] = T.int32(0)
            if use_exp:
                mn = T.alloc_local((1,), T.float32)
                acc = T.alloc_local((1,), T.float32)
                if n <= EXP_DOMAIN_REGS_MAX_N:
                    k_ = T.alloc_local((n * n,), T.float32)
                    h = T.alloc_local((n * n,), T.float32)
                    for q in T.unroll(n * n):
                        k_[q] = tile_l[tx * pitch + q]
                    kk, hh = Matrix(n, k_, None, None), Matrix(n, h, None, None)
                else:  # K and H overwrite the thread's tile rows; the fallback reloads them
                    kk, hh = Matrix(n, None, tile_l, tx * pitch), Matrix(n, None, tile_g, tx * pitch)
                exp_domain_backward(kk, hh, tile_g, hist, tx, a, b, a_nxt, cs, mn, acc, ok)
                if n > EXP_DOMAIN_REGS_MAX_N:  # noqa: SIM102 - compile-time test, then the token's run-time one
                    if ok[0] == 0:
                        reload_row(logits, tile_l, bx, tx, num_tokens)
                        reload_row(grad_out, tile_g, bx, tx, num_tokens)
            if ok[0] == 0:
                log_domain_backward(
                    lg, g, p, lg_regs, tile_l, tile_g, hist, tx, a, b, w, a_nxt, b_nxt, cs, cs_nxt, prow
                )
            T.sync_threads()  # the store reads other threads' tile rows
            store_tile(tile_g, grad_logits, bx, tx, num_tokens)

    return sinkhorn_bwd


@functools.cache
def sinkhorn_fwd_kernel(n: int, iters: int, eps: float, exp_domain: bool = True):
    """Compiled forward kernel (memoised here and in TileLang's disk cache)."""
    return _common.compile_program(sinkhorn_fwd_program(n, iters, eps, exp_domain), pass_configs=COMPILE_CONFIGS)


@functools.cache
def sinkhorn_bwd_kernel(n: int, iters: int, eps: float, exp_domain: bool = True):
    """Compiled backward kernel (memoised here and in TileLang's disk cache)."""
    return _common.compile_program(sinkhorn_bwd_program(n, iters, eps, exp_domain), pass_configs=COMPILE_CONFIGS)
