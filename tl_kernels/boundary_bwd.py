"""The fully fused backward across the residual boundary (issue 18), part of the ``boundary`` kernel family of
:mod:`tl_kernels.boundary`: site l+1's pre-mapping input gradient, the incoming residual gradient and post_res(l)'s
backward in one pass over the token tiles (:func:`boundary_bwd_fused_program`), then one launch that sums its
partials in fixed orders (:func:`boundary_reduce_bwd_program`). Two launches after ``pre_finalize_bwd`` and the
Sinkhorn backward; they replace ``pre_proj_bwd``, the gradient add and ``post_res_bwd``.

The forward and the summed backward of the family live in :mod:`tl_kernels.boundary` (its ``boundary_bwd_kernel``
dispatches here for ``fused=True`` / ``reduce_dh=True``, the registry's names). Design, math and call contracts are
in the two programs' docstrings; bytes, resources and the performance model's estimate in docs/design.md section 7.

The fused kernel has two variants. The default (``clusters=False``) writes one d_h partial per channel block to
``dh_part``. The opt-in ``clusters=True`` runs in thread block clusters (sm_90) of ``cs`` adjacent channel blocks
(:func:`cluster_size`: the largest of 8, 4, 2, 1 dividing ``C / g``): the d_h partials of a cluster's blocks are
summed through distributed shared memory (:data:`DSMEM_PRELUDE`), so ``dh_part`` holds one partial per cluster. It
moves fewer bytes, but the performance model (an estimate; no GPU has run either) predicts it slower, so it is off
unless ``MHC_BOUNDARY_CLUSTERS=1`` (docs/design.md section 7, docs/env.md).
"""

import functools
from dataclasses import dataclass

from . import _common

__all__ = [
    "COEF_BM",
    "FUSED_BM",
    "FUSED_THREADS",
    "DSMEM_PRELUDE",
    "FusedPlan",
    "boundary_bwd_fused_kernel",
    "boundary_bwd_fused_program",
    "boundary_reduce_bwd_kernel",
    "boundary_reduce_bwd_program",
    "cluster_size",
    "fused_choose_splits",
    "fused_plan",
]

STREAMS: tuple[int, ...] = _common.ACTIVATION_STREAMS
MAX_SPLITS = 16  # token splits of the fused backward: its d_phi partials stay a few percent of the bytes
FUSED_BM = 32  # tokens per tile of the fused backward
FUSED_THREADS = 256
COEF_BM = 64  # tokens per row of d_coef_part: pre_proj's tile, so the rows (and d_bias, d_alpha) are bit for bit its
REDUCE_UNROLL = 8  # partials a thread loads at once in the d_h reduction (then sums in cluster order)
# n = 4 stays at one: with a tile's inputs loaded at its top it needs 244 registers (bf16; 128 spilled 60 to 644
# bytes), and one block of 244 beats two latency-bound ones (python -m profiling model --site chain --kernel site_bwd
# --C 7168 --gpu H100: the kernel's t_latency 3,862 -> 1,571 us); fp32's 113.8 KB of shared memory fits once anyway
_FUSED_MIN_BLOCKS = {(n, dt): 2 for n in (1, 2) for dt in ("bfloat16", "float16", "float32")} | {(4, "float32"): 1}
# The fused backward places its barriers by hand (as pre_proj's backward; tests/emulation/test_barrier_mutations.py
# deletes each in turn) and indexes in bounds by construction (row guards; the ASan test checks exact-size tensors).
# Thread block clusters along the channel-block axis (sm_90): the d_h partials of a cluster's blocks are summed through
# distributed shared memory, one partial per cluster in dh_part (fused_plan's clusters=True, opt-in). 8 is the portable
# maximum cluster size; cs = 1 (clusters=False, the default) gives the kernel without clusters (a d_h partial per
# channel block: the same generated code as before the clusters).
CLUSTER_SIZES = (8, 4, 2, 1)
# No cluster at n = 2: its two blocks an SM at 128 registers leave none for it (ptxas spilled 24 bytes at C = 1280)
_NO_CLUSTER = {(2, dt) for dt in _common.ACTIVATION_DTYPES}
DH_SLOTS = 3  # a block's d_h partial slots in shared memory, used round robin by the token tiles (see the program)
# A 4-byte load from block `rank`'s shared memory at the address of `p` in the caller's (mapa + ld.shared::cluster;
# TileLang 0.1.15 has the cluster barriers and ranks but no element-wise distributed shared memory load). The CPU
# emulator defines the same function (tests/emulation/shim.h).
DSMEM_PRELUDE = r"""
__device__ __forceinline__ float mhc_ld_shared_cluster_f32(const float *p, int rank) {
  unsigned local = (unsigned)__cvta_generic_to_shared(p), remote;
  float v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
  return v;
}
"""
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
    blocks: int  # channel blocks: C / g (the grid's x extent)
    cs: int  # thread block cluster size along the channel blocks (:func:`cluster_size`; 1: no cluster)
    groups: int  # clusters along the channel blocks: blocks / cs (the rows of dh_part)
    vec: int  # elements per 16-byte chunk
    lanes: int  # threads per token row in the elementwise phases (g / vec)
    rows: int  # token rows one pass covers (FUSED_THREADS / lanes; rows past FUSED_BM idle)
    passes: int
    min_blocks: int  # __launch_bounds__ minimum blocks per SM (registers <= 65536 / (256 * min_blocks))


