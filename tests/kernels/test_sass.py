"""SASS-level checks of the Sinkhorn kernels without a GPU (tl_kernels/codegen.py: ptxas, cuobjdump, nvdisasm from
NVIDIA's pip wheels in the dev extras; skipped where they are missing).

The instruction counts are regression guards for the latency work on the Sinkhorn kernels: at n = 4, 20 iterations,
the forward's exp-domain iteration is 157 instructions per two iterations (195 per iteration in the log domain with
flush-to-zero, 315 before), the backward's loops 208 + 168 (328 + 240 before flush-to-zero). A change that brings
the denormal fixups back or otherwise bloats an iteration fails here.
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


def _mufu_loops(direction):
    kernel = getattr(sinkhorn, f"sinkhorn_{direction}_kernel")(4, 20, 0.0)
    return [loop for loop in codegen.sass_loops(_sass_or_skip(kernel)) if loop["mufu"]]


def test_sinkhorn_forward_iterates_in_the_exp_domain():
    """The forward's normal path: 8 reciprocals (MUFU.RCP) an iteration and no exp/log; ptxas unrolls it by 2 (16
    MUFU, 157 instructions for two iterations). The second loop is the log-domain fallback (40 MUFU an iteration)."""
    exp_loop, log_loop = _mufu_loops("fwd")
    assert exp_loop["mufu"] in (8, 16) and exp_loop["instructions"] <= 85 * exp_loop["mufu"] // 8, exp_loop
    assert log_loop["mufu"] == 40 and log_loop["instructions"] <= 200, log_loop


def test_sinkhorn_backward_loops_stay_small():
    recompute, sweep = _mufu_loops("bwd")
    assert recompute["mufu"] == 40 and recompute["instructions"] <= 215, recompute  # 4 x (4 ex2 + 1 lg2) x 2
    assert sweep["mufu"] == 20 and sweep["instructions"] <= 175, sweep


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
