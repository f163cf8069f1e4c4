"""PTX/SASS guards for the fused boundary forward (tl_kernels/boundary.py), without a GPU (tl_kernels/tools/codegen.py:
ptxas, cuobjdump from NVIDIA's pip wheels; skipped where they are missing).

Per configuration (n = 4 bf16 at C = 7168, the paper's; n = 8 fp32, 16-channel blocks; n = 1 bf16): zero spills,
no stack frame and no local memory; every activation chunk moves with one 128-bit access (a lane holds one 16-byte
chunk of each of its two token rows per stream: ``STG.E.128`` exactly ``2n`` times, and ``LDG.E.128`` ``2 (n + 1)``
times for the first channel block plus as many for the prefetch of the next); the projection runs on TF32 tensor
cores (``mma.sync.m16n8k8`` tf32 in PTX, ``HMMA.1688.F32.TF32`` in SASS), ``n * steps * nt`` of them per channel
block; no integer division in the channel-block loop; and no atomic or reduction instruction exists anywhere (the
split partials and the sums of squares are reduced in a fixed order: deterministic). The channel-block loop at
n = 4, bf16 has an instruction ceiling (measured 1,230 a block of 32 channels x 4 streams: :func:`_channel_block_loop`
on ``codegen.sass(boundary.boundary_fwd_kernel(4, 7168, "bfloat16"))``, plus ~8%). The backward (post_res(l)'s
backward on the summed gradient): zero spills, no local memory, no atomics, n + 1 128-bit stores per chunk. The fully fused backward
(``boundary_bwd_fused``): the same, no division in its token-tile loop, the MMA count of its two GEMMs exactly, an
instruction ceiling per tile, both in the default variant and in the opt-in thread block cluster variant; the latter's
cluster barriers (3 arrives, 3 waits) and ``cs`` loads from the cluster's shared memory per tile in PTX and SASS, no
global store of a per-channel-block d_h partial; the default has none of them.
"""

from __future__ import annotations

import collections

import pytest

from tl_kernels import boundary, boundary_bwd, post_res
from tl_kernels.tools import codegen

CONFIGS = [(4, 7168, "bfloat16"), (8, 7168, "float32"), (1, 1280, "bfloat16")]
FWD_LOOP_CEILING = 1330  # SASS instructions per channel block at n = 4, bf16 (measured 1,230)


def _sass_or_skip(kernel) -> str:
    try:
        return codegen.sass(kernel)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _channel_block_loop(sass_text: str) -> dict:
    """The forward's channel-block loop (the one outermost loop with MMAs): its instructions, HMMA, divisions."""
    from tl_kernels.tools import pre_mapping_sass as pm_sass

    ins = codegen.sass_instructions(sass_text)
    loops = [
        a for a in pm_sass._outermost(codegen.sass_loops(sass_text)) if any("HMMA" in t for t in pm_sass._body(ins, a))
    ]
    assert len(loops) == 1, loops
    body = pm_sass._body(ins, loops[0])
    return {"instructions": len(body), "hmma": sum("HMMA" in t for t in body),
            "divisions": pm_sass.division_sequences(body)}  # fmt: skip


def _opcodes(sass_text: str) -> collections.Counter:
    ops = collections.Counter()
    for _addr, text in codegen.sass_instructions(sass_text):
        words = text.split()
        ops[words[1] if words[0].startswith("@") else words[0]] += 1
    return ops