def cluster_size(blocks: int) -> int:
    """The cluster size of a fused backward of ``blocks`` channel blocks: the largest of 8, 4, 2, 1 dividing it (a
    cluster's blocks are adjacent channel blocks of one token split, and CUDA needs the grid to be a whole number of
    clusters)."""
    return next(c for c in CLUSTER_SIZES if blocks % c == 0)


def fused_plan(n: int, C: int, dtype: str, clusters: bool = False) -> FusedPlan:
    """The tiling of :func:`boundary_bwd_fused_program` for ``(n, C, dtype)``; validates the arguments.
    ``clusters``: the thread block cluster variant (``cs = cluster_size(blocks)``, but 1 at n = 2); otherwise
    ``cs = 1`` (one d_h partial per channel block, the default)."""
    if not isinstance(clusters, bool):
        raise TypeError(f"boundary_bwd fused_plan: clusters must be a bool, got {type(clusters).__name__}")
    _common.validate_activation_config("boundary", n, C, dtype, STREAMS)
    vec = _common.VECTOR_BYTES // _common.ELEMENT_BYTES[dtype]
    g = 64 if n <= 4 else 32  # K-slice n * g <= 256: the two accumulators stay at <= 32 + 80 registers a thread
    m = n * n + 2 * n
    lanes = g // vec
    rows = FUSED_THREADS // lanes
    # Two blocks an SM (16 warps in flight instead of 8: the performance model finds the loop latency-bound at one)
    # where the registers allow it without spills (ptxas at 128 registers: checked by tests/kernels/test_codegen.py).
    min_blocks = _FUSED_MIN_BLOCKS.get((n, dtype), 1)
    blocks = C // g
    cs = cluster_size(blocks) if clusters and (n, dtype) not in _NO_CLUSTER else 1
    return FusedPlan(n=n, C=C, m=m, mp=-(-m // 16) * 16, g=g, kw=n * g, blocks=blocks, cs=cs, groups=blocks // cs,
                     vec=vec, lanes=lanes, rows=rows, passes=max(1, FUSED_BM // rows), min_blocks=min_blocks)  # fmt: skip


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
    top = max(1, min(MAX_SPLITS, tiles))
    lo = max(1, min(top, slots // p.blocks))
    best, best_fill = lo, 0.0
    for s in range(lo, top + 1):
        fill = p.blocks * s / (-(-(p.blocks * s) // slots) * slots)
        if fill > best_fill + 1e-9:
            best, best_fill = s, fill
    per = -(-tiles // best)
    return -(-tiles // per)


def boundary_bwd_fused_program(n: int, C: int, dtype: str, clusters: bool = False):
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
            d_layer_output [T, C] dt, d_residual [T, n, C] dt, dh_part [CB / cs, T, n * n + n] f32,
            d_phi_part [S, K, m] f32, d_coef_part [R, 2m] f32)

    grid ``(CB, S)``: block ``(cb, s)`` owns channels ``[cb g, cb g + g)`` of every stream (the K-slice of
    ``n g`` rows of ``phi``, staged once, TF32-rounded) and the token tiles ``[s ceil(TT / S), ...)`` of
    ``FUSED_BM`` tokens (TT = ceil(T / FUSED_BM)); use :func:`fused_choose_splits`. Thread block clusters of
    ``cs`` blocks along x (``cs = 1``: no cluster): ``dh_part[G, t]`` = (d_h_res row-major | d_h_post) over the
    ``cs g`` channels of cluster ``G`` (blocks ``cb = G cs + r``); it, ``d_phi_part`` and ``d_coef_part`` are summed
    in fixed orders by :func:`boundary_reduce_bwd_program` (``d_coef_part`` row ``r`` covers tokens ``[64 r, 64 r + 64)`` as pre_proj_bwd's does, computed by
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
    the ``d_h`` partials reduced over a row's lanes with an xor butterfly, into the block's shared slot ``tile mod
    DH_SLOTS`` (``dh_part`` directly at ``cs = 1``). ``d_coef_part`` after the tile loop, as pre_proj_bwd.

    The cluster's d_h sum, one tile late, so that the cluster barrier rarely waits: after step 4 of tile ``i`` every
    thread arrives (``barrier.cluster.arrive``: tile ``i - 1``'s partials are in its slot, and it has read tile
    ``i - 2``'s; the release is a ``MEMBAR.ALL.GPU`` in SASS, placed where the tile's loads have been used); after
    step 5 it waits for the cluster, and block rank ``r`` sums token rows ``[r BM / cs, (r + 1) BM / cs)`` of tile
    ``i - 1`` over the ``cs`` blocks' slots (``ld.shared::cluster``, a pairwise tree in rank order: deterministic)
    on its last threads, and writes them to ``dh_part``. A slot is written again ``DH_SLOTS = 3`` tiles later, after
    the wait that follows every peer's next arrive (two slots race: tests/emulation/test_barrier_mutations.py).
    After the loop the last tile's sum, then one wait before exit: no block leaves while a peer reads its shared
    memory. At n = 4, C = 7168, bf16 the tile loop waits for global loads twice a tile (22 times when each
    value was loaded where it was used; tests/kernels/test_boundary_sass.py), 241 registers, one block an SM.

    Bytes per token (bf16, n = 4): reads ``x`` 8C, ``y`` 2C, ``g_li`` 2C, ``grad_x_next`` 8C, writes ``d_x`` 8C,
    ``d_y`` 2C: 30C, plus ``dh_part`` (C / 64 / cs x 80 B: 0.16C at cs = 8, 1.25C per channel block without the
    cluster) and the coefficients; see docs/design.md section 7.
    """
    import tilelang.language as T
    from tvm import tirx

    from . import pre_proj
    from .pre_proj import _coef_grad
    from .pre_proj import _tf32 as tf32

    p = fused_plan(n, C, dtype, clusters)
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
    # the cluster's d_h sum: block rank r of a cluster of cs sums token rows [r BM / cs, (r + 1) BM / cs) of a tile
    # over the cs blocks' shared memory, dh_rows x q floats, dh_k of them a thread, on the block's last threads
    # (dh_skip threads idle at the front): the first warps compute pre_proj_bwd's coefficients (coef_base = 0)
    cs, clustered = p.cs, p.cs > 1
    dh_rows = FUSED_BM // cs
    dh_k = -(-(dh_rows * q) // FUSED_THREADS)
    dh_skip = dh_k * FUSED_THREADS - dh_rows * q
    dh_tree = tuple(cs >> s for s in range(1, cs.bit_length()))  # cs/2, ..., 1 partial sums a level
    assert G * a == n2 and coef_threads % 32 == 0 and FUSED_BM * n <= FUSED_THREADS  # internal invariants
    assert FUSED_BM % cs == 0
    num_tokens = T.dynamic("num_tokens")
    num_splits = T.dynamic("num_splits")
    num_coef_tiles = T.dynamic("num_coef_tiles")

    @T.macro
    def dh_cluster_sum(dhs, dh_part, slot, tp, tx, rank, grp):
        """Rows [rank dh_rows, ...) of the tile at token ``tp`` (its partials in slot ``slot`` of every block of the
        cluster), summed over the blocks in rank order and written to ``dh_part[grp]``."""
        acc_dh = T.alloc_var(f32)
        part = T.alloc_local((cs,), f32)
        for k in T.unroll(dh_k):
            e = tx + k * FUSED_THREADS - dh_skip
            if dh_skip == 0 or e >= 0:
                rr = rank * dh_rows + e // q
                for src in T.unroll(cs):
                    part[src] = T.call_extern(f32, "mhc_ld_shared_cluster_f32", T.address_of(dhs[slot, rr, e % q]), src)
                # a pairwise tree in rank order (fixed: deterministic), log2(cs) dependent adds after the loads
                for width in dh_tree:
                    for u in T.unroll(width):
                        part[u] = part[2 * u] + part[2 * u + 1]
                acc_dh = part[0]
                if tp + rr < num_tokens:
                    dh_part[grp, tp + rr, e % q] = acc_dh

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
        dh_part: T.Tensor((p.groups, num_tokens, q), f32),
        d_phi_part: T.Tensor((num_splits, K, m), f32),
        d_coef_part: T.Tensor((num_coef_tiles, 2 * m), f32),
    ):
        with T.Kernel(
            p.blocks,
            num_splits,
            threads=FUSED_THREADS,
            cluster_dims=(cs, 1, 1) if clustered else None,
            prelude=DSMEM_PRELUDE if clustered else None,
        ) as (cb, by):
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
            # the block's d_h partials of the last DH_SLOTS tiles (d_h_res row-major | d_h_post), read by the cluster
            dhs = T.alloc_shared((DH_SLOTS, FUSED_BM, q), f32) if clustered else None
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
            if clustered:  # bound only with clusters: the default's program is the one before the clusters
                rank = cb % cs  # %cluster_ctarank: the cluster is cs adjacent channel blocks of one split
                grp = cb // cs
                # the d_h slot of this tile, and of the previous one (round robin)
                wslot = T.alloc_var("int32")
                wslot = 0
                rslot = T.alloc_var("int32")
                rslot = 0
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
                if clustered:  # noqa: SIM102 - compile-time test, then the run-time one
                    # the cluster barrier's arrive for the previous tile: its d_h partials (step 5) are in this
                    # block's slot, and this block has read the tile before it from its peers. Here, after step 4,
                    # the tile's global loads have been used: the arrive's release (MEMBAR.ALL.GPU in SASS, which
                    # waits for the thread's outstanding memory operations) finds none in flight
                    if tt > 0:
                        T.cluster_arrive()
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
                        if clustered:
                            if lane == 0:
                                for i in T.unroll(n):
                                    dhs[wslot, r, nn + i] = ph[i]
                        elif lane == 0 and t0 + r < num_tokens:
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
                            if clustered:
                                if lane == 0:
                                    for i in T.unroll(n):
                                        dhs[wslot, r, i * n + j] = ph[i]
                            elif lane == 0 and t0 + r < num_tokens:
                                for i in T.unroll(n):
                                    dh_part[cb, t0 + r, i * n + j] = ph[i]
                if clustered:  # noqa: SIM102 - compile-time test, then the run-time one
                    # the previous tile's d_h summed over the cluster, one tile late (the peers arrived before their
                    # step 5: the wait rarely stalls). Its slot is written again DH_SLOTS = 3 tiles after it, once
                    # the writer has passed the wait that follows every peer's next arrive (after this read)
                    if tt > 0:
                        T.cluster_wait()
                        dh_cluster_sum(dhs, dh_part, rslot, t0 - FUSED_BM, tx, rank, grp)
                    rslot = wslot
                    wslot = T.if_then_else(wslot == DH_SLOTS - 1, 0, wslot + 1)
            # the last tile's d_h (all blocks of a cluster share the split, so the same tile count), then an arrive
            # that tells the peers this block has read their slots
            if clustered:  # noqa: SIM102 - compile-time test, then the run-time one
                if count > 0:
                    T.cluster_arrive()
                    T.cluster_wait()
                    dh_cluster_sum(dhs, dh_part, rslot, t_base + (count - 1) * FUSED_BM, tx, rank, grp)
                    T.cluster_arrive()
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
            if clustered:  # noqa: SIM102 - compile-time test, then the run-time one
                if count > 0:  # no block exits (freeing its shared memory) before its peers have read the last tile
                    T.cluster_wait()

    return boundary_bwd_fused


def boundary_reduce_bwd_program(n: int):
    """The fused backward's last launch: ``tl_kernels.pre_reduce``'s sums and the d_h sum in one grid (deterministic,
    no atomics)::

        d_phi[e]                 = sum_{s < S} d_phi_part[s, e]             (split order, as pre_reduce_bwd)
        d_bias, d_alpha          = pre_reduce_bwd's coefficient block (the same macro: its bits)
        d_h_res[t] | d_h_post[t] = sum_{G < CB / cs} dh_part[G, t]          (cluster order)

    Call (``S``, ``kq = K m / 4``, ``R``, ``num_cb`` (the fused kernel's clusters, ``CB / cs``), ``T`` dynamic;
    ``S = 1`` too: ``d_phi_part`` is then the fused kernel's own buffer, copied)::

        boundary_reduce_bwd_kernel(n)(d_phi_part [S, kq, 4] f32, d_coef_part [R, 2m] f32,
            dh_part [num_cb, T, n * n + n] f32, d_phi [kq, 4] f32, d_alpha [3] f32, d_bias [m] f32,
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
            # REDUCE_UNROLL independent loads in flight, then their sum in cluster order (a block past the
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
def boundary_bwd_fused_kernel(n: int, C: int, dtype: str, clusters: bool = False):
    """The compiled fused backward for ``(n, C, dtype)`` (memoised; TileLang's disk cache below); ``clusters``: the
    thread block cluster variant (:func:`fused_plan`)."""
    return _common.compile_program(boundary_bwd_fused_program(n, C, dtype, clusters), pass_configs=_FUSED_PASS_CONFIGS)


@functools.cache
def boundary_reduce_bwd_kernel(n: int):
    """The compiled reduction for ``n`` (memoised): in bounds by construction, so TileLang's guards (which would split
    the 128-bit accesses) are off."""
    return _common.compile_program(
        boundary_reduce_bwd_program(n), pass_configs={"tl.disable_safe_memory_legalize": True}
    )
