"""The pre-mapping projection (mHC paper Eq. 14-15) on the tensor cores: forward and backward, general n.

Math, per token ``t`` (``K = n * C``, ``m = n * n + 2n``, ``x = vec(residual[t])`` stream-major)::

    forward   proj[t, j] = sum_k x[t, k] * phi[k, j]            (Eq. 14, TF32 tensor cores, fp32 accumulation)
              sq[t]      = sum_k x[t, k]^2                       (Eq. 15 before the mean and the root, fp32 FMA)
    backward  d_x[t, k]  = sum_j d_proj[t, j] * phi[k, j]        (first matmul)
                           + cx[t] * x[t, k]                      (the RMS term, cx = -d_rinv * rinv^3 / K)
                           + h_pre[t, k // C] * g_li[t, k % C]    (F_pre's gradient)
                           (+ d_x_in[t, k] with ``accumulate``: the gradient post_res already produced)
              d_phi[k, j] = sum_t x[t, k] * d_proj[t, j]         (second matmul, the same pass over x)

where ``d_proj[t, j] = d_logits[t, j] * alpha_{g(j)} * rinv[t]`` and ``cx[t] = -rinv[t]^3 / K * sum_j d_logits[t, j]
* alpha_{g(j)} * proj[t, j]`` are formed in the backward kernel's prologue from the coefficient gradients
(``d_logits [T, m]``: pre | post | res), the saved ``proj`` and ``rinv`` and ``alpha``.

Layouts and call contracts (everything contiguous; ``T`` = ``num_tokens`` dynamic: one binary per (n, C, dtype)):

* ``pre_proj_fwd_kernel(n, C, dtype)(x [T, K] dt, phi [K, m] f32, proj_part [S, T, m] f32, sq_part [S, T] f32)``,
  grid ``(ceil(T / BM), S)``; ``S`` (split-K, the leading dim of the partials) is dynamic and chosen by the caller
  (:func:`choose_splits`); split ``s`` covers K-chunks ``[s * ceil(KC / S), ...)``, so the caller must make every
  split non-empty (``choose_splits`` does). The partials are reduced in split order by ``pre_finalize``.
* ``pre_proj_bwd_kernel(n, C, dtype, accumulate)(x [T, K] dt, phi [K, m] f32, d_logits [T, m] f32,
  proj [T, m] f32, rinv [T] f32, alpha [3] f32, h_pre [T, n] f32, g_li [T, C] dt,
  [d_x_in [T, K] dt,] d_x [T, K] dt, d_phi_part [S, K, m] f32)``, grid ``(K / BK, S)``; block ``(kb, s)`` owns the
  K-slice ``kb`` and the token tiles ``[s * ceil(TT / S), ...)`` (TT = ceil(T / BM)); ``d_phi = d_phi_part.sum(0)``
  (the caller sums in a fixed order: deterministic, no atomics).
* ``dt`` in bfloat16 / float16 / float32; n in {1, 2, 4, 6, 8}; C a positive multiple of 64 up to 65536; T >= 1.

Precision (the TF32 error budget). ``T.gemm`` on float32 tiles lowers to ``mma.sync.m16n8k8`` with ``.tf32``
operands (checked in PTX by tests/kernels), which reads the top 19 bits of each operand. ``phi`` and ``d_proj``
are rounded to nearest TF32 when they are staged in shared memory (add 2**12 to the bit pattern, as DeepSeek's
kernels do; the MMA then drops the low 13 bits): relative error <= 2**-11 per element. bf16 and fp16 activations
are exact in TF32; fp32 activations are truncated by the MMA (<= 2**-10). Hence, per token,
``|proj - proj_exact| <= 2**-11 * sum_k |x_k phi_kj|`` (bf16/fp16; 2**-10 + 2**-11 for fp32) plus fp32
accumulation error, and the same bound with d_proj for d_x and d_phi. The GPU tests assert 2**-10 of that sum.
``sq`` is plain fp32 (no TF32). The backward's elementwise terms are fp32 FMA.

Design. Both kernels are memory-bound: the projection reads 2nC bytes per token (bf16) and does 2 nC m FLOPs,
24 FLOP/B at n=4, below the TF32 ridge (~150 FLOP/B on H100); phi (K x m x 4 B, 2.75 MB at C=7168) stays in L2.
Tiles: BM = 64 tokens x BK = 64 channels, 128 threads (4 warps, the MMA tiles partitioned by TileLang), N padded
to ``mp`` = m rounded up to 16 (16, 16, 32, 48, 80 for n = 1, 2, 4, 6, 8); the padded phi columns are zero-filled
on load, never read from global memory. Loads are guarded (rows past T read as 0), 128-bit where the row
alignment allows it. Split-K in the forward and token-splits in the backward are chosen from T so that the grid
covers every SM at least twice (decode: T = 1 .. 137 still spreads over ~2 x SMs blocks); partials are reduced in a
fixed order, so results are bitwise reproducible for a given (T, S).
Loop-carried state stays on chip: the forward accumulates proj [BM, mp] and sq across its K-chunks in registers;
the backward keeps phi's K-slice [BK, mp] in shared memory and the d_phi accumulator [BK, mp] in registers across
its token tiles, and writes d_x once per tile. Bytes per token (bf16, n=4): forward 8C + 100 B; backward x 8C +
g_li 2C (read once per stream: up to 8C if the four streams' blocks miss L2) + d_x 8C = 18C-24C (+8C read with
``accumulate``).

Resources (ptxas -v, sm_90a, CUDA 13.0; all 75 shipped pre_proj configurations: 0 spills, 0 stack). Registers fwd /
bwd at 128 threads: n = 1: 80 / 151, n = 2: 76 / 158, n = 4: 94-106 / 185-200; at n = 6, 8 the backward runs 256
threads (:func:`bwd_threads`: at 128 it needed 255 registers and spilled 300 B at n = 8): fwd 144 / 189, bwd 238 /
255. Dynamic shared memory 12-28 KB fwd, 25-57 KB bwd. So the n = 4 backward fits 2 blocks (8 warps) per SM and
the n = 8 backward 1: latency hiding there rests on the 64-token tiles' loads in flight; a measured GPU profile
decides whether the split or the tile sizes change. The backward's bf16/fp16 x-tile loads are 64-bit (the
conversion to the fp32 tile is fused into them); the forward's and all fp32 loads are 128-bit.

Verified without a GPU: the generated CUDA source runs in the CPU emulation (tests/emulation; ``shim.h`` emulates
``mma.sync`` TF32 and ``ldmatrix`` with the PTX ISA's fragment layouts) against float64, and under AddressSanitizer
with every tensor allocated to its exact size (no out-of-bounds access; a planted short input is caught).

Speed (H100, not measured: no GPU has run these kernels yet). The K-loop is not software-pipelined (TileLang 0.1.15
could not lower ``T.copy`` with cp.async over the split's dynamic trip count); latency is hidden by occupancy
(several 128-thread blocks per SM). Estimate: 60-80% of copy bandwidth for T >= 4096.
"""