@pytest.mark.parametrize("n,C,dtype", CONFIGS, ids=[f"n{c[0]}-C{c[1]}-{c[2]}" for c in CONFIGS])
def test_boundary_fwd_resources_and_instructions(n, C, dtype):
    kernel = boundary.boundary_fwd_kernel(n, C, dtype)
    sass = _sass_or_skip(kernel)
    result = codegen.analyze(kernel)
    assert result["spill_bytes"] == 0 and result["stack_frame_bytes"] == 0, result["kernels"]
    assert result["vector_loads_128"] and result["vector_stores_128"], result
    ops = _opcodes(sass)
    assert not [op for op in ops if op.startswith(("LDL", "STL"))], "local memory in SASS"
    assert not [op for op in ops if op.startswith(("ATOM", "RED"))], "atomics: the reduction must be fixed-order"
    p = boundary.plan(n, C, dtype)
    assert ops["STG.E.128"] == 2 * n, ops
    wide_loads = sum(v for op, v in ops.items() if op.startswith("LDG.E.128"))
    assert wide_loads == 4 * (n + 1), ops
    assert ops["HMMA.1688.F32.TF32"] > 0, "the projection is not on the TF32 tensor cores"
    loop = _channel_block_loop(sass)
    assert loop["hmma"] == n * p.steps * p.nt, loop
    assert loop["divisions"] == 0, "an integer division (or a call) in the channel-block loop"
    if (n, dtype) == (4, "bfloat16"):
        assert loop["instructions"] <= FWD_LOOP_CEILING, loop
    mma = [line for line in codegen.ptx(kernel).splitlines() if "mma.sync.aligned" in line]
    assert mma and all(".m16n8k8." in line and ".tf32.tf32." in line for line in mma), mma[:3]


@pytest.mark.parametrize("n,C,dtype", CONFIGS, ids=[f"n{c[0]}-C{c[1]}-{c[2]}" for c in CONFIGS])
def test_boundary_bwd_resources_and_instructions(n, C, dtype):
    """post_res(l)'s backward on the summed gradient: zero spills, no local memory, no atomics (the coefficient
    gradients go through the fixed-order butterfly and block reduction), and per chunk iteration n + 1 128-bit
    stores (d_layer_output and the n streams of d_residual) in the rolled chunk loop."""
    kernel = boundary.boundary_bwd_kernel(n, C, dtype)
    sass = _sass_or_skip(kernel)
    result = codegen.analyze(kernel)
    assert result["spill_bytes"] == 0 and result["stack_frame_bytes"] == 0, result["kernels"]
    assert result["vector_loads_128"] and result["vector_stores_128"], result
    ops = _opcodes(sass)
    assert not [op for op in ops if op.startswith(("LDL", "STL"))], "local memory in SASS"
    assert not [op for op in ops if op.startswith(("ATOM", "RED"))], "atomics: the reduction must be fixed-order"
    iters = post_res._plan(n, C, dtype).iters
    assert ops["STG.E.128"] in (n + 1, (n + 1) * iters), ops  # rolled, or fully unrolled by ptxas


# ------------------------------------------------------------------------------- the fully fused backward's hot loop
# The token-tile loop of boundary_bwd_fused (tl_kernels/boundary_bwd.py) at n = 4, C = 7168, bf16, measured with
# ``_fused_hot_loop`` below: 2,316 SASS instructions a thread per 32-token tile in the default variant (a d_h partial
# per channel block; the loop's body plus the rolled MMA loop of T.gemm at its remaining trips; 2,321 when each input
# was loaded where it was used), 2,409 with the opt-in cluster's sum, 64 HMMA a warp; guarded at +8%. Keyed by
# (n, C, dtype, clusters).
FUSED_CEILING = {(4, 7168, "bfloat16", False): 2501, (4, 7168, "bfloat16", True): 2602}
FUSED_CONFIGS = [(4, 7168, "bfloat16"), (8, 7168, "bfloat16"), (1, 1280, "bfloat16"), (4, 7168, "float32")]
CLUSTERS = pytest.mark.parametrize("clusters", [False, True], ids=["default", "clusters"])


