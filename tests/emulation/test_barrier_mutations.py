"""Barrier mutation tests: the emulation (cuda_emu.py, shim.h) must not hide a missing ``__syncthreads``.

For each shipped kernel family (post_res bwd, Sinkhorn fwd/bwd in the exp domain with K in registers and in the
tile rows and in the log domain, pre_proj fwd/bwd, pre_finalize fwd/bwd, boundary fwd/bwd and the fused backward,
by default without and opt-in with thread block clusters of two and of four) at a representative configuration (several warps per block,
partial last blocks), every ``__syncthreads`` found in the generated source is deleted in turn and
the mutant is run under both thread schedules; the mutation is detected when some output differs bit for bit from the
unmutated kernel's (whose outputs are the same under every schedule and block order: asserted too). The barriers
are enumerated from the source, not counted by hand, so a kernel that gains a barrier is covered by the same test.

Why a deletion shows: only one emulated thread runs at a time and it runs until it blocks, lowest (``forward``) or
highest (``reverse``) thread first, so without the barrier one warp finishes the merged phase before another starts
it; a read of shared memory another warp writes then sees the block's poison (0xFF: NaN) or the previous phase's
value, and a write over data another warp still has to read replaces it early, in one of the two schedules.

post_res fwd has no barrier and must use no shared memory (asserted). Every barrier of every family is detected but
one, exempt by construction and asserted to be exactly the one missed: pre_decode's barrier before the ticket, which
orders the block's partial stores for *other* blocks (blocks run one at a time here; see ``_exempt``). Cost: about
20 g++ builds (cached by source hash) and small launches.
"""

from __future__ import annotations

import re

import pytest
import torch

from tl_kernels import boundary, boundary_bwd, post_res, pre_decode, pre_finalize, pre_proj, sinkhorn

from .cuda_emu import BLOCK_ORDERS, SCHEDULES, EmulatedKernel, EmulationDeadlock, kernel_sources

BARRIER = re.compile(r"__syncthreads\(\);")


