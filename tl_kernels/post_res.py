"""F_post,res: apply H_post and H_res and merge the residual, forward and backward, in one pass each.

Math (mHC paper Eq. 3, the paper's orientation; DeepSeek's TileKernels applies the transpose of ``h_res``)::

    out[t, i, c] = sum_j h_res[t, i, j] * residual[t, j, c] + h_post[t, i] * layer_output[t, c]

and its backward, with ``g = grad_out``::

    d_layer_output[t, c] = sum_i h_post[t, i] * g[t, i, c]
    d_residual[t, j, c]  = sum_i h_res[t, i, j] * g[t, i, c]
    d_h_post[t, i]       = sum_c g[t, i, c] * layer_output[t, c]
    d_h_res[t, i, j]     = sum_c g[t, i, c] * residual[t, j, c]

Layouts and dtypes (all tensors contiguous, ``T`` = ``num_tokens`` is dynamic: one binary per ``(n, C, dtype)``):

* fwd ``kernel(layer_output [T, C] dt, residual [T, n, C] dt, h_post [T, n] f32, h_res [T, n, n] f32,
  out [T, n, C] dt)``;
* bwd ``kernel(grad_out [T, n, C] dt, layer_output [T, C] dt, residual [T, n, C] dt, h_post [T, n] f32,
  h_res [T, n, n] f32, d_layer_output [T, C] dt, d_residual [T, n, C] dt, d_h_post [T, n] f32,
  d_h_res [T, n, n] f32)``;
* ``dt`` in :data:`DTYPES`; n in {1, 2, 4, 6, 8}; C a positive multiple of 64 up to 65536.
  Arithmetic is fp32; every activation output is rounded once to ``dt`` on store. ``T >= 1`` (the host skips 0).

Design. Both kernels are pure bandwidth: fwd reads (n+1)C and writes nC elements (18C bytes + 80 B of coefficients
at n=4, bf16); bwd reads (2n+1)C and writes (n+1)C (28C + 160 B). Their floors and the performance model's
predictions are in docs/benchmarks.md (``python -m profiling floors``, ``python -m profiling model``). So:

* 128-bit accesses. A thread owns "chunks" of VEC = 16 bytes of the hidden dimension (8 bf16/fp16 or 4 fp32) and
  moves each activation row of a chunk with one 128-bit access: loads are plain vector loads (PTX
  ``ld.global.nc.v4.u32``, ``.v4.f32`` for fp32), stores go through ``T.stg128`` (``st.global.v4.u32``) because nvcc
  split the first row's ordinary ``uint4`` store of a locally packed bf16 vector into 4 x ``st.global.u32``.
* Chunking rule, chunks = C / VEC (a multiple of 8). If chunks <= 32: tpt (threads per token) = next power of two
  >= chunks and a 128-thread block serves 128 / tpt tokens (C=64 bf16: 8 threads x 16 tokens). Otherwise one token
  per block, iters = ceil(chunks / 256) and tpt = 32 * ceil(chunks / (32 * iters)). Thread ``lane`` of a token
  handles chunks q = k * tpt + lane, k < iters (a warp touches 512 contiguous bytes per row): every chunk exactly
  once, with a ``q < chunks`` guard only where tpt * iters > chunks. bf16: C=1280 -> 160 threads x 1 iteration,
  1920 -> 256 x 1 (240 active), 2560 -> 160 x 2, 4096 -> 256 x 2, 7168 -> 224 x 4, 16384 -> 256 x 8; fp32 7168 ->
  256 x 7.
* Latency hiding from many resident warps, not software pipelining: ``T.Pipelined`` through shared memory would add
  a copy and barriers to a kernel that reuses nothing. Registers are capped with ``__launch_bounds__(threads,
  min_blocks)`` (:data:`_REG_BUDGET`) so that enough blocks stay resident to keep the bytes in flight per SM that
  Little's law asks for (bandwidth per SM x loaded latency; the performance model's latency bound). One token per
  block also keeps small T (decode) from serialising a token over one warp: at most ``iters`` dependent load rounds
  per token. The loop over a thread's chunks stays rolled.
* ``h_res`` and ``h_post`` of the token are loaded once per thread into registers (fp32, gcd(n, 4)-wide vector
  loads; the threads of a token read the same addresses, L1 broadcasts). All loops over n and VEC are unrolled, so
  every local array is indexed by constants and lives in registers.
* bwd: each thread accumulates n * n + n fp32 partial sums of d_h_res and d_h_post (72 for n=8) over its chunks in
  a fixed order; :class:`tl_kernels._common.TokenLaneSum` then sums them over the token's threads (an xor butterfly
  over the token's lanes of each warp, segment leaders write their partials to shared memory [slots, n * n + n], one
  ``__syncthreads``) and thread p of the token adds the token's slots in slot order and writes coefficient gradient
  p. No atomics: bitwise deterministic for a given (n, C, dtype). The butterfly and the barrier sit outside the
  ``t < num_tokens`` guard (full-warp shuffles).

Registers, spills and shared memory of every shipped configuration: ``python -m tl_kernels.build --family post_res``
(docs/benchmarks.md, "Compile facts"); tests/kernels/test_codegen.py asserts zero spills and stack.
"""

