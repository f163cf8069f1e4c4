"""The residual boundary between two mHC sites: site l's F_post,res fused with site l+1's projection (forward), and
post_res(l)'s backward on the sum of the two gradients of x_{l+1} (:func:`boundary_bwd_program`).

Math, per token ``t`` (site l's coefficients ``h_post``, ``h_res``; site l+1's ``phi``; ``K = n * C``,
``m = n * n + 2n``)::

    x_next[t, i, c] = sum_j h_res[t, i, j] * residual[t, j, c] + h_post[t, i] * layer_output[t, c]   (Eq. 3)
    proj_part[s, t, k] = sum over split s of  x_next[t, k] * phi[k, :]                              (Eq. 14)
    sq_part[s, t]      = sum over split s of  x_next[t, k]^2                                        (Eq. 15)

``x_next`` is rounded to the activation dtype once, on store, and the projection and the sum of squares use the
*rounded* values, i.e. exactly what site l+1 would read back from memory; so ``x_next`` is bit for bit the output
of ``tl_kernels.post_res`` (same operation order: ``h_post * y`` first, then one FMA per ``j`` in order), and the
partials are those of ``tl_kernels.pre_proj`` up to the order of the fp32 sums (the TF32 budget below).
``tl_kernels.pre_finalize`` then runs unchanged: it reduces the partials in split order and applies H_pre.

Layout and call contract (contiguous; ``T`` = ``num_tokens`` and ``S`` = ``num_splits`` dynamic, one binary per
``(n, C, dtype)``)::

    boundary_fwd_kernel(n, C, dtype)(layer_output [T, C] dt, residual [T, n, C] dt, h_post [T, n] f32,
        h_res [T, n, n] f32, phi [K, m] f32, out [T, n, C] dt, proj_part [S, T, m] f32, sq_part [S, T] f32)

grid ``(ceil(T / BM), S)``. Split ``s`` owns the channel blocks ``[s * ceil(CB / S), ...)`` (``CB = C / BC``) of
*every* stream: it is a partition of K = n * C like pre_proj's, in a different order (pre_proj splits K-chunks
stream by stream), which pre_finalize does not see. Use :func:`choose_splits` (every split non-empty). ``dt`` in
bfloat16 / float16 / float32; n in {1, 2, 4, 6, 8}; C a positive multiple of 64 up to 65536; T >= 1.

Precision. As pre_proj: ``phi`` is rounded to nearest TF32 when staged in shared memory, bf16/fp16 ``x_next`` is
exact in TF32 and fp32 ``x_next`` is truncated by the MMA, so ``|proj - exact| <= 2**-11 * sum_k |x_k phi_kj|``
(2**-10 + 2**-11 for fp32) plus fp32 accumulation error. ``sq`` is fp32 FMA on the rounded values.

Design: pre_proj's forward (x in registers, phi staged in the MMA's B-fragment order, a hand-pipelined K loop) with
post_res in front of it. A block of 128 threads (4 warps) owns BM = 64 tokens; each warp owns 16 of them, one MMA
row tile, and walks its split's channel blocks of ``BC = 4 * VEC`` channels (``VEC`` = elements in 16 bytes: 32
channels for bf16/fp16, 16 for fp32). Lane ``4g + q`` of a warp owns token rows ``g`` and ``g + 8`` and channels
``[q * VEC, (q + 1) * VEC)`` of the block, in every stream; per channel block:

1. (post_res) the lane's 16-byte chunks of ``layer_output`` and of the n residual streams, for both rows, are
   already in registers (128-bit loads issued during the previous block); it forms the n output chunks with
   post_res's arithmetic, rounds them to ``dt``, stores each with one 128-bit store to ``out``, adds their squares
   to its two row sums and parks them in a lane-private slot of shared memory (conflict-free 128-bit accesses, read
   back by the same thread: no barrier), so that one stream's chunks at a time are in registers during the MMAs.
   They are the lane's A-fragments as they are.
2. (prefetch) it issues the next channel block's 2 (n + 1) 128-bit loads into the registers just freed, so they
   are in flight during this block's MMAs.
3. (projection) for each stream i, a chunk of K = BC: phi's rows ``i * C + [c0, c0 + BC)`` (a contiguous BC x m
   block, whose loads were issued one chunk earlier) are TF32-rounded into one of two shared buffers in the
   B-fragment order (:func:`_fragment_index`), one barrier, the next chunk's phi loads are issued, and the VEC / 2
   K-steps run ``mma.sync.m16n8k8`` TF32 on the [16, 8 * ceil(m / 8)] register accumulator. The K order within
   the chunk is permuted, so that step s takes channel ``q * VEC + 2s`` (A slot q) and ``+ 1`` (slot q + 4) of
   the lane's own chunk: the post_res output feeds the MMA with no exchange between threads and no conversion
   beyond the exact widening to fp32; each B operand is one conflict-free 64-bit shared load.

Where the register design does not fit (n = 8 with 16-bit activations: its post_res half's widened inputs made
ptxas spill, :func:`_register_design`), the shared-tile design runs: 64-channel blocks, post_res's chunks written
to a shared tile ``xs [n, BM, BC + VEC]`` (rows padded by 16 bytes), then per stream phi staged in shared memory
and ``T.gemm`` from the tile (TileLang's fragment copy and barriers): the same call contract and partials.

Rows past T are clamped to T - 1 on load (an MMA row only feeds its own output row; neither that row's ``out``
nor its partials are stored). At the end the two row sums are reduced over the four lanes q with an xor butterfly
(fixed order) and lane q = 0 writes ``sq_part``; the accumulator is written to ``proj_part``. No atomics: bitwise
reproducible for a given (T, S). The coefficient tiles ``h_res`` / ``h_post`` of the block's tokens sit in shared
memory with rows padded by one word (the 8 rows a warp reads at once fall in distinct banks). In the register
design the barriers are placed by hand (pre_proj's pass configuration, TileLang's sync pass off): one after the
coefficient tiles and the zero fill of the phi buffers, one per (channel block, stream) chunk;
tests/emulation/test_barrier_mutations.py deletes each and sees every deletion.

Bytes per token (bf16, n = 4): reads layer_output 2C + residual 8C, writes out 8C: 18C, plus S x (m + 1) x 4 B of
partials and 80 B of coefficients; phi (K x m x 4 B) is read once per token tile, from L2. Site l+1's pre_finalize
then reads x_next once (8C) and writes layer_input (2C): 28C for the boundary, against 36C unfused
(post_res 18C + pre_proj 8C + pre_finalize 10C).

Resources and speed: registers, spills (none in any registered configuration: ``pytest tests/kernels/test_codegen.py
-k boundary``), the channel-block loop's instructions and MMAs (tests/kernels/test_boundary_sass.py) and the
performance model's prediction (``python -m profiling model --kernel site_fwd --json PATH``, the ``boundary_fwd``
part of the chain record) are in docs/benchmarks.md beside their commands.

Backward (:func:`boundary_bwd_program`): post_res's token-to-thread mapping and reduction with a second gradient
input; 36C a token at n = 4, bf16 instead of 52C (add + post_res backward). ptxas: 0 spills, 0 stack; registers
n = 1 bf16 C = 1280: 34, n = 2 fp16 C = 1920: 56, n = 4 bf16 C = 7168: 121, n = 4 fp32 C = 1280: 128, n = 6 bf16
C = 4096 / 7168: 195 / 210, n = 6 fp32 C = 7168: 224, n = 8 bf16 / fp32 C = 7168: 243 / 245 (same
``codegen.analyze`` call with ``boundary_bwd_kernel``; all 35 registered configurations spill-free:
``pytest tests/kernels/test_codegen.py -k boundary``). ``__launch_bounds__`` follows post_res's rule with
``_BWD_REG_BUDGET``.

The fully fused backward (:func:`boundary_bwd_fused_program`, with :func:`boundary_reduce_bwd_program`) replaces
``pre_proj_bwd`` and this backward: x_next recomputed from x and y, site l+1's d x_next, the incoming gradient and
post_res(l)'s backward in one pass, 30C a token (40C with pre_finalize_bwd) plus the d_h partials; its docstring
has the design, docs/design.md section 7 the bytes, the model's estimate and the resources.

Verified without a GPU: the generated source runs in the CPU emulation (tests/emulation/test_boundary_emulated.py,
and under AddressSanitizer: test_asan_boundary.py). Speed: not measured (no GPU has run this kernel); the 18C a
token is a byte count, not a time.
"""

import functools
from dataclasses import dataclass

from . import _common

__all__ = [
    "BM",
    "DTYPES",
    "STREAMS",
    "boundary_bwd_fused_kernel",
    "boundary_bwd_fused_program",
    "boundary_bwd_kernel",
    "boundary_bwd_program",
    "boundary_fwd_kernel",
    "boundary_fwd_program",
    "boundary_reduce_bwd_kernel",
    "boundary_reduce_bwd_program",
    "choose_splits",
    "fused_choose_splits",
    "fused_plan",
    "plan",
]

