"""The geometry of tl_kernels._common.TokenLaneSum (the butterfly-and-slot reduction of post_res_bwd and
pre_finalize_bwd) for every thread mapping the shipped kernels use: each token's slot rows are its own, every
segment lies inside one warp and one token, and the xor offsets stay inside a segment. The reduction's results are
checked by the emulation tests of both kernels (tests/emulation)."""

from __future__ import annotations

import pytest

from tl_kernels import _common, post_res, registry

PLANS = sorted(
    {
        (cfg.kwargs["n"], cfg.kwargs["C"], cfg.kwargs["dtype"])
        for cfg in registry.ALL_CONFIGS
        if cfg.family in ("post_res", "pre_finalize") and cfg.direction == "bwd"
    }
)


@pytest.mark.parametrize(("n", "C", "dtype"), PLANS)
def test_slots_and_segments_partition_the_block(n, C, dtype):
    p = post_res._plan(n, C, dtype)  # the mapping both backward kernels use
    lanes = _common.TokenLaneSum(p.tpt, p.threads)
    assert lanes.num_slots == p.tpb * lanes.slots_per_token  # every slot row belongs to exactly one token
    owners = {}
    for tx in range(p.threads):
        segment = tx // lanes.seg
        token = tx // p.tpt
        assert owners.setdefault(segment, token) == token  # a segment never spans two tokens
        assert tx // 32 == (segment * lanes.seg) // 32  # ... nor two warps
        assert token * lanes.slots_per_token <= segment < (token + 1) * lanes.slots_per_token  # the token's rows
    assert sorted(owners) == list(range(lanes.num_slots))
    lane = 0
    for offset in lanes.offsets:  # the butterfly reaches every lane of a segment, and only those
        assert 0 < offset < lanes.seg
        lane |= offset
    assert lane == lanes.seg - 1


def test_offsets_halve_down_to_one():
    assert _common.TokenLaneSum(8, 128).offsets == (4, 2, 1)
    assert _common.TokenLaneSum(224, 224).offsets == (16, 8, 4, 2, 1)
    assert _common.TokenLaneSum(1, 128).offsets == ()  # one thread per token: nothing to exchange