import functools
import math
from dataclasses import dataclass

from . import _common

__all__ = [
    "DTYPES",
    "post_res_bwd_kernel",
    "post_res_bwd_program",
    "post_res_fwd_kernel",
    "post_res_fwd_program",
]

#: Residual / layer-output dtypes (TileLang names). Coefficients and their gradients are always float32.
DTYPES: tuple[str, ...] = _common.ACTIVATION_DTYPES
_STREAMS = _common.ACTIVATION_STREAMS  # supported stream counts n

_SMALL_BLOCK = 128  # block size when several tokens share a block (tpt <= 32)
_MAX_TPT = 256  # most threads one token is spread over
# Register budget per thread, turned into __launch_bounds__(threads, min_blocks): the smallest caps that gave zero
# spills over every n and C in {64, 192, 1280, ..., 16384} (fwd n=4 at 64: 4 blocks of 224-256 threads per SM; fwd
# n=8 at 128: 2 blocks instead of 1); tests/kernels/test_codegen.py keeps the shipped ones spill-free.
_REG_BUDGET = {
    "fwd": {1: 40, 2: 48, 4: 64, 6: 112, 8: 128},
    "bwd": {1: 48, 2: 72, 4: 128, 6: 144, 8: 255},
}


@dataclass(frozen=True)
class _Plan:
    vec: int  # elements per 128-bit access
    chunks: int  # C // vec
    tpt: int  # threads per token
    tpb: int  # tokens per block
    iters: int  # serial iterations per thread
    guarded: bool  # tpt * iters > chunks: the last iteration needs q < chunks
    coef_vec: int  # vector width of the h_res / h_post loads

    @property
    def threads(self) -> int:
        return self.tpt * self.tpb


def _validate(n: int, C: int, dtype: str) -> None:
    _common.validate_activation_config("post_res", n, C, dtype, _STREAMS)


