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

Design. The block owns BM = 64 tokens and walks its split's channel blocks of BC channels. Per channel block:

1. (elementwise, post_res's arithmetic) thread ``tx`` owns 16-byte chunk ``tx % L`` (``L = BC / VEC`` lanes per
   token row) of token rows ``tx // L + k * (128 / L)``; it loads the chunk of ``layer_output`` and of the n
   residual streams with 128-bit loads, forms the n output chunks, stores each with one 128-bit store to ``out``,
   writes it to the shared tile ``xs [n, BM, BC]`` (dtype) and adds its squares to a per-row register sum;
2. (projection) for each stream i: stage phi rows ``i * C + [c0, c0 + BC)`` (TF32-rounded, columns padded to
   ``mp`` = m rounded up to 16 with zeros) in shared memory, copy ``xs[i]`` to an fp32 fragment and accumulate
   ``T.gemm`` into the [BM, mp] fp32 accumulator (mma.sync m16n8k8 TF32), as pre_proj does.

At the end the row sums of squares are reduced over the L lanes of a row with an xor butterfly (fixed order), and
lane 0 writes ``sq_part``; the accumulator is written to ``proj_part``. No atomics: bitwise reproducible for a
given (T, S). Rows past T are loaded as zeros (their outputs are not stored, their zero rows add nothing).

Bytes per token (bf16, n = 4): reads layer_output 2C + residual 8C, writes out 8C: 18C, plus S x (m + 1) x 4 B of
partials and 80 B of coefficients; phi (K x m x 4 B) is read once per token tile, from L2. Site l+1's pre_finalize
then reads x_next once (8C) and writes layer_input (2C): 28C for the boundary, against 36C unfused
(post_res 18C + pre_proj 8C + pre_finalize 10C). ``BC`` = 64, or 32 where the tile ``xs`` would exceed 64 KB
(fp32 at n = 6, 8). The rows of ``xs`` are padded by 16 bytes, so the 128-bit tile stores of a quarter warp and the
fragment loads of ``T.copy`` (8 rows x 4 columns a warp) hit distinct banks.

Resources (ptxas -v, sm_90a, CUDA 13.0, ``codegen.analyze``): 0 spills, 0 stack in every configuration checked;
registers / shared memory: n = 1 bf16 C = 1280: 67 / 13.5 KB; n = 2 fp16 C = 1920: 99 / 23.5 KB; n = 4 bf16
C = 7168: 122 / 49 KB (4 blocks, 16 warps per SM); n = 4 fp32: 134 / 81 KB; n = 6 bf16: 189 / 76.5 KB; n = 8 bf16:
231 / 110 KB; n = 8 fp32 (BC = 32): 160 / 100 KB. Measured with ``python -c "from tl_kernels import boundary,
codegen; print(codegen.analyze(boundary.boundary_fwd_kernel(4, 7168, 'bfloat16')))"`` over the 9 configurations
above (the SASS test re-checks three of them). The projection's fragment copy reads ``xs`` one element at a
time (``LDS.U16``), as pre_proj's does: shared-memory traffic a GPU profile should look at.

Backward (:func:`boundary_bwd_program`): post_res's token-to-thread mapping and reduction with a second gradient
input; 36C a token at n = 4, bf16 instead of 52C (add + post_res backward). ptxas: 0 spills, 0 stack; registers
n = 1 bf16 C = 1280: 34, n = 2 fp16 C = 1920: 56, n = 4 bf16 C = 7168: 121, n = 4 fp32 C = 1280: 128, n = 6 bf16
C = 4096 / 7168: 195 / 210, n = 6 fp32 C = 7168: 224, n = 8 bf16 / fp32 C = 7168: 243 / 245 (same
``codegen.analyze`` call with ``boundary_bwd_kernel``; all 35 registered configurations spill-free:
``pytest tests/kernels/test_codegen.py -k boundary``). ``__launch_bounds__`` follows post_res's rule with
``_BWD_REG_BUDGET``.

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
STREAMS: tuple[int, ...] = (1, 2, 4, 6, 8)
BM = 64  # tokens per block
THREADS = 128
MAX_SPLITS = 64
_VECTOR_BYTES = 16
_ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_TILE_BYTES = 64 * 1024  # most shared memory for the x_next tile xs [n, BM, BC]
_BWD_REG_BUDGET = {1: 48, 2: 72, 4: 128, 6: 168, 8: 255}  # registers a thread, -> __launch_bounds__ min blocks
_TF32_ROUND = 0x1000  # added to the fp32 bit pattern: round to nearest before the MMA drops 13 bits