DTYPES: tuple[str, ...] = _common.ACTIVATION_DTYPES
STREAMS: tuple[int, ...] = (1, 2, 4, 6, 8)
BM = 64  # tokens per block
THREADS = 128
MAX_SPLITS = 64
_VECTOR_BYTES = 16
_ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_TILE_BYTES = 64 * 1024  # the shared-tile design: most shared memory for the x_next tile xs [n, BM, BC]
_BWD_REG_BUDGET = {1: 48, 2: 72, 4: 128, 6: 168, 8: 255}  # registers a thread, -> __launch_bounds__ min blocks


@dataclass(frozen=True)
class Plan:
    n: int
    C: int
    m: int  # n * n + 2n
    mp: int  # m padded to a multiple of 16
    nt: int  # MMA column tiles: ceil(m / 8)
    vec: int  # elements per 16-byte chunk: the channels a lane holds per token row and stream
    bc: int  # channels per block step: 4 * vec (the four lanes q of an MMA row group)
    steps: int  # m16n8k8 K-steps per stream and channel block: vec / 2
    blocks: int  # channel blocks: C / bc
    registers: bool  # the register design (module docstring), else the shared-tile one
    per_thread: int  # phi elements a thread stages per (channel block, stream): ceil(bc * m / THREADS)


def _register_design(n: int, vec: int) -> bool:
    """Whether the register design fits: its post_res half holds ``2 (n + 1) VEC`` widened fp32 inputs a thread
    (both token rows of the n residual streams and layer_output) beside the MMA accumulators, the next block's loads
    and the next phi chunk. ptxas fits n = 6 with 16-bit activations (112 values) without spilling and spilled at
    n = 8 (144; ``pytest tests/kernels/test_codegen.py -k boundary_fwd`` with the bound raised shows it); there the
    shared-tile design (:func:`_boundary_fwd_tile_program`) runs."""
    return 2 * (n + 1) * vec <= 112


