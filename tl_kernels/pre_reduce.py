"""The last launch of the pre-mapping backward: the fixed-order sums of ``pre_proj_bwd``'s partials, general n.

Math (``m = n * n + 2n``; the partials come from :mod:`tl_kernels.pre_proj`'s backward, one row per token tile)::

    d_phi[e]   = sum_{s < S} d_phi_part[s, e]                  (split order; only with S > 1 splits)
    d_bias[j]  = sum_{r < R} d_coef_part[r, j]                 (j < m)
    d_alpha[g] = sum_{j in g} sum_{r < R} d_coef_part[r, m + j] (g = pre [0, n), post [n, 2n), res [2n, m))

where ``R = ceil(T / 64)`` token tiles and ``d_coef_part[r] = (d_bias | d_scale)`` partials of tile ``r``.

Layouts and call contract (contiguous, fp32; ``S``, ``K * m / 4`` and ``R`` dynamic: one binary per
``(n, reduce_phi)``):

* ``pre_reduce_bwd_kernel(n, reduce_phi=True)(d_phi_part [S, K * m / 4, 4], d_coef_part [R, 2m],
  d_phi [K * m / 4, 4], d_alpha [3], d_bias [m])`` (views of ``[S, K, m]`` and ``[K, m]``), grid
  ``phi_blocks(K * m) + 1``;
* ``pre_reduce_bwd_kernel(n, reduce_phi=False)(d_coef_part [R, 2m], d_alpha [3], d_bias [m])``, grid ``1``
  (one split: ``pre_proj_bwd`` wrote d_phi itself).
* ``K * m`` a multiple of 4 (K is a multiple of 64); n in {1, 2, 4, 6, 8}; S, R >= 1.

Design. THREADS = 512 a block. The d_phi blocks (``reduce_phi``) each own ``THREADS * VEC`` consecutive floats: a
thread sums its 4 floats over the splits in split order with 128-bit loads and stores. The last block reduces the
coefficient partials: thread ``(p, c)`` (column ``c`` < 2m, part ``p`` < ``THREADS // 2m``) sums column ``c`` over
its part of the rows in row order, UNROLL = 8 rows loaded at once; then one thread per column adds the parts in part
order, and one thread per group adds its d_scale columns in column order (through shared memory). Every order is
fixed and none depends on the split count: bitwise reproducible for a given T, no atomics. fp32 sums: the error is
at most ``(rows per part + parts + n * n) * 2**-24`` of the sum of magnitudes.

Verified without a GPU: the generated CUDA source runs in the CPU emulation (tests/emulation) bit for bit against a
sequential fp32 sum in the documented order and within the bound of float64. Speed: not measured; the performance
model (profiling/) predicts it.
"""

import functools

import tilelang.language as T

from . import _common

__all__ = [
    "STREAMS",
    "THREADS",
    "VEC",
    "coef_block_macro",
    "phi_blocks",
    "pre_reduce_bwd_kernel",
    "pre_reduce_bwd_program",
]

STREAMS: tuple[int, ...] = _common.ACTIVATION_STREAMS
THREADS = 512
VEC = 4  # floats per thread of the d_phi sum (one 128-bit access)
UNROLL = 8  # rows of the coefficient partials loaded at once by a thread
# In bounds by construction (q < kq; rows [r0, r0 + count) inside [0, rows)); TileLang's own
# guards would split the 128-bit accesses into guarded scalar ones. The emulation test checks exactly sized tensors.
_PASS_CONFIGS = {"tl.disable_safe_memory_legalize": True}


