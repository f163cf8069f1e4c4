"""SASS-level checks of the Sinkhorn kernels without a GPU (tl_kernels/codegen.py: ptxas, cuobjdump, nvdisasm from
NVIDIA's pip wheels in the dev extras; skipped where they are missing).

The instruction counts are regression guards for the latency work on the Sinkhorn kernels: at n = 4, 20 iterations,
the flush-to-zero build has loop bodies of 195 (forward) and 208 + 168 (backward) instructions, against 315 and
328 + 240 without it. A change that brings the denormal fixups back (or otherwise bloats the iteration) fails here.
"""

from __future__ import annotations

import pytest

from tl_kernels import codegen

sinkhorn = pytest.importorskip("tl_kernels.sinkhorn")


def _sass_or_skip(kernel) -> str:
    try:
        return codegen.sass(kernel)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("direction,bounds", [("fwd", (200,)), ("bwd", (215, 175))])
def test_sinkhorn_iteration_loops_stay_small(direction, bounds):
    kernel = getattr(sinkhorn, f"sinkhorn_{direction}_kernel")(4, 20, 0.0)
    loops = [loop for loop in codegen.sass_loops(_sass_or_skip(kernel)) if loop["mufu"]]
    assert len(loops) == len(bounds), loops
    for loop, bound in zip(loops, bounds, strict=True):
        assert loop["instructions"] <= bound, loops
        assert loop["mufu"] == (40 if loop is loops[0] else 20), loops  # 4 x (4 ex2 + 1 lg2) per half-step pair


def test_sinkhorn_math_is_flush_to_zero():
    text = codegen.ptx(sinkhorn.sinkhorn_fwd_kernel(4, 20, 0.0))
    ops = {line.split()[0] for line in text.splitlines() if "ex2." in line or "lg2." in line}
    assert ops == {"ex2.approx.ftz.f32", "lg2.approx.ftz.f32"}, ops


def test_sass_loop_parser_on_a_listing():
    listing = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   MUFU.EX2 R2, R3 ;
        /*0020*/                   FADD R4, R2, R4 ;
        /*0030*/              @P0 BRA 0x10 ;
        /*0040*/                   EXIT ;
"""
    assert len(codegen.sass_instructions(listing)) == 5
    assert codegen.sass_loops(listing) == [{"start": 0x10, "end": 0x30, "instructions": 3, "mufu": 1}]
