"""The pre-mapping projection (mHC paper Eq. 14-15) on the tensor cores: forward and backward, general n.

Math, per token ``t`` (``K = n * C``, ``m = n * n + 2n``, ``x = vec(residual[t])`` stream-major)::

    forward   proj[t, j] = sum_k x[t, k] * phi[k, j]            (Eq. 14, TF32 tensor cores, fp32 accumulation)
              sq[t]      = sum_k x[t, k]^2                       (Eq. 15 before the mean and the root, fp32 FMA)
    backward  d_x[t, k]  = sum_j d_proj[t, j] * phi[k, j]        (first matmul)
                           + cx[t] * x[t, k]                      (the RMS term, cx = -d_rinv * rinv^3 / K)
                           + h_pre[t, k // C] * g_li[t, k % C]    (F_pre's gradient)
                           (+ d_x_in[t, k] with ``accumulate``: the gradient post_res already produced)
              d_phi[k, j] = sum_t x[t, k] * d_proj[t, j]         (second matmul, the same pass over x)
              d_bias[j]   = sum_t d_logits[t, j]                  (per-tile partials, fp32)
              d_scale[j]  = sum_t d_logits[t, j] * proj[t, j] * rinv[t]   (likewise; d_alpha sums its groups)

where ``d_proj[t, j] = d_logits[t, j] * alpha_{g(j)} * rinv[t]`` and ``cx[t] = -rinv[t]^3 / K * sum_j d_logits[t, j]
* alpha_{g(j)} * proj[t, j]`` are formed in the backward kernel's prologue from the coefficient gradients
(``d_logits [T, m]`` = pre | post | res, read from its two producers: ``d_pp [T, 2n]`` of pre_finalize's backward and
``d_res [T, n * n]`` of the Sinkhorn backward, no concatenation), the saved ``proj`` and ``rinv`` and ``alpha``.

Layouts and call contracts (everything contiguous; ``T`` = ``num_tokens`` dynamic: one binary per (n, C, dtype)):

* ``pre_proj_fwd_kernel(n, C, dtype)(x [T, K] dt, phi [K, m] f32, proj_part [S, T, m] f32, sq_part [S, T] f32)``,
  grid ``(fwd_tiles(T), S)`` = ``(ceil(T / FWD_BM), S)``; ``S`` (split-K, the leading dim of the partials) is
  dynamic and chosen by the caller (:func:`choose_splits`); split ``s`` covers K-chunks ``[s * ceil(KC / S), ...)``
  (KC = K / BK), so the caller must make every split non-empty (``choose_splits`` does). The partials are reduced in
  split order by ``pre_finalize``.
* ``pre_proj_bwd_kernel(n, C, dtype, accumulate)(x [T, K] dt, phi [K, m] f32, d_pp [T, 2n] f32,
  d_res [T, n * n] f32, proj [T, m] f32, rinv [T] f32, alpha [3] f32, h_pre [T, n] f32, g_li [T, C] dt,
  [d_x_in [T, K] dt,] d_x [T, K] dt, d_phi_part [S, K, m] f32, d_coef_part [TT, 2m] f32)``, grid
  ``(K / BK, S)``; block ``(kb, s)`` owns the K-slice ``kb`` and the token tiles ``[s * ceil(TT / S), ...)``
  (TT = ceil(T / BM)); ``d_phi = d_phi_part.sum(0)``. ``d_coef_part[tt]`` = (d_bias | d_scale) partials of token
  tile ``tt``, written by the block ``kb = tt' mod (K / BK)`` of its split (``tt'`` its index in the split: a fixed
  assignment, every tile in one block), one thread per column summing in token order: the rows do not depend on
  S. :mod:`tl_kernels.pre_reduce` sums d_phi's splits and these rows in fixed orders: deterministic, no atomics.
* ``dt`` in bfloat16 / float16 / float32; n in {1, 2, 4, 6, 8}; C a positive multiple of 64 up to 65536; T >= 1.

Precision (the TF32 error budget). Both kernels multiply with ``mma.sync.m16n8k8`` on ``.tf32`` operands (the
forward through ``T.ptx_mma``, the backward through ``T.gemm`` on float32 tiles; checked in PTX by tests/kernels),
which reads the top 19 bits of each operand. ``phi`` and ``d_proj``
are rounded to nearest TF32 when they are staged in shared memory (add 2**12 to the bit pattern, as DeepSeek's
kernels do; the MMA then drops the low 13 bits): relative error <= 2**-11 per element. bf16 and fp16 activations
are exact in TF32; fp32 activations are truncated by the MMA (<= 2**-10). Hence, per token,
``|proj - proj_exact| <= 2**-11 * sum_k |x_k phi_kj|`` (bf16/fp16; 2**-10 + 2**-11 for fp32) plus fp32
accumulation error, and the same bound with d_proj for d_x and d_phi. The GPU tests assert 2**-10 of that sum.
``sq`` is plain fp32 (no TF32). The backward's elementwise terms are fp32 FMA.

Design. Both kernels are memory-bound: the projection reads 2nC bytes per token (bf16) and does 2 nC m FLOPs, m
FLOP per byte (24 at n=4), far below the tensor cores' FLOP per byte of DRAM bandwidth; phi (K x m x 4 B) stays
in L2. Splits (split-K in the forward, token splits in the backward) fill at most one wave of resident blocks
(:func:`choose_splits`); partials are reduced in a fixed order, so results are bitwise reproducible for a given
(T, S). The split bounds are int32 scalars computed once per block (inlined into the loops they were 64-bit
divisions).

Forward: FWD_BM = 128 tokens per block of 8 warps; each warp owns 16 tokens (one MMA row tile) for all of the
split's K-chunks of BK = 64 columns, so the accumulators [16, 8 * ceil(m / 8)] and the two sums of squares stay in
registers. Within a chunk the K order fed to the MMAs is permuted so that lane (g, q) of MMA step s = 4h + s' holds
columns 32h + 8q + 2s' (slot q) and + 1 (slot q + 4): each lane reads rows g and g + 8 of x straight from global
memory into registers with four 128-bit loads a chunk (a warp reads 64 contiguous bytes of each row and half), no
shared-memory staging of x, no bank conflicts. phi's chunk (a contiguous BK x m block) is staged in shared memory,
TF32-rounded, in the same permuted order and in the B-fragment layout ``[step][column tile][lane][2]``: one
conflict-free 64-bit shared load per MMA. The K loop is software-pipelined by hand: the next chunk's x (registers)
and phi (registers, then the other of two shared buffers) are in flight while this chunk's MMAs run, one barrier a
chunk. Rows past T are clamped to T - 1 on load (an MMA row only feeds its own output row, which is not stored).

Backward: BM = 64 tokens x BK = 64 channels, 128 threads (256 at n = 6, 8, :func:`bwd_threads`), the MMA tiles
partitioned by TileLang, N padded to ``mp`` = m rounded up to 16 (16, 16, 32, 48, 80 for n = 1, 2, 4, 6, 8); the
padded phi columns are zero-filled on load, never read from global memory. It keeps phi's K-slice [BK, mp] in shared
memory and the d_phi accumulator [BK, mp] in registers across its token tiles, and writes d_x once per tile.
Every global load of a token tile is issued at the top of the tile, before the first use of any of them, so that a
warp waits about one DRAM latency a tile, not one per load: each thread loads its slice of x (4 elements a row of
its rows) into registers, its share of one token row's coefficient inputs (``G = threads / BM`` adjacent lanes a row,
d_pp's columns ``[p * 2n / G, ...)``, d_res's likewise, proj at the same columns, rinv, h_pre), and g_li (and d_x_in)
in the d_x accumulator's fragment layout, for the epilogue after the GEMMs (which reads cx and h_pre of its rows from
shared memory once a tile into registers, not once per element pair; not in the accumulating variant, where their
8 registers made ptxas spill). Rows past T are clamped to T - 1 on load
and zeroed by selects, not branches (ptxas sinks a load into the branch that uses it, and the warp then waits for it
there). The lanes of a row sum their parts of cx with a fixed butterfly (the same order in every lane: deterministic).
``__launch_bounds__`` holds ptxas to the registers of the resident blocks :func:`choose_splits` assumes.

Bytes per token (bf16, n=4): forward 8C + S x 100 B; backward x 8C + g_li 2C (read once per stream: up to 8C if
the four streams' blocks miss L2) + d_x 8C = 18C-24C (+8C read with ``accumulate``); the coefficient inputs
(d_pp, d_res, proj, rinv: 4 (2m + 1) = 196 B) are read by every K-slice's block, mostly from L2.

Resources and SASS: the hot loops' instruction counts (per K-chunk in the forward, per token tile in the backward),
HMMA, integer divisions (none), load widths, registers, shared memory and resident blocks are printed by ``python -m
tl_kernels.tools.pre_mapping_sass [--n 1 2 4 6 8]`` (docs/benchmarks.md, "Compile facts"), guarded in
tests/kernels/test_sass.py; every shipped configuration has 0 spills and 0 stack (tests/kernels/test_codegen.py).
The backward issues every global load of a token tile at the tile's top, before any use (x unconditionally into
registers with rows clamped to T - 1, then staged through a select, not a branch; the coefficient inputs split over
the lanes of a token row; g_li / d_x_in into a fragment in d_x's layout), so a warp waits for DRAM about twice a
tile, not once per value (tests/kernels/test_sass.py counts the waits). Its x-tile loads are 64-bit: 128-bit ones
made the fp32 tile's stores 2-way bank conflicts. The d_bias /
d_scale pass runs after the tile loop (a rolled loop over its tiles' tokens; unrolled, ptxas hoisted the loads and
spilled). The d_proj tile is filled by two loops, d_pp's 2n columns and d_res's n * n (one loop selecting between
the two sources per element cost more instructions); the two loops' shared stores are 2-way bank conflicts
(``python -m profiling model --kernel pre_mapping_bwd --json PATH``: ``bank_conflicts`` of pre_proj_bwd), a lever
left. :data:`_FWD_RESIDENT` and :data:`_BWD_RESIDENT` (resident blocks per SM by n at bf16, used by
:func:`choose_splits`) follow from the register counts that command prints.

Verified without a GPU: the generated CUDA source runs in the CPU emulation (tests/emulation; ``shim.h`` emulates
``mma.sync`` TF32 and ``ldmatrix`` with the PTX ISA's fragment layouts) against float64, and under AddressSanitizer
with every tensor allocated to its exact size (no out-of-bounds access; a planted short input is caught). Speed:
not measured (no GPU has run these kernels); the performance model (profiling/) predicts it from the SASS.
"""