import functools
from dataclasses import dataclass

import tilelang.language as T

from . import _common

__all__ = [
    "BK",
    "BM",
    "DTYPES",
    "STREAMS",
    "choose_splits",
    "bwd_threads",
    "padded_width",
    "pre_proj_bwd_kernel",
    "pre_proj_bwd_program",
    "pre_proj_fwd_kernel",
    "pre_proj_fwd_program",
]

DTYPES: tuple[str, ...] = _common.ACTIVATION_DTYPES
STREAMS: tuple[int, ...] = (1, 2, 4, 6, 8)
BM = 64  # tokens per tile
BK = 64  # K (= n * C) elements per chunk; divides C, so a chunk lies in one stream
THREADS = 128
MAX_SPLITS = 64
_TF32_ROUND = 0x1000  # added to the fp32 bit pattern: round to nearest before the MMA drops 13 bits


@dataclass(frozen=True)
class _Shape:
    n: int
    C: int
    m: int  # n * n + 2n coefficient columns
    mp: int  # m padded to a multiple of 16 (the MMA's N)
    K: int  # n * C
    chunks: int  # K // BK


def padded_width(m: int) -> int:
    return -(-m // 16) * 16


def _shape(n: int, C: int, dtype: str) -> _Shape:
    _common.validate_activation_config("pre_proj", n, C, dtype, STREAMS)
    m = n * n + 2 * n
    return _Shape(n=n, C=C, m=m, mp=padded_width(m), K=n * C, chunks=n * C // BK)


def choose_splits(num_tokens: int, n: int, C: int, num_sms: int, direction: str) -> int:
    """Split count for a launch: enough blocks for ~2 per SM, every split non-empty, at most :data:`MAX_SPLITS`.

    fwd: splits of the K-chunks (grid ``ceil(T / BM) x S``); bwd: splits of the token tiles (grid ``K / BK x S``).
    """
    chunks = n * C // BK
    tiles = -(-num_tokens // BM)
    if direction == "fwd":
        base, work = tiles, chunks
    elif direction == "bwd":
        base, work = chunks, tiles
    else:
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
    want = max(1, min(MAX_SPLITS, work, -(-2 * num_sms // max(base, 1))))
    per = -(-work // want)
    return -(-work // per)  # every split gets at least one unit of work


def bwd_threads(n: int) -> int:
    """Threads of the backward block: 256 when the padded width exceeds 32 (n = 6, 8), so that the two accumulators
    (d_x [BM, BK] and d_phi [BK, mp]) and the operand fragments fit in registers: at 128 threads n = 8 needed 255
    registers and spilled 300 bytes, n = 6 sat at 255."""
    return THREADS if padded_width(n * n + 2 * n) <= 32 else 2 * THREADS


def _tf32(v):
    """Round an fp32 value to the nearest TF32 (ties away from zero); the MMA then ignores the low 13 bits."""
    return T.reinterpret(T.reinterpret(v, "uint32") + T.uint32(_TF32_ROUND), "float32")


def pre_proj_fwd_program(n: int, C: int, dtype: str):
    """``proj_part[s] = x[:, K_s] @ phi[K_s]`` and ``sq_part[s] = sum over K_s of x^2``; see the module docstring."""
    sh = _shape(n, C, dtype)
    m, mp, K, chunks = sh.m, sh.mp, sh.K, sh.chunks
    f32 = "float32"
    num_tokens = T.dynamic("num_tokens")
    num_splits = T.dynamic("num_splits")

    @T.prim_func
    def pre_proj_fwd(
        x: T.Tensor((num_tokens, K), dtype),
        phi: T.Tensor((K, m), f32),
        proj_part: T.Tensor((num_splits, num_tokens, m), f32),
        sq_part: T.Tensor((num_splits, num_tokens), f32),
    ):
        with T.Kernel(T.ceildiv(num_tokens, BM), num_splits, threads=THREADS) as (bx, by):
            xs = T.alloc_shared((BM, BK), dtype)
            ps = T.alloc_shared((BK, mp), f32)
            xf = T.alloc_fragment((BM, BK), f32)
            acc = T.alloc_fragment((BM, mp), f32)
            sq = T.alloc_fragment((BM, 4), f32)
            sq_row = T.alloc_fragment((BM,), f32)
            T.clear(acc)
            T.clear(sq)
            per = T.ceildiv(chunks, num_splits)
            k_first = by * per
            for kk in T.serial(T.min(per, chunks - k_first)):
                k0 = (k_first + kk) * BK
                for i, j in T.Parallel(BM, BK):
                    xs[i, j] = T.if_then_else(bx * BM + i < num_tokens, x[bx * BM + i, k0 + j], T.cast(0, dtype))
                for i, j in T.Parallel(BK, mp):
                    ps[i, j] = T.if_then_else(j < m, _tf32(phi[k0 + i, j]), T.float32(0))
                T.copy(xs, xf)
                for jj in T.serial(BK // 4):
                    for i, j in T.Parallel(BM, 4):
                        sq[i, j] += xf[i, jj * 4 + j] * xf[i, jj * 4 + j]
                T.gemm(xf, ps, acc)
            T.reduce_sum(sq, sq_row, dim=1)
            for i in T.Parallel(BM):
                if bx * BM + i < num_tokens:
                    sq_part[by, bx * BM + i] = sq_row[i]
            for i, j in T.Parallel(BM, mp):
                if bx * BM + i < num_tokens and j < m:
                    proj_part[by, bx * BM + i, j] = acc[i, j]

    return pre_proj_fwd


def pre_proj_bwd_program(n: int, C: int, dtype: str, accumulate: bool = False):
    """``d_x`` (both matmul terms, the RMS term and F_pre's term) and per-split ``d_phi`` partials in one pass."""
    sh = _shape(n, C, dtype)
    m, mp, K, chunks = sh.m, sh.mp, sh.K, sh.chunks
    threads = bwd_threads(n)
    f32 = "float32"
    num_tokens = T.dynamic("num_tokens")
    num_splits = T.dynamic("num_splits")

    @T.macro
    def body(x, phi, d_logits, proj, rinv, alpha, h_pre, g_li, d_x_in, d_x, d_phi_part):
        with T.Kernel(chunks, num_splits, threads=threads) as (kb, by):
            ps = T.alloc_shared((BK, mp), f32)  # phi's K-slice, loaded once
            xs = T.alloc_shared((BM, BK), f32)  # x tile, converted to fp32
            dps = T.alloc_shared((BM, mp), f32)  # d_proj tile (TF32-rounded, zero-padded)
            cxs = T.alloc_shared((BM,), f32)
            hps = T.alloc_shared((BM,), f32)
            dx_acc = T.alloc_fragment((BM, BK), f32)
            dphi_acc = T.alloc_fragment((BK, mp), f32)
            tx = T.get_thread_binding()
            k0 = kb * BK
            stream = k0 // C  # BK divides C: the slice lies in one stream
            c0 = k0 - stream * C
            tiles = T.ceildiv(num_tokens, BM)
            per = T.ceildiv(tiles, num_splits)
            first = by * per
            for i, j in T.Parallel(BK, mp):
                ps[i, j] = T.if_then_else(j < m, _tf32(phi[k0 + i, j]), T.float32(0))
            T.clear(dphi_acc)
            for tt in T.serial(T.min(per, tiles - first)):
                t0 = (first + tt) * BM
                for i, j in T.Parallel(BM, BK):
                    xs[i, j] = T.if_then_else(t0 + i < num_tokens, T.cast(x[t0 + i, k0 + j], f32), T.float32(0))
                # d_proj = d_logits * alpha_g * rinv, rows past T and padded columns zero.
                for i, j in T.Parallel(BM, mp):
                    dps[i, j] = T.if_then_else(
                        t0 + i < num_tokens and j < m,
                        _tf32(d_logits[t0 + i, T.min(j, m - 1)] * alpha[T.min(j // n, 2)] * rinv[t0 + i]),
                        T.float32(0),
                    )
                # cx = -rinv^3 / K * sum_j d_logits_j * alpha_g(j) * proj_j (one thread per token, fixed order; a
                # rolled loop: unrolled, ptxas hoisted all 2m loads and spilled at n = 6, 8).
                if tx < BM:
                    t = t0 + tx
                    if t < num_tokens:
                        s = T.alloc_var(f32)
                        s = T.float32(0)
                        for j in T.serial(m):
                            s += d_logits[t, j] * alpha[T.min(j // n, 2)] * proj[t, j]
                        r = rinv[t]
                        cxs[tx] = -s * r * r * r / T.float32(K)
                        hps[tx] = h_pre[t, stream]
                    else:
                        cxs[tx] = T.float32(0)
                        hps[tx] = T.float32(0)
                T.gemm(dps, ps, dx_acc, transpose_B=True, clear_accum=True)
                T.gemm(xs, dps, dphi_acc, transpose_A=True)
                for i, j in T.Parallel(BM, BK):
                    if t0 + i < num_tokens:
                        v = dx_acc[i, j] + cxs[i] * xs[i, j] + hps[i] * T.cast(g_li[t0 + i, c0 + j], f32)
                        if accumulate:
                            v = v + T.cast(d_x_in[t0 + i, k0 + j], f32)
                        d_x[t0 + i, k0 + j] = T.cast(v, dtype)
            for i, j in T.Parallel(BK, mp):
                if j < m:
                    d_phi_part[by, k0 + i, j] = dphi_acc[i, j]

    if accumulate:

        @T.prim_func
        def pre_proj_bwd_acc(
            x: T.Tensor((num_tokens, K), dtype),
            phi: T.Tensor((K, m), f32),
            d_logits: T.Tensor((num_tokens, m), f32),
            proj: T.Tensor((num_tokens, m), f32),
            rinv: T.Tensor((num_tokens,), f32),
            alpha: T.Tensor((3,), f32),
            h_pre: T.Tensor((num_tokens, n), f32),
            g_li: T.Tensor((num_tokens, C), dtype),
            d_x_in: T.Tensor((num_tokens, K), dtype),
            d_x: T.Tensor((num_tokens, K), dtype),
            d_phi_part: T.Tensor((num_splits, K, m), f32),
        ):
            body(x, phi, d_logits, proj, rinv, alpha, h_pre, g_li, d_x_in, d_x, d_phi_part)

        return pre_proj_bwd_acc

    @T.prim_func
    def pre_proj_bwd(
        x: T.Tensor((num_tokens, K), dtype),
        phi: T.Tensor((K, m), f32),
        d_logits: T.Tensor((num_tokens, m), f32),
        proj: T.Tensor((num_tokens, m), f32),
        rinv: T.Tensor((num_tokens,), f32),
        alpha: T.Tensor((3,), f32),
        h_pre: T.Tensor((num_tokens, n), f32),
        g_li: T.Tensor((num_tokens, C), dtype),
        d_x: T.Tensor((num_tokens, K), dtype),
        d_phi_part: T.Tensor((num_splits, K, m), f32),
    ):
        body(x, phi, d_logits, proj, rinv, alpha, h_pre, g_li, None, d_x, d_phi_part)

    return pre_proj_bwd


@functools.cache
def pre_proj_fwd_kernel(n: int, C: int, dtype: str):
    """The compiled forward kernel for ``(n, C, dtype)`` (memoised; TileLang's disk cache below)."""
    return _common.compile_program(pre_proj_fwd_program(n, C, dtype))


@functools.cache
def pre_proj_bwd_kernel(n: int, C: int, dtype: str, accumulate: bool = False):
    """The compiled backward kernel for ``(n, C, dtype, accumulate)`` (memoised; TileLang's disk cache below)."""
    return _common.compile_program(pre_proj_bwd_program(n, C, dtype, accumulate))
