"""PTX/SASS guards for the decode pre-mapping (tl_kernels/pre_decode.py), without a GPU (tl_kernels/codegen.py:
ptxas, cuobjdump from NVIDIA's pip wheels; skipped where they are missing).

Per configuration: zero spills, no stack frame, no local memory; 128-bit loads and stores (the H_pre apply); one
atomic (the group's integer ticket) and no float atomic or reduction (the partials are summed in a fixed order);
no integer division but three 32-bit ones per block (the split bound, the last block's splits per staged batch
and its batch count), none in any loop, no 64-bit division; and
PDL: ``griddepcontrol.wait`` (SASS ``ACQBULK``) precedes every global load, store and atomic, straight-line from
the kernel's entry, and ``griddepcontrol.launch_dependents`` is issued once. The K-chunk loop (the first loop of
``codegen.sass_loops``; one iteration stages and multiplies ``stage_chunks(4) = 4`` chunks) of n = 4, C = 7168,
bf16 measured 475 SASS instructions (sm_90a, CUDA 13.0; was 285 for one chunk an iteration), guarded at +8%.
"""

from __future__ import annotations

import collections
import re

import pytest

from tl_kernels import pre_decode
from tl_kernels.tools import codegen

CONFIGS = [(4, 7168, "bfloat16"), (8, 7168, "bfloat16"), (4, 7168, "float32"), (1, 1280, "bfloat16")]
CHUNK_LOOP_CEILING = {(4, 7168, "bfloat16"): 513}
_GLOBAL = re.compile(r"^(?:@!?U?P\w+\s+)?(?:LDG|STG|ATOM|RED)\b")


def _sass_or_skip(kernel) -> str:
    try:
        return codegen.sass(kernel)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("n,C,dtype", CONFIGS, ids=[f"n{c[0]}-C{c[1]}-{c[2]}" for c in CONFIGS])
def test_pre_decode_fwd_resources_and_instructions(n, C, dtype):
    kernel = pre_decode.pre_decode_fwd_kernel(n, C, dtype, 20, 0.0)
    sass = _sass_or_skip(kernel)
    result = codegen.analyze(kernel)
    assert result["spill_bytes"] == 0 and result["stack_frame_bytes"] == 0, result["kernels"]
    assert result["vector_loads_128"] and result["vector_stores_128"], result
    ins = codegen.sass_instructions(sass)
    ops = collections.Counter()
    for _addr, text in ins:
        words = text.split()
        ops[words[1] if words[0].startswith("@") else words[0]] += 1
    assert not [op for op in ops if op.startswith(("LDL", "STL"))], "local memory in SASS"
    atomics = {op: c for op, c in ops.items() if op.startswith(("ATOM", "RED"))}
    assert atomics == {"ATOM.E.ADD.S32.STRONG.GPU": 1}, atomics
    divisions = [(a, t) for a, t in ins if "I2F" in t and ".RP" in t]
    # per block, once: the split bound, the reduction's splits per staged batch and its batch count
    assert len(divisions) <= 3 and not any("U64" in t for _a, t in divisions), divisions
    loops = sorted(codegen.sass_loops(sass), key=lambda lp: lp["start"])
    chunk_loop = loops[0]
    for lp in loops:
        assert not [a for a, t in divisions if lp["start"] <= a <= lp["end"]], ("a division in a loop", lp)
    in_loop = [t for a, t in ins if chunk_loop["start"] <= a <= chunk_loop["end"]]
    assert not [t for t in in_loop if re.search(r"\bCALL\b", t)], "a call in the K-chunk loop"
    if (n, C, dtype) in CHUNK_LOOP_CEILING:
        assert chunk_loop["instructions"] <= CHUNK_LOOP_CEILING[(n, C, dtype)], chunk_loop
    # PDL: the wait comes first, before any branch and any global access.
    wait = next(i for i, (_a, t) in enumerate(ins) if t.split()[0] == "ACQBULK")
    first_global = next(i for i, (_a, t) in enumerate(ins) if _GLOBAL.match(t))
    assert wait < first_global, (ins[wait], ins[first_global])
    assert not [t for _a, t in ins[:wait] if re.search(r"\b(?:BRA|CALL|EXIT)\b", t)], ins[:wait]
    ptx = [line.strip() for line in codegen.ptx(kernel).splitlines()]
    ptx_wait = ptx.index("griddepcontrol.wait;")
    ptx_global = next(i for i, line in enumerate(ptx) if line.startswith(("ld.global", "st.global", "atom.", "red.")))
    assert ptx_wait < ptx_global
    assert ptx.count("griddepcontrol.launch_dependents;") == 1