def _fused_hot_loop(kernel, n, C, dtype):
    """The outermost SASS loop holding the HMMAs (the token-tile loop): its instruction count with the rolled MMA
    loop at its trip count, its instructions, and the whole kernel's."""
    text = _sass_or_skip(kernel)
    ins = codegen.sass_instructions(text)
    loops = codegen.sass_loops(text)

    def body(loop):
        return [t for a, t in ins if loop["start"] <= a <= loop["end"]]

    outer = [
        a for a in loops if not any(b is not a and b["start"] <= a["start"] and a["end"] <= b["end"] for b in loops)
    ]
    hot = [a for a in outer if any("HMMA" in t for t in body(a))]
    assert len(hot) == 1, hot
    loop, p = hot[0], boundary_bwd.fused_plan(n, C, dtype)
    count, hmma = len(body(loop)), sum("HMMA" in t for t in body(loop))
    need = 2 * (boundary_bwd.FUSED_BM // 16) * (p.kw // 8) * (p.mp // 8) // (boundary_bwd.FUSED_THREADS // 32)
    for inner in loops:
        if inner is not loop and loop["start"] <= inner["start"] and inner["end"] <= loop["end"]:
            per = sum("HMMA" in t for t in body(inner))
            if per:
                extra = (need - hmma) // per
                count, hmma = count + inner["instructions"] * extra, hmma + per * extra
    return count, hmma, need, body(loop), [t for _, t in ins]


@CLUSTERS
@pytest.mark.parametrize("n,C,dtype", FUSED_CONFIGS, ids=[f"n{c[0]}-C{c[1]}-{c[2]}" for c in FUSED_CONFIGS])
def test_boundary_bwd_fused_hot_loop(n, C, dtype, clusters):
    """0 spills, no stack, no local memory, no atomics anywhere; in the token-tile loop no integer division
    sequence or call, every MMA TF32 m16n8k8 (the GEMMs' count per warp exactly), 128-bit loads of x and y and
    ``passes * (n + 1)`` 128-bit stores (d_layer_output and the n streams of d_residual), and at n = 4 bf16 at most
    :data:`FUSED_CEILING` instructions a tile."""
    from tl_kernels.tools import pre_mapping_sass as pm_sass

    kernel = boundary_bwd.boundary_bwd_fused_kernel(n, C, dtype, clusters)
    count, hmma, need, body, everything = _fused_hot_loop(kernel, n, C, dtype)
    result = codegen.analyze(kernel)
    assert result["spill_bytes"] == 0 and result["stack_frame_bytes"] == 0, result["kernels"]
    assert pm_sass.local_memory(everything) == 0, "local memory in SASS"
    every_op = collections.Counter((t.split()[1] if t.startswith("@") else t.split()[0]) for t in everything)
    assert every_op and not [op for op in every_op if op.startswith(("ATOM", "RED"))]
    assert pm_sass.division_sequences(body) == 0, "an integer division (or a call) in the token-tile loop"
    assert hmma == need and all("HMMA.1688.F32.TF32" in t for t in body if "HMMA" in t), (hmma, need)
    p = boundary_bwd.fused_plan(n, C, dtype)
    ops = collections.Counter((t.split()[1] if t.startswith("@") else t.split()[0]) for t in body)
    assert ops["STG.E.128"] == p.passes * (n + 1), ops
    assert pm_sass.widest_load_bits(body) == 128
    if (n, C, dtype, clusters) in FUSED_CEILING:
        assert count <= FUSED_CEILING[(n, C, dtype, clusters)], count


@CLUSTERS
def test_boundary_bwd_fused_issues_a_tile_loads_together(clusters):
    """The fused backward's token-tile loop (n = 4, C = 7168, bf16) stops for global loads at most twice a tile: its
    inputs (x, y, g_li, grad_x_next, the coefficient inputs, h_res, h_post, h_pre) are all issued at the top of the
    tile. Loading each where it was used stopped 22 times a tile, a DRAM latency each (the performance model's
    dependent chain: 3,862 us of the kernel at T = 16384 on an H100, against 1,571 now)."""
    from tests.kernels.test_sass import global_load_waits

    kernel = boundary_bwd.boundary_bwd_fused_kernel(4, 7168, "bfloat16", clusters)
    _, _, _, body, _ = _fused_hot_loop(kernel, 4, 7168, "bfloat16")
    assert global_load_waits(body) <= 2


def test_boundary_reduce_bwd_has_no_atomics_or_local_memory():
    from tl_kernels.tools import pre_mapping_sass as pm_sass

    text = _sass_or_skip(boundary_bwd.boundary_reduce_bwd_kernel(4))
    everything = [t for _, t in codegen.sass_instructions(text)]
    assert pm_sass.local_memory(everything) == 0
    assert not [op for op in _opcodes(text) if op.startswith(("ATOM", "RED"))]


@pytest.mark.parametrize("n,C,dtype", FUSED_CONFIGS, ids=[f"n{c[0]}-C{c[1]}-{c[2]}" for c in FUSED_CONFIGS])
def test_boundary_bwd_fused_cluster(n, C, dtype):
    """The d_h partials summed over the thread block cluster: PTX has the kernel's 3 ``barrier.cluster.arrive`` and
    3 ``barrier.cluster.wait`` (aligned, the arrive with its default release semantics) and ``2 cs dh_k`` loads
    ``ld.shared::cluster.f32`` after ``mapa`` (the in-loop and the last tile's sums, unrolled over the ranks); in
    SASS (``UCGABAR_ARV``/``UCGABAR_WAIT``; the loads are generic ``LD.E`` into the shared window, flagged by the
    performance model's ``sass.mark_dsmem``) the token-tile loop holds one wait, one arrive and ``cs * dh_k``
    distributed loads, and its only scalar global stores are the cluster's d_h rows (``dh_k`` a thread)."""
    from profiling.model import sass as model_sass

    kernel = boundary_bwd.boundary_bwd_fused_kernel(n, C, dtype, True)
    p = boundary_bwd.fused_plan(n, C, dtype, True)
    assert p.cs == boundary_bwd.cluster_size(p.blocks) and p.cs > 1 and p.groups * p.cs == p.blocks
    dh_k = -(-(boundary_bwd.FUSED_BM // p.cs * (n * n + n)) // boundary_bwd.FUSED_THREADS)  # d_h sums a thread
    ptx = codegen.ptx(kernel)
    assert ptx.count("barrier.cluster.arrive.aligned;") == 3 and ptx.count("barrier.cluster.wait.aligned;") == 3
    assert ptx.count("ld.shared::cluster.f32") == ptx.count("mapa.shared::cluster.u32") == 2 * p.cs * dh_k
    _, _, _, body, everything = _fused_hot_loop(kernel, n, C, dtype)
    ops = collections.Counter((t.split()[1] if t.startswith("@") else t.split()[0]) for t in body)
    assert ops["UCGABAR_ARV"] == 1 and ops["UCGABAR_WAIT"] == 1, ops
    all_ops = collections.Counter((t.split()[1] if t.startswith("@") else t.split()[0]) for t in everything)
    assert all_ops["UCGABAR_ARV"] == 3 and all_ops["UCGABAR_WAIT"] == 3, all_ops
    ins = model_sass.parse_annotated(codegen.sass_with_line_info(kernel))
    loop = max(model_sass.loops(ins), key=lambda lp: len(lp.body))
    assert sum(ins[i].dsmem for i in loop.body) == p.cs * dh_k
    assert sum(x.dsmem for x in ins) == 2 * p.cs * dh_k
    assert ops["STG.E"] == dh_k, ops


@pytest.mark.parametrize("n,C,dtype", FUSED_CONFIGS, ids=[f"n{c[0]}-C{c[1]}-{c[2]}" for c in FUSED_CONFIGS])
def test_boundary_bwd_fused_default_has_no_cluster(n, C, dtype):
    """The default fused backward (``clusters=False``): no cluster dimensions, barriers or distributed shared memory
    in PTX, and its token-tile loop stores the block's own d_h partials to global memory (``dh_part`` has a row per
    channel block)."""
    kernel = boundary_bwd.boundary_bwd_fused_kernel(n, C, dtype)
    p = boundary_bwd.fused_plan(n, C, dtype)
    assert (p.cs, p.groups) == (1, p.blocks)
    ptx = codegen.ptx(kernel)
    assert "barrier.cluster" not in ptx and "shared::cluster" not in ptx and "mapa" not in ptx
    source = codegen.cuda_source(kernel)
    assert "tl::cluster_" not in source and "mhc_ld_shared_cluster_f32" not in source
    _, _, _, body, _ = _fused_hot_loop(kernel, n, C, dtype)
    ops = collections.Counter((t.split()[1] if t.startswith("@") else t.split()[0]) for t in body)
    assert ops["STG.E"] > 0 and ops["UCGABAR_ARV"] == ops["UCGABAR_WAIT"] == 0, ops