import functools
from dataclasses import dataclass

import tilelang.language as T

from . import _common

__all__ = [
    "BK",
    "BM",
    "DTYPES",
    "FWD_BM",
    "FWD_THREADS",
    "STREAMS",
    "choose_splits",
    "bwd_threads",
    "fwd_tiles",
    "padded_width",
    "pre_proj_bwd_kernel",
    "pre_proj_bwd_program",
    "pre_proj_fwd_kernel",
    "pre_proj_fwd_program",
]

DTYPES: tuple[str, ...] = _common.ACTIVATION_DTYPES
STREAMS: tuple[int, ...] = _common.ACTIVATION_STREAMS
BM = 64  # tokens per tile
BK = 64  # K (= n * C) elements per chunk; divides C, so a chunk lies in one stream
THREADS = 128
FWD_WARPS = 8  # the forward: each warp owns 16 tokens (one MMA row tile) and all of the split's K-chunks
FWD_THREADS = 32 * FWD_WARPS
FWD_BM = 16 * FWD_WARPS  # tokens per forward block
MAX_SPLITS = 64
X_VEC = 4  # x elements a thread loads at once in the backward (64-bit at bf16/fp16; 8 conflicts in xs)
X_LANES = BK // X_VEC  # threads per x tile row
# Resident blocks per H100 SM by n (registers from ptxas -v at bf16; ``python -m tl_kernels.tools.pre_mapping_sass --n 1
# 2 4 6 8``, column blocks/SM): the wave :func:`choose_splits` fills. fp32 activations at n = 4 fit fewer (the same
# command with --dtype float32).
_FWD_RESIDENT = {1: 3, 2: 3, 4: 2, 6: 1, 8: 1}
_BWD_RESIDENT = {1: 3, 2: 3, 4: 4, 6: 1, 8: 1}
# Both kernels index in bounds by construction (forward: rows clamped to T - 1, every split non-empty; backward:
# explicit row guards); TileLang's own guards on the splits' dynamic offsets would cost the forward its 128-bit loads
# and add dead compares. The ASan test (tests/emulation) checks the bounds with exactly sized tensors.
_PASS_CONFIGS = {"tl.disable_safe_memory_legalize": True}
# Both kernels place their barriers by hand (TileLang's sync pass off, and with it the shared-memory reuse that
# relies on its barriers). The forward: after the zero fill and the first loads, and after each chunk's phi staging;
# the pass would add a third at the top of the K loop, for the WAR hazard it sees on `ps`, but buffer `kk % 2` was
# last read in chunk kk - 2, and every thread passed chunk kk - 1's barrier after those reads. The backward: at
# the top of each token tile (the previous tile's GEMM and epilogue reads before this tile's writes) and before
# the GEMMs; the pass would add one between the two loops that fill `dps`, which write disjoint columns.
# tests/emulation/test_barrier_mutations.py deletes each remaining barrier in turn and sees every deletion.
_HAND_SYNC = {**_PASS_CONFIGS, "tl.disable_thread_storage_sync": True, "tl.disable_shared_memory_reuse": True}
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
    """Split count for a launch: at most one wave of resident blocks (a second, partial wave would leave SMs idle
    for a whole block's time), every split non-empty, at most :data:`MAX_SPLITS`.

    fwd: splits of the K-chunks (grid ``fwd_tiles(T) x S``); bwd: splits of the token tiles (grid ``K / BK x S``).
    """
    chunks = n * C // BK
    if direction == "fwd":
        base, work = fwd_tiles(num_tokens), chunks
    elif direction == "bwd":
        base, work = chunks, -(-num_tokens // BM)
    else:
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
    resident = (_FWD_RESIDENT if direction == "fwd" else _BWD_RESIDENT)[n]
    want = max(1, min(MAX_SPLITS, work, resident * num_sms // max(base, 1)))
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


def fwd_tiles(num_tokens: int) -> int:
    """Token tiles of the forward (its grid's x extent): ``ceil(T / FWD_BM)``."""
    return -(-num_tokens // FWD_BM)


def _fwd_fragment_index(r, j, nt_count: int):
    """Where phi's chunk element (row ``r`` < BK, column ``j``) lies in the forward's shared B-fragment order.

    Lane ``4g + q`` of MMA step ``s`` (= 4h + s') holds, for the column tile ``nt``, the pair (b0, b1) = phi rows
    ``32h + 8q + 2s'`` and ``+ 1``, column ``8nt + g``; the pairs are stored ``[s][nt][lane][2]`` so that a warp
    reads one step's tile with one conflict-free 64-bit shared load per lane."""
    step = (r // 32) * 4 + (r // 2) % 4
    lane = (j % 8) * 4 + (r // 8) % 4
    return ((step * nt_count + j // 8) * 32 + lane) * 2 + r % 2


def store_partials_macro(m: int, nt_count: int):
    """The forward's epilogue as a ``T.macro``, shared with ``tl_kernels.boundary``'s register forward: a lane's two
    sums of squares (rows g and g + 8 of its warp's tile) summed over its quad with two butterflies and stored by
    lane q = 0 into ``sq_part[by, token]`` (``by``: the split); its MMA accumulators (the m16n8 C-fragments of the ``nt_count`` column
    tiles: ``acc[4 nt + 2 r + c]`` is row g + 8r, column 8 nt + 2q + c) stored into ``proj_part[by, token, j]``,
    j < m. Rows past ``num_tokens`` are not stored."""

    @T.macro
    def store_partials(acc, sq, proj_part, sq_part, by, tok0, q, num_tokens):
        for r in T.unroll(2):
            sq[r] = sq[r] + T.shfl_xor(sq[r], 1)
            sq[r] = sq[r] + T.shfl_xor(sq[r], 2)
        if q == 0:
            for r in T.unroll(2):
                if tok0 + 8 * r < num_tokens:
                    sq_part[by, tok0 + 8 * r] = sq[r]
        for r in T.unroll(2):
            if tok0 + 8 * r < num_tokens:
                for nt in T.unroll(nt_count):
                    for c in T.unroll(2):
                        if nt * 8 + 2 * q + c < m:
                            proj_part[by, tok0 + 8 * r, nt * 8 + 2 * q + c] = acc[4 * nt + 2 * r + c]

    return store_partials


def pre_proj_fwd_program(n: int, C: int, dtype: str):
    """``proj_part[s] = x[:, K_s] @ phi[K_s]`` and ``sq_part[s] = sum over K_s of x^2``; see the module docstring."""
    sh = _shape(n, C, dtype)
    m, K, chunks = sh.m, sh.K, sh.chunks
    nt_count = -(-m // 8)  # MMA column tiles (N = 8 each)
    frag = BK * nt_count * 8  # floats of one chunk of phi in B-fragment order (padded columns zero)
    per_thread = -(-BK * m // FWD_THREADS)  # phi elements each thread stages per chunk
    f32 = "float32"
    num_tokens = T.dynamic("num_tokens")
    num_splits = T.dynamic("num_splits")
    store_partials = store_partials_macro(m, nt_count)

    @T.macro
    def load_chunk(x, phi, kc, row0, row1, tx, q, xd, pd):
        # x: rows g and g + 8 of the warp's 16 tokens, columns [8q, 8q + 8) and [32 + 8q, 32 + 8q + 8) of the chunk
        # (128-bit loads; a warp reads 64 contiguous bytes per row and half). phi: the chunk's BK x m block is
        # contiguous in memory; thread tx takes the elements tx, tx + FWD_THREADS, ... (coalesced).
        k0 = kc * BK  # a multiple of BK, as the vectorizer must see
        for h in T.unroll(2):
            for e in T.vectorized(8):
                xd[0, 8 * h + e] = x[row0, k0 + 32 * h + 8 * q + e]
            for e in T.vectorized(8):
                xd[1, 8 * h + e] = x[row1, k0 + 32 * h + 8 * q + e]
        for i in T.unroll(per_thread):
            if (BK * m) % FWD_THREADS == 0 or i * FWD_THREADS + tx < BK * m:
                f = i * FWD_THREADS + tx
                pd[i] = phi[k0 + f // m, f % m]

    @T.macro
    def stage_phi(ps, buf, tx, pd):
        for i in T.unroll(per_thread):
            if (BK * m) % FWD_THREADS == 0 or i * FWD_THREADS + tx < BK * m:
                f = i * FWD_THREADS + tx
                ps[buf * frag + _fwd_fragment_index(f // m, f % m, nt_count)] = _tf32(pd[i])

    @T.prim_func
    def pre_proj_fwd(
        x: T.Tensor((num_tokens, K), dtype),
        phi: T.Tensor((K, m), f32),
        proj_part: T.Tensor((num_splits, num_tokens, m), f32),
        sq_part: T.Tensor((num_splits, num_tokens), f32),
    ):
        with T.Kernel(T.ceildiv(num_tokens, FWD_BM), num_splits, threads=FWD_THREADS) as (bx, by):
            ps = T.alloc_shared((2 * frag,), f32)  # phi's chunk in B-fragment order, double-buffered
            xc = T.alloc_local((2, 16), dtype)  # this chunk's x (rows g, g + 8)
            xn = T.alloc_local((2, 16), dtype)  # the next chunk's x, in flight during this chunk's MMAs
            pd = T.alloc_local((per_thread,), f32)  # the next chunk's phi elements, in flight
            acc = T.alloc_local((4 * nt_count,), f32)
            af = T.alloc_local((4,), f32)
            bf = T.alloc_local((2,), f32)
            sq = T.alloc_local((2,), f32)
            tx = T.get_thread_binding()
            lane = tx % 32
            g = lane // 4
            q = lane % 4
            tok0 = bx * FWD_BM + (tx // 32) * 16 + g  # rows past T are clamped to T - 1 (MMA rows are independent:
            row0 = T.min(tok0, num_tokens - 1)  # a clamped row only feeds its own output row, which is not stored)
            row1 = T.min(tok0 + 8, num_tokens - 1)
            # The split's bounds, once, as int32 scalars (inlined into the loop they cost 64-bit divisions).
            per = T.alloc_var("int32")
            per = T.ceildiv(chunks, num_splits)
            k_first = T.alloc_var("int32")
            k_first = by * per
            count = T.alloc_var("int32")
            count = T.min(per, chunks - by * per)
            for i in T.serial(2 * frag // FWD_THREADS):
                ps[i * FWD_THREADS + tx] = T.float32(0)  # the padded columns (m % 8 != 0) stay zero
            for i in T.unroll(4 * nt_count):
                acc[i] = T.float32(0)
            sq[0] = T.float32(0)
            sq[1] = T.float32(0)
            if count > 0:  # an empty split (not made by choose_splits) writes zeros and reads nothing
                load_chunk(x, phi, k_first, row0, row1, tx, q, xc, pd)
            T.sync_threads()
            for kk in T.serial(count):
                buf = kk % 2
                stage_phi(ps, buf, tx, pd)
                # One barrier a chunk: buffer buf was last read two chunks ago, before the previous barrier.
                T.sync_threads()
                if kk + 1 < count:
                    load_chunk(x, phi, k_first + kk + 1, row0, row1, tx, q, xn, pd)
                for r in T.unroll(2):
                    for e in T.unroll(16):
                        sq[r] += T.cast(xc[r, e], f32) * T.cast(xc[r, e], f32)
                for s in T.unroll(8):
                    # Step s = 4h + s': slot q is column 32h + 8q + 2s', slot q + 4 the next column (phi alike).
                    e0 = (s // 4) * 8 + (s % 4) * 2
                    af[0] = T.cast(xc[0, e0], f32)
                    af[1] = T.cast(xc[1, e0], f32)
                    af[2] = T.cast(xc[0, e0 + 1], f32)
                    af[3] = T.cast(xc[1, e0 + 1], f32)
                    for nt in T.unroll(nt_count):
                        for v in T.vectorized(2):
                            bf[v] = ps[buf * frag + ((s * nt_count + nt) * 32 + lane) * 2 + v]
                        T.ptx_mma(f32, "m16n8k8", "row", "col", "tf32", "tf32", "fp32",
                                  af.data, 0, bf.data, 0, acc.data, 4 * nt, T.bool(False))  # fmt: skip
                for r in T.unroll(2):
                    for e in T.unroll(16):
                        xc[r, e] = xn[r, e]
            store_partials(acc, sq, proj_part, sq_part, by, tok0, q, num_tokens)

    return pre_proj_fwd


def _coef_grad(d_pp, d_res, t, j, n: int):
    """``d_logits[t, j]`` of the coefficient columns (pre | post | res) from its two sources: ``d_pp [T, 2n]``
    (pre_finalize's) for j < 2n, ``d_res [T, n * n]`` (the Sinkhorn backward's, row-major) past it; both column
    indices are clamped into bounds, so the select may evaluate either load."""
    return T.if_then_else(j < 2 * n, d_pp[t, T.min(j, 2 * n - 1)], d_res[t, T.min(T.max(j - 2 * n, 0), n * n - 1)])


def pre_proj_bwd_program(n: int, C: int, dtype: str, accumulate: bool = False):
    """``d_x`` (both matmul terms, the RMS term and F_pre's term), per-split ``d_phi`` partials and per-block
    partials of ``d_bias`` / ``d_scale`` per token tile in one pass."""
    sh = _shape(n, C, dtype)
    m, mp, K, chunks = sh.m, sh.mp, sh.K, sh.chunks
    nn, n2 = n * n, 2 * n
    threads = bwd_threads(n)
    assert threads >= m, "one thread per coefficient column in the d_bias / d_scale pass"  # internal invariant
    G = threads // BM  # threads per token row in the d_logits staging (2 or 4)
    G_LOG = G.bit_length() - 1
    a = n2 // G  # d_pp columns per thread (G divides 2n for every n in STREAMS)
    b = -(-nn // G)  # d_res columns per thread (the tail masked at n = 1)
    # The blocks per SM that choose_splits assumes (fp32 activations: one fewer at n = 4, their x slice takes 16
    # registers more); ptxas is held to the registers that fit them (__launch_bounds__' second argument).
    min_blocks = min(_BWD_RESIDENT[n], 3) if dtype == "float32" else _BWD_RESIDENT[n]
    x_rows = threads // X_LANES  # x tile rows loaded per pass
    x_passes = BM // x_rows
    assert G * a == n2 and (1 << G_LOG) == G and x_passes * x_rows == BM  # internal invariants
    f32 = "float32"
    num_tokens = T.dynamic("num_tokens")
    num_splits = T.dynamic("num_splits")
    num_tiles = T.dynamic("num_tiles")  # ceil(num_tokens / BM), the rows of d_coef_part

    @T.macro
    def body(x, phi, d_pp, d_res, proj, rinv, alpha, h_pre, g_li, d_x_in, d_x, d_phi_part, d_coef_part):
        with T.Kernel(chunks, num_splits, threads=threads) as (kb, by):
            ps = T.alloc_shared((BK, mp), f32)  # phi's K-slice, loaded once
            xs = T.alloc_shared((BM, BK), f32)  # x tile, converted to fp32
            dps = T.alloc_shared((BM, mp), f32)  # d_proj tile (TF32-rounded, zero-padded)
            cxs = T.alloc_shared((BM,), f32)
            hps = T.alloc_shared((BM,), f32)
            dx_acc = T.alloc_fragment((BM, BK), f32)
            dphi_acc = T.alloc_fragment((BK, mp), f32)
            # One tile's global inputs, loaded into registers at the top of the tile before any of them is used
            # (one DRAM latency a tile; a load used right after it costs a latency each): x (xr, this thread's
            # x_passes rows of X_VEC channels), g_li and d_x_in (gl, dxi: the d_x accumulator's layout), and per
            # token row r = tx // G, part p = tx % G: d_pp's columns [p * a, p * a + a), d_res's [p * b, p * b + b)
            # (clamped; the tail masked), proj at the same columns, rinv and h_pre.
            xr = T.alloc_local((x_passes, X_VEC), dtype)
            gl = T.alloc_fragment((BM, BK), dtype)
            dxi = T.alloc_fragment((BM, BK), dtype) if accumulate else None
            # cx and h_pre of the accumulator's rows, read from shared memory once a tile, not per element pair
            cxf = None if accumulate else T.alloc_fragment((BM,), f32)
            hpf = None if accumulate else T.alloc_fragment((BM,), f32)
            dlp = T.alloc_local((a,), f32)
            prp = T.alloc_local((a,), f32)
            dlr = T.alloc_local((b,), f32)
            prr = T.alloc_local((b,), f32)
            T.annotate_min_blocks_per_sm(min_blocks)  # ptxas keeps the registers to the resident blocks
            tx = T.get_thread_binding()
            k0 = kb * BK
            stream = T.alloc_var("int32")
            stream = kb // (C // BK)  # BK divides C: the slice lies in one stream
            c0 = (kb % (C // BK)) * BK  # an expression, a visible multiple of BK: g_li's loads vectorize
            tiles = T.ceildiv(num_tokens, BM)
            # The split's token tiles, once, as int32 scalars (inlined into the loop they cost 64-bit divisions).
            per = T.alloc_var("int32")
            per = T.ceildiv(tiles, num_splits)
            t_base = T.alloc_var("int32")
            t_base = by * per * BM
            count = T.alloc_var("int32")
            count = T.min(per, tiles - by * per)
            a0 = T.alloc_var(f32)
            a0 = alpha[0]
            a1 = T.alloc_var(f32)
            a1 = alpha[1]
            a2 = T.alloc_var(f32)
            a2 = alpha[2]
            xrow = tx // X_LANES  # x: row xrow + x_rows * i, channels [X_VEC * xl, X_VEC * xl + X_VEC)
            xl = tx % X_LANES
            r = tx // G  # d_logits: token row r, part p (a row's parts in adjacent lanes)
            p = tx % G
            for i, j in T.Parallel(BK, mp):
                ps[i, j] = T.if_then_else(j < m, _tf32(phi[k0 + i, j]), T.float32(0))
            for i, j in T.Parallel(BM, mp):
                dps[i, j] = T.float32(0)  # the padded columns [m, mp) stay zero (the tile loop writes [0, m))
            T.clear(dphi_acc)
            for tt in T.serial(count):
                t0 = t_base + tt * BM
                # Every global load of the tile, rows past T clamped to T - 1 (masked below, never stored).
                for i in T.unroll(x_passes):
                    for e in T.vectorized(X_VEC):
                        xr[i, e] = x[T.min(t0 + xrow + x_rows * i, num_tokens - 1), k0 + X_VEC * xl + e]
                tr = T.min(t0 + r, num_tokens - 1)
                for i in T.unroll(a):
                    dlp[i] = d_pp[tr, p * a + i]
                    prp[i] = proj[tr, p * a + i]
                for i in T.unroll(b):
                    dlr[i] = d_res[tr, T.min(p * b + i, nn - 1)]
                    prr[i] = proj[tr, n2 + T.min(p * b + i, nn - 1)]
                rv = T.alloc_var(f32)
                rv = rinv[tr]
                hv = T.alloc_var(f32)
                hv = h_pre[tr, stream]
                for i, j in T.Parallel(BM, BK):
                    gl[i, j] = g_li[T.min(t0 + i, num_tokens - 1), c0 + j]
                if accumulate:
                    for i, j in T.Parallel(BM, BK):
                        dxi[i, j] = d_x_in[T.min(t0 + i, num_tokens - 1), k0 + j]
                T.sync_threads()  # the previous tile's GEMM and epilogue reads before these writes
                for i in T.unroll(x_passes):
                    for e in T.vectorized(X_VEC):
                        xs[xrow + x_rows * i, X_VEC * xl + e] = T.Select(
                            t0 + xrow + x_rows * i < num_tokens, T.cast(xr[i, e], f32), T.float32(0)
                        )
                # d_proj = d_logits * alpha_g * rinv (d_logits = d_pp | d_res), rows past T zero; and this part's
                # share of cx = -rinv^3 / K * sum_j d_logits_j * alpha_g(j) * proj_j, summed over the G parts of
                # the row by a butterfly (the same fixed order in every lane: deterministic).
                ok = t0 + r < num_tokens
                s = T.alloc_var(f32)
                s = T.float32(0)
                for i in T.unroll(a):
                    ag = T.Select(p * a + i < n, a0, a1)
                    dps[r, p * a + i] = T.Select(ok, _tf32(dlp[i] * ag * rv), T.float32(0))
                    s += dlp[i] * ag * prp[i]
                for i in T.unroll(b):
                    if nn % G == 0 or p * b + i < nn:
                        dps[r, n2 + p * b + i] = T.Select(ok, _tf32(dlr[i] * a2 * rv), T.float32(0))
                        s += dlr[i] * a2 * prr[i]
                for sh_ in T.unroll(G_LOG):
                    s = s + T.shfl_xor(s, 1 << sh_)  # the G parts of a row: lanes differing in bits [0, G_LOG)
                if p == 0:
                    cxs[r] = T.Select(ok, -s * rv * rv * rv * T.float32(1.0 / K), T.float32(0))  # no division
                    hps[r] = T.Select(ok, hv, T.float32(0))
                T.sync_threads()  # xs, dps, cxs, hps written before the GEMMs and the epilogue read them
                T.gemm(dps, ps, dx_acc, transpose_B=True, clear_accum=True)
                T.gemm(xs, dps, dphi_acc, transpose_A=True)
                if not accumulate:  # with d_x_in's 16 registers, ptxas spilled at 128 (n = 4, bf16)
                    for i in T.Parallel(BM):
                        cxf[i] = cxs[i]
                        hpf[i] = hps[i]
                for i, j in T.Parallel(BM, BK):
                    if t0 + i < num_tokens:
                        if accumulate:
                            v = dx_acc[i, j] + cxs[i] * xs[i, j] + hps[i] * T.cast(gl[i, j], f32)
                        else:
                            v = dx_acc[i, j] + cxf[i] * xs[i, j] + hpf[i] * T.cast(gl[i, j], f32)
                        if accumulate:
                            v = v + T.cast(dxi[i, j], f32)
                        d_x[t0 + i, k0 + j] = T.cast(v, dtype)
            for i, j in T.Parallel(BK, mp):
                if j < m:
                    d_phi_part[by, k0 + i, j] = dphi_acc[i, j]
            # Per token tile: d_bias_j = sum_t d_logits[t, j] and d_scale_j = sum_t d_logits[t, j] * proj[t, j] *
            # rinv[t], for the split's tiles kb, kb + chunks, ... (every tile in exactly one block): thread j sums
            # column j in token order. After the GEMM loop (its registers are free by then); a rolled loop (unrolled,
            # ptxas hoisted the loads to 255 registers and spilled).
            if tx < m:
                col = T.min(tx, m - 1)
                for it in T.serial(T.ceildiv(T.max(count - kb, 0), chunks)):
                    tile = by * per + kb + it * chunks  # the global tile index
                    t0 = tile * BM
                    sb = T.alloc_var(f32)
                    sc = T.alloc_var(f32)
                    sb = T.float32(0)
                    sc = T.float32(0)
                    for i in T.serial(T.min(BM, num_tokens - t0)):  # a dynamic count: a rolled loop
                        dl = _coef_grad(d_pp, d_res, t0 + i, col, n)
                        sb += dl
                        sc += dl * proj[t0 + i, col] * rinv[t0 + i]
                    d_coef_part[tile, col] = sb
                    d_coef_part[tile, m + col] = sc

    if accumulate:

        @T.prim_func
        def pre_proj_bwd_acc(
            x: T.Tensor((num_tokens, K), dtype),
            phi: T.Tensor((K, m), f32),
            d_pp: T.Tensor((num_tokens, n2), f32),
            d_res: T.Tensor((num_tokens, nn), f32),
            proj: T.Tensor((num_tokens, m), f32),
            rinv: T.Tensor((num_tokens,), f32),
            alpha: T.Tensor((3,), f32),
            h_pre: T.Tensor((num_tokens, n), f32),
            g_li: T.Tensor((num_tokens, C), dtype),
            d_x_in: T.Tensor((num_tokens, K), dtype),
            d_x: T.Tensor((num_tokens, K), dtype),
            d_phi_part: T.Tensor((num_splits, K, m), f32),
            d_coef_part: T.Tensor((num_tiles, 2 * m), f32),
        ):
            body(x, phi, d_pp, d_res, proj, rinv, alpha, h_pre, g_li, d_x_in, d_x, d_phi_part, d_coef_part)

        return pre_proj_bwd_acc

    @T.prim_func
    def pre_proj_bwd(
        x: T.Tensor((num_tokens, K), dtype),
        phi: T.Tensor((K, m), f32),
        d_pp: T.Tensor((num_tokens, n2), f32),
        d_res: T.Tensor((num_tokens, nn), f32),
        proj: T.Tensor((num_tokens, m), f32),
        rinv: T.Tensor((num_tokens,), f32),
        alpha: T.Tensor((3,), f32),
        h_pre: T.Tensor((num_tokens, n), f32),
        g_li: T.Tensor((num_tokens, C), dtype),
        d_x: T.Tensor((num_tokens, K), dtype),
        d_phi_part: T.Tensor((num_splits, K, m), f32),
        d_coef_part: T.Tensor((num_tiles, 2 * m), f32),
    ):
        body(x, phi, d_pp, d_res, proj, rinv, alpha, h_pre, g_li, None, d_x, d_phi_part, d_coef_part)

    return pre_proj_bwd


@functools.cache
def pre_proj_fwd_kernel(n: int, C: int, dtype: str):
    """The compiled forward kernel for ``(n, C, dtype)`` (memoised; TileLang's disk cache below)."""
    return _common.compile_program(pre_proj_fwd_program(n, C, dtype), pass_configs=_HAND_SYNC)


@functools.cache
def pre_proj_bwd_kernel(n: int, C: int, dtype: str, accumulate: bool = False):
    """The compiled backward kernel for ``(n, C, dtype, accumulate)`` (memoised; TileLang's disk cache below)."""
    return _common.compile_program(pre_proj_bwd_program(n, C, dtype, accumulate), pass_configs=_HAND_SYNC)
