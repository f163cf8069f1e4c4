"""The decode pre-mapping (mHC paper Eq. 14-19 and F_pre) in ONE launch for T <= 64 tokens, forward only.

Training and prefill keep the two-launch forward (:mod:`tl_kernels.pre_proj` then :mod:`tl_kernels.pre_finalize`)
and its backward; this kernel serves ``mhc::pre_mapping_fwd`` when ``T <= MAX_TOKENS`` (a static shape, so the
choice is the same under ``torch.compile`` and in a captured CUDA graph). With ``post_res`` a decode site is then
two launches instead of three.

Math, per token ``t`` (``K = n * C``, ``m = n * n + 2n``), as :mod:`tl_kernels.pre_finalize` states it::

    proj_part[s, t, j] = sum over k in split s of x[t, k] * phi[k, j]     (Eq. 14, fp32 FMA on CUDA cores)
    sq_part[s, t]      = sum over k in split s of x[t, k]^2
    proj[j] = sum_s proj_part[s, j]  (split order);  rinv = rsqrt(sum_s sq_part[s] / K + rms_eps)   (Eq. 15)
    logit[j] = proj[j] * rinv * alpha_g(j) + bias[j];  h_pre = sigmoid(logit[:n]);
    h_post = post_mult * sigmoid(logit[n:2n]);  h_res = Sinkhorn(logit[2n:])        (Eq. 16-19)
    layer_input[c] = sum_i h_pre[i] * x[i, c]                                         (F_pre)

Layout and call contract (contiguous; ``T`` = ``num_tokens`` dynamic, 1 <= T <= MAX_TOKENS; one binary per
``(n, C, dtype, iters, eps)``)::

    pre_decode_fwd_kernel(n, C, dtype, iters, eps)(x [T, n*C] dt, phi [K, m] f32, alpha [3] f32, bias [m] f32,
        layer_input [T, C] dt, h_post [T, n] f32, h_res [T, n, n] f32, h_pre [T, n] f32, proj [T, m] f32,
        rinv [T] f32, proj_part [S, T, m] f32, sq_part [S, T] f32, ticket [MAX_GROUPS] int32, rms_eps, post_mult)

grid ``(ceil(T / TB), S)``; ``S`` from :func:`choose_splits` (every split non-empty). ``proj_part``/``sq_part`` are
scratch (uninitialised is fine: every slot read is written first in the same launch). ``ticket`` must be zero before
the first launch and is zero again after every launch (self-resetting), so one zeroed buffer serves any number of
launches and CUDA-graph replays in stream order; two launches that run *concurrently* must not share it.

Design. At decode the projection is bound by reading ``phi`` (K x m x 4 B: 2.75 MB at n = 4, C = 7168), not by
``x`` (2nC B = 57 KB a token in bf16, 3.7 MB at T = 64). A grid of one CTA per token would make one SM read all
of phi at T = 1 (~20 us at an estimated ~150 GB/s per SM); so the K dimension is split over the GPU as in
``pre_proj`` (split-K, one wave: ``S`` about #SMs / groups), tokens in groups of ``TB`` = 8 (grid x). Block
``(g, s)`` stages each 64-wide K-chunk of its split (x rows of its 8 tokens and phi's 64 x m block, coalesced) in
shared memory and accumulates ``TB x (m + 1)`` dot products (column m is the sum of squares) with fp32 FMAs; at
T <= 64 the 2 nC m FLOPs a token are far below what even one SM's FMA units do in the phi read time, so tensor
cores would not shorten it. It then stores its partials; the block that takes the last ticket of its group (a
``__syncthreads``, then thread 0's ``__threadfence`` and ``atomicAdd``: the pattern of cooperative groups' grid
sync, without any wait) resets the ticket, reduces the group's partials in split order (fixed: deterministic, no
float atomics) and forms the coefficients with ``pre_finalize``'s own device code
(:func:`tl_kernels.pre_finalize.coefficients`, the Sinkhorn of :mod:`tl_kernels.sinkhorn` included; one token per
lane of warp 0), then applies ``H_pre`` to its group's tokens with 128-bit loads and stores. Nobody waits for
another block, so no co-residency is assumed.

Bytes per launch (bf16, n = 4, C = 7168): phi 4 K m B = 2.75 MB from DRAM once (the groups after the first read it
from L2: 8 groups at T = 64); x 8C a token for the projection and again for the apply (the second read mostly from
L2, a few microseconds after the first); layer_input 2C a token; partials S x T x (m + 1) x 4 B written and read
once. Latency: not measured (no GPU has run this kernel). One block applies a group (8 tokens x 57 KB at C = 7168)
with up to four 128-bit chunks of every stream in flight per thread: the cost of keeping one launch; the
performance model (profiling/) predicts it per site.

PDL: ``pdl_sync`` (``griddepcontrol.wait``) runs before the first global access, so every read of a predecessor's
output and every write that a predecessor might still read is ordered after the predecessor grid completed and
flushed; ``pdl_trigger`` follows the partial stores, so a dependent kernel's prologue overlaps the last block's
finalisation. TileLang drops ``__restrict__`` from the parameters of a kernel with either call (no read-only load
can be hoisted above the wait). See docs/design.md, section 8.

Resources and SASS (sm_90a, CUDA 13.0; ``codegen.analyze`` / ``codegen.sass`` of ``pre_decode_fwd_kernel``, guarded
in tests/kernels/test_pre_decode_sass.py): registers n = 4 bf16 / fp32: 96, n = 8 bf16: 250, n = 1 bf16: 55 (the
Sinkhorn state of the last block's warp 0 sets them); 0 spills, no local memory; the K-chunk loop is 285
instructions at n = 4, C = 7168, bf16; one ``ATOM.E.ADD.S32`` (the ticket), no float atomics; ``ACQBULK`` (the
wait) before every global access.

Accuracy (CPU emulation of the generated source, approximate math at its error bounds; ``pytest -s
tests/emulation/test_pre_decode_emulated.py -k generated`` prints each case's errors): |proj - exact| <= 1.3e-7 x
sum |x phi| (asserted: the fp32 bound (K / S + S + 2) x 2**-24; the two-launch path's TF32 budget is 2**-11 =
4.9e-4), coefficients within 3e-7 of float64, layer_input within one output ulp.
"""

