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
input; 36C a token at n = 4, bf16 instead of 52C (add + post_res backward). Its registers, spills and shared
memory per registered configuration: ``python -m tl_kernels.build --family boundary --direction bwd`` (all
spill-free: ``pytest tests/kernels/test_codegen.py -k boundary``). ``__launch_bounds__`` follows post_res's rule
with ``_BWD_REG_BUDGET``.

The fully fused backward (:mod:`tl_kernels.boundary_bwd`: ``boundary_bwd_fused_program`` and ``boundary_reduce_bwd_program``) replaces
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
    "boundary_bwd_kernel",
    "boundary_bwd_program",
    "boundary_fwd_kernel",
    "boundary_fwd_program",
    "choose_splits",
    "plan",
]

DTYPES: tuple[str, ...] = _common.ACTIVATION_DTYPES
STREAMS: tuple[int, ...] = _common.ACTIVATION_STREAMS
BM = 64  # tokens per block
THREADS = 128
MAX_SPLITS = 64
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
    elt = _common.ELEMENT_BYTES[dtype]
    vec = _common.VECTOR_BYTES // elt
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
            pre_proj.store_partials_macro(m, nt_count)(pacc, sq, proj_part, sq_part, by, tok0, q, num_tokens)

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
    n: int,
    C: int | None = None,
    dtype: str | None = None,
    *,
    fused: bool = False,
    clusters: bool = False,
    reduce_dh: bool = False,
):
    """post_res(l)'s backward on the *sum* of the two gradients that reach ``x_next``, without writing the sum.

    ``fused=True``: :func:`tl_kernels.boundary_bwd.boundary_bwd_fused_program` (the whole backward across the boundary in one pass);
    ``reduce_dh=True``: :func:`tl_kernels.boundary_bwd.boundary_reduce_bwd_program` (``n`` only: the fused backward's last launch, d_phi,
    d_alpha, d_bias and d_h); ``fused=True, clusters=True``: the fused backward's opt-in thread block cluster variant
    (``MHC_BOUNDARY_CLUSTERS=1``). The registry names the four variants ``boundary_bwd[n, C, dtype]``,
    ``boundary_bwd[n, C, dtype, fused=True]``, ``boundary_bwd[n, C, dtype, fused=True, clusters=True]`` and
    ``boundary_bwd[n, reduce_dh=True]``.

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
    from . import boundary_bwd, post_res

    if reduce_dh:
        return boundary_bwd.boundary_reduce_bwd_program(n)
    if fused:
        return boundary_bwd.boundary_bwd_fused_program(n, C, dtype, clusters)
    if clusters:
        raise ValueError("boundary_bwd: clusters=True needs fused=True (the summed backward has no cluster variant)")
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
    n: int,
    C: int | None = None,
    dtype: str | None = None,
    fused: bool = False,
    clusters: bool = False,
    reduce_dh: bool = False,
):
    """The compiled backward kernel for ``(n, C, dtype)`` (memoised; TileLang's disk cache below); ``fused`` and
    ``reduce_dh`` select the two kernels of :mod:`tl_kernels.boundary_bwd`, ``clusters`` the fused one's thread
    block cluster variant."""
    from . import boundary_bwd

    if reduce_dh:
        return boundary_bwd.boundary_reduce_bwd_kernel(n)
    if fused:
        return boundary_bwd.boundary_bwd_fused_kernel(n, C, dtype, clusters)
    if clusters:
        raise ValueError("boundary_bwd: clusters=True needs fused=True (the summed backward has no cluster variant)")
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
