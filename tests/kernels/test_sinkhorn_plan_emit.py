"""The Sinkhorn helper modules on their own, without compiling anything: the plans and shared-memory layouts of
tl_kernels/sinkhorn_plan.py and the pure-Python pieces of tl_kernels/sinkhorn_emit.py (the register-or-shared
Matrix, the balanced reduction tree, the dot-product fold). The kernels built from them are checked by
tests/emulation/test_sinkhorn_emulated.py and tests/kernels/test_sass.py."""

from __future__ import annotations

from collections import Counter

import pytest

pytest.importorskip("tilelang")

from tl_kernels import sinkhorn_emit as emit  # noqa: E402
from tl_kernels import sinkhorn_plan as plan  # noqa: E402


def _wavefronts(byte_addresses: list[int], width: int) -> int:
    """Shared-memory wavefronts of one warp access of ``width`` bytes per lane: lanes are served in phases of
    128 bytes (32, 16, 8 lanes for 4-, 8-, 16-byte accesses); a phase costs its largest count of distinct words in
    one bank."""
    per_phase = 128 // width
    total = 0
    for p in range(0, 32, per_phase):
        words = {a // 4 + k for a in byte_addresses[p : p + per_phase] for k in range(width // 4)}
        total += max(Counter(w % 32 for w in words).values())
    return total


@pytest.mark.parametrize("n", range(1, 17))
def test_history_layout_is_a_bijection_and_conflict_free(n):
    tpb, slots = 32, 3
    seen = set()
    for t in range(slots):
        for v in (0, 1):
            for tx in range(tpb):
                idx = [plan.hist_index(n, tpb, t, v, i, tx) for i in range(n)]
                seen.update(idx)
                if plan.hist_vectors_contiguous(n):
                    assert idx == list(range(idx[0], idx[0] + n))  # one thread's vector is contiguous
    assert seen == set(range(slots * 2 * n * tpb))
    # a warp reading entry i of its 32 tokens' vectors, with the widest access the layout allows: the minimum
    # number of wavefronts (one 128-byte wavefront per 32 words), i.e. no bank conflict
    vector = plan.hist_vectors_contiguous(n)
    width = 4 if not vector or n % 2 else 8 if n % 4 else 16
    for i in range(0, n, width // 4):
        addresses = [4 * plan.hist_index(n, tpb, 1, 1, i, tx) for tx in range(32)]
        assert _wavefronts(addresses, width) == width * 32 // 128, (n, i, width)


def test_vector_layout_only_where_it_stays_conflict_free():
    assert [n for n in range(1, 17) if not plan.hist_vectors_contiguous(n)] == [8, 16]
    # n = 8 vector-major with 128-bit accesses would conflict: the reason it stays token-minor
    addresses = [4 * (tx * 8) for tx in range(32)]
    assert _wavefronts(addresses, 16) > 4


def test_plans_fit_the_budget_in_whole_warps():
    for n in range(1, 17):
        for make in (plan.fwd_plan, plan.bwd_plan):
            p = make(n, 20, 0.0)
            assert p.smem_bytes <= plan.SMEM_BUDGET_BYTES
            assert p.tokens_per_block <= plan.MAX_TOKENS_PER_BLOCK
            assert p.tokens_per_block % 32 == 0 or p.tokens_per_block < 32
            assert p.pitch % 2 == 1 and p.pitch >= n * n
    with pytest.raises(ValueError, match="per-block budget"):
        plan.bwd_plan(16, 5000, 0.0)
    with pytest.raises(ValueError, match="n must be an int"):
        plan.fwd_plan(17, 20, 0.0)
    with pytest.raises(ValueError, match="eps must be a finite float"):
        plan.fwd_plan(4, 20, float("nan"))


def test_matrix_indexes_registers_and_tile_rows_alike():
    regs, tile = object(), object()
    in_regs = emit.Matrix(4, regs, None, None)
    in_tile = emit.Matrix(4, None, tile, 100)
    assert in_regs.buf is regs and in_regs.idx(2, 3) == 11
    assert in_tile.buf is tile and in_tile.idx(2, 3) == 111


def test_tree_is_balanced_and_dot_is_a_left_fold():
    depth = emit.tree(lambda a, b: max(a, b) + 1, [0] * 13)
    assert depth == 4  # ceil(log2 13), not 12 as a left fold would give
    assert emit.tree(emit.add, list(range(7))) == 21
    assert emit.dot([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == 32.0