import functools

import tilelang.language as T
from tvm import tirx

from . import _common, pre_finalize, sinkhorn

__all__ = [
    "DTYPES",
    "MAX_GROUPS",
    "MAX_TOKENS",
    "STREAMS",
    "TB",
    "choose_splits",
    "pre_decode_fwd_kernel",
    "pre_decode_fwd_program",
]

DTYPES: tuple[str, ...] = _common.ACTIVATION_DTYPES
STREAMS: tuple[int, ...] = _common.ACTIVATION_STREAMS
MAX_TOKENS = 64  # the decode path serves T <= MAX_TOKENS
TB = 8  # tokens per group (grid x); one lane of warp 0 each for the coefficients
MAX_GROUPS = MAX_TOKENS // TB
THREADS = 128
BK = 64  # K elements per staged chunk; divides C, so a chunk lies in one stream


def _validate(n: int, C: int, dtype: str) -> None:
    _common.validate_activation_config("pre_decode", n, C, dtype, STREAMS)


def choose_splits(num_tokens: int, n: int, C: int, num_sms: int) -> int:
    """K-splits per token group: one wave (``groups x S`` about ``num_sms``), every split non-empty."""
    if not 1 <= num_tokens <= MAX_TOKENS:
        raise ValueError(f"pre_decode: expected 1 <= num_tokens <= {MAX_TOKENS}, got {num_tokens}")
    chunks = n * C // BK
    groups = -(-num_tokens // TB)
    want = max(1, min(chunks, num_sms // groups))
    per = -(-chunks // want)
    return -(-chunks // per)


def pre_decode_fwd_program(n: int, C: int, dtype: str, iters: int, eps: float):
    """The one-launch decode pre-mapping; see the module docstring."""
    _validate(n, C, dtype)
    m, nn, K = n * n + 2 * n, n * n, n * C
    chunks = K // BK
    cols = m + 1  # column m: the sum of squares
    outs = TB * cols
    per_thread = -(-outs // THREADS)
    vec = _common.VECTOR_BYTES // _common.ELEMENT_BYTES[dtype]
    cchunks = C // vec
    stage_x = TB * BK // THREADS
    stage_phi = -(-BK * m // THREADS)
    units = max(1, min(4, 16 // n))  # 128-bit chunks of every stream in flight per thread in the apply
    rounds = -(-TB * cchunks // (THREADS * units))
    f32 = "float32"
    finalize = pre_finalize.coefficients(n, C, iters, eps)  # pre_finalize's device code, Sinkhorn included
    num_tokens = T.dynamic("num_tokens")
    num_splits = T.dynamic("num_splits")

    @T.prim_func
    def pre_decode_fwd(
        x: T.Tensor((num_tokens, K), dtype),
        phi: T.Tensor((K, m), f32),
        alpha: T.Tensor((3,), f32),
        bias: T.Tensor((m,), f32),
        layer_input: T.Tensor((num_tokens, C), dtype),
        h_post: T.Tensor((num_tokens, n), f32),
        h_res: T.Tensor((num_tokens, n, n), f32),
        h_pre: T.Tensor((num_tokens, n), f32),
        proj: T.Tensor((num_tokens, m), f32),
        rinv: T.Tensor((num_tokens,), f32),
        proj_part: T.Tensor((num_splits, num_tokens, m), f32),
        sq_part: T.Tensor((num_splits, num_tokens), f32),
        ticket: T.Tensor((MAX_GROUPS,), "int32"),
        rms_eps: T.float32,
        post_mult: T.float32,
    ):
        with T.Kernel(T.ceildiv(num_tokens, TB), num_splits, threads=THREADS) as (bx, by):
            tx = T.get_thread_binding()
            xs = T.alloc_shared((TB, BK), f32)
            ps = T.alloc_shared((BK, m), f32)
            hps = T.alloc_shared((TB, n), f32)
            last = T.alloc_shared((1,), "int32")
            acc = T.alloc_local((per_thread,), f32)
            p = T.alloc_local((m,), f32)
            z = T.alloc_local((nn,), f32)
            a = T.alloc_local((n,), f32)
            b = T.alloc_local((n,), f32)
            w = T.alloc_local((n,), f32)
            xv = T.alloc_local((units, n, vec), dtype)
            av = T.alloc_local((vec,), f32)
            ob = T.alloc_local((vec,), dtype)
            # Nothing global is read or written before this: the predecessor grid has completed (PDL).
            T.pdl_sync()
            t_first = bx * TB
            per = T.alloc_var("int32")
            per = T.ceildiv(chunks, num_splits)
            k_first = T.alloc_var("int32")
            k_first = by * per
            count = T.alloc_var("int32")
            count = T.min(per, chunks - k_first)
            for u in T.unroll(per_thread):
                acc[u] = T.float32(0)
            for kk in T.serial(count):
                k0 = (k_first + kk) * BK
                for u in T.unroll(stage_x):
                    e = u * THREADS + tx
                    t = t_first + e // BK
                    xs[e // BK, e % BK] = T.if_then_else(
                        t < num_tokens, T.cast(x[T.min(t, num_tokens - 1), k0 + e % BK], f32), T.float32(0)
                    )
                for u in T.unroll(stage_phi):
                    if (BK * m) % THREADS == 0 or u * THREADS + tx < BK * m:
                        f = u * THREADS + tx
                        ps[f // m, f % m] = phi[k0 + f // m, f % m]
                T.sync_threads()  # the chunk is staged before any thread reads it
                for u in T.unroll(per_thread):
                    if outs % THREADS == 0 or u * THREADS + tx < outs:
                        o = u * THREADS + tx
                        for k in T.serial(BK):
                            v = xs[o // cols, k]
                            acc[u] += v * T.if_then_else(o % cols < m, ps[k, T.min(o % cols, m - 1)], v)
                T.sync_threads()  # every read of the chunk precedes the next chunk's staging
            for u in T.unroll(per_thread):
                if outs % THREADS == 0 or u * THREADS + tx < outs:
                    o = u * THREADS + tx
                    t = t_first + o // cols
                    if t < num_tokens:
                        if o % cols < m:
                            proj_part[by, t, T.min(o % cols, m - 1)] = acc[u]
                        else:
                            sq_part[by, t] = acc[u]
            # A dependent grid may start its prologue now; its own pdl_sync still waits for this grid to finish.
            T.pdl_trigger()
            # The last block of the group to arrive finalises it (cooperative groups' grid-sync pattern, no wait):
            # every thread's partial stores precede the barrier, thread 0's fence orders them (cumulatively) before
            # its ticket; the last ticket holder fences again before its threads read the other blocks' partials.
            T.sync_threads()
            if tx == 0:
                T.call_extern("void", "__threadfence")
                last[0] = T.if_then_else(T.atomic_add(ticket[bx], 1, return_prev=True) == num_splits - 1, 1, 0)
                if last[0] == 1:
                    ticket[bx] = 0  # every block of this group has taken its ticket: reset for the next launch
                    T.call_extern("void", "__threadfence")
            T.sync_threads()
            if last[0] == 1:
                t = t_first + tx
                if tx < TB:
                    if t < num_tokens:
                        finalize(t, tx, True, proj_part, sq_part, alpha, bias, h_post, h_res, h_pre, proj, rinv,
                                 rms_eps, post_mult, hps, p, z, a, b, w)  # fmt: skip
                    else:
                        for i in T.unroll(n):
                            hps[tx, i] = T.float32(0)
            # Unconditional (last[0] is uniform over the block, but a barrier outside the branch cannot diverge):
            # h_pre of the group's tokens is in shared memory before the apply reads it.
            T.sync_threads()
            if last[0] == 1:
                # The group's TB x C/VEC 128-bit chunks, flattened so that a round of UNITS chunks a thread has
                # all its loads in flight before the first FMA (one block does the group's apply: memory-level
                # parallelism is what bounds it).
                for rnd in T.serial(rounds):
                    for v in T.unroll(units):
                        u = (rnd * units + v) * THREADS + tx
                        if u < TB * cchunks and t_first + u // cchunks < num_tokens:
                            for i in T.unroll(n):
                                for e in T.vectorized(vec):
                                    xv[v, i, e] = x[t_first + u // cchunks, i * C + (u % cchunks) * vec + e]
                    for v in T.unroll(units):
                        u = (rnd * units + v) * THREADS + tx
                        if u < TB * cchunks and t_first + u // cchunks < num_tokens:
                            for e in T.unroll(vec):
                                av[e] = hps[u // cchunks, 0] * T.cast(xv[v, 0, e], f32)
                            for i in T.unroll(1, n):
                                for e in T.unroll(vec):
                                    av[e] = av[e] + hps[u // cchunks, i] * T.cast(xv[v, i, e], f32)
                            for e in T.vectorized(vec):
                                ob[e] = T.cast(av[e], dtype)
                            T.stg128(
                                layer_input[t_first + u // cchunks, (u % cchunks) * vec],
                                T.reinterpret(ob[tirx.Ramp(0, 1, vec)], "uint32x4"),
                            )

    return pre_decode_fwd


@functools.cache
def pre_decode_fwd_kernel(n: int, C: int, dtype: str, iters: int, eps: float):
    """The compiled kernel (memoised; TileLang's disk cache below)."""
    return _common.compile_program(
        pre_decode_fwd_program(n, C, dtype, iters, eps), pass_configs=sinkhorn.COMPILE_CONFIGS
    )
