"""The pre-mapping finalisation (mHC paper Eq. 15-19 and F_pre): coefficients, Sinkhorn and ``H_pre x``, forward and
backward, general n. It follows the projection of :mod:`tl_kernels.pre_proj`.

Math, per token ``t`` (``K = n * C``, ``m = n * n + 2n``, groups ``g(j)`` = pre for j < n, post for j < 2n, res)::

    forward   proj[j]    = sum_s proj_part[s, j]                 (split-K partials, reduced in split order)
              rinv       = rsqrt(sum_s sq_part[s] / K + rms_eps)  (Eq. 15)
              logit[j]   = proj[j] * rinv * alpha_g(j) + bias[j]  (Eq. 16)
              h_pre      = sigmoid(logit[:n]),  h_post = post_mult * sigmoid(logit[n:2n])   (Eq. 17-18)
              h_res      = Sinkhorn(logit[2n:] as n x n, row-major)                         (Eq. 19 / Eq. 9)
              layer_input[c] = sum_i h_pre[i] * x[i, c]                                       (F_pre)
    backward  g_pre[i]   = sum_c g_li[c] * x[i, c] + grad_h_pre[i]
              d_pp[:n]   = g_pre * h_pre * (1 - h_pre),  d_pp[n:] = grad_h_post * h_post * (1 - h_post / post_mult)
              res_logits = logit[2n:] recomputed from (proj, rinv, alpha, bias), bit-identical to the forward's

The per-token coefficient code is the macro :func:`coefficients`, which the one-launch decode kernel
(:mod:`tl_kernels.pre_decode`) runs too. The Sinkhorn part is the device code of :mod:`tl_kernels.sinkhorn`
(``forward_in_registers``), not a copy; the backward hands ``res_logits`` to ``sinkhorn_bwd_kernel`` (the same
binary ``mhc.sinkhorn`` uses) and the rest of the chain (d_proj, the RMS term, d_x, d_phi, per-tile d_bias /
d_alpha partials) runs in ``pre_proj_bwd``, which reads ``d_pp`` and the Sinkhorn's ``d_res`` as they are (no
concatenation); ``pre_reduce_bwd`` (:mod:`tl_kernels.pre_reduce`) sums the partials in a fixed order. Four launches
for the backward.

Layouts and call contracts (contiguous; ``T`` = ``num_tokens`` dynamic; one binary per (n, C, dtype[, iters, eps])):

* ``pre_finalize_fwd_kernel(n, C, dtype, iters, eps)(proj_part [S, T, m] f32, sq_part [S, T] f32, alpha [3] f32,
  bias [m] f32, x [T, n, C] dt, layer_input [T, C] dt, h_post [T, n] f32, h_res [T, n, n] f32, h_pre [T, n] f32,
  proj [T, m] f32, rinv [T] f32, rms_eps, post_mult, num_slices)``, grid ``(ceil(T / TB), num_slices)`` with ``TB =
  token_block(S, n)`` (``TOKENS`` = 32 unless the partials come in many splits): block ``(b, s)`` applies H_pre to
  the C-slice ``s`` of tokens ``[b * TB, ...)``; only ``s = 0`` runs Sinkhorn and writes the coefficient outputs. ``num_slices`` (1 <= num_slices <= C / VEC, every slice non-empty: use
  :func:`choose_slices`) spreads small T over the GPU.
* ``pre_finalize_bwd_kernel(n, C, dtype)(g_li [T, C] dt, x [T, n, C] dt, grad_h_pre [T, n] f32, grad_h_post
  [T, n] f32, h_pre [T, n] f32, h_post [T, n] f32, proj [T, m] f32, rinv [T] f32, alpha [3] f32, bias [m] f32,
  d_pp [T, 2n] f32, res_logits [T, n, n] f32, post_mult)``; the token-to-thread mapping of ``post_res``.
* ``dt`` in bfloat16 / float16 / float32; n in {1, 2, 4, 6, 8}; C a positive multiple of 64 up to 65536; T >= 1.

Design. Forward: ``TB`` tokens per block of 128 threads. First all 128 threads sum the block's split partials
(:func:`reduce_splits`): a batch of splits (at most ``STAGE`` = 3072 floats; all of them at decode sizes, where
``TB = token_block(S, n)`` shrinks to keep it so: 2 tokens a block for S = 56 at n = 4) is loaded with every
thread's loads in flight at once, staged in shared memory, then each (token, column) pair is summed by one thread in
split order: one DRAM latency a batch where the serial loop of one lane per token waited one a split (56 at decode).
Warp 0 then does the per-token scalar work, one token per thread (the Sinkhorn state, n*n + 3n floats, stays in
registers), and leaves h_pre in shared memory; after one barrier all 128 threads stream the slice: for each token, thread q moves chunk q of VEC = 16 bytes of every stream
(128-bit loads, ``ld.global.nc.v4``) and writes one 128-bit chunk of layer_input (``st.global.v4``). Bytes per
token (bf16, n=4): 8C read + 2C written (+ S x 100 B of partials): with the projection's 8C this is the two-read
design of spec §6.2, 18C per token. Backward: the reduction g_pre = <g_li, x_i> over C is the only full pass
(2C + 2nC bytes, 10C at n=4); its partials are summed over the token's threads in a fixed order by
:class:`tl_kernels._common.TokenLaneSum`, as in post_res (no atomics: deterministic).

Resources: the Sinkhorn state of warp 0 and the staged batch's loads set the forward's register count for the
whole block (flush-to-zero as tl_kernels/sinkhorn.py); at n <= 4 ``__launch_bounds__(128, 4)`` holds it to 128 (n = 4
bf16: 128, was 96; four blocks an SM, one wave at T = 16384 as before; n = 8: 219), shared memory 12.5 KB (the
staged batch; the sums reuse it). The backward holds n coefficient partials per thread in
post_res's mapping. Registers per configuration: ``python -m tl_kernels.build --family pre_finalize``; zero spills
and stack asserted by tests/kernels/test_codegen.py.

Verified without a GPU: the generated CUDA source runs in the CPU emulation (tests/emulation; ``shim.h`` emulates
``mma.sync`` TF32 and ``ldmatrix`` with the PTX ISA's fragment layouts) against float64, and under AddressSanitizer
with every tensor allocated to its exact size (no out-of-bounds access; a planted short input is caught).

SASS: the slice bounds are int32 scalars computed once per block (recomputed in the apply loop they were 64-bit
division sequences); loads and stores are 128-bit. The hot loops' instruction counts, registers and occupancy are
printed by ``python -m tl_kernels.tools.pre_mapping_sass`` (docs/benchmarks.md, "Compile facts") and guarded in
tests/kernels/test_sass.py. Speed: not measured (no GPU has run these kernels); the performance model (profiling/)
predicts it from the SASS.
"""

