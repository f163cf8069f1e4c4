"""Device-code building blocks of the Sinkhorn kernels (:mod:`tl_kernels.sinkhorn`): a per-thread matrix that lives
in registers or in shared memory, and the emitter factories that turn a :class:`~tl_kernels.sinkhorn_plan.Plan` into
TileLang macros.

* :class:`Matrix`: one token's n x n fp32 matrix, either a local array indexed by compile-time constants only (so
  it stays in registers) or the thread's own row of a shared staging tile; macros index it through ``buf`` and
  ``idx(i, j)`` and never ask which.
* :func:`base_emitters`: the coalesced global <-> shared staging copies and the log-domain half-steps (a shifted
  log-sum-exp per row or column, eps folded in from exponent bits).
* :func:`factored_emitters`: the factored exp-domain iteration (eps = 0): K = exp(L - colmax), half-steps as n dot
  products and n reciprocals, the backward's sweep on H = G / K, the fallback test.
* :func:`forward_iteration`: the whole forward iteration on a Matrix (exp domain with log-domain fallback, or log
  domain only), also embedded by :mod:`tl_kernels.pre_finalize`.

Synchronisation is placed by hand (:data:`PASS_CONFIGS`): the kernels have exactly two ``__syncthreads`` each, one
after the staging load (other threads' elements land in this thread's tile row) and one before the staging store
(this thread stores other threads' rows); between them every thread touches only its own tile rows and history
entries. The block-scope fences of :func:`fence` order no memory between threads: they only keep nvcc and ptxas from
merging and hoisting shared loads (:data:`CSE_NOTE`).
"""

from __future__ import annotations

import functools
import math

import tilelang.language as T

from .sinkhorn_plan import Plan, hist_index, uses_exp_domain

__all__ = [
    "CSE_NOTE", "EXP_DOMAIN_TINY", "FLT_MAX", "PASS_CONFIGS", "Matrix", "add", "base_emitters", "dot", "expf",
    "factored_emitters", "fence", "forward_iteration", "rcp", "tree",
]  # fmt: skip

# Unroll factor of the staging copies (global <-> shared) when a tile has more than that many entries per token.
_TILE_UNROLL = 32

#: Barriers are placed by hand: TileLang's automatic pass cannot prove that thread tx only touches its own tile row
#: and history entries, and would put a __syncthreads() inside the unrolled per-row loops. Shared-memory reuse must
#: then be off as well: the lifetime-based merge may overlay the history on the logits tile (it did for iters = 1),
#: which is only race-free behind the barrier the automatic pass would have added. The budget never assumes reuse.
PASS_CONFIGS = {"tl.disable_thread_storage_sync": True, "tl.disable_shared_memory_reuse": True}

#: Why a shared-memory Matrix gets a fence per row or column: nvcc merges the column step's n * n loads with the
#: row step's (nothing writes the logits after the prologue) and ptxas hoists later rows' loads to the top of the
#: huge unrolled basic block, so all n * n values end up live (255 registers and spills at n = 16). A block-scope
#: fence (membar.cta) before each row or column stops both, so only one row or column is live at a time.
CSE_NOTE = "one row or column of a shared-memory matrix live at a time (see tl_kernels.sinkhorn_emit)"

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Round-to-integer trick: for |x| < 2**22, (x + 1.5 * 2**23) has round(x) in its low mantissa bits.
_MAGIC = 12582912.0
_MAGIC_BITS = 0x4B400000
_BIG = 2.0**20  # above this shift the eps term is negligible and the trick above is not needed (nor valid)


class Matrix:
    """A per-thread n x n fp32 matrix that lives either in registers (a local array indexed by compile-time
    constants only, so it never touches local memory) or in the thread's own row of a shared staging tile."""

    def __init__(self, n: int, regs, tile, row_base):
        self.n = n
        self.regs = regs
        self.tile = tile
        self.row_base = row_base  # tx * pitch (PrimExpr) for the shared variant

    @property
    def buf(self):
        return self.regs if self.regs is not None else self.tile

    def idx(self, i, j):
        q = i * self.n + j
        return q if self.regs is not None else self.row_base + q