def _plan(n: int, C: int, dtype: str) -> _Plan:
    vec = _common.VECTOR_BYTES // _common.ELEMENT_BYTES[dtype]
    chunks = C // vec
    if chunks <= 32:
        tpt = 1 << (chunks - 1).bit_length()
        tpb = _SMALL_BLOCK // tpt
        iters = 1
    else:
        iters = -(-chunks // _MAX_TPT)
        tpt = 32 * -(-chunks // (32 * iters))
        tpb = 1
    return _Plan(
        vec=vec,
        chunks=chunks,
        tpt=tpt,
        tpb=tpb,
        iters=iters,
        guarded=tpt * iters > chunks,
        coef_vec=math.gcd(n, 4),
    )


def _min_blocks(direction: str, n: int, p: _Plan) -> int:
    """``minBlocksPerMultiprocessor`` of ``__launch_bounds__``: caps ptxas at ~``_REG_BUDGET`` registers a thread.

    Only for one token per block; the small-C blocks (several tokens, not bandwidth-critical) are left to ptxas:
    their extra token index math made fwd n=4 fp16 at C=64 spill 8 bytes under the 64-register cap.
    """
    if p.tpb > 1:
        return 1
    budget = _REG_BUDGET[direction][n]
    return max(1, min(_common.REGS_PER_SM // (budget * p.threads), _common.THREADS_PER_SM // p.threads))


def _chunk_loop(T, iters: int):
    """The loop over a thread's chunks: kept rolled (``#pragma unroll 1``) so registers do not grow with C."""
    return T.serial(1) if iters == 1 else T.unroll(iters, annotations={"pragma_unroll_factor": 1})


def _coefficient_loader(T, n: int, cw: int):
    """A ``T.macro`` shared by the forward and the backward: token ``t``'s coefficients into registers,
    ``hp[i] = h_post[t, i]`` and ``hr[i, j] = h_res[t, i, j]``, in ``cw``-wide vector loads."""

    @T.macro
    def load_coefficients(t, h_post, h_res, hp, hr):
        for i in T.unroll(n // cw):
            for e in T.vectorized(cw):
                hp[i * cw + e] = h_post[t, i * cw + e]
        for i in T.unroll(n):
            for j in T.unroll(n // cw):
                for e in T.vectorized(cw):
                    hr[i, j * cw + e] = h_res[t, i, j * cw + e]

    return load_coefficients


def post_res_fwd_program(n: int, C: int, dtype: str, pdl: bool = False):
    """``out = h_res @ residual + h_post^T layer_output`` per token; see the module docstring.

    ``pdl=True``: the decode variant (the runtime takes it at T <= 64) with programmatic dependent launch, as
    ``tl_kernels.pre_decode``: ``T.pdl_sync()`` (``griddepcontrol.wait``) before the first global access, so that the
    kernel behaves as a stream-ordered launch while its launch and block dispatch overlap its predecessor, and
    ``T.pdl_trigger()`` after the block's stores, so that the next site's decode kernel may start its own prologue.
    TileLang drops ``__restrict__`` from such a kernel (its loads lose the read-only path), which is why the
    training-size kernel stays without it (docs/design.md section 8)."""
    _validate(n, C, dtype)
    import tilelang.language as T
    from tvm import tirx

    p = _plan(n, C, dtype)
    vec, tpt, tpb, cw = p.vec, p.tpt, p.tpb, p.coef_vec
    f32 = "float32"
    num_tokens = T.dynamic("num_tokens")
    load_coefficients = _coefficient_loader(T, n, cw)

    @T.macro
    def chunk(q, t, layer_output, residual, out, hr, hp, xs, ls, acc, ob):
        c0 = q * vec
        for e in T.vectorized(vec):
            ls[e] = layer_output[t, c0 + e]
        for j in T.unroll(n):
            for e in T.vectorized(vec):
                xs[j, e] = residual[t, j, c0 + e]
        for i in T.unroll(n):
            for e in T.unroll(vec):
                acc[e] = hp[i] * T.cast(ls[e], f32)
            for j in T.unroll(n):
                for e in T.unroll(vec):
                    acc[e] = acc[e] + hr[i, j] * T.cast(xs[j, e], f32)
            for e in T.vectorized(vec):
                ob[e] = T.cast(acc[e], dtype)
            T.stg128(out[t, i, c0], T.reinterpret(ob[tirx.Ramp(0, 1, vec)], "uint32x4"))

    @T.prim_func
    def post_res_fwd(
        layer_output: T.Tensor((num_tokens, C), dtype),
        residual: T.Tensor((num_tokens, n, C), dtype),
        h_post: T.Tensor((num_tokens, n), f32),
        h_res: T.Tensor((num_tokens, n, n), f32),
        out: T.Tensor((num_tokens, n, C), dtype),
    ):
        with T.Kernel(T.ceildiv(num_tokens, tpb), threads=p.threads) as bx:
            T.annotate_min_blocks_per_sm(_min_blocks("fwd", n, p))
            if pdl:
                T.pdl_sync()  # nothing global is read or written before the predecessor grid has completed
            tx = T.get_thread_binding()
            hr = T.alloc_local((n, n), f32)
            hp = T.alloc_local((n,), f32)
            xs = T.alloc_local((n, vec), dtype)
            ls = T.alloc_local((vec,), dtype)
            acc = T.alloc_local((vec,), f32)
            ob = T.alloc_local((vec,), dtype)
            t = bx * tpb + tx // tpt
            lane = tx % tpt
            if t < num_tokens:
                load_coefficients(t, h_post, h_res, hp, hr)
                for k in _chunk_loop(T, p.iters):
                    q = k * tpt + lane
                    if p.guarded:
                        if q < p.chunks:
                            chunk(q, t, layer_output, residual, out, hr, hp, xs, ls, acc, ob)
                    else:
                        chunk(q, t, layer_output, residual, out, hr, hp, xs, ls, acc, ob)
            if pdl:
                T.pdl_trigger()  # a dependent grid's prologue may start; its pdl_sync still waits for this grid

    return post_res_fwd


def post_res_bwd_program(n: int, C: int, dtype: str, *, summed: bool = False, min_blocks: int | None = None):
    """Gradients of :func:`post_res_fwd_program` w.r.t. all four inputs, in one pass; see the module docstring.

    ``summed``: the kernel takes two gradients of the output, ``grad_x_next`` and ``d_x_next``, and runs on their sum
    rounded once to ``dtype`` (as autograd accumulates them), never writing it: ``tl_kernels.boundary``'s backward.
    ``min_blocks`` overrides the ``__launch_bounds__`` minimum (that variant's second gradient needs registers)."""
    _validate(n, C, dtype)
    import tilelang.language as T
    from tvm import tirx

    p = _plan(n, C, dtype)
    vec, tpt, tpb, cw = p.vec, p.tpt, p.tpb, p.coef_vec
    f32 = "float32"
    nn = n * n
    num_coef = nn + n  # d_h_res (row-major) then d_h_post
    lanes = _common.TokenLaneSum(tpt, p.threads)  # the coefficient partials summed over the token's threads
    butterfly, publish, slot_sum = lanes.macros(T)
    coef_rounds = -(-num_coef // tpt)
    num_tokens = T.dynamic("num_tokens")
    load_coefficients = _coefficient_loader(T, n, cw)

    @T.macro
    def add_partner(offset, ph, pr):
        for i in T.unroll(n):
            ph[i] = ph[i] + T.shfl_xor(ph[i], offset)
            for j in T.unroll(n):
                pr[i, j] = pr[i, j] + T.shfl_xor(pr[i, j], offset)

    @T.macro
    def store(tx, red, ph, pr):
        for i in T.unroll(n):
            for j in T.unroll(n):
                red[tx // lanes.seg, i * n + j] = pr[i, j]
            red[tx // lanes.seg, nn + i] = ph[i]

    @T.macro
    def chunk(q, t, grad_out, grad_2, layer_output, residual, d_lo, d_res, hr, hp, gs, xs, ls, acc, ob, ph, pr):
        c0 = q * vec
        for i in T.unroll(n):
            for e in T.vectorized(vec):
                gs[i, e] = grad_out[t, i, c0 + e]
            if summed:  # trace time: the second gradient, added in fp32 and rounded once (ob is free until below)
                for e in T.vectorized(vec):
                    ob[e] = grad_2[t, i, c0 + e]
                for e in T.unroll(vec):
                    gs[i, e] = T.cast(T.cast(gs[i, e], f32) + T.cast(ob[e], f32), dtype)
        for e in T.vectorized(vec):
            ls[e] = layer_output[t, c0 + e]
        for j in T.unroll(n):
            for e in T.vectorized(vec):
                xs[j, e] = residual[t, j, c0 + e]
        # d_layer_output and the d_h_post partials
        for e in T.unroll(vec):
            acc[e] = hp[0] * T.cast(gs[0, e], f32)
        for i in T.unroll(1, n):
            for e in T.unroll(vec):
                acc[e] = acc[e] + hp[i] * T.cast(gs[i, e], f32)
        for e in T.vectorized(vec):
            ob[e] = T.cast(acc[e], dtype)
        T.stg128(d_lo[t, c0], T.reinterpret(ob[tirx.Ramp(0, 1, vec)], "uint32x4"))
        for i in T.unroll(n):
            for e in T.unroll(vec):
                ph[i] = ph[i] + T.cast(gs[i, e], f32) * T.cast(ls[e], f32)
        # d_residual row j and the d_h_res[:, j] partials
        for j in T.unroll(n):
            for e in T.unroll(vec):
                acc[e] = hr[0, j] * T.cast(gs[0, e], f32)
            for i in T.unroll(1, n):
                for e in T.unroll(vec):
                    acc[e] = acc[e] + hr[i, j] * T.cast(gs[i, e], f32)
            for e in T.vectorized(vec):
                ob[e] = T.cast(acc[e], dtype)
            T.stg128(d_res[t, j, c0], T.reinterpret(ob[tirx.Ramp(0, 1, vec)], "uint32x4"))
            for i in T.unroll(n):
                for e in T.unroll(vec):
                    pr[i, j] = pr[i, j] + T.cast(gs[i, e], f32) * T.cast(xs[j, e], f32)

    blocks_per_sm = _min_blocks("bwd", n, p) if min_blocks is None else min_blocks

    @T.macro
    def body(grad_out, grad_2, layer_output, residual, h_post, h_res, d_layer_output, d_residual, d_h_post, d_h_res):
        with T.Kernel(T.ceildiv(num_tokens, tpb), threads=p.threads) as bx:
            T.annotate_min_blocks_per_sm(blocks_per_sm)
            tx = T.get_thread_binding()
            hr = T.alloc_local((n, n), f32)
            hp = T.alloc_local((n,), f32)
            gs = T.alloc_local((n, vec), dtype)
            xs = T.alloc_local((n, vec), dtype)
            ls = T.alloc_local((vec,), dtype)
            acc = T.alloc_local((vec,), f32)
            ob = T.alloc_local((vec,), dtype)
            ph = T.alloc_local((n,), f32)
            pr = T.alloc_local((n, n), f32)
            total = T.alloc_local((1,), f32)
            red = T.alloc_shared((lanes.num_slots, num_coef), f32)
            token = tx // tpt
            t = bx * tpb + token
            lane = tx % tpt
            for i in T.unroll(n):
                ph[i] = 0.0
                for j in T.unroll(n):
                    pr[i, j] = 0.0
            if t < num_tokens:
                load_coefficients(t, h_post, h_res, hp, hr)
                for k in _chunk_loop(T, p.iters):
                    q = k * tpt + lane
                    if p.guarded:
                        if q < p.chunks:
                            chunk(
                                q, t, grad_out, grad_2, layer_output, residual, d_layer_output, d_residual,
                                hr, hp, gs, xs, ls, acc, ob, ph, pr,
                            )  # fmt: skip
                    else:
                        chunk(
                            q, t, grad_out, grad_2, layer_output, residual, d_layer_output, d_residual,
                            hr, hp, gs, xs, ls, acc, ob, ph, pr,
                        )  # fmt: skip
            butterfly(add_partner, ph, pr)  # every lane of the warp takes part; lanes past T add zeros
            publish(tx, store, red, ph, pr)
            if t < num_tokens:
                for r in T.serial(coef_rounds):
                    c = r * tpt + lane
                    if c < num_coef:
                        slot_sum(total[0], red, token, (c,))
                        if c < nn:
                            d_h_res[t, c // n, c % n] = total[0]
                        else:
                            d_h_post[t, c - nn] = total[0]

    if summed:

        @T.prim_func
        def boundary_bwd(
            grad_x_next: T.Tensor((num_tokens, n, C), dtype),
            d_x_next: T.Tensor((num_tokens, n, C), dtype),
            layer_output: T.Tensor((num_tokens, C), dtype),
            residual: T.Tensor((num_tokens, n, C), dtype),
            h_post: T.Tensor((num_tokens, n), f32),
            h_res: T.Tensor((num_tokens, n, n), f32),
            d_layer_output: T.Tensor((num_tokens, C), dtype),
            d_residual: T.Tensor((num_tokens, n, C), dtype),
            d_h_post: T.Tensor((num_tokens, n), f32),
            d_h_res: T.Tensor((num_tokens, n, n), f32),
        ):
            body(grad_x_next, d_x_next, layer_output, residual, h_post, h_res, d_layer_output, d_residual, d_h_post,
                 d_h_res)  # fmt: skip

        return boundary_bwd

    @T.prim_func
    def post_res_bwd(
        grad_out: T.Tensor((num_tokens, n, C), dtype),
        layer_output: T.Tensor((num_tokens, C), dtype),
        residual: T.Tensor((num_tokens, n, C), dtype),
        h_post: T.Tensor((num_tokens, n), f32),
        h_res: T.Tensor((num_tokens, n, n), f32),
        d_layer_output: T.Tensor((num_tokens, C), dtype),
        d_residual: T.Tensor((num_tokens, n, C), dtype),
        d_h_post: T.Tensor((num_tokens, n), f32),
        d_h_res: T.Tensor((num_tokens, n, n), f32),
    ):
        body(grad_out, None, layer_output, residual, h_post, h_res, d_layer_output, d_residual, d_h_post, d_h_res)

    return post_res_bwd


@functools.cache
def post_res_fwd_kernel(n: int, C: int, dtype: str, pdl: bool = False):
    """The compiled forward kernel for ``(n, C, dtype)`` (memoised; TileLang's disk cache below); ``pdl``: the decode
    variant of :func:`post_res_fwd_program`."""
    return _common.compile_program(post_res_fwd_program(n, C, dtype, pdl))


@functools.cache
def post_res_bwd_kernel(n: int, C: int, dtype: str):
    """The compiled backward kernel for ``(n, C, dtype)`` (memoised; TileLang's disk cache below)."""
    return _common.compile_program(post_res_bwd_program(n, C, dtype))