import functools

import tilelang.language as T
from tvm import tirx

from . import _common, post_res, sinkhorn

__all__ = [
    "DTYPES",
    "STAGE",
    "STREAMS",
    "TOKENS",
    "choose_slices",
    "coefficients",
    "pre_finalize_bwd_kernel",
    "pre_finalize_bwd_program",
    "pre_finalize_fwd_kernel",
    "pre_finalize_fwd_program",
    "reduce_splits",
    "stage_loads",
    "token_block",
]

DTYPES: tuple[str, ...] = _common.ACTIVATION_DTYPES
STREAMS: tuple[int, ...] = _common.ACTIVATION_STREAMS
TOKENS = 32  # tokens per forward block (one warp does their coefficients)
THREADS = 128
MIN_BLOCKS = 4  # forward blocks per SM that ptxas keeps registers for at n <= 4 (128 registers a thread)
STAGE = 3072  # split partials (f32) staged in shared memory per batch: all of them at decode sizes


def _validate(n: int, C: int, dtype: str) -> None:
    _common.validate_activation_config("pre_finalize", n, C, dtype, STREAMS)


def token_block(num_splits: int, n: int) -> int:
    """Tokens per forward block (grid x is ``ceil(T / token_block)``): ``TOKENS``, or fewer where a block's split
    partials (``num_splits x tokens x (m + 1)`` floats) would not fit one staged batch of ``STAGE``: at decode the
    partials come in many splits, and fewer tokens a block keep the reduction one round of loads."""
    return max(1, min(TOKENS, STAGE // (num_splits * (n * n + 2 * n + 1))))


def choose_slices(num_tokens: int, C: int, dtype: str, num_sms: int) -> int:
    """C-slices per token block for the forward: about 2 blocks per SM, each slice at least one chunk per thread."""
    chunks = C // (_common.VECTOR_BYTES // _common.ELEMENT_BYTES[dtype])
    blocks = -(-num_tokens // TOKENS)
    most = max(1, chunks // THREADS)
    want = max(1, min(most, -(-2 * num_sms // blocks)))
    per = -(-chunks // want)
    return -(-chunks // per)


def stage_loads(n: int, threads: int, stage: int = STAGE) -> tuple[int, int]:
    """(proj, sum-of-squares) partials one of ``threads`` threads loads per batch of :func:`reduce_splits` (a batch
    of at most ``stage`` values), at most: the caller's ``vals`` holds their sum, its shared ``stage_p`` /
    ``stage_q`` buffers ``threads`` times each."""
    cols = n * n + 2 * n + 1
    return -(-stage * (cols - 1) // (cols * threads)), -(-stage // (cols * threads))


def reduce_splits(n: int, tokens: int, threads: int, stage: int = STAGE):
    """The sums over the split-K partials of a block's tokens, for this kernel and the decode kernel
    (:mod:`tl_kernels.pre_decode`): a macro ``(tx, t_first, ntok, proj_part, sq_part, stage_p, stage_q, red, vals,
    acc)`` that leaves ``red[i, j] = sum_s proj_part[s, t_first + i, j]`` (``j < m``) and ``red[i, m] = sum_s
    sq_part[s, t_first + i]`` for ``i < ntok <= tokens`` in shared memory, each sum taken from 0 in split order ``s =
    0, 1, ...`` (one fp32 add a split, as a serial loop over the splits: deterministic, and bit-identical to that
    loop). ``stage_p`` / ``stage_q``: shared f32 of ``threads x stage_loads(...)[0 / 1]``; ``red``: shared
    ``[tokens, m + 1]`` f32; ``vals``: local ``[sum(stage_loads(...))]`` f32; ``acc``: local ``[ceil(tokens (m + 1)
    / threads)]`` f32. Every thread of the block must call it (barriers inside); a barrier follows the last write of
    ``red``.

    Latency design: the partials of a batch of splits (as many as ``stage`` floats hold: all of them at decode
    sizes) are loaded by every thread of the block, each thread's loads all in flight before the first is used (one
    DRAM latency a batch, where one lane per token summing split after split waited one a split), coalesced (a
    split's partials of the block's tokens are contiguous), and staged in shared memory; then each (token, column)
    pair is summed by one thread in split order. The staged index ``e`` is split into (split, offset) with a float
    reciprocal, ``floor((e + 0.5) * (1 / row))``, exact while ``stage x 2**-22 < 0.5`` (the product's error is
    below ``(e / row) 2**-22``, the quotient is at least ``0.5 / row`` from an integer): no integer division a load."""
    m = n * n + 2 * n
    cols = m + 1
    if stage < tokens * cols or stage > 2**20:
        raise ValueError(f"reduce_splits: expected {tokens * cols} <= stage <= 2**20 (one split of {tokens} tokens; "
                         f"the float index split exact), got {stage}")  # fmt: skip
    loads_p, loads_q = stage_loads(n, threads, stage)
    pairs = -(-tokens * cols // threads)
    f32, i32 = "float32", "int32"

    def inside(i, size):  # already in [0, size): the clamp only shows the compiler (no bounds check, no branch)
        return T.max(T.min(i, size - 1), 0)

    @T.macro
    def body(tx, t_first, ntok, proj_part, sq_part, stage_p, stage_q, red, vals, acc):
        num_splits, num_tokens = proj_part.shape[0], proj_part.shape[1]
        # flat views, named as the parameters (the kernel's signature keeps its names)
        proj_part = T.reshape(proj_part, (num_splits * num_tokens * m,))
        sq_part = T.reshape(sq_part, (num_splits * num_tokens,))
        nt = T.alloc_var(i32)
        nt = ntok
        row = T.alloc_var(i32)  # a split's proj partials of the block's tokens: contiguous in proj_part
        row = nt * m
        per = T.alloc_var(i32)
        per = T.max(1, T.min(num_splits, stage // (nt * cols)))  # splits per staged batch
        rcp_p = T.alloc_var(f32)
        rcp_p = T.float32(1) / T.cast(row, f32)
        rcp_q = T.alloc_var(f32)
        rcp_q = T.float32(1) / T.cast(nt, f32)
        span = T.alloc_var(i32)
        lim_p = T.alloc_var(i32)
        lim_q = T.alloc_var(i32)
        gap = T.alloc_var(i32)  # tokens from the end of one split's row to the start of the next
        gap = num_tokens - nt
        base = T.alloc_var(i32)  # flat index of the batch's first sum of squares (times m: of its first projection)
        for u in T.unroll(pairs):
            acc[u] = T.float32(0)
        for batch in T.serial(T.ceildiv(num_splits, per)):
            span = T.min(per, num_splits - batch * per)
            lim_p = span * row
            lim_q = span * nt
            base = batch * per * num_tokens + t_first
            # stage_p[0, lim_p) = the batch's proj rows (split-major), stage_q[0, lim_q) its sq rows; element e of
            # split sl = e // row (e // nt) sits at base * m + e + sl * gap * m (base + e + sl * gap) of the flat
            # view; clamping an index that is in range only tells the compiler so (no bounds check, no branch)
            for u in T.unroll(loads_q):  # every load of the batch in flight before any is used
                e = u * threads + tx
                if e < lim_q:
                    sl = T.cast((T.cast(e, f32) + 0.5) * rcp_q, i32)
                    vals[loads_p + u] = sq_part[inside(base + e + sl * gap, num_splits * num_tokens)]
            for u in T.unroll(loads_p):
                e = u * threads + tx
                if e < lim_p:
                    sl = T.cast((T.cast(e, f32) + 0.5) * rcp_p, i32)
                    vals[u] = proj_part[inside(base * m + e + sl * (gap * m), num_splits * num_tokens * m)]
            for u in T.unroll(loads_p):
                if u * threads + tx < lim_p:
                    stage_p[u * threads + tx] = vals[u]
            for u in T.unroll(loads_q):
                if u * threads + tx < lim_q:
                    stage_q[u * threads + tx] = vals[loads_p + u]
            T.sync_threads()  # the batch is staged before any thread sums it
            for u in T.unroll(pairs):
                q = u * threads + tx
                if q < nt * cols:
                    i, j = q // cols, q % cols
                    if j < m:
                        for sl in T.serial(span):  # fixed order: deterministic
                            acc[u] += stage_p[sl * row + i * m + j]
                    else:
                        for sl in T.serial(span):
                            acc[u] += stage_q[sl * nt + i]
            T.sync_threads()  # every read of the batch precedes the next batch's staging
        for u in T.unroll(pairs):
            if u * threads + tx < nt * cols:
                red[(u * threads + tx) // cols, (u * threads + tx) % cols] = acc[u]
        T.sync_threads()

    return body


def coefficients(n: int, C: int, iters: int, eps: float):
    """The per-token coefficient device code of the forward, for this kernel and the one-launch decode kernel
    (:mod:`tl_kernels.pre_decode`): a macro ``(t, slot, write, red, alpha, bias, h_post, h_res, h_pre, proj, rinv,
    rms_eps, post_mult, hps, p, z, a, b, w)`` that takes token ``t``'s split sums from ``red[slot]`` (left there by
    :func:`reduce_splits`), forms rinv, the logits, h_pre (into ``hps[slot]``), and when ``write`` holds stores rinv,
    proj, h_pre, h_post and the Sinkhorn's h_res (the device code of :mod:`tl_kernels.sinkhorn`)."""
    m, nn, K = n * n + 2 * n, n * n, n * C
    run_sinkhorn = sinkhorn.forward_in_registers(n, iters, eps)

    @T.macro
    def body(t, slot, write, red, alpha, bias, h_post, h_res, h_pre, proj, rinv, rms_eps, post_mult,
             hps, p, z, a, b, w):  # fmt: skip
        r = T.alloc_var("float32")
        r = T.rsqrt(red[slot, m] / T.float32(K) + rms_eps)
        for j in T.unroll(m):
            p[j] = red[slot, j]
        if write:
            rinv[t] = r
            for j in T.unroll(m):
                proj[t, j] = p[j]
        for j in T.unroll(m):
            p[j] = p[j] * r * alpha[T.min(j // n, 2)] + bias[j]  # the logit (bwd recomputes it alike)
        for i in T.unroll(n):
            p[i] = T.sigmoid(p[i])  # h_pre (p[:n] is not needed as a logit again)
            hps[slot, i] = p[i]
        if write:
            for i in T.unroll(n):
                h_pre[t, i] = p[i]
                h_post[t, i] = post_mult * T.sigmoid(p[n + i])
            for q in T.unroll(nn):
                z[q] = p[2 * n + q]
            run_sinkhorn(z, a, b, w)
            for q in T.unroll(nn):
                h_res[t, q // n, q % n] = z[q]

    return body


def pre_finalize_fwd_program(n: int, C: int, dtype: str, iters: int, eps: float):
    """Coefficients, Sinkhorn and ``layer_input = sum_i h_pre[i] x[i]``; see the module docstring."""
    _validate(n, C, dtype)
    m, nn = n * n + 2 * n, n * n
    vec = _common.VECTOR_BYTES // _common.ELEMENT_BYTES[dtype]
    chunks = C // vec
    f32 = "float32"
    finalize = coefficients(n, C, iters, eps)
    reduce = reduce_splits(n, TOKENS, THREADS)
    num_tokens = T.dynamic("num_tokens")
    num_splits = T.dynamic("num_splits")

    @T.prim_func
    def pre_finalize_fwd(
        proj_part: T.Tensor((num_splits, num_tokens, m), f32),
        sq_part: T.Tensor((num_splits, num_tokens), f32),
        alpha: T.Tensor((3,), f32),
        bias: T.Tensor((m,), f32),
        x: T.Tensor((num_tokens, n, C), dtype),
        layer_input: T.Tensor((num_tokens, C), dtype),
        h_post: T.Tensor((num_tokens, n), f32),
        h_res: T.Tensor((num_tokens, n, n), f32),
        h_pre: T.Tensor((num_tokens, n), f32),
        proj: T.Tensor((num_tokens, m), f32),
        rinv: T.Tensor((num_tokens,), f32),
        rms_eps: T.float32,
        post_mult: T.float32,
        num_slices: T.int32,
    ):
        # Tokens per block: TOKENS, fewer where the block's split partials would not fit one staged batch (decode:
        # many splits); ``token_block`` is this expression.
        with T.Kernel(T.ceildiv(num_tokens, T.max(1, T.min(TOKENS, STAGE // (num_splits * (m + 1))))), num_slices,
                      threads=THREADS) as (bx, by):  # fmt: skip
            if n <= 4:  # registers for 4 resident blocks (one wave at T = 16384); n > 4's Sinkhorn needs more
                T.annotate_min_blocks_per_sm(MIN_BLOCKS)
            tx = T.get_thread_binding()
            hps = T.alloc_shared((TOKENS, n), f32)
            stage = T.alloc_shared((stage_loads(n, THREADS)[0] * THREADS,), f32)
            stage_q = T.alloc_shared((stage_loads(n, THREADS)[1] * THREADS,), f32)
            red = T.alloc_shared((TOKENS, m + 1), f32)
            vals = T.alloc_local((sum(stage_loads(n, THREADS)),), f32)
            acc_s = T.alloc_local((-(-TOKENS * (m + 1) // THREADS),), f32)
            p = T.alloc_local((m,), f32)
            z = T.alloc_local((nn,), f32)
            a = T.alloc_local((n,), f32)
            b = T.alloc_local((n,), f32)
            w = T.alloc_local((n,), f32)
            xs = T.alloc_local((n, vec), dtype)
            acc = T.alloc_local((vec,), f32)
            ob = T.alloc_local((vec,), dtype)
            # expressions, not variables: the barrier planner sees the branches below as uniform where they are
            tb = T.max(1, T.min(TOKENS, STAGE // (num_splits * (m + 1))))
            t_first = bx * tb
            t = t_first + tx
            reduce(tx, t_first, T.min(tb, num_tokens - t_first), proj_part, sq_part, stage, stage_q, red, vals, acc_s)
            if tx < tb:
                if t < num_tokens:
                    finalize(t, tx, by == 0, red, alpha, bias, h_post, h_res, h_pre, proj, rinv, rms_eps, post_mult,
                             hps, p, z, a, b, w)  # fmt: skip
                else:
                    for i in T.unroll(n):
                        hps[tx, i] = T.float32(0)
            T.sync_threads()
            # The slice's bounds, once, as int32 scalars (inlined into the loops they cost divisions).
            per = T.alloc_var("int32")
            per = T.ceildiv(chunks, num_slices)
            q_first = T.alloc_var("int32")
            q_first = by * per
            q_count = T.alloc_var("int32")
            q_count = T.min(per, chunks - q_first)
            trips = T.alloc_var("int32")
            trips = T.ceildiv(q_count, THREADS)
            tb_v = T.alloc_var("int32")  # as int32 scalars in the apply loop (inlined there they were 64-bit divisions)
            tb_v = tb
            t0 = T.alloc_var("int32")
            t0 = t_first
            for tok in T.serial(tb_v):
                if t0 + tok < num_tokens:
                    for k in T.serial(trips):
                        if k * THREADS + tx < q_count:
                            c0 = (q_first + k * THREADS + tx) * vec
                            for i in T.unroll(n):
                                for e in T.vectorized(vec):
                                    xs[i, e] = x[t0 + tok, i, c0 + e]
                            for e in T.unroll(vec):
                                acc[e] = hps[tok, 0] * T.cast(xs[0, e], f32)
                            for i in T.unroll(1, n):
                                for e in T.unroll(vec):
                                    acc[e] = acc[e] + hps[tok, i] * T.cast(xs[i, e], f32)
                            for e in T.vectorized(vec):
                                ob[e] = T.cast(acc[e], dtype)
                            T.stg128(
                                layer_input[t0 + tok, c0],
                                T.reinterpret(ob[tirx.Ramp(0, 1, vec)], "uint32x4"),
                            )

    return pre_finalize_fwd


def pre_finalize_bwd_program(n: int, C: int, dtype: str, grad_pre: bool = True):
    """``d_pp`` (pre and post logit gradients) and the recomputed ``res_logits``; see the module docstring.
    ``grad_pre=False``: ``grad_h_pre`` is taken as zero and never read (any ``[T, n]`` f32 buffer may be passed), for
    a caller whose ``h_pre`` output has no gradient (``mhc.boundary``: no zero-fill launch for it)."""
    _validate(n, C, dtype)
    m, nn = n * n + 2 * n, n * n
    p = post_res._plan(n, C, dtype)  # the same token-to-thread mapping and chunking as post_res
    vec, tpt, tpb = p.vec, p.tpt, p.tpb
    f32 = "float32"
    lanes = _common.TokenLaneSum(tpt, p.threads)  # g_pre's partials summed over the token's threads
    butterfly, publish, slot_sum = lanes.macros(T)
    num_tokens = T.dynamic("num_tokens")

    @T.macro
    def chunk(q, t, g_li, x, gs, xs, gp):
        c0 = q * vec
        for e in T.vectorized(vec):
            gs[e] = g_li[t, c0 + e]
        for i in T.unroll(n):
            for e in T.vectorized(vec):
                xs[i, e] = x[t, i, c0 + e]
        for i in T.unroll(n):
            for e in T.unroll(vec):
                gp[i] = gp[i] + T.cast(gs[e], f32) * T.cast(xs[i, e], f32)

    @T.macro
    def add_partner(offset, gp):
        for i in T.unroll(n):
            gp[i] = gp[i] + T.shfl_xor(gp[i], offset)

    @T.macro
    def store(tx, red, gp):
        for i in T.unroll(n):
            red[tx // lanes.seg, i] = gp[i]

    @T.prim_func
    def pre_finalize_bwd(
        g_li: T.Tensor((num_tokens, C), dtype),
        x: T.Tensor((num_tokens, n, C), dtype),
        grad_h_pre: T.Tensor((num_tokens, n), f32),
        grad_h_post: T.Tensor((num_tokens, n), f32),
        h_pre: T.Tensor((num_tokens, n), f32),
        h_post: T.Tensor((num_tokens, n), f32),
        proj: T.Tensor((num_tokens, m), f32),
        rinv: T.Tensor((num_tokens,), f32),
        alpha: T.Tensor((3,), f32),
        bias: T.Tensor((m,), f32),
        d_pp: T.Tensor((num_tokens, 2 * n), f32),
        res_logits: T.Tensor((num_tokens, n, n), f32),
        post_mult: T.float32,
    ):
        with T.Kernel(T.ceildiv(num_tokens, tpb), threads=p.threads) as bx:
            tx = T.get_thread_binding()
            gs = T.alloc_local((vec,), dtype)
            xs = T.alloc_local((n, vec), dtype)
            gp = T.alloc_local((n,), f32)
            total = T.alloc_var(f32)
            red = T.alloc_shared((lanes.num_slots, n), f32)
            token = tx // tpt
            t = bx * tpb + token
            lane = tx % tpt
            for i in T.unroll(n):
                gp[i] = T.float32(0)
            if t < num_tokens:
                for k in post_res._chunk_loop(T, p.iters):
                    q = k * tpt + lane
                    if p.guarded:
                        if q < p.chunks:
                            chunk(q, t, g_li, x, gs, xs, gp)
                    else:
                        chunk(q, t, g_li, x, gs, xs, gp)
            butterfly(add_partner, gp)  # every lane of the warp takes part; lanes past T add zeros
            publish(tx, store, red, gp)
            if t < num_tokens and lane == 0:
                r = rinv[t]
                for i in T.unroll(n):
                    slot_sum(total, red, token, (i,))
                    hp = h_pre[t, i]
                    if grad_pre:
                        d_pp[t, i] = (total + grad_h_pre[t, i]) * hp * (T.float32(1) - hp)
                    else:
                        d_pp[t, i] = total * hp * (T.float32(1) - hp)
                    hq = h_post[t, i]
                    d_pp[t, n + i] = grad_h_post[t, i] * hq * (T.float32(1) - hq / post_mult)
                for q in T.unroll(nn):
                    res_logits[t, q // n, q % n] = proj[t, 2 * n + q] * r * alpha[2] + bias[2 * n + q]

    return pre_finalize_bwd


@functools.cache
def pre_finalize_fwd_kernel(n: int, C: int, dtype: str, iters: int, eps: float):
    """The compiled forward kernel (memoised; TileLang's disk cache below)."""
    return _common.compile_program(
        pre_finalize_fwd_program(n, C, dtype, iters, eps), pass_configs=sinkhorn.COMPILE_CONFIGS
    )


@functools.cache
def pre_finalize_bwd_kernel(n: int, C: int, dtype: str, grad_pre: bool = True):
    """The compiled backward kernel (memoised; TileLang's disk cache below)."""
    return _common.compile_program(pre_finalize_bwd_program(n, C, dtype, grad_pre))