def _post_res_bwd(C):
    n, dt = 4, torch.bfloat16
    kernel = post_res.post_res_bwd_kernel(n, C, "bfloat16")
    tpb = post_res._plan(n, C, "bfloat16").tpb
    T = tpb + 1 if tpb > 1 else 3

    def inputs(g):
        ins = dict(grad_out=torch.randn(T, n, C, generator=g).to(dt), layer_output=torch.randn(T, C, generator=g).to(dt),
                   residual=torch.randn(T, n, C, generator=g).to(dt), h_post=torch.randn(T, n, generator=g),
                   h_res=torch.randn(T, n, n, generator=g))  # fmt: skip
        outs = dict(d_layer_output=torch.empty(T, C, dtype=dt), d_residual=torch.empty(T, n, C, dtype=dt),
                    d_h_post=torch.empty(T, n), d_h_res=torch.empty(T, n, n))  # fmt: skip
        return ins, outs, dict(num_tokens=T, grid=-(-T // tpb))

    return kernel, inputs


def _sinkhorn(direction, n, iters, eps):
    kernel = getattr(sinkhorn, f"sinkhorn_{direction}_kernel")(n, iters, eps)
    plan = getattr(sinkhorn, f"_{direction}_plan")(n, iters, eps)
    T = plan.tokens_per_block + 3

    def inputs(g):
        L = torch.randn(T, n, n, generator=g) * 2
        if direction == "fwd":
            return dict(logits=L), dict(out=torch.empty(T, n, n)), dict(num_tokens=T, grid=2)
        ins = dict(logits=L, grad_out=torch.randn(T, n, n, generator=g))
        return ins, dict(grad_logits=torch.empty(T, n, n)), dict(num_tokens=T, grid=2)

    return kernel, inputs


def _pre_proj(direction):
    n, C, T, S, dt = 4, 256, 70, 2, torch.bfloat16
    m, K = n * n + 2 * n, n * C
    if direction == "fwd":
        kernel = pre_proj.pre_proj_fwd_kernel(n, C, "bfloat16")

        def inputs(g):
            ins = dict(x=torch.randn(T, K, generator=g).to(dt), phi=torch.randn(K, m, generator=g) / K**0.5)
            outs = dict(proj_part=torch.empty(S, T, m), sq_part=torch.empty(S, T))
            return ins, outs, dict(num_tokens=T, num_splits=S, grid=(-(-T // pre_proj.BM), S))

        return kernel, inputs
    T, S = 130, 1  # three token tiles in the split: the loop-top barrier orders a tile's reads before the next load
    kernel = pre_proj.pre_proj_bwd_kernel(n, C, "bfloat16", False)

    def inputs(g):
        ins = dict(x=torch.randn(T, K, generator=g).to(dt), phi=torch.randn(K, m, generator=g) / K**0.5,
                   d_pp=torch.randn(T, 2 * n, generator=g), d_res=torch.randn(T, n * n, generator=g),
                   proj=torch.randn(T, m, generator=g), rinv=torch.rand(T, generator=g) + 0.5,
                   alpha=torch.tensor([0.7, 0.5, 1.3]), h_pre=torch.rand(T, n, generator=g),
                   g_li=torch.randn(T, C, generator=g).to(dt))  # fmt: skip
        outs = dict(d_x=torch.empty(T, K, dtype=dt), d_phi_part=torch.empty(S, K, m),
                    d_coef_part=torch.empty(-(-T // pre_proj.BM), 2 * m))  # fmt: skip
        return ins, outs, dict(num_tokens=T, num_splits=S, grid=(K // pre_proj.BK, S))

    return kernel, inputs


def _pre_finalize(direction):
    n = 4
    m = n * n + 2 * n
    if direction == "fwd":
        C, T, S = 1280, 33, 2
        kernel = pre_finalize.pre_finalize_fwd_kernel(n, C, "bfloat16", 20, 0.0)

        def inputs(g):
            ins = dict(proj_part=torch.randn(S, T, m, generator=g), sq_part=torch.rand(S, T, generator=g) + 1,
                       alpha=torch.tensor([0.8, 0.6, 1.5]), bias=torch.randn(m, generator=g),
                       x=torch.randn(T, n, C, generator=g).to(torch.bfloat16))  # fmt: skip
            outs = dict(layer_input=torch.empty(T, C, dtype=torch.bfloat16), h_post=torch.empty(T, n),
                        h_res=torch.empty(T, n, n), h_pre=torch.empty(T, n), proj=torch.empty(T, m),
                        rinv=torch.empty(T))  # fmt: skip
            scal = dict(rms_eps=1e-6, post_mult=2.0, num_slices=1, num_tokens=T, num_splits=S)
            return ins, outs, dict(scal, grid=(-(-T // pre_finalize.TOKENS), 1))

        return kernel, inputs
    # one token per block over 5 warps (C = 1280 bf16): the token's slots come from several warps. With a token
    # inside one warp (C <= 256 bf16, 128 fp32) each slot is written and read by the same thread and the barrier
    # is redundant; the emulation rightly sees no difference there.
    C, T, dt = 1280, 3, torch.bfloat16
    kernel = pre_finalize.pre_finalize_bwd_kernel(n, C, "bfloat16")
    tpb = post_res._plan(n, C, "bfloat16").tpb

    def inputs(g):
        ins = dict(g_li=torch.randn(T, C, generator=g).to(dt), x=torch.randn(T, n, C, generator=g).to(dt),
                   grad_h_pre=torch.randn(T, n, generator=g), grad_h_post=torch.randn(T, n, generator=g),
                   h_pre=torch.rand(T, n, generator=g), h_post=torch.rand(T, n, generator=g),
                   proj=torch.randn(T, m, generator=g), rinv=torch.rand(T, generator=g) + 0.5,
                   alpha=torch.tensor([0.8, 0.6, 1.5]), bias=torch.randn(m, generator=g))  # fmt: skip
        outs = dict(d_pp=torch.empty(T, 2 * n), res_logits=torch.empty(T, n, n))
        return ins, outs, dict(post_mult=2.0, num_tokens=T, grid=-(-T // tpb))

    return kernel, inputs


def _boundary(direction):
    n, dt = 4, torch.bfloat16
    m = n * n + 2 * n
    if direction == "fwd":
        # two token tiles (the second partial), two splits of two channel blocks each: the tile is reused across
        # channel blocks, so both the tile-write -> MMA barrier and the MMA -> next-write barrier are exercised
        C, T, S = 256, 70, 2
        kernel = boundary.boundary_fwd_kernel(n, C, "bfloat16")

        def inputs(g):
            ins = dict(layer_output=torch.randn(T, C, generator=g).to(dt), residual=torch.randn(T, n, C, generator=g).to(dt),
                       h_post=torch.rand(T, n, generator=g) * 2, h_res=torch.rand(T, n, n, generator=g),
                       phi=torch.randn(n * C, m, generator=g) / (n * C) ** 0.5)  # fmt: skip
            outs = dict(out=torch.empty(T, n, C, dtype=dt), proj_part=torch.empty(S, T, m), sq_part=torch.empty(S, T))
            return ins, outs, dict(num_tokens=T, num_splits=S, grid=(-(-T // boundary.BM), S))

        return kernel, inputs
    C = 1280  # one token per block over several warps, as post_res_bwd-n4-C1280
    kernel = boundary.boundary_bwd_kernel(n, C, "bfloat16")
    tpb = post_res._plan(n, C, "bfloat16").tpb
    T = tpb + 2

    def inputs(g):
        ins = dict(grad_x_next=torch.randn(T, n, C, generator=g).to(dt), d_x_next=torch.randn(T, n, C, generator=g).to(dt),
                   layer_output=torch.randn(T, C, generator=g).to(dt), residual=torch.randn(T, n, C, generator=g).to(dt),
                   h_post=torch.randn(T, n, generator=g), h_res=torch.randn(T, n, n, generator=g))  # fmt: skip
        outs = dict(d_layer_output=torch.empty(T, C, dtype=dt), d_residual=torch.empty(T, n, C, dtype=dt),
                    d_h_post=torch.empty(T, n), d_h_res=torch.empty(T, n, n))  # fmt: skip
        return ins, outs, dict(num_tokens=T, grid=-(-T // tpb))

    return kernel, inputs


def _boundary_bwd_fused(C=128, T=70, kernel=None, clusters=False):
    # C = 128: two channel blocks (with the opt-in clusters, one cluster of two), three token tiles of 32 in one
    # split (the loop-top barrier orders a tile's reads before the next tile's writes), the last tile partial; 8
    # warps, so every phase's shared data crosses warps. C = 256, T = 130, clusters: a cluster of four, five tiles
    # (the d_h slots reused)
    n, S, dt = 4, 1, torch.bfloat16
    m = n * n + 2 * n
    p = boundary_bwd.fused_plan(n, C, "bfloat16", clusters)
    kernel = kernel or boundary_bwd.boundary_bwd_fused_kernel(n, C, "bfloat16", clusters)

    def inputs(g):
        ins = dict(grad_x_next=torch.randn(T, n, C, generator=g).to(dt), layer_output=torch.randn(T, C, generator=g).to(dt),
                   residual=torch.randn(T, n, C, generator=g).to(dt), h_post=torch.rand(T, n, generator=g) * 2,
                   h_res=torch.rand(T, n, n, generator=g), phi=torch.randn(n * C, m, generator=g) / (n * C) ** 0.5,
                   d_pp=torch.randn(T, 2 * n, generator=g), d_res=torch.randn(T, n * n, generator=g),
                   proj=torch.randn(T, m, generator=g), rinv=torch.rand(T, generator=g) + 0.5,
                   alpha=torch.tensor([0.7, 0.5, 1.3]), h_pre=torch.rand(T, n, generator=g),
                   g_li=torch.randn(T, C, generator=g).to(dt))  # fmt: skip
        R = -(-T // boundary_bwd.COEF_BM)
        outs = dict(d_layer_output=torch.empty(T, C, dtype=dt), d_residual=torch.empty(T, n, C, dtype=dt),
                    dh_part=torch.empty(p.groups, T, n * n + n), d_phi_part=torch.empty(S, n * C, m),
                    d_coef_part=torch.empty(R, 2 * m))  # fmt: skip
        return ins, outs, dict(num_tokens=T, num_splits=S, num_coef_tiles=R, grid=(p.blocks, S))

    return kernel, inputs


def _pre_decode():
    # two token groups (the second with one token), three splits of several K-chunks each: the chunk loop's two
    # barriers, the ticket barriers and the one before the H_pre apply are all on the path of the last block
    n, C, T, S, dt = 4, 256, 9, 3, torch.bfloat16
    m, K = n * n + 2 * n, n * C
    kernel = pre_decode.pre_decode_fwd_kernel(n, C, "bfloat16", 20, 0.0)

    def inputs(g):
        ins = dict(x=torch.randn(T, K, generator=g).to(dt), phi=torch.randn(K, m, generator=g) / K**0.5,
                   alpha=torch.tensor([0.8, 0.6, 1.5]), bias=torch.randn(m, generator=g),
                   ticket=torch.zeros(pre_decode.MAX_GROUPS, dtype=torch.int32))  # fmt: skip
        outs = dict(layer_input=torch.empty(T, C, dtype=dt), h_post=torch.empty(T, n), h_res=torch.empty(T, n, n),
                    h_pre=torch.empty(T, n), proj=torch.empty(T, m), rinv=torch.empty(T),
                    proj_part=torch.empty(S, T, m), sq_part=torch.empty(S, T))  # fmt: skip
        scal = dict(rms_eps=1e-6, post_mult=2.0, num_tokens=T, num_splits=S)
        return ins, outs, dict(scal, grid=(-(-T // pre_decode.TB), S))

    return kernel, inputs


def _exempt(case: str, source: str) -> set[int]:
    """Barriers whose deletion the sequential emulation cannot show, by construction. pre_decode: the barrier
    before thread 0's ``__threadfence`` and ticket orders the block's partial stores before its ticket *for the
    other blocks* (a cross-block memory ordering); blocks run one after another here, and inside the block the
    next barrier (after the ticket) orders the same stores for its own threads."""
    if not case.startswith("pre_decode"):
        return set()
    return {i for i, m in enumerate(BARRIER.finditer(source)) if "__threadfence" in source[m.end() : m.end() + 80]}


CASES = {
    "post_res_bwd-n4-C64": lambda: _post_res_bwd(64),  # 16 tokens per block, 4 warps
    "post_res_bwd-n4-C1280": lambda: _post_res_bwd(1280),  # one token per block, 5 warps
    "sinkhorn_fwd-n4": lambda: _sinkhorn("fwd", 4, 20, 0.0),  # exp domain, K in registers
    "sinkhorn_bwd-n4": lambda: _sinkhorn("bwd", 4, 20, 0.0),
    "sinkhorn_fwd-n16": lambda: _sinkhorn("fwd", 16, 20, 0.0),  # K in the tile rows
    "sinkhorn_bwd-n16": lambda: _sinkhorn("bwd", 16, 20, 0.0),
    "sinkhorn_fwd-n12-eps": lambda: _sinkhorn("fwd", 12, 5, 0.3),  # log domain
    "sinkhorn_bwd-n12-eps": lambda: _sinkhorn("bwd", 12, 5, 0.3),
    "pre_proj_fwd": lambda: _pre_proj("fwd"),
    "pre_proj_bwd": lambda: _pre_proj("bwd"),
    "pre_finalize_fwd": lambda: _pre_finalize("fwd"),
    "pre_finalize_bwd": lambda: _pre_finalize("bwd"),
    "boundary_fwd": lambda: _boundary("fwd"),
    "boundary_bwd": lambda: _boundary("bwd"),
    "boundary_bwd_fused": _boundary_bwd_fused,  # the default: no cluster
    "boundary_bwd_fused-cluster2": lambda: _boundary_bwd_fused(clusters=True),  # the opt-in clusters
    "boundary_bwd_fused-cluster4": lambda: _boundary_bwd_fused(256, 130, clusters=True),
    "pre_decode_fwd": _pre_decode,
}


def _run(emulated, inputs, **options) -> list[torch.Tensor]:
    ins, outs, launch = inputs(torch.Generator().manual_seed(0))
    for t in outs.values():
        t.view(torch.uint8).fill_(0xA5)  # outputs start as a fixed pattern, so an unwritten element shows
    emulated(**ins, **outs, **launch, **options)
    return [t.view(torch.uint8).clone() for t in outs.values()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _detected(mutant, inputs, base) -> bool:
    """A mutant is detected when some schedule changes an output bit or deadlocks (threads wait at a barrier the
    others never reach: a GPU hangs, the emulator raises)."""
    for s in SCHEDULES:
        try:
            if not _same(_run(mutant, inputs, schedule=s), base):
                return True
        except EmulationDeadlock:
            return True
    return False


def _mutants(source: str) -> list[str]:
    return [source[: m.start()] + "/* barrier deleted */" + source[m.end() :] for m in BARRIER.finditer(source)]


@pytest.mark.parametrize("case", list(CASES))
def test_deleting_any_barrier_is_detected(case):
    kernel, inputs = CASES[case]()
    info = kernel_sources(kernel)
    mutants = _mutants(info["source"])
    assert mutants, f"{case}: no __syncthreads in the generated source (the case no longer tests anything)"
    base = _run(EmulatedKernel(info), inputs)
    missed = []
    for i, source in enumerate(mutants):
        if not _detected(EmulatedKernel(dict(info, source=source)), inputs, base):
            missed.append(i)
    exempt = _exempt(case, info["source"])
    assert set(missed) == exempt, (
        f"{case}: deleting barrier(s) {missed} of {len(mutants)} left every output "
        f"bit-identical (exempt by construction: {sorted(exempt)})"
    )


@pytest.mark.parametrize("case", list(CASES))
def test_unmutated_kernels_do_not_depend_on_the_schedule_or_block_order(case):
    """The reference point of the mutation test, and the block-order check: both thread schedules (blocks in order)
    and every block order (forward, reverse, shuffled with two seeds; forward schedule) give the same bits."""
    kernel, inputs = CASES[case]()
    emulated = EmulatedKernel(kernel)
    base = _run(emulated, inputs)
    runs = [dict(schedule="reverse"), dict(block_order="reverse")]
    runs += [dict(block_order="shuffle", seed=seed) for seed in (0, 1)]
    assert {r.get("block_order", "forward") for r in runs} == set(BLOCK_ORDERS)
    for options in runs:
        assert _same(_run(emulated, inputs, **options), base), f"{case}: {options} changes the result"


def test_post_res_forward_needs_no_barrier():
    """post_res fwd has no __syncthreads to mutate: it must not use shared memory at all."""
    for C in (64, 1280, 7168):
        source = post_res.post_res_fwd_kernel(4, C, "bfloat16").get_kernel_source()
        assert "__shared__" not in source and not BARRIER.search(source), C


CLUSTER_BARRIER = re.compile(r"tl::cluster_(?:arrive|wait)\(\);")


def test_deleting_any_cluster_barrier_is_detected():
    """The fused backward's cluster barriers (tl_kernels/boundary_bwd.py: each tile's arrive for the previous tile
    and the wait before the cluster sums that tile's d_h, the last tile's arrive, wait and arrive after the loop,
    the wait before exit), each deleted in turn, on a cluster of four and five tiles: some output differs in one of
    the two schedules (the emulator runs a cluster's blocks together, lower rank first or last; shim.h)."""
    kernel, inputs = _boundary_bwd_fused(256, 130, clusters=True)
    info = kernel_sources(kernel)
    assert info["cluster"] == [4, 1, 1]
    assert not CLUSTER_BARRIER.search(kernel_sources(_boundary_bwd_fused(256, 130)[0])["source"])  # the default
    sites = list(CLUSTER_BARRIER.finditer(info["source"]))
    assert len(sites) == 6, f"expected 3 waits and 3 arrives, found {len(sites)}"
    base = _run(EmulatedKernel(info), inputs)
    missed = []
    for i, m in enumerate(sites):
        source = info["source"][: m.start()] + "/* cluster barrier deleted */" + info["source"][m.end() :]
        mutant = EmulatedKernel(dict(info, source=source))
        if all(_same(_run(mutant, inputs, schedule=s), base) for s in SCHEDULES):
            missed.append(f"{i}: {m.group(0)}")
    assert not missed, f"deleting {missed} left every output bit-identical"


def test_two_d_h_slots_are_too_few(monkeypatch):
    """With the d_h partials read one tile late, a slot is free again only after the wait two tiles on: with two
    slots instead of three a block overwrites a slot its peers have still to read (caught; with three, the
    unmutated kernel above is schedule-independent)."""
    from tl_kernels import _common

    monkeypatch.setattr(boundary_bwd, "DH_SLOTS", 2)
    racy = _common.compile_program(
        boundary_bwd.boundary_bwd_fused_program(4, 256, "bfloat16", True), pass_configs=boundary_bwd._FUSED_PASS_CONFIGS
    )
    _, inputs = _boundary_bwd_fused(256, 130, clusters=True)
    base = _run(EmulatedKernel(boundary_bwd.boundary_bwd_fused_kernel(4, 256, "bfloat16", True)), inputs)
    mutant = EmulatedKernel(racy)
    assert not all(_same(_run(mutant, inputs, schedule=s), base) for s in SCHEDULES)