@dataclass(frozen=True)
class Plan:
    n: int
    C: int
    m: int  # n * n + 2n
    mp: int  # m padded to a multiple of 16 (the MMA's N)
    vec: int  # elements per 16-byte chunk
    bc: int  # channels per block step
    lanes: int  # threads per token row (bc / vec)
    rows: int  # token rows one pass of the block covers (THREADS / lanes)
    passes: int  # BM / rows
    blocks: int  # channel blocks: C / bc


def plan(n: int, C: int, dtype: str) -> Plan:
    """The tiling for ``(n, C, dtype)``; validates the build-time arguments."""
    _common.validate_activation_config("boundary", n, C, dtype, STREAMS)
    elt = _ELEMENT_BYTES[dtype]
    vec = _VECTOR_BYTES // elt
    bc = 64 if n * BM * 64 * elt <= _TILE_BYTES else 32
    lanes = bc // vec
    rows = THREADS // lanes
    m = n * n + 2 * n
    return Plan(n=n, C=C, m=m, mp=-(-m // 16) * 16, vec=vec, bc=bc, lanes=lanes, rows=rows, passes=BM // rows,
                blocks=C // bc)  # fmt: skip


def choose_splits(num_tokens: int, n: int, C: int, dtype: str, num_sms: int) -> int:
    """Split count for a launch: about 2 blocks per SM, every split non-empty, at most :data:`MAX_SPLITS`."""
    p = plan(n, C, dtype)
    tiles = -(-num_tokens // BM)
    want = max(1, min(MAX_SPLITS, p.blocks, -(-2 * num_sms // max(tiles, 1))))
    per = -(-p.blocks // want)
    return -(-p.blocks // per)


def boundary_fwd_program(n: int, C: int, dtype: str):
    """``out = h_res @ residual + h_post^T layer_output`` and the next site's projection partials; see the module
    docstring."""
    import tilelang.language as T
    from tvm import tirx

    p = plan(n, C, dtype)
    m, mp, vec, bc, lanes, rows = p.m, p.mp, p.vec, p.bc, p.lanes, p.rows
    K, nn = n * C, n * n
    f32 = "float32"
    shuffle_offsets = tuple(lanes >> s for s in range(1, lanes.bit_length()))  # lanes/2, ..., 1
    num_tokens = T.dynamic("num_tokens")
    num_splits = T.dynamic("num_splits")

    def tf32(v):
        return T.reinterpret(T.reinterpret(v, "uint32") + T.uint32(_TF32_ROUND), f32)

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
            sqa = T.alloc_local((p.passes,), f32)
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
            for k in T.unroll(p.passes):
                sqa[k] = T.float32(0)
            per = T.ceildiv(p.blocks, num_splits)
            b_first = by * per
            for bb in T.serial(T.min(per, p.blocks - b_first)):
                cb0 = (b_first + bb) * bc
                for k in T.unroll(p.passes):
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
                        ps[kk, j] = T.if_then_else(j < m, tf32(phi[i * C + cb0 + kk, T.min(j, m - 1)]), T.float32(0))
                    T.copy(xs[i, :, 0:bc], xf)
                    T.gemm(xf, ps, pacc)
            # Sums of squares: xor butterfly over the row's lanes (consecutive threads), fixed order.
            for offset in shuffle_offsets:
                for k in T.unroll(p.passes):
                    sqa[k] = sqa[k] + T.shfl_xor(sqa[k], offset)
            if lane == 0:
                for k in T.unroll(p.passes):
                    if t0 + k * rows + tx // lanes < num_tokens:
                        sq_part[by, t0 + k * rows + tx // lanes] = sqa[k]
            for i, j in T.Parallel(BM, mp):
                if t0 + i < num_tokens and j < m:
                    proj_part[by, t0 + i, j] = pacc[i, j]

    return boundary_fwd


def boundary_bwd_program(n: int, C: int, dtype: str):
    """post_res(l)'s backward on the *sum* of the two gradients that reach ``x_next``, without writing the sum.

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
def boundary_bwd_kernel(n: int, C: int, dtype: str):
    """The compiled backward kernel for ``(n, C, dtype)`` (memoised; TileLang's disk cache below)."""
    return _common.compile_program(boundary_bwd_program(n, C, dtype))


@functools.cache
def boundary_fwd_kernel(n: int, C: int, dtype: str):
    """The compiled forward kernel for ``(n, C, dtype)`` (memoised; TileLang's disk cache below)."""
    return _common.compile_program(boundary_fwd_program(n, C, dtype))
