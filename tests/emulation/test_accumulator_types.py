"""Low-precision accumulators (a failure class of other projects' mHC kernels): in the generated source of every
family (the configurations of test_barrier_mutations.py), no variable of a 16-bit float type is updated from its
own value (``v = (v + ...)``, ``v[i] = (v[i] + ...)``, ``v += ...``) and every ``mma.sync`` accumulates in fp32: sums run in fp32 and are rounded once on
store."""

from __future__ import annotations

import re

import pytest

from .test_barrier_mutations import CASES

_LOW = re.compile(r"\b(?:bfloat16_t|half_t|__nv_bfloat16|half)\s+(\w+)\s*(?:\[[^\]]*\])?\s*[;=]")


def _accumulated(source: str, name: str) -> bool:
    update = rf"\b{name}\b(\[[^\]]*\])?\s*=\s*\(*\s*{name}\b(\[[^\]]*\])?\s*[-+]|\b{name}\b(\[[^\]]*\])?\s*[-+]="
    return re.search(update, source) is not None


@pytest.mark.parametrize("case", list(CASES))
def test_no_low_precision_accumulator(case):
    source = CASES[case]()[0].get_kernel_source()
    mma = re.findall(r"tl::mma_sync<[^,]+, [^,]+, tl::DataType::(\w+),[^>]*>\(reinterpret_cast<(\w+)\*>\((\w+)", source)
    assert all(c == "kFloat32" and t == "float" for c, t, _ in mma), f"{case}: tensor-core accumulator not fp32: {mma}"
    accs = re.findall(r"\b(?:float|double)\s+(\w+)\s*(?:\[[^\]]*\])?\s*;", source)
    assert mma or any(_accumulated(source, a) for a in accs), f"{case}: no fp32 accumulation found (the check is blind)"
    low = [name for name in _LOW.findall(source) if _accumulated(source, name)]
    assert not low, f"{case}: 16-bit float variables accumulated: {low}"
