"""PTX/SASS guards for the decode variants with programmatic dependent launch (``pdl=True``), without a GPU
(tl_kernels/tools/codegen.py: ptxas, cuobjdump from NVIDIA's pip wheels; skipped where they are missing).

Per kernel: ``griddepcontrol.wait`` (SASS ``ACQBULK``) precedes every global load, store and atomic, straight-line
from the kernel's entry (no branch before it, so no thread can skip it); ``griddepcontrol.launch_dependents`` is
issued once; the variant moves the same 128-bit global accesses as the training-size kernel, which has neither
instruction (its code is unchanged). The pre_decode kernel has its own guards (test_pre_decode_sass.py).
"""

from __future__ import annotations

import re

import pytest

from tl_kernels import post_res
from tl_kernels.tools import codegen

_GLOBAL = re.compile(r"^(?:@!?U?P\w+\s+)?(?:LDG|STG|ATOM|RED)\b")
_WIDE = re.compile(r"^(?:@!?U?P\w+\s+)?(?:LDG|STG)\.E\.128\b")
KERNELS = {
    "post_res_fwd": lambda n, C, dt, pdl: post_res.post_res_fwd_kernel(n, C, dt, pdl),
}
CONFIGS = [(4, 7168, "bfloat16"), (4, 2560, "float32"), (8, 4096, "bfloat16"), (2, 1280, "bfloat16")]


def _listing(kernel) -> list[str]:
    try:
        sass = codegen.sass(kernel)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return [t for _a, t in codegen.sass_instructions(sass)]


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("n,C,dtype", CONFIGS, ids=[f"n{c[0]}-C{c[1]}-{c[2]}" for c in CONFIGS])
def test_decode_variant_waits_before_any_global_access(name, n, C, dtype):
    kernel = KERNELS[name](n, C, dtype, True)
    ins = _listing(kernel)
    wait = next(i for i, t in enumerate(ins) if t.split()[0] == "ACQBULK")
    first_global = next(i for i, t in enumerate(ins) if _GLOBAL.match(t))
    assert wait < first_global, (ins[wait], ins[first_global])
    assert not [t for t in ins[:wait] if re.search(r"\b(?:BRA|CALL|EXIT)\b", t)], ins[:wait]
    ptx = [line.strip() for line in codegen.ptx(kernel).splitlines()]
    ptx_global = next(i for i, line in enumerate(ptx) if line.startswith(("ld.global", "st.global", "atom.", "red.")))
    assert ptx.index("griddepcontrol.wait;") < ptx_global
    assert ptx.count("griddepcontrol.launch_dependents;") == 1
    plain = _listing(KERNELS[name](n, C, dtype, False))
    assert not [t for t in plain if t.split()[0] == "ACQBULK"]
    assert "griddepcontrol" not in codegen.ptx(KERNELS[name](n, C, dtype, False))
    assert sum(bool(_WIDE.match(t)) for t in ins) == sum(bool(_WIDE.match(t)) for t in plain) > 0