def phi_blocks(km: int) -> int:
    """Blocks of the d_phi sum for ``K * m`` floats (the coefficient block comes after them)."""
    return -(-km // (THREADS * VEC))


def coef_block_macro(n: int, rows):
    """The coefficient block of :func:`pre_reduce_bwd_program` as a macro ``(tx, d_coef_part [rows, 2m], d_alpha,
    d_bias)`` for ``THREADS`` threads, ``rows`` the caller's dynamic row count; shared with
    ``tl_kernels.boundary``'s backward reduction, so that its d_alpha and d_bias are these bits."""
    m = n * n + 2 * n
    w = 2 * m  # d_bias | d_scale columns
    parts = THREADS // w
    f32 = "float32"

    @T.macro
    def coef_block(tx, d_coef_part, d_alpha, d_bias):
        red = T.alloc_shared((parts, w), f32)
        tot = T.alloc_shared((w,), f32)
        ld = T.alloc_local((UNROLL,), f32)
        acc = T.alloc_var(f32)
        total = T.alloc_var(f32)
        col = tx % w
        part = tx // w
        # The part's rows, once, as int32 scalars.
        per = T.alloc_var("int32")
        per = T.ceildiv(rows, parts)
        r0 = T.alloc_var("int32")
        r0 = part * per
        count = T.alloc_var("int32")
        count = T.max(T.min(per, rows - r0), 0)
        acc = T.float32(0)
        if part < parts:
            # UNROLL independent loads, then their sum in row order (a row past the part adds +0: exact).
            for r in T.serial(T.ceildiv(count, UNROLL)):
                for u in T.unroll(UNROLL):
                    ld[u] = T.if_then_else(
                        r * UNROLL + u < count, d_coef_part[r0 + T.min(r * UNROLL + u, count - 1), col], T.float32(0)
                    )
                for u in T.unroll(UNROLL):
                    acc += ld[u]
            red[part, col] = acc
        T.sync_threads()
        if tx < w:
            total = red[0, tx]
            for p in T.unroll(1, parts):
                total = total + red[p, tx]
            tot[tx] = total
            if tx < m:
                d_bias[tx] = total
        T.sync_threads()
        if tx < 3:
            # d_alpha: the column totals of d_scale over the group (pre [0, n), post [n, 2n), res [2n, m)), in order.
            total = tot[m + tx * n]
            for j in T.serial(1, T.if_then_else(tx < 2, n, n * n)):
                total = total + tot[m + tx * n + j]
            d_alpha[tx] = total

    return coef_block


def pre_reduce_bwd_program(n: int, reduce_phi: bool = True):
    """``d_phi`` (with ``reduce_phi``), ``d_bias`` and ``d_alpha`` from ``pre_proj_bwd``'s partials."""
    if n not in STREAMS:
        raise ValueError(f"pre_reduce: n must be one of {STREAMS}, got {n}")
    m = n * n + 2 * n
    w = 2 * m  # d_bias | d_scale columns
    f32 = "float32"
    num_splits = T.dynamic("num_splits")
    kq = T.dynamic("kq")  # K * m / VEC
    rows = T.dynamic("rows")

    coef_block = coef_block_macro(n, rows)

    if reduce_phi:

        @T.prim_func
        def pre_reduce_bwd(
            d_phi_part: T.Tensor((num_splits, kq, VEC), f32),
            d_coef_part: T.Tensor((rows, w), f32),
            d_phi: T.Tensor((kq, VEC), f32),
            d_alpha: T.Tensor((3,), f32),
            d_bias: T.Tensor((m,), f32),
        ):
            with T.Kernel(T.ceildiv(kq, THREADS) + 1, threads=THREADS) as bx:
                tx = T.get_thread_binding()
                acc = T.alloc_local((VEC,), f32)
                ld = T.alloc_local((VEC,), f32)
                if bx < T.ceildiv(kq, THREADS):
                    q = bx * THREADS + tx
                    if q < kq:
                        for v in T.vectorized(VEC):
                            acc[v] = d_phi_part[0, q, v]
                        for s in T.serial(1, num_splits):  # split order: deterministic
                            for v in T.vectorized(VEC):
                                ld[v] = d_phi_part[s, q, v]
                            for v in T.unroll(VEC):
                                acc[v] = acc[v] + ld[v]
                        for v in T.vectorized(VEC):
                            d_phi[q, v] = acc[v]
                else:
                    coef_block(tx, d_coef_part, d_alpha, d_bias)

        return pre_reduce_bwd

    @T.prim_func
    def pre_reduce_bwd_coef(
        d_coef_part: T.Tensor((rows, w), f32),
        d_alpha: T.Tensor((3,), f32),
        d_bias: T.Tensor((m,), f32),
    ):
        with T.Kernel(1, threads=THREADS) as _bx:
            tx = T.get_thread_binding()
            coef_block(tx, d_coef_part, d_alpha, d_bias)

    return pre_reduce_bwd_coef


@functools.cache
def pre_reduce_bwd_kernel(n: int, reduce_phi: bool = True):
    """The compiled reduction kernel for ``(n, reduce_phi)`` (memoised; TileLang's disk cache below)."""
    return _common.compile_program(pre_reduce_bwd_program(n, reduce_phi), pass_configs=_PASS_CONFIGS)