def plan(n: int, C: int, dtype: str) -> Plan:
    """The tiling for ``(n, C, dtype)``; validates the build-time arguments."""
    _common.validate_activation_config("boundary", n, C, dtype, STREAMS)
    elt = _ELEMENT_BYTES[dtype]
    vec = _VECTOR_BYTES // elt
    registers = _register_design(n, vec)
    bc = 4 * vec if registers else (64 if n * BM * 64 * elt <= _TILE_BYTES else 32)
    m = n * n + 2 * n
    return Plan(n=n, C=C, m=m, mp=-(-m // 16) * 16, nt=-(-m // 8), vec=vec, bc=bc, steps=vec // 2,
                blocks=C // bc, registers=registers, per_thread=-(-bc * m // THREADS))  # fmt: skip


def choose_splits(num_tokens: int, n: int, C: int, dtype: str, num_sms: int) -> int:
    """Split count for a launch: about 2 blocks per SM, every split non-empty, at most :data:`MAX_SPLITS`."""
    p = plan(n, C, dtype)
    tiles = -(-num_tokens // BM)
    want = max(1, min(MAX_SPLITS, p.blocks, -(-2 * num_sms // max(tiles, 1))))
    per = -(-p.blocks // want)
    return -(-p.blocks // per)


def _fragment_index(r, j, vec: int, nt_count: int):
    """Where phi's element (row ``r`` < 4 * vec of a (channel block, stream) chunk, column ``j``) lies in shared
    memory, in the MMA's B-fragment order ``[step][column tile][lane][2]``.

    Lane ``4g + q`` holds channels ``[q * vec, (q + 1) * vec)`` of its token rows (one 16-byte chunk a row), and
    K-step ``s`` feeds it channels ``q * vec + 2s`` (A slot q) and ``+ 1`` (slot q + 4), so its B pair is phi rows
    ``q * vec + 2s`` and ``+ 1`` of column ``8 nt + g``: one conflict-free 64-bit shared load a lane per MMA (the
    order of pre_proj's forward, whose lanes hold two such chunks)."""
    lane = (j % 8) * 4 + r // vec
    return (((r % vec) // 2 * nt_count + j // 8) * 32 + lane) * 2 + r % 2


def boundary_fwd_program(n: int, C: int, dtype: str):
    """``out = h_res @ residual + h_post^T layer_output`` and the next site's projection partials; see the module
    docstring."""
    import tilelang.language as T
    from tvm import tirx

    from . import pre_proj  # its TF32 rounding; imported here so that this module loads without TileLang

    p = plan(n, C, dtype)
    if not p.registers:
        return _boundary_fwd_tile_program(n, C, dtype)
    m, nt_count, vec, bc, per_thread = p.m, p.nt, p.vec, p.bc, p.per_thread
    nn = n * n
    frag = bc * nt_count * 8  # floats of one (channel block, stream) chunk of phi in B-fragment order
    f32 = "float32"
    num_tokens = T.dynamic("num_tokens")
    num_splits = T.dynamic("num_splits")

    @T.macro
    def load_x(layer_output, residual, c0, row0, row1, xl, lo):
        # one 16-byte chunk per token row (g, g + 8) of layer_output and of each residual stream
        for e in T.vectorized(vec):
            lo[0, e] = layer_output[row0, c0 + e]
        for e in T.vectorized(vec):
            lo[1, e] = layer_output[row1, c0 + e]
        for j in T.unroll(n):
            for e in T.vectorized(vec):
                xl[j, 0, e] = residual[row0, j, c0 + e]
            for e in T.vectorized(vec):
                xl[j, 1, e] = residual[row1, j, c0 + e]

    @T.macro
    def load_phi(phi, k0, tx, pd):
        # the chunk's bc x m block of phi is contiguous: thread tx takes elements tx, tx + THREADS, ... (coalesced)
        for u in T.unroll(per_thread):
            if (bc * m) % THREADS == 0 or u * THREADS + tx < bc * m:
                f = u * THREADS + tx
                pd[u] = phi[k0 + f // m, f % m]

    @T.macro
    def stage_phi(ps, buf, tx, pd):
        for u in T.unroll(per_thread):
            if (bc * m) % THREADS == 0 or u * THREADS + tx < bc * m:
                f = u * THREADS + tx
                ps[buf * frag + _fragment_index(f // m, f % m, vec, nt_count)] = pre_proj._tf32(pd[u])

    @T.prim_func
    def boundary_fwd(
        layer_output: T.Tensor((num_tokens, C), dtype),
        residual: T.Tensor((num_tokens, n, C), dtype),
        h_post: T.Tensor((num_tokens, n), f32),
        h_res: T.Tensor((num_tokens, n, n), f32),
        phi: T.Tensor((n * C, m), f32),
        out: T.Tensor((num_tokens, n, C), dtype),
        proj_part: T.Tensor((num_splits, num_tokens, m), f32),
        sq_part: T.Tensor((num_splits, num_tokens), f32),
    ):
        with T.Kernel(T.ceildiv(num_tokens, BM), num_splits, threads=THREADS) as (bx, by):
            # coefficient rows padded by one word: the 8 rows a warp reads at once fall in distinct banks
            hr = T.alloc_shared((BM, nn + 1), f32)
            hp = T.alloc_shared((BM, n + 1), f32)
            ps = T.alloc_shared((2 * frag,), f32)  # phi's (channel block, stream) chunk, B-fragment order, 2 buffers
            xl = T.alloc_local((n, 2, vec), dtype)  # residual chunks (rows g, g + 8); the next block's in flight
            lo = T.alloc_local((2, vec), dtype)  # layer_output chunks
            # x_next chunks, rounded: the MMA's A operand. Each lane parks its own chunks in a lane-private slot of
            # shared memory (128-bit accesses, consecutive lanes on consecutive 16 bytes: conflict-free; no barrier,
            # the thread that writes a slot is the one that reads it), so that only one stream's chunks are in
            # registers during the MMAs, beside the next block's loads in flight (all n in registers spilled at n = 6).
            xs = T.alloc_shared((n, 2, THREADS, vec), dtype)
            xo = T.alloc_local((vec,), dtype)
            xa = T.alloc_local((2, vec), dtype)
            acc = T.alloc_local((vec,), f32)
            pd = T.alloc_local((per_thread,), f32)  # the next chunk's phi elements, in flight
            pacc = T.alloc_local((4 * nt_count,), f32)
            af = T.alloc_local((4,), f32)
            bf = T.alloc_local((2,), f32)
            sq = T.alloc_local((2,), f32)
            tx = T.get_thread_binding()
            lane = tx % 32
            g = lane // 4
            q = lane % 4
            r0 = (tx // 32) * 16 + g  # the block's row of this lane's first token (the second: r0 + 8)
            tok0 = bx * BM + r0  # rows past T are clamped to T - 1 on load (their outputs are never stored)
            row0 = T.min(tok0, num_tokens - 1)
            row1 = T.min(tok0 + 8, num_tokens - 1)
            t0 = bx * BM
            # The split's bounds, once, as int32 scalars (inlined into the loop they cost 64-bit divisions).
            per = T.alloc_var("int32")
            per = T.ceildiv(p.blocks, num_splits)
            b_first = T.alloc_var("int32")
            b_first = by * per
            count = T.alloc_var("int32")
            count = T.min(per, p.blocks - by * per)
            for r, c in T.Parallel(BM, nn):
                hr[r, c] = T.if_then_else(
                    t0 + r < num_tokens, h_res[T.min(t0 + r, num_tokens - 1), c // n, c % n], T.float32(0)
                )
            for r, c in T.Parallel(BM, n):
                hp[r, c] = T.if_then_else(t0 + r < num_tokens, h_post[T.min(t0 + r, num_tokens - 1), c], T.float32(0))
            for u in T.serial(2 * frag // THREADS):
                ps[u * THREADS + tx] = T.float32(0)  # the padded columns (m % 8 != 0) stay zero
            for u in T.unroll(4 * nt_count):
                pacc[u] = T.float32(0)
            sq[0] = T.float32(0)
            sq[1] = T.float32(0)
            if count > 0:  # an empty split (not made by choose_splits) writes zeros and reads nothing
                load_x(layer_output, residual, b_first * bc + q * vec, row0, row1, xl, lo)
                load_phi(phi, b_first * bc, tx, pd)
            # Barrier: the coefficient tiles and the zero fill of ps are written before any thread reads hr / hp or
            # stages phi over the fill.
            T.sync_threads()
            for bb in T.serial(count):
                c0 = (b_first + bb) * bc + q * vec
                # post_res's arithmetic (h_post * y first, then one FMA per stream j in order), rounded once
                for r in T.unroll(2):
                    for i in T.unroll(n):
                        for e in T.unroll(vec):
                            acc[e] = hp[r0 + 8 * r, i] * T.cast(lo[r, e], f32)
                        for j in T.unroll(n):
                            for e in T.unroll(vec):
                                acc[e] = acc[e] + hr[r0 + 8 * r, i * n + j] * T.cast(xl[j, r, e], f32)
                        for e in T.vectorized(vec):
                            xo[e] = T.cast(acc[e], dtype)
                        for e in T.vectorized(vec):
                            xs[i, r, tx, e] = xo[e]
                        if tok0 + 8 * r < num_tokens:
                            T.stg128(out[tok0 + 8 * r, i, c0], T.reinterpret(xo[tirx.Ramp(0, 1, vec)], "uint32x4"))
                        for e in T.unroll(vec):
                            sq[r] = sq[r] + T.cast(xo[e], f32) * T.cast(xo[e], f32)
                if bb + 1 < count:  # the next channel block's activations, in flight during this block's MMAs
                    load_x(layer_output, residual, (b_first + bb + 1) * bc + q * vec, row0, row1, xl, lo)
                for i in T.unroll(n):
                    buf = (bb * n + i) % 2
                    stage_phi(ps, buf, tx, pd)
                    # Barrier (one per chunk): the staged chunk is complete before any warp's MMAs read it; buffer buf
                    # was last read two chunks ago, before the previous chunk's barrier.
                    T.sync_threads()
                    if i + 1 < n:
                        load_phi(phi, (i + 1) * C + (b_first + bb) * bc, tx, pd)
                    elif bb + 1 < count:
                        load_phi(phi, (b_first + bb + 1) * bc, tx, pd)
                    for r in T.unroll(2):
                        for e in T.vectorized(vec):
                            xa[r, e] = xs[i, r, tx, e]
                    for s in T.unroll(p.steps):
                        # A slot q is channel q * vec + 2s of rows g / g + 8, slot q + 4 the next channel
                        af[0] = T.cast(xa[0, 2 * s], f32)
                        af[1] = T.cast(xa[1, 2 * s], f32)
                        af[2] = T.cast(xa[0, 2 * s + 1], f32)
                        af[3] = T.cast(xa[1, 2 * s + 1], f32)
                        for nt in T.unroll(nt_count):
                            for v in T.vectorized(2):
                                bf[v] = ps[buf * frag + ((s * nt_count + nt) * 32 + lane) * 2 + v]
                            T.ptx_mma(f32, "m16n8k8", "row", "col", "tf32", "tf32", "fp32",
                                      af.data, 0, bf.data, 0, pacc.data, 4 * nt, T.bool(False))  # fmt: skip
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
                                proj_part[by, tok0 + 8 * r, nt * 8 + 2 * q + c] = pacc[4 * nt + 2 * r + c]

    return boundary_fwd


def _boundary_fwd_tile_program(n: int, C: int, dtype: str):
    """The forward where the register design does not fit (:func:`_register_design`): post_res into a shared tile
    ``xs [n, BM, BC + VEC]`` (rows padded by 16 bytes), then ``T.gemm`` per stream from it; TileLang's sync pass
    places the barriers. See the module docstring."""
    import tilelang.language as T
    from tvm import tirx

    from . import pre_proj

    p = plan(n, C, dtype)
    m, mp, vec, bc = p.m, p.mp, p.vec, p.bc
    K, nn = n * C, n * n
    f32 = "float32"
    lanes = bc // vec
    rows = THREADS // lanes
    passes = BM // rows
    shuffle_offsets = tuple(lanes >> s for s in range(1, lanes.bit_length()))  # lanes/2, ..., 1
    num_tokens = T.dynamic("num_tokens")
    num_splits = T.dynamic("num_splits")

    @T.macro
    def chunk(t, r, c0, cl, layer_output, residual, out, hr, hp, xs, xl, ls, acc, ob, sqa, k):
        for e in T.vectorized(vec):
            ls[e] = layer_output[t, c0 + e]
        for j in T.unroll(n):
            for e in T.vectorized(vec):
                xl[j, e] = residual[t, j, c0 + e]
        for i in T.unroll(n):
            for e in T.unroll(vec):
                acc[e] = hp[r, i] * T.cast(ls[e], f32)
            for j in T.unroll(n):
                for e in T.unroll(vec):
                    acc[e] = acc[e] + hr[r, i * n + j] * T.cast(xl[j, e], f32)
            for e in T.vectorized(vec):
                ob[e] = T.cast(acc[e], dtype)
            T.stg128(out[t, i, c0], T.reinterpret(ob[tirx.Ramp(0, 1, vec)], "uint32x4"))
            for e in T.vectorized(vec):
                xs[i, r, cl + e] = ob[e]
            for e in T.unroll(vec):
                sqa[k] = sqa[k] + T.cast(ob[e], f32) * T.cast(ob[e], f32)

    @T.prim_func
    def boundary_fwd(
        layer_output: T.Tensor((num_tokens, C), dtype),
        residual: T.Tensor((num_tokens, n, C), dtype),
        h_post: T.Tensor((num_tokens, n), f32),
        h_res: T.Tensor((num_tokens, n, n), f32),
        phi: T.Tensor((K, m), f32),
        out: T.Tensor((num_tokens, n, C), dtype),
        proj_part: T.Tensor((num_splits, num_tokens, m), f32),
        sq_part: T.Tensor((num_splits, num_tokens), f32),
    ):
        with T.Kernel(T.ceildiv(num_tokens, BM), num_splits, threads=THREADS) as (bx, by):
            hr = T.alloc_shared((BM, nn), f32)  # h_res (row-major) of the tile's tokens
            hp = T.alloc_shared((BM, n), f32)  # h_post of the tile's tokens
            xs = T.alloc_shared((n, BM, bc + vec), dtype)  # x_next of the channel block, rounded; rows padded
            ps = T.alloc_shared((bc, mp), f32)  # phi rows of one stream's channel block, TF32-rounded
            xf = T.alloc_fragment((BM, bc), f32)
            pacc = T.alloc_fragment((BM, mp), f32)
            xl = T.alloc_local((n, vec), dtype)
            ls = T.alloc_local((vec,), dtype)
            acc = T.alloc_local((vec,), f32)
            ob = T.alloc_local((vec,), dtype)
            sqa = T.alloc_local((passes,), f32)
            tx = T.get_thread_binding()
            lane = tx % lanes
            t0 = bx * BM
            for r, q in T.Parallel(BM, nn):
                hr[r, q] = T.if_then_else(
                    t0 + r < num_tokens, h_res[T.min(t0 + r, num_tokens - 1), q // n, q % n], T.float32(0)
                )
            for r, q in T.Parallel(BM, n):
                hp[r, q] = T.if_then_else(t0 + r < num_tokens, h_post[T.min(t0 + r, num_tokens - 1), q], T.float32(0))
            T.clear(pacc)
            for k in T.unroll(passes):
                sqa[k] = T.float32(0)
            per = T.ceildiv(p.blocks, num_splits)
            b_first = by * per
            for bb in T.serial(T.min(per, p.blocks - b_first)):
                cb0 = (b_first + bb) * bc
                for k in T.unroll(passes):
                    r = k * rows + tx // lanes
                    cl = lane * vec
                    if t0 + r < num_tokens:
                        chunk(t0 + r, r, cb0 + cl, cl, layer_output, residual, out, hr, hp, xs, xl, ls, acc, ob, sqa, k)
                    else:
                        for i in T.unroll(n):
                            for e in T.vectorized(vec):
                                xs[i, r, cl + e] = T.cast(0, dtype)
                for i in T.serial(n):
                    for kk, j in T.Parallel(bc, mp):
                        ps[kk, j] = T.if_then_else(
                            j < m, pre_proj._tf32(phi[i * C + cb0 + kk, T.min(j, m - 1)]), T.float32(0)
                        )
                    T.copy(xs[i, :, 0:bc], xf)
                    T.gemm(xf, ps, pacc)
            # Sums of squares: xor butterfly over the row's lanes (consecutive threads), fixed order.
            for offset in shuffle_offsets:
                for k in T.unroll(passes):
                    sqa[k] = sqa[k] + T.shfl_xor(sqa[k], offset)
            if lane == 0:
                for k in T.unroll(passes):
                    if t0 + k * rows + tx // lanes < num_tokens:
                        sq_part[by, t0 + k * rows + tx // lanes] = sqa[k]
            for i, j in T.Parallel(BM, mp):
                if t0 + i < num_tokens and j < m:
                    proj_part[by, t0 + i, j] = pacc[i, j]

    return boundary_fwd


def boundary_bwd_program(
    n: int, C: int | None = None, dtype: str | None = None, *, fused: bool = False, reduce_dh: bool = False
):
    """post_res(l)'s backward on the *sum* of the two gradients that reach ``x_next``, without writing the sum.

    ``fused=True``: :func:`boundary_bwd_fused_program` (the whole backward across the boundary in one pass);
    ``reduce_dh=True``: :func:`boundary_reduce_bwd_program` (``n`` only: the fused backward's last launch, d_phi,
    d_alpha, d_bias and d_h). The registry names the three variants
    ``boundary_bwd[n, C, dtype]``, ``boundary_bwd[n, C, dtype, fused=True]`` and ``boundary_bwd[n, reduce_dh=True]``.

    Math, per token (``g = round_dt(grad_x_next + d_x_next)``: the sum rounded once to the activation dtype, exactly
    as autograd's accumulation of the two gradients of ``x_next`` in the unfused path)::

        d_layer_output[c] = sum_i h_post[i] g[i, c]          d_h_post[i]    = sum_c g[i, c] layer_output[c]
        d_residual[j, c]  = sum_i h_res[i, j] g[i, c]        d_h_res[i, j]  = sum_c g[i, c] residual[j, c]

    ``grad_x_next`` is the gradient from ``x_next``'s other consumer (the next site's post_res), ``d_x_next`` the
    pre-mapping's (``pre_proj_bwd``). Call: ``boundary_bwd_kernel(n, C, dtype)(grad_x_next [T, n, C] dt,
    d_x_next [T, n, C] dt, layer_output [T, C] dt, residual [T, n, C] dt, h_post [T, n] f32, h_res [T, n, n] f32,
    d_layer_output [T, C] dt, d_residual [T, n, C] dt, d_h_post [T, n] f32, d_h_res [T, n, n] f32)``, grid
    ``ceil(T / tokens_per_block)`` with post_res's token-to-thread mapping (``tl_kernels.post_res._plan``), its
    register budget, its fixed-order butterfly and block reduction (deterministic, no atomics). Bitwise the unfused
    ``g = grad_x_next + d_x_next`` followed by ``post_res_bwd(g, ...)``: same rounding of the sum, same arithmetic.

    Bytes per token (bf16, n = 4): reads 8C + 8C + 2C + 8C, writes 2C + 8C = 36C, against 52C for the add (24C) and
    post_res's backward (28C). Step towards the fully fused backward (module docstring of mhc/boundary.py).
    """
    from . import post_res

    if reduce_dh:
        return boundary_reduce_bwd_program(n)
    if fused:
        return boundary_bwd_fused_program(n, C, dtype)
    _common.validate_activation_config("boundary", n, C, dtype, STREAMS)
    p = post_res._plan(n, C, dtype)
    # post_res's __launch_bounds__ rule with this kernel's own budget: the second gradient's registers made n = 6
    # (bf16, C = 7168: 224 threads) spill 56 bytes under post_res's 144-register budget (2 blocks a SM)
    min_blocks = 1
    if p.tpb == 1:
        min_blocks = max(1, min(65536 // (_BWD_REG_BUDGET[n] * p.threads), 2048 // p.threads))
    # The program is post_res's backward with the second gradient added in registers (one home for that code).
    return post_res.post_res_bwd_program(n, C, dtype, summed=True, min_blocks=min_blocks)


@functools.cache
def boundary_bwd_kernel(
    n: int, C: int | None = None, dtype: str | None = None, fused: bool = False, reduce_dh: bool = False
):
    """The compiled backward kernel for ``(n, C, dtype)`` (memoised; TileLang's disk cache below); ``fused`` and
    ``reduce_dh`` select :func:`boundary_bwd_fused_kernel` and :func:`boundary_reduce_bwd_kernel`."""
    if reduce_dh:
        return boundary_reduce_bwd_kernel(n)
    if fused:
        return boundary_bwd_fused_kernel(n, C, dtype)
    return _common.compile_program(boundary_bwd_program(n, C, dtype))


@functools.cache
def boundary_fwd_kernel(n: int, C: int, dtype: str):
    """The compiled forward kernel for ``(n, C, dtype)`` (memoised; TileLang's disk cache below)."""
    from . import pre_proj

    # The register design: pre_proj's pass configuration, barriers placed by hand (boundary_fwd_program) and 128-bit
    # loads at the splits' dynamic offsets (in bounds by construction: rows clamped, every split non-empty;
    # ASan-tested). The shared-tile design: TileLang's defaults (its sync pass places the barriers).
    configs = pre_proj._HAND_SYNC if plan(n, C, dtype).registers else None
    return _common.compile_program(boundary_fwd_program(n, C, dtype), pass_configs=configs)


# ------------------------------------------------------------------------------------ the fully fused backward pass

FUSED_BM = 32  # tokens per tile of the fused backward
FUSED_THREADS = 256
COEF_BM = 64  # tokens per row of d_coef_part: pre_proj's tile, so the rows (and d_bias, d_alpha) are bit for bit its
REDUCE_UNROLL = 8  # partials a thread loads at once in the d_h reduction (then sums in channel-block order)
# n = 4 stays at one: with a tile's inputs loaded at its top it needs 244 registers (bf16; 128 spilled 60 to 644
# bytes), and one block of 244 beats two latency-bound ones (python -m profiling model --site chain --kernel site_bwd
# --C 7168 --gpu H100: the kernel's t_latency 3,862 -> 1,571 us); fp32's 113.8 KB of shared memory fits once anyway
_FUSED_MIN_BLOCKS = {(n, dt): 2 for n in (1, 2) for dt in ("bfloat16", "float16", "float32")} | {(4, "float32"): 1}
# The fused backward places its barriers by hand (as pre_proj's backward; tests/emulation/test_barrier_mutations.py
# deletes each in turn) and indexes in bounds by construction (row guards; the ASan test checks exact-size tensors).
_FUSED_PASS_CONFIGS = {
    "tl.disable_safe_memory_legalize": True,
    "tl.disable_thread_storage_sync": True,
    "tl.disable_shared_memory_reuse": True,
}


@dataclass(frozen=True)
class FusedPlan:
    n: int
    C: int
    m: int
    mp: int  # m padded to a multiple of 16 (the MMA's N)
    g: int  # channels of every stream a block owns (its channel block)
    kw: int  # n * g: the block's K-slice (rows of phi)
    blocks: int  # channel blocks: C / g (the grid's x extent, and the rows of dh_part)
    vec: int  # elements per 16-byte chunk
    lanes: int  # threads per token row in the elementwise phases (g / vec)
    rows: int  # token rows one pass covers (FUSED_THREADS / lanes; rows past FUSED_BM idle)
    passes: int
    min_blocks: int  # __launch_bounds__ minimum blocks per SM (registers <= 65536 / (256 * min_blocks))


def fused_plan(n: int, C: int, dtype: str) -> FusedPlan:
    """The tiling of :func:`boundary_bwd_fused_program` for ``(n, C, dtype)``; validates the arguments."""
    _common.validate_activation_config("boundary", n, C, dtype, STREAMS)
    vec = _VECTOR_BYTES // _ELEMENT_BYTES[dtype]
    g = 64 if n <= 4 else 32  # K-slice n * g <= 256: the two accumulators stay at <= 32 + 80 registers a thread
    m = n * n + 2 * n
    lanes = g // vec
    rows = FUSED_THREADS // lanes
    # Two blocks an SM (16 warps in flight instead of 8: the performance model finds the loop latency-bound at one)
    # where the registers allow it without spills (ptxas at 128 registers: checked by tests/kernels/test_codegen.py).
    min_blocks = _FUSED_MIN_BLOCKS.get((n, dtype), 1)
    return FusedPlan(n=n, C=C, m=m, mp=-(-m // 16) * 16, g=g, kw=n * g, blocks=C // g, vec=vec, lanes=lanes,
                     rows=rows, passes=max(1, FUSED_BM // rows), min_blocks=min_blocks)  # fmt: skip


def fused_choose_splits(num_tokens: int, n: int, C: int, dtype: str, num_sms: int) -> int:
    """Token splits of the fused backward (grid ``C / g x S``), every split non-empty, at most :data:`MAX_SPLITS`.

    The grid is ``C / g`` channel blocks wide, which rarely divides the ``min_blocks x num_sms`` resident slots (at
    C = 7168, n = 4: 112 blocks for 264 slots, so two splits leave 15% of the slots idle for the whole kernel). The
    choice is the smallest ``S`` (at least one wave of slots) whose last wave is the fullest: the fraction of the
    slots that ``ceil(CB S / slots)`` waves keep busy, ``CB S / (waves x slots)``, maximal, ties to the smaller
    ``S`` (fewer ``d_phi`` partials: ``S K m`` floats written and read, about 0.4% of the kernel's bytes per split
    at T = 16384)."""
    p = fused_plan(n, C, dtype)
    tiles = -(-num_tokens // FUSED_BM)
    slots = p.min_blocks * num_sms
    top = max(1, min(MAX_SPLITS // 4, tiles))  # <= 16 splits: the partials stay a few percent of the bytes
    lo = max(1, min(top, slots // p.blocks))
    best, best_fill = lo, 0.0
    for s in range(lo, top + 1):
        fill = p.blocks * s / (-(-(p.blocks * s) // slots) * slots)
        if fill > best_fill + 1e-9:
            best, best_fill = s, fill
    per = -(-tiles // best)
    return -(-tiles // per)


def boundary_bwd_fused_program(n: int, C: int, dtype: str):
    """The fully fused backward across the boundary: site l+1's pre-mapping input gradient and post_res(l)'s
    backward in one pass, without reading ``x_next`` or writing any gradient of it.

    Math, per token ``t`` (site l's ``h_post``, ``h_res``, sublayer output ``y`` and residual ``x``; site l+1's
    ``phi``, ``alpha``, ``h_pre`` and the saved ``proj``, ``rinv``; ``K = n * C``; ``d_logits = d_pp | d_res`` from
    ``pre_finalize_bwd`` and ``sinkhorn_bwd``; ``grad_x_next`` the gradient of ``x_next`` from its other consumer)::

        x_next[i, c]  = round(sum_j h_res[i, j] x[j, c] + h_post[i] y[c])            (recomputed: post_res's bits)
        d_proj[j]     = tf32(d_logits[j] alpha_g(j) rinv)        cx = -rinv^3 / K sum_j d_logits_j alpha_g(j) proj_j
        d_xn[i, c]    = round(sum_j d_proj[j] phi[iC + c, j] + cx x_next[i, c] + h_pre[i] g_li[c])   (pre_proj_bwd)
        g[i, c]       = round(grad_x_next[i, c] + d_xn[i, c])     (autograd's accumulation of the two gradients)
        d_y[c]        = sum_i h_post[i] g[i, c]                   d_x[j, c] = sum_i h_res[i, j] g[i, c]
        d_h_post[i]   = sum_c g[i, c] y[c]                        d_h_res[i, j] = sum_c g[i, c] x[j, c]
        d_phi[k, :]   = sum_t x_next[t, k] d_proj[t, :]           d_bias, d_scale: pre_proj_bwd's tile partials

    Every rounded value is bit for bit the unfused path's (``post_res_fwd``, ``pre_proj_bwd``, the add,
    ``post_res_bwd``): the same operations in the same order; ``d_y`` and ``d_x`` are therefore bit for bit the
    unfused ones. ``d_h_*`` sums its channels in another order (fp32), ``d_phi`` its tokens (TF32 budget of
    :mod:`tl_kernels.pre_proj`).

    Call contract (contiguous; ``T`` = ``num_tokens``, ``S`` = ``num_splits``, ``R`` = ``num_coef_tiles`` =
    ``ceil(T / 64)`` dynamic; ``CB = C / g``, :func:`fused_plan`)::

        boundary_bwd_fused_kernel(n, C, dtype)(grad_x_next [T, n, C] dt, layer_output [T, C] dt,
            residual [T, n, C] dt, h_post [T, n] f32, h_res [T, n, n] f32, phi [K, m] f32, d_pp [T, 2n] f32,
            d_res [T, n * n] f32, proj [T, m] f32, rinv [T] f32, alpha [3] f32, h_pre [T, n] f32, g_li [T, C] dt,
            d_layer_output [T, C] dt, d_residual [T, n, C] dt, dh_part [CB, T, n * n + n] f32,
            d_phi_part [S, K, m] f32, d_coef_part [R, 2m] f32)

    grid ``(CB, S)``: block ``(cb, s)`` owns channels ``[cb g, cb g + g)`` of every stream (the K-slice of
    ``n g`` rows of ``phi``, staged once, TF32-rounded) and the token tiles ``[s ceil(TT / S), ...)`` of
    ``FUSED_BM`` tokens (TT = ceil(T / FUSED_BM)); use :func:`fused_choose_splits`. ``dh_part[cb, t]`` =
    (d_h_res row-major | d_h_post) over the block's channels; it, ``d_phi_part`` and ``d_coef_part`` are summed in
    fixed orders by :func:`boundary_reduce_bwd_program` (``d_coef_part`` row ``r`` covers tokens ``[64 r, 64 r + 64)`` as pre_proj_bwd's does, computed by
    block ``by * CB + cb = r mod (CB S)``). No atomics: bitwise reproducible for a given (T, S).

    Per token tile (256 threads, barriers by hand): (0) every global input of the tile is loaded into registers at
    its top, before the first barrier, rows clamped to ``T - 1`` (zeroed by selects, not branches: ptxas sinks a load
    into the branch that uses it, and the warp then waits a DRAM latency there): each chunk owner's ``y`` and n
    streams of ``x`` (then written to shared memory at once: a thread writes only the chunks it alone reads back, so
    no barrier orders them), ``g_li`` and ``grad_x_next`` in the ``d_x`` accumulator's fragment layout (n <= 4; n = 6
    right after the GEMMs; n = 8 where step 4 uses them), and pre_proj_bwd's share of a token row's coefficient inputs
    (``G`` = its threads / BM adjacent lanes a row: d_pp's columns ``[p 2n / G, ...)``, d_res's likewise, proj at the
    same columns, rinv) with ``h_res``, ``h_post``, ``h_pre`` spread over the block (n = 8: staged after the barrier,
    the registers spilled); ``d_proj`` and this part's share of ``cx`` are computed before the barrier, so that the
    ``G`` parts summed by pre_proj_bwd's butterfly give its ``cx`` bit for bit (by the warps idle in the elementwise
    phases where there are such: n = 6, 8 at 2 bytes); (1) stage the coefficients in shared memory; (2) each thread owns a 16-byte chunk of
    ``lanes`` per token row and writes the recomputed, rounded ``x_next`` of all n streams to the fp32 tile
    ``xs [BM, n g]``; (3) ``T.gemm``: ``d_proj phi^T`` (TF32 ``mma.sync``) and ``x_next^T d_proj`` into the block's
    ``d_phi`` accumulator; (4) per fragment element ``d_xn``, then ``g``, written over ``xs`` (same element, same
    thread); (5) the chunk owners of step 2 run post_res's backward on ``g``: ``d_y``, ``d_x`` with 128-bit stores,
    the ``d_h`` partials reduced over a row's lanes with an xor butterfly. ``d_coef_part`` after the tile loop, as
    pre_proj_bwd. At n = 4, C = 7168, bf16 the tile loop waits for global loads twice a tile (22 times when each
    value was loaded where it was used; tests/kernels/test_boundary_sass.py), 244 registers, one block an SM.

    Bytes per token (bf16, n = 4): reads ``x`` 8C, ``y`` 2C, ``g_li`` 2C, ``grad_x_next`` 8C, writes ``d_x`` 8C,
    ``d_y`` 2C: 30C, plus ``dh_part`` (C / 64 x 80 B, 1.25C) and the coefficients; see docs/design.md section 7.
    """
    import tilelang.language as T
    from tvm import tirx

    from . import pre_proj
    from .pre_proj import _coef_grad
    from .pre_proj import _tf32 as tf32

    p = fused_plan(n, C, dtype)
    m, mp, g, kw, vec, lanes, rows = p.m, p.mp, p.g, p.kw, p.vec, p.lanes, p.rows
    K, nn, n2, q = n * C, n * n, 2 * n, n * n + n
    f32 = "float32"
    idle_rows = rows > FUSED_BM  # threads whose row is past the tile idle in the elementwise phases (whole warps)
    shuffle_offsets = tuple(lanes >> s for s in range(1, lanes.bit_length()))  # lanes/2, ..., 1
    # cx in pre_proj_bwd's order (its d_x bit for bit): G = its threads / BM parts a token row, G_LOG butterfly steps
    G = pre_proj.bwd_threads(n) // pre_proj.BM
    G_LOG = G.bit_length() - 1
    a = n2 // G  # d_pp columns a part
    b = -(-nn // G)  # d_res columns a part (the tail masked at n = 1)
    coef_threads = FUSED_BM * G  # whole warps
    # the coefficient threads: the last warps where those idle in the elementwise phases (n = 6, 8 at 2 bytes), so that
    # no thread holds both a chunk of x and a row's coefficient inputs (ptxas spilled at n = 8)
    coef_base = FUSED_THREADS - coef_threads if idle_rows else 0
    hr_k = -(-(FUSED_BM * nn) // FUSED_THREADS)  # h_res elements a thread loads
    # g_li and grad_x_next into registers at the top of the tile (n <= 4), right after the GEMMs (n = 6), or where
    # step 4 uses them (n = 8: its 80-register d_phi accumulator leaves no room for them; ptxas spilled)
    early_g, late_g = n <= 4, n == 6
    rolled = n == 8  # h_res, h_post, h_pre staged after the first barrier (loaded at the top, ptxas spilled)
    assert G * a == n2 and coef_threads % 32 == 0 and FUSED_BM * n <= FUSED_THREADS  # internal invariants
    num_tokens = T.dynamic("num_tokens")
    num_splits = T.dynamic("num_splits")
    num_coef_tiles = T.dynamic("num_coef_tiles")

    @T.prim_func
    def boundary_bwd_fused(
        grad_x_next: T.Tensor((num_tokens, n, C), dtype),
        layer_output: T.Tensor((num_tokens, C), dtype),
        residual: T.Tensor((num_tokens, n, C), dtype),
        h_post: T.Tensor((num_tokens, n), f32),
        h_res: T.Tensor((num_tokens, n, n), f32),
        phi: T.Tensor((K, m), f32),
        d_pp: T.Tensor((num_tokens, n2), f32),
        d_res: T.Tensor((num_tokens, nn), f32),
        proj: T.Tensor((num_tokens, m), f32),
        rinv: T.Tensor((num_tokens,), f32),
        alpha: T.Tensor((3,), f32),
        h_pre: T.Tensor((num_tokens, n), f32),
        g_li: T.Tensor((num_tokens, C), dtype),
        d_layer_output: T.Tensor((num_tokens, C), dtype),
        d_residual: T.Tensor((num_tokens, n, C), dtype),
        dh_part: T.Tensor((p.blocks, num_tokens, q), f32),
        d_phi_part: T.Tensor((num_splits, K, m), f32),
        d_coef_part: T.Tensor((num_coef_tiles, 2 * m), f32),
    ):
        with T.Kernel(p.blocks, num_splits, threads=FUSED_THREADS) as (cb, by):
            if p.min_blocks > 1:
                T.annotate_min_blocks_per_sm(p.min_blocks)
            ps = T.alloc_shared((kw, mp), f32)  # phi rows i C + c0 + [0, g) for every stream i, TF32-rounded
            xs = T.alloc_shared((FUSED_BM, kw), f32)  # x_next (column i g + cc), then the summed gradient g
            dps = T.alloc_shared((FUSED_BM, mp), f32)  # d_proj (TF32-rounded, zero-padded)
            cxs = T.alloc_shared((FUSED_BM,), f32)
            hqs = T.alloc_shared((FUSED_BM, n), f32)  # site l+1's h_pre
            hrs = T.alloc_shared((FUSED_BM, nn), f32)  # site l's h_res (row-major)
            hps = T.alloc_shared((FUSED_BM, n), f32)  # site l's h_post
            dx_acc = T.alloc_fragment((FUSED_BM, kw), f32)
            dphi_acc = T.alloc_fragment((kw, mp), f32)
            # x and y of the tile's channel block, kept from step 2 to step 5 (each thread reads back its own chunks:
            # no barrier orders them; in shared memory, not registers, so that two blocks fit an SM at n = 4)
            xls = T.alloc_shared((n, FUSED_BM, g), dtype)
            lss = T.alloc_shared((FUSED_BM, g), dtype)
            xl = T.alloc_local((p.passes, n, vec), dtype)
            ls = T.alloc_local((p.passes, vec), dtype)
            acc = T.alloc_local((vec,), f32)
            ob = T.alloc_local((vec,), dtype)
            gs = T.alloc_local((n, vec), dtype)  # g of the thread's chunk (exact in dtype: xs holds rounded values)
            ph = T.alloc_local((n,), f32)
            # The tile's other global inputs, loaded into registers at the top of the tile (one DRAM latency a tile,
            # not one per use): g_li and grad_x_next in dx_acc's fragment layout (step 4), pre_proj_bwd's share of
            # a token row's coefficient inputs (row cr = tx // G, part cp = tx % G: d_pp's columns [cp a, cp a + a),
            # d_res's [cp b, cp b + b), proj at the same columns, rinv), and h_res, h_post, h_pre spread flat over
            # the block's threads.
            glf = T.alloc_fragment((FUSED_BM, kw), dtype) if early_g or late_g else None
            gxf = T.alloc_fragment((FUSED_BM, kw), dtype) if early_g or late_g else None
            dlp = T.alloc_local((a,), f32)
            prp = T.alloc_local((a,), f32)
            dlr = T.alloc_local((b,), f32)
            prr = T.alloc_local((b,), f32)
            hrv = T.alloc_local((hr_k,), f32)
            hpv = T.alloc_local((1,), f32)
            hqv = T.alloc_local((1,), f32)
            cxv = T.alloc_local((1,), f32)
            rv = T.alloc_local((1,), f32)
            sv = T.alloc_local((1,), f32)  # this part's share of the row's cx sum
            tx = T.get_thread_binding()
            lane = tx % lanes
            cl = lane * vec
            c0 = cb * g
            cr = (tx - coef_base) // G  # coefficient row and part (a row's G parts in adjacent lanes, pre_proj_bwd's)
            cp = tx % G
            tiles = T.ceildiv(num_tokens, FUSED_BM)
            per = T.alloc_var("int32")
            per = T.ceildiv(tiles, num_splits)
            t_base = T.alloc_var("int32")
            t_base = by * per * FUSED_BM
            count = T.alloc_var("int32")
            count = T.min(per, tiles - by * per)
            a0 = T.alloc_var(f32)
            a0 = alpha[0]
            a1 = T.alloc_var(f32)
            a1 = alpha[1]
            a2 = T.alloc_var(f32)
            a2 = alpha[2]
            for kk, j in T.Parallel(kw, mp):
                ps[kk, j] = T.if_then_else(j < m, tf32(phi[(kk // g) * C + c0 + kk % g, T.min(j, m - 1)]), T.float32(0))
            for i, j in T.Parallel(FUSED_BM, mp):
                dps[i, j] = T.float32(0)  # the padded columns [m, mp) stay zero
            T.clear(dphi_acc)
            for tt in T.serial(count):
                t0 = t_base + tt * FUSED_BM
                # Every global load of the tile, rows past T clamped to T - 1 (zeroed by selects below, or unused)
                for k in T.unroll(p.passes):
                    r = k * rows + tx // lanes
                    if not idle_rows or r < FUSED_BM:
                        tr = T.min(t0 + r, num_tokens - 1)
                        for e in T.vectorized(vec):
                            ls[k, e] = layer_output[tr, c0 + cl + e]
                        for j in T.unroll(n):
                            for e in T.vectorized(vec):
                                xl[k, j, e] = residual[tr, j, c0 + cl + e]
                if early_g:
                    for i, j in T.Parallel(FUSED_BM, kw):
                        glf[i, j] = g_li[T.min(t0 + i, num_tokens - 1), c0 + j % g]
                        gxf[i, j] = grad_x_next[T.min(t0 + i, num_tokens - 1), j // g, c0 + j % g]
                ctr = T.min(t0 + cr, num_tokens - 1)
                sv[0] = T.float32(0)
                if not idle_rows and coef_base <= tx and tx < coef_base + coef_threads:  # x's threads: with x's loads
                    for i in T.unroll(a):
                        dlp[i] = d_pp[ctr, cp * a + i]
                        prp[i] = proj[ctr, cp * a + i]
                    for i in T.unroll(b):
                        dlr[i] = d_res[ctr, T.min(cp * b + i, nn - 1)]
                        prr[i] = proj[ctr, n2 + T.min(cp * b + i, nn - 1)]
                    rv[0] = rinv[ctr]
                if not rolled:
                    for k in T.unroll(hr_k):
                        e = T.min(tx + k * FUSED_THREADS, FUSED_BM * nn - 1)
                        hrv[k] = h_res[T.min(t0 + e // nn, num_tokens - 1), (e % nn) // n, e % n]
                    e1 = T.min(tx, FUSED_BM * n - 1)
                    hpv[0] = h_post[T.min(t0 + e1 // n, num_tokens - 1), e1 % n]
                    hqv[0] = h_pre[T.min(t0 + e1 // n, num_tokens - 1), e1 % n]
                # x and y to shared memory now (rows past T zero), freeing their registers: a thread writes only the
                # chunks it alone reads back (its own step 5 of the previous tile, then its step 2), so no barrier
                for k in T.unroll(p.passes):
                    r = k * rows + tx // lanes
                    if not idle_rows or r < FUSED_BM:
                        ok = t0 + r < num_tokens
                        for e in T.unroll(vec):
                            ls[k, e] = T.Select(ok, ls[k, e], T.cast(0, dtype))
                        for j in T.unroll(n):
                            for e in T.unroll(vec):
                                xl[k, j, e] = T.Select(ok, xl[k, j, e], T.cast(0, dtype))
                        for e in T.vectorized(vec):
                            lss[r, cl + e] = ls[k, e]
                        for j in T.unroll(n):
                            for e in T.vectorized(vec):
                                xls[j, r, cl + e] = xl[k, j, e]
                if idle_rows and coef_base <= tx and tx < coef_base + coef_threads:  # after x's stores
                    for i in T.unroll(a):
                        dlp[i] = d_pp[ctr, cp * a + i]
                        prp[i] = proj[ctr, cp * a + i]
                    for i in T.unroll(b):
                        dlr[i] = d_res[ctr, T.min(cp * b + i, nn - 1)]
                        prr[i] = proj[ctr, n2 + T.min(cp * b + i, nn - 1)]
                    rv[0] = rinv[ctr]
                if coef_base <= tx and tx < coef_base + coef_threads:
                    # d_proj (over its inputs) and cx in registers before the barrier: fewer live registers
                    ok = t0 + cr < num_tokens
                    sv[0] = T.float32(0)
                    for i in T.unroll(a):
                        ag = T.Select(cp * a + i < n, a0, a1)
                        sv[0] += dlp[i] * ag * prp[i]
                        dlp[i] = T.Select(ok, tf32(dlp[i] * ag * rv[0]), T.float32(0))
                    for i in T.unroll(b):
                        if nn % G == 0 or cp * b + i < nn:
                            sv[0] += dlr[i] * a2 * prr[i]
                        dlr[i] = T.Select(ok, tf32(dlr[i] * a2 * rv[0]), T.float32(0))
                T.sync_threads()  # the previous tile's reads (GEMM, steps 4 and 5) of the coefficients before these writes
                # the G parts of a row summed by lanes differing in bits [0, G_LOG), by every warp right after the
                # barrier (converged: inside the branch ptxas added a divergent-shuffle fallback; other threads' sums
                # are never read)
                for sh_ in T.unroll(G_LOG):
                    sv[0] = sv[0] + T.shfl_xor(sv[0], 1 << sh_)
                if coef_base <= tx and tx < coef_base + coef_threads:
                    cxv[0] = T.Select(
                        t0 + cr < num_tokens, -sv[0] * rv[0] * rv[0] * rv[0] * T.float32(1.0 / K), T.float32(0)
                    )
                # (1) the tile's coefficients, rows past T zero; d_proj and cx in pre_proj_bwd's expressions and
                # order (its G parts of a row, summed by the same butterfly), so they are its bits
                if not rolled:
                    for k in T.unroll(hr_k):
                        e = tx + k * FUSED_THREADS
                        if FUSED_BM * nn % FUSED_THREADS == 0 or e < FUSED_BM * nn:
                            hrs[e // nn, e % nn] = T.Select(t0 + e // nn < num_tokens, hrv[k], T.float32(0))
                    if FUSED_BM * n >= FUSED_THREADS or tx < FUSED_BM * n:
                        hps[tx // n, tx % n] = T.Select(t0 + tx // n < num_tokens, hpv[0], T.float32(0))
                        hqs[tx // n, tx % n] = T.Select(t0 + tx // n < num_tokens, hqv[0], T.float32(0))
                else:  # n = 8: loaded here (with the coefficient inputs at the top, ptxas spilled)
                    for i, j in T.Parallel(FUSED_BM, nn):
                        hrs[i, j] = T.if_then_else(
                            t0 + i < num_tokens, h_res[T.min(t0 + i, num_tokens - 1), j // n, j % n], T.float32(0)
                        )
                    for i, j in T.Parallel(FUSED_BM, n):
                        hps[i, j] = T.if_then_else(
                            t0 + i < num_tokens, h_post[T.min(t0 + i, num_tokens - 1), j], T.float32(0)
                        )
                        hqs[i, j] = T.if_then_else(
                            t0 + i < num_tokens, h_pre[T.min(t0 + i, num_tokens - 1), j], T.float32(0)
                        )
                if coef_base <= tx and tx < coef_base + coef_threads:
                    for i in T.unroll(a):
                        dps[cr, cp * a + i] = dlp[i]
                    for i in T.unroll(b):
                        if nn % G == 0 or cp * b + i < nn:
                            dps[cr, n2 + cp * b + i] = dlr[i]
                    if cp == 0:
                        cxs[cr] = cxv[0]
                T.sync_threads()  # hrs, hps before step 2 reads them
                # (2) x_next of all n streams from x and y, post_res's arithmetic, rounded once
                for k in T.unroll(p.passes):
                    r = k * rows + tx // lanes
                    if not idle_rows or r < FUSED_BM:
                        for e in T.vectorized(vec):
                            ls[0, e] = lss[r, cl + e]
                        for j in T.unroll(n):
                            for e in T.vectorized(vec):
                                xl[0, j, e] = xls[j, r, cl + e]
                        for i in T.unroll(n):
                            for e in T.unroll(vec):
                                acc[e] = hps[r, i] * T.cast(ls[0, e], f32)
                            for j in T.unroll(n):
                                for e in T.unroll(vec):
                                    acc[e] = acc[e] + hrs[r, i * n + j] * T.cast(xl[0, j, e], f32)
                            for e in T.unroll(vec):
                                xs[r, i * g + cl + e] = T.cast(T.cast(acc[e], dtype), f32)
                T.sync_threads()  # xs, dps, cxs, hqs written before the GEMMs and step 4 read them
                # (3) the two matmuls
                T.gemm(dps, ps, dx_acc, transpose_B=True, clear_accum=True)
                T.gemm(xs, dps, dphi_acc, transpose_A=True)
                T.sync_threads()  # every warp's GEMM reads of xs before step 4 overwrites it
                if late_g:  # n = 6: with the larger d_phi accumulator they spilled at the top of the tile
                    for i, j in T.Parallel(FUSED_BM, kw):
                        glf[i, j] = g_li[T.min(t0 + i, num_tokens - 1), c0 + j % g]
                        gxf[i, j] = grad_x_next[T.min(t0 + i, num_tokens - 1), j // g, c0 + j % g]
                # (4) d_xn (pre_proj_bwd's epilogue) and the summed gradient g, over x_next in xs
                for i, j in T.Parallel(FUSED_BM, kw):
                    if t0 + i < num_tokens:
                        if early_g or late_g:
                            v = dx_acc[i, j] + cxs[i] * xs[i, j] + hqs[i, j // g] * T.cast(glf[i, j], f32)
                            dxn = T.cast(T.cast(v, dtype), f32)
                            xs[i, j] = T.cast(T.cast(T.cast(gxf[i, j], f32) + dxn, dtype), f32)
                        else:
                            gli = g_li[t0 + i, c0 + j % g]
                            v = dx_acc[i, j] + cxs[i] * xs[i, j] + hqs[i, j // g] * T.cast(gli, f32)
                            dxn = T.cast(T.cast(v, dtype), f32)
                            gxn = grad_x_next[t0 + i, j // g, c0 + j % g]
                            xs[i, j] = T.cast(T.cast(T.cast(gxn, f32) + dxn, dtype), f32)
                T.sync_threads()  # g written before step 5 reads other threads' elements
                # (5) post_res(l)'s backward on g (its operation order), d_h partials over the block's channels
                for k in T.unroll(p.passes):
                    r = k * rows + tx // lanes
                    if not idle_rows or r < FUSED_BM:
                        for i in T.unroll(n):
                            for e in T.unroll(vec):
                                gs[i, e] = T.cast(xs[r, i * g + cl + e], dtype)
                        for e in T.vectorized(vec):
                            ls[0, e] = lss[r, cl + e]
                        for e in T.unroll(vec):
                            acc[e] = hps[r, 0] * T.cast(gs[0, e], f32)
                        for i in T.unroll(1, n):
                            for e in T.unroll(vec):
                                acc[e] = acc[e] + hps[r, i] * T.cast(gs[i, e], f32)
                        for e in T.vectorized(vec):
                            ob[e] = T.cast(acc[e], dtype)
                        if t0 + r < num_tokens:
                            T.stg128(
                                d_layer_output[t0 + r, c0 + cl], T.reinterpret(ob[tirx.Ramp(0, 1, vec)], "uint32x4")
                            )
                        for i in T.unroll(n):
                            ph[i] = T.float32(0)
                            for e in T.unroll(vec):
                                ph[i] = ph[i] + T.cast(gs[i, e], f32) * T.cast(ls[0, e], f32)
                        for offset in shuffle_offsets:  # xor butterfly over the row's lanes, fixed order
                            for i in T.unroll(n):
                                ph[i] = ph[i] + T.shfl_xor(ph[i], offset)
                        if lane == 0 and t0 + r < num_tokens:
                            for i in T.unroll(n):
                                dh_part[cb, t0 + r, nn + i] = ph[i]
                        for j in T.unroll(n):
                            for e in T.unroll(vec):
                                acc[e] = hrs[r, j] * T.cast(gs[0, e], f32)
                            for i in T.unroll(1, n):
                                for e in T.unroll(vec):
                                    acc[e] = acc[e] + hrs[r, i * n + j] * T.cast(gs[i, e], f32)
                            for e in T.vectorized(vec):
                                ob[e] = T.cast(acc[e], dtype)
                            if t0 + r < num_tokens:
                                T.stg128(
                                    d_residual[t0 + r, j, c0 + cl], T.reinterpret(ob[tirx.Ramp(0, 1, vec)], "uint32x4")
                                )
                            for e in T.vectorized(vec):
                                xl[0, 0, e] = xls[j, r, cl + e]
                            # column j of d_h_res: reduced over the row's lanes and written before the next column
                            for i in T.unroll(n):
                                ph[i] = T.float32(0)
                                for e in T.unroll(vec):
                                    ph[i] = ph[i] + T.cast(gs[i, e], f32) * T.cast(xl[0, 0, e], f32)
                            for offset in shuffle_offsets:
                                for i in T.unroll(n):
                                    ph[i] = ph[i] + T.shfl_xor(ph[i], offset)
                            if lane == 0 and t0 + r < num_tokens:
                                for i in T.unroll(n):
                                    dh_part[cb, t0 + r, i * n + j] = ph[i]
            for kk, j in T.Parallel(kw, mp):
                if j < m:
                    d_phi_part[by, (kk // g) * C + c0 + kk % g, j] = dphi_acc[kk, j]
            # d_bias / d_scale per 64-token row of d_coef_part (pre_proj_bwd's rows and per-thread order), the rows
            # r = b, b + CB S, ... for the linear block index b (every row in exactly one block)
            if tx < m:
                col = T.min(tx, m - 1)
                lb = by * p.blocks + cb
                for it in T.serial(T.ceildiv(T.max(num_coef_tiles - lb, 0), p.blocks * num_splits)):
                    tile = lb + it * p.blocks * num_splits
                    tc0 = tile * COEF_BM
                    sb = T.alloc_var(f32)
                    sc = T.alloc_var(f32)
                    sb = T.float32(0)
                    sc = T.float32(0)
                    for i in T.serial(T.min(COEF_BM, num_tokens - tc0)):
                        dl = _coef_grad(d_pp, d_res, tc0 + i, col, n)
                        sb += dl
                        sc += dl * proj[tc0 + i, col] * rinv[tc0 + i]
                    d_coef_part[tile, col] = sb
                    d_coef_part[tile, m + col] = sc

    return boundary_bwd_fused


def boundary_reduce_bwd_program(n: int):
    """The fused backward's last launch: ``tl_kernels.pre_reduce``'s sums and the d_h sum in one grid (deterministic,
    no atomics)::

        d_phi[e]                 = sum_{s < S} d_phi_part[s, e]             (split order, as pre_reduce_bwd)
        d_bias, d_alpha          = pre_reduce_bwd's coefficient block (the same macro: its bits)
        d_h_res[t] | d_h_post[t] = sum_{cb < CB} dh_part[cb, t]             (channel-block order)

    Call (``S``, ``kq = K m / 4``, ``R``, ``CB``, ``T`` dynamic; ``S = 1`` too: ``d_phi_part`` is then the fused
    kernel's own buffer, copied)::

        boundary_reduce_bwd_kernel(n)(d_phi_part [S, kq, 4] f32, d_coef_part [R, 2m] f32,
            dh_part [CB, T, n * n + n] f32, d_phi [kq, 4] f32, d_alpha [3] f32, d_bias [m] f32,
            d_h_res [T, n, n] f32, d_h_post [T, n] f32)

    grid ``1 + ceil(T (n * n + n) / THREADS) + ceil(kq / THREADS)`` of ``pre_reduce.THREADS`` threads: block 0 the
    coefficient block (the longest, so it starts first), then the d_h blocks (one thread per output element,
    coalesced, ``REDUCE_UNROLL`` partials in flight: the performance model found a one-load-a-step loop bound by
    DRAM latency), then the d_phi blocks (a thread's 4 floats over the splits, 128-bit). One launch where the
    backward had two (``pre_reduce_bwd`` and a d_h reduction)."""
    import tilelang.language as T

    from . import pre_reduce

    if n not in STREAMS:
        raise ValueError(f"boundary: n must be one of {STREAMS}, got {n}")
    nn, q, m = n * n, n * n + n, n * n + 2 * n
    threads, vec = pre_reduce.THREADS, pre_reduce.VEC
    f32 = "float32"
    num_tokens = T.dynamic("num_tokens")
    num_cb = T.dynamic("num_cb")
    num_splits = T.dynamic("num_splits")
    kq = T.dynamic("kq")
    rows = T.dynamic("rows")
    coef_block = pre_reduce.coef_block_macro(n, rows)

    @T.macro
    def dh_block(b, tx, dh_part, d_h_res, d_h_post):
        s = T.alloc_var(f32)
        ld = T.alloc_local((REDUCE_UNROLL,), f32)
        e = b * threads + tx
        if e < num_tokens * q:
            t = e // q
            k = e % q
            # REDUCE_UNROLL independent loads in flight, then their sum in channel-block order (a block past the
            # last adds +0: exact)
            s = T.float32(0)
            for c in T.serial(T.ceildiv(num_cb, REDUCE_UNROLL)):
                for u in T.unroll(REDUCE_UNROLL):
                    ld[u] = T.if_then_else(
                        c * REDUCE_UNROLL + u < num_cb,
                        dh_part[T.min(c * REDUCE_UNROLL + u, num_cb - 1), t, k],
                        T.float32(0),
                    )
                for u in T.unroll(REDUCE_UNROLL):
                    s = s + ld[u]
            if k < nn:
                d_h_res[t, k // n, k % n] = s
            else:
                d_h_post[t, k - nn] = s

    @T.prim_func
    def boundary_reduce_bwd(
        d_phi_part: T.Tensor((num_splits, kq, vec), f32),
        d_coef_part: T.Tensor((rows, 2 * m), f32),
        dh_part: T.Tensor((num_cb, num_tokens, q), f32),
        d_phi: T.Tensor((kq, vec), f32),
        d_alpha: T.Tensor((3,), f32),
        d_bias: T.Tensor((m,), f32),
        d_h_res: T.Tensor((num_tokens, n, n), f32),
        d_h_post: T.Tensor((num_tokens, n), f32),
    ):
        dh_blocks = T.ceildiv(num_tokens * q, threads)
        with T.Kernel(1 + dh_blocks + T.ceildiv(kq, threads), threads=threads) as bx:
            # three blocks an SM (<= 42 registers; ptxas: 40, no spills; four spill): at one (86 registers) the d_h
            # blocks kept too few loads in flight (the performance model at n = 4, C = 7168, T = 16384, H100: 139 us
            # at one block an SM, 70 at two, 56 at three = its bytes)
            T.annotate_min_blocks_per_sm(3)
            tx = T.get_thread_binding()
            acc = T.alloc_local((vec,), f32)
            ld = T.alloc_local((vec,), f32)
            if bx == 0:
                coef_block(tx, d_coef_part, d_alpha, d_bias)  # its barriers: block-uniform branch
            elif bx <= dh_blocks:
                dh_block(bx - 1, tx, dh_part, d_h_res, d_h_post)
            else:
                e = (bx - 1 - dh_blocks) * threads + tx
                if e < kq:
                    for v in T.vectorized(vec):
                        acc[v] = d_phi_part[0, e, v]
                    for s in T.serial(1, num_splits):  # split order: pre_reduce_bwd's, bit for bit
                        for v in T.vectorized(vec):
                            ld[v] = d_phi_part[s, e, v]
                        for v in T.unroll(vec):
                            acc[v] = acc[v] + ld[v]
                    for v in T.vectorized(vec):
                        d_phi[e, v] = acc[v]

    return boundary_reduce_bwd


@functools.cache
def boundary_bwd_fused_kernel(n: int, C: int, dtype: str):
    """The compiled fused backward for ``(n, C, dtype)`` (memoised; TileLang's disk cache below)."""
    return _common.compile_program(boundary_bwd_fused_program(n, C, dtype), pass_configs=_FUSED_PASS_CONFIGS)


@functools.cache
def boundary_reduce_bwd_kernel(n: int):
    """The compiled reduction for ``n`` (memoised): in bounds by construction, so TileLang's guards (which would split
    the 128-bit accesses) are off."""
    return _common.compile_program(
        boundary_reduce_bwd_program(n), pass_configs={"tl.disable_safe_memory_legalize": True}
    )
