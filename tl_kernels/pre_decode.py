"""The decode pre-mapping (mHC paper Eq. 14-19 and F_pre) in ONE launch for T <= 64 tokens, forward only.

Training and prefill keep the two-launch forward (:mod:`tl_kernels.pre_proj` then :mod:`tl_kernels.pre_finalize`)
and its backward; the kernel serves ``T <= MAX_TOKENS``, and ``mhc::pre_mapping_fwd`` takes it where the
performance model predicts it faster than the two launches (``T <= 16``, ``mhc._cuda._DECODE_ONE_LAUNCH_TOKENS``; a
static shape, so the choice is the same under ``torch.compile`` and in a captured CUDA graph). With ``post_res`` a
decode site is then two launches instead of three.

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
``pre_proj`` (split-K, one wave: ``S`` about #SMs / groups), tokens in groups of ``TB`` = 8 (grid x), blocks of
``threads(n)`` = 512 threads (128 at n > 4, whose Sinkhorn needs more than 128 registers). Block ``(g, s)`` stages
``stage_chunks(n)`` (4 at n = 4) 64-wide K-chunks of its split at a time (x rows of its 8 tokens and phi's 64 x m
block, coalesced; every load of the round issued before the first is used: one DRAM latency a round) in shared
memory and accumulates ``TB x (m + 1)`` dot products (column m is the sum of squares) with fp32 FMAs; at
T <= 64 the 2 nC m FLOPs a token are far below what even one SM's FMA units do in the phi read time, so tensor
cores would not shorten it. It then stores its partials; the block that takes the last ticket of its group (a
``__syncthreads``, then thread 0's ``__threadfence`` and ``atomicAdd``: the pattern of cooperative groups' grid
sync, without any wait) resets the ticket, reduces the group's partials in split order with all its threads
(:func:`tl_kernels.pre_finalize.reduce_splits`: batches of up to ``STAGE`` = 8192 partials loaded at once, then
each sum taken in split order; fixed: deterministic, no float atomics) and forms the coefficients with ``pre_finalize``'s own device code
(:func:`tl_kernels.pre_finalize.coefficients`, the Sinkhorn of :mod:`tl_kernels.sinkhorn` included; one token per
lane of warp 0), then applies ``H_pre`` to its group's tokens with 128-bit loads and stores. Nobody waits for
another block, so no co-residency is assumed.

Bytes per launch (bf16, n = 4, C = 7168): phi 4 K m B = 2.75 MB from DRAM once (the groups after the first read it
from L2: 8 groups at T = 64); x 8C a token for the projection and again for the apply (the second read mostly from
L2, a few microseconds after the first); layer_input 2C a token; partials S x T x (m + 1) x 4 B written and read
once. Latency: not measured (no GPU has run this kernel). One block applies a group (8 tokens x 57 KB at C = 7168)
with up to four 128-bit chunks of every stream in flight per thread (4 rounds of loads at 512 threads): the cost of
keeping one launch, which grows with the groups; the performance model (profiling/) predicts it per site
(docs/design.md section 8: 9.3 us at T = 1, 14.9 at T = 8, n = 4, C = 7168, H100, estimates).

PDL: ``pdl_sync`` (``griddepcontrol.wait``) runs before the first global access, so every read of a predecessor's
output and every write that a predecessor might still read is ordered after the predecessor grid completed and
flushed; ``pdl_trigger`` follows the partial stores, so a dependent kernel's prologue overlaps the last block's
finalisation. TileLang drops ``__restrict__`` from the parameters of a kernel with either call (no read-only load
can be hoisted above the wait). See docs/design.md, section 8.

Resources and SASS (sm_90a, CUDA 13.0; ``codegen.analyze`` / ``codegen.sass`` of ``pre_decode_fwd_kernel``, guarded
in tests/kernels/test_pre_decode_sass.py): registers n = 4 bf16 / fp32: 96 (512 threads), n = 8 bf16: 254,
n = 6: 255 (128 threads), n = 1 bf16: 80 (the Sinkhorn state of the last block's warp 0 sets them); 0 spills, no
local memory; the K-chunk loop is 475 instructions an iteration of 4 chunks at n = 4, C = 7168, bf16 (was 285 for
one); three 32-bit integer divisions a block, none in a loop; one ``ATOM.E.ADD.S32`` (the ticket), no float atomics; ``ACQBULK`` (the
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
    "STAGE",
    "TB",
    "choose_splits",
    "pre_decode_fwd_kernel",
    "pre_decode_fwd_program",
    "stage_chunks",
    "threads",
]

DTYPES: tuple[str, ...] = _common.ACTIVATION_DTYPES
STREAMS: tuple[int, ...] = _common.ACTIVATION_STREAMS
MAX_TOKENS = 64  # the decode path serves T <= MAX_TOKENS
TB = 8  # tokens per group (grid x); one lane of warp 0 each for the coefficients
MAX_GROUPS = MAX_TOKENS // TB
STAGE = 8192  # split partials staged per batch of the last block's reduction (32 KB of shared memory)
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


def threads(n: int) -> int:
    """Threads per block: 512 where the Sinkhorn state of the finalising warp fits 128 registers (n <= 4), else 128
    (n = 8 needs about 250)."""
    return 512 if n <= 4 else 128


def stage_chunks(n: int) -> int:
    """K-chunks staged per round of the projection loop (their loads all in flight together): as many as fit
    32 KB of shared memory (x rows and phi block of a chunk: (TB + m) x BK x 4 B), at most 4."""
    m = n * n + 2 * n
    return max(1, min(4, 32768 // ((TB + m) * BK * 4)))


def pre_decode_fwd_program(n: int, C: int, dtype: str, iters: int, eps: float):
    """The one-launch decode pre-mapping; see the module docstring."""
    _validate(n, C, dtype)
    m, nn, K = n * n + 2 * n, n * n, n * C
    chunks = K // BK
    cols = m + 1  # column m: the sum of squares
    outs = TB * cols
    nthreads = threads(n)
    ku = stage_chunks(n)
    per_thread = -(-outs // nthreads)
    vec = _common.VECTOR_BYTES // _common.ELEMENT_BYTES[dtype]
    cchunks = C // vec
    stage_x = -(-TB * BK // nthreads)
    stage_phi = -(-BK * m // nthreads)
    units = max(1, min(4, 16 // n))  # 128-bit chunks of every stream in flight per thread in the apply
    rounds = -(-TB * cchunks // (nthreads * units))
    f32 = "float32"
    finalize = pre_finalize.coefficients(n, C, iters, eps)  # pre_finalize's device code, Sinkhorn included
    reduce = pre_finalize.reduce_splits(n, TB, nthreads, STAGE)
    loads_p, loads_q = pre_finalize.stage_loads(n, nthreads, STAGE)
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
        with T.Kernel(T.ceildiv(num_tokens, TB), num_splits, threads=nthreads) as (bx, by):
            tx = T.get_thread_binding()
            xs = T.alloc_shared((ku, TB, BK), f32)
            ps = T.alloc_shared((ku, BK, m), f32)
            hps = T.alloc_shared((TB, n), f32)
            last = T.alloc_shared((1,), "int32")
            stage_p = T.alloc_shared((loads_p * nthreads,), f32)
            stage_q = T.alloc_shared((loads_q * nthreads,), f32)
            red = T.alloc_shared((TB, cols), f32)
            vals = T.alloc_local((loads_p + loads_q,), f32)
            acc_r = T.alloc_local((-(-TB * cols // nthreads),), f32)
            xv_s = T.alloc_local((ku, stage_x), dtype)  # converted when staged: no load waits in the load loop
            pv_s = T.alloc_local((ku, stage_phi), f32)
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
            # KU chunks a round: every load of the round in flight before the first is used, then staged.
            for kr in T.serial(T.ceildiv(count, ku)):
                for c in T.unroll(ku):
                    k0 = (k_first + T.min(kr * ku + c, count - 1)) * BK  # a chunk past count loads chunk count-1
                    for u in T.unroll(stage_x):
                        e = u * nthreads + tx
                        if (TB * BK) % nthreads == 0 or e < TB * BK:
                            # in-range indices clamped only to tell the compiler (no bounds branch between loads)
                            xv_s[c, u] = x[
                                T.max(T.min(t_first + e // BK, num_tokens - 1), 0), T.max(T.min(k0 + e % BK, K - 1), 0)
                            ]
                    for u in T.unroll(stage_phi):
                        f = u * nthreads + tx
                        if (BK * m) % nthreads == 0 or f < BK * m:
                            pv_s[c, u] = phi[T.max(T.min(k0 + f // m, K - 1), 0), f % m]
                for c in T.unroll(ku):
                    for u in T.unroll(stage_x):
                        e = u * nthreads + tx
                        if (TB * BK) % nthreads == 0 or e < TB * BK:
                            xs[c, e // BK, e % BK] = T.if_then_else(
                                t_first + e // BK < num_tokens, T.cast(xv_s[c, u], f32), T.float32(0)
                            )
                    for u in T.unroll(stage_phi):
                        f = u * nthreads + tx
                        if (BK * m) % nthreads == 0 or f < BK * m:
                            ps[c, f // m, f % m] = pv_s[c, u]
                T.sync_threads()  # the round is staged before any thread reads it
                for u in T.unroll(per_thread):
                    if outs % nthreads == 0 or u * nthreads + tx < outs:
                        o = u * nthreads + tx
                        for c in T.unroll(ku):
                            if kr * ku + c < count:  # chunks in K order: the sum's order is fixed
                                for k in T.serial(BK):
                                    v = xs[c, o // cols, k]
                                    acc[u] += v * T.if_then_else(o % cols < m, ps[c, k, T.min(o % cols, m - 1)], v)
                T.sync_threads()  # every read of the round precedes the next round's staging
            for u in T.unroll(per_thread):
                if outs % nthreads == 0 or u * nthreads + tx < outs:
                    o = u * nthreads + tx
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
            if last[0] == 1:  # uniform over the block: every thread reaches the reduction's barriers
                reduce(tx, t_first, T.min(TB, num_tokens - t_first), proj_part, sq_part, stage_p, stage_q, red, vals,
                       acc_r)  # fmt: skip
                t = t_first + tx
                if tx < TB:
                    if t < num_tokens:
                        finalize(t, tx, True, red, alpha, bias, h_post, h_res, h_pre, proj, rinv, rms_eps, post_mult,
                                 hps, p, z, a, b, w)  # fmt: skip
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
                        u = (rnd * units + v) * nthreads + tx
                        if u < TB * cchunks and t_first + u // cchunks < num_tokens:
                            for i in T.unroll(n):
                                for e in T.vectorized(vec):
                                    xv[v, i, e] = x[t_first + u // cchunks, i * C + (u % cchunks) * vec + e]
                    for v in T.unroll(units):
                        u = (rnd * units + v) * nthreads + tx
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