def base_emitters(plan: Plan):
    """TileLang macros shared by the forward and backward programs, specialised on ``plan``'s constants."""
    n, nn, tpb, pitch = plan.n, plan.n * plan.n, plan.tokens_per_block, plan.pitch
    # Staging copies: fully unrolled for small tiles; otherwise #pragma unroll _TILE_UNROLL keeps that many loads
    # in flight per thread.
    tile_loop = T.unroll if nn <= _TILE_UNROLL else functools.partial(T.unroll, unroll_factor=_TILE_UNROLL)
    with_eps = plan.eps > 0.0
    if with_eps:
        # eps = eps_m * 2**eps_e exactly, eps_m in [1, 2): eps * 2**-k is then built from the exponent bits.
        mant, expo = math.frexp(plan.eps)
        eps_m, eps_e = 2.0 * mant, expo - 1
        ln_eps = math.log(plan.eps)

    @T.macro
    def load_tile(src, tile, bx, tx, num_tokens):
        # The block owns tokens [bx * tpb, bx * tpb + tpb): tpb * n * n contiguous floats. Thread tx moves elements
        # e = k * tpb + tx (coalesced) into the padded tile; tokens past the end are zero-filled, never read.
        for k in tile_loop(nn):
            e = k * tpb + tx
            tok = e // nn
            q = e % nn
            if bx * tpb + tok < num_tokens:
                tile[tok * pitch + q] = src[bx * tpb + tok, q // n, q % n]
            else:
                tile[tok * pitch + q] = T.float32(0)

    @T.macro
    def store_tile(tile, dst, bx, tx, num_tokens):
        for k in tile_loop(nn):
            e = k * tpb + tx
            tok = e // nn
            q = e % nn
            if bx * tpb + tok < num_tokens:
                dst[bx * tpb + tok, q // n, q % n] = tile[tok * pitch + q]

    @T.macro
    def normalize(w, own, dst, d):
        """dst[d] <- own - log(sum_k exp(w[k] + own) + eps): one Sinkhorn half-step for one row or column whose
        entries are z_k = w[k] + own (own = the offset being updated). Shift-invariant log-sum-exp with shift
        K ~ max z: every exp argument is <= ~0.35 and the largest >= ~-0.35, so s is in [0.7, 2n + 2] and nothing
        over/underflows. Max and sum are balanced trees (depth ceil(log2 n)): this chain is the critical path."""
        c = T.alloc_var(T.float32)  # -K + own: z_k - K = w[k] + c
        mx = tree(T.max, [w[k] for k in range(n)])
        if with_eps:
            # K = k * ln 2 with the integer k = round(max(max z, ln eps) / ln 2), so that eps * exp(-K) = eps * 2**-k
            # is built from exponent bits and costs no MUFU op. Only the first column step can see a shift above
            # 2**20 (logits above ~1e6); eps is negligible there and the exact max is used instead.
            mm = T.max(mx + own, T.float32(ln_eps))
            rnd = T.alloc_var(T.float32)
            rnd = mm * T.float32(LOG2E) + T.float32(_MAGIC)  # own statement: must not be folded with the "- _MAGIC"
            ki = T.reinterpret(rnd, T.int32) - T.int32(_MAGIC_BITS)  # k (exact while |mm / ln 2| < 2**22)
            e2 = T.max(T.int32(eps_e) - ki, T.int32(-127))  # <= 0 because k >= round(log2 eps) >= eps_e
            eps_term = T.float32(eps_m) * T.reinterpret(T.shift_left(e2 + T.int32(127), T.int32(23)), T.float32)
            big = mm >= T.float32(_BIG)
            c = own - T.Select(big, mm, (rnd - T.float32(_MAGIC)) * T.float32(LN2))
            extra = [T.Select(big, T.float32(0), eps_term)]
        else:
            c = -mx  # eps = 0: the result does not depend on own
            extra = []
        s = tree(add, [expf(w[k] + c) for k in range(n)] + extra)
        dst[d] = c - T.__log2(s) * T.float32(LN2)

    @T.macro
    def col_step(lg, a, b, w, fold):
        """Normalise every column j of z[i, j] = lg[i, j] + a[i] + b[j] by updating b[j]. fold (forward): lg holds
        z itself and a = b = 0; each column's update is added into z instead. That is the fp32 reference's own form:
        z keeps its small normalised magnitudes, so huge logits lose no accuracy to big offsets a, b."""
        for j in T.unroll(n):
            if lg.regs is None:
                fence()  # one row live: no merged or hoisted shared loads (CSE_NOTE)
            for i in T.unroll(n):
                w[i] = lg.buf[lg.idx(i, j)] if fold else lg.buf[lg.idx(i, j)] + a[i]
            normalize(w, b[j], b, j)
            if fold:
                for i in T.unroll(n):
                    lg.buf[lg.idx(i, j)] += b[j]
                b[j] = T.float32(0)

    @T.macro
    def row_step(lg, a, b, w, fold):
        """Normalise every row i by updating a[i] (uses the b of the column step just done); fold as above."""
        for i in T.unroll(n):
            if lg.regs is None:
                fence()  # one row live: no merged or hoisted shared loads (CSE_NOTE)
            for j in T.unroll(n):
                w[j] = lg.buf[lg.idx(i, j)] if fold else lg.buf[lg.idx(i, j)] + b[j]
            normalize(w, a[i], a, i)
            if fold:
                for j in T.unroll(n):
                    lg.buf[lg.idx(i, j)] += a[i]
                a[i] = T.float32(0)

    return load_tile, store_tile, col_step, row_step


def expf(x):
    """exp(x) as one MUFU ex2. The argument stays in natural units until this multiply, so differences of large
    logits (|L| ~ 1e4) are formed exactly as in the fp32 reference instead of after a lossy log2(e) scaling."""
    return T.exp2(x * T.float32(LOG2E))


def add(x, y):
    return x + y


def tree(op, values: list):
    """op-reduce a Python list of PrimExprs as a balanced tree (shorter dependency chain than a left fold)."""
    while len(values) > 1:
        values = [op(values[k], values[k + 1]) if k + 1 < len(values) else values[k] for k in range(0, len(values), 2)]
    return values[0]


def fence():
    """membar.cta: orders this thread's shared-memory accesses, so ptxas cannot hoist the next row's loads above
    it (see CSE_NOTE). Nothing is outstanding at that point, so it costs a few cycles."""
    T.evaluate(T.call_extern("void", "__threadfence_block"))


# Factored exp-domain iteration (registers, eps = 0): a normalising sum below this sends the token to the log-domain
# path. Above it, a term flushed to zero (< 2**-126) changes its sum by less than 2**-62 relative.
EXP_DOMAIN_TINY = 2.0**-64
FLT_MAX = 3.4028234663852886e38


def rcp(x):
    """1 / x as ``__fdividef(1, x)``: one MUFU.RCP (rcp.approx.ftz, 1 ulp) under -ftz=true."""
    return T.call_extern("float32", "__fdividef", T.float32(1), x)


def dot(xs: list, ys: list):
    """sum_k xs[k] * ys[k] as a left fold: nvcc contracts it into one FMUL and n - 1 dependent FFMAs (the n rows or
    columns of a half-step are independent, which is the ILP)."""
    acc = xs[0] * ys[0]
    for x, y in zip(xs[1:], ys[1:], strict=True):
        acc = acc + x * y
    return acc


def factored_emitters(plan: Plan):
    """Device code of the factored exp-domain Sinkhorn (eps = 0), shared by the forward and the backward, on Matrix
    accessors (registers, or the thread's tile row with a fence per row or column, see CSE_NOTE).

    With K = exp(L - colmax(L)) (every entry in [0, 1], every column's largest exactly 1) the iterate after column
    step t is Q_t = diag(u_{t-1}) K diag(v_t) and after row step t P_t = diag(u_t) K diag(v_t), u_0 = 1, with
    v_t = 1 / (K^T u_{t-1}) and u_t = 1 / (K v_t) (eps = 0 makes the divisor the plain sum). A half-step is n dot
    products of length n and n reciprocals: n * n FFMA + n MUFU.RCP, and K itself is never rewritten. The smallest
    normalising sum is tracked (one FMNMX per sum); the caller's ``factored_ok`` test then sends a token whose sums
    got tiny, or whose scalings are not finite (NaN/Inf logits), to the log-domain path."""
    n, iters, tpb, pitch = plan.n, plan.iters, plan.tokens_per_block, plan.pitch

    @T.macro
    def first_column_step(m, v):
        """m: logits -> K; v <- v_1 = 1 / colsum(K) (colsum >= 1: no test needed)."""
        for j in T.unroll(n):
            if m.regs is None:
                fence()  # one row live: no merged or hoisted shared loads (CSE_NOTE)
            mx = tree(T.max, [m.buf[m.idx(i, j)] for i in range(n)])
            for i in T.unroll(n):
                m.buf[m.idx(i, j)] = expf(m.buf[m.idx(i, j)] - mx)
            v[j] = rcp(tree(add, [m.buf[m.idx(i, j)] for i in range(n)]))

    @T.macro
    def scale(m, src, dst, mn, cols):
        """A half-step: dst[k] <- 1 / sum_l m[l, k] src[l] (cols: v from u) or 1 / sum_l m[k, l] src[l] (rows: u
        from v); the running minimum mn[0] takes every sum."""
        for k in T.unroll(n):
            if m.regs is None:
                fence()  # one row live: no merged or hoisted shared loads (CSE_NOTE)
            s = dot([m.buf[m.idx(l, k) if cols else m.idx(k, l)] for l in range(n)], [src[l] for l in range(n)])
            mn[0] = T.min(mn[0], s)
            dst[k] = rcp(s)

    @T.macro
    def record_uv(hist, tx, slot, u, v):
        for i in T.unroll(n):
            hist[hist_index(n, tpb, slot, 0, i, tx)] = u[i]
            hist[hist_index(n, tpb, slot, 1, i, tx)] = v[i]

    @T.macro
    def iterate_scalings(m, u, v, mn, hist, tx):
        """The whole forward iteration: m: logits -> K, u, v <- u_R, v_R, mn[0] <- the smallest normalising sum.
        With ``hist`` (the backward's recompute) u_t, v_t of every t < R are recorded in slot t - 1, the first and
        last iterations peeled so that the loop records unconditionally."""
        first_column_step(m, v)
        mn[0] = T.float32(FLT_MAX)
        scale(m, v, u, mn, False)
        if hist is None:
            for _t in T.serial(iters - 1):
                scale(m, u, v, mn, True)
                scale(m, v, u, mn, False)
        elif iters > 1:
            record_uv(hist, tx, 0, u, v)
            for t in T.serial(iters - 2):
                scale(m, u, v, mn, True)
                scale(m, v, u, mn, False)
                record_uv(hist, tx, t + 1, u, v)
            scale(m, u, v, mn, True)
            scale(m, v, u, mn, False)

    @T.macro
    def apply_scalings(m, u, v):
        """m: K -> diag(u) K diag(v)."""
        for i in T.unroll(n):
            if m.regs is None:
                fence()  # one row live: no merged or hoisted shared loads (CSE_NOTE)
            for j in T.unroll(n):
                m.buf[m.idx(i, j)] = m.buf[m.idx(i, j)] * u[i] * v[j]

    @T.macro
    def sweep(kk, hh, u, v, cc, cs, pending):
        """Backward step t on H = G / K (u = u_t, v = v_t), one pass over the rows: first the column VJP of step
        t + 1 (``pending``; cc = v_{t+1} * colsum(K * H) from the previous sweep, and u_t is its row factor too),
        then the row VJP of step t; leaves cc = v_t * colsum(K * H) for the next sweep::

            H -= u_t[i] cc[j];   H -= (u_t[i] sum_j K H) v_t[j];   cs[j] += K H

        4 FFMA per entry, no MUFU."""
        for j in T.unroll(n):
            cs[j] = T.float32(0)
        for i in T.unroll(n):
            if kk.regs is None:
                fence()  # one row live: no merged or hoisted shared loads (CSE_NOTE)
            if pending:
                for j in T.unroll(n):
                    hh.buf[hh.idx(i, j)] = hh.buf[hh.idx(i, j)] - u[i] * cc[j]
            r = u[i] * dot([kk.buf[kk.idx(i, j)] for j in range(n)], [hh.buf[hh.idx(i, j)] for j in range(n)])
            for j in T.unroll(n):
                hh.buf[hh.idx(i, j)] = hh.buf[hh.idx(i, j)] - r * v[j]
                cs[j] = cs[j] + kk.buf[kk.idx(i, j)] * hh.buf[hh.idx(i, j)]
        for j in T.unroll(n):
            cc[j] = v[j] * cs[j]

    @T.macro
    def reload_row(src, tile, bx, tx, num_tokens):
        """The thread's own token from global memory into its tile row: the fallback of a shared-memory plan, whose
        K (and H) overwrote the staged inputs. Rare, so the uncoalesced loads do not matter."""
        if bx * tpb + tx < num_tokens:
            for i in T.unroll(n):
                fence()  # one row live: no merged or hoisted shared loads (CSE_NOTE)
                for j in T.unroll(n):
                    tile[tx * pitch + i * n + j] = src[bx * tpb + tx, i, j]

    def factored_ok(u, v, mn):
        """True when every sum was >= 2**-64 and the final scalings are finite (NaN fails both comparisons; fminf
        ignores NaN, hence the second test: a NaN anywhere reaches every u and v)."""
        scal = tree(add, [u[k] for k in range(n)] + [v[k] for k in range(n)])
        return T.And(mn[0] >= T.float32(EXP_DOMAIN_TINY), scal <= T.float32(FLT_MAX))

    return iterate_scalings, apply_scalings, sweep, reload_row, factored_ok


def forward_iteration(plan: Plan, exp_domain: bool = True):
    """The forward iteration as one macro ``(lg, a, b, w)`` on the Matrix lg (registers or the thread's tile row),
    which holds the logits before and ``h_res`` after; a, b, w are n-vectors of scratch.

    Register plans with eps = 0 run the factored exp-domain iteration (module docstring): K = exp(L - colmax)
    replaces the logits in lg, a and b hold the row and column scalings u, v, and every half-step is n dot products
    and n reciprocals (``__fdividef``: rcp.approx, 1 ulp), no exp or log. A normalising sum below 2**-64 or
    non-finite scalings (underflow, NaN/Inf logits) mark the token, which is then recomputed in the log domain from a
    register copy of its logits (from global memory for the shared-memory plans), so extreme logits behave exactly
    as with ``exp_domain=False``. Other plans run the log-domain iteration in fold mode and exponentiate at the end."""
    n = plan.n
    _, _, col_step, row_step = base_emitters(plan)

    @T.macro
    def log_domain(lg, a, b, w):
        for i in T.unroll(n):
            a[i] = T.float32(0)
            b[i] = T.float32(0)
        for _t in T.serial(plan.iters):
            col_step(lg, a, b, w, True)
            row_step(lg, a, b, w, True)
        for i in T.unroll(n):
            if lg.regs is None:
                fence()  # one row live: no merged or hoisted shared loads (CSE_NOTE)
            for j in T.unroll(n):
                lg.buf[lg.idx(i, j)] = expf(lg.buf[lg.idx(i, j)])

    if not (exp_domain and uses_exp_domain(plan)):

        @T.macro
        def log_only(lg, a, b, w, src, bx, tx, num_tokens):
            log_domain(lg, a, b, w)

        return log_only
    iterate_scalings, apply_scalings, _, reload_row, factored_ok = factored_emitters(plan)

    @T.macro
    def iterate(lg, a, b, w, src, bx, tx, num_tokens):
        u, v = a, b  # row and column scalings: P_t = diag(u_t) K diag(v_t); lg: the logits, then K, then h_res
        z0 = T.alloc_local((n * n,), T.float32) if lg.regs is not None else None
        if lg.regs is not None:
            for q in T.unroll(n * n):
                z0[q] = lg.regs[q]
        mn = T.alloc_local((1,), T.float32)
        iterate_scalings(lg, u, v, mn, None, None)
        apply_scalings(lg, u, v)
        # ok as an int first: TVM rewrites not(a >= b and c <= d) as (a < b or d < c), which is false for NaN
        ok = T.alloc_local((1,), T.int32)
        ok[0] = T.if_then_else(factored_ok(u, v, mn), T.int32(1), T.int32(0))
        if ok[0] == 0:  # underflow or NaN/Inf: the log-domain path from the logits
            if lg.regs is not None:
                for q in T.unroll(n * n):
                    lg.regs[q] = z0[q]
            else:
                reload_row(src, lg.tile, bx, tx, num_tokens)
            log_domain(lg, a, b, w)

    return iterate
