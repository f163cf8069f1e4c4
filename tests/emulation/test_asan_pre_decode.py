"""The emulated decode pre-mapping (tl_kernels/pre_decode.py) under AddressSanitizer (g++ -fsanitize=address,
libasan preloaded into a child python): every tensor, the ticket buffer included, is allocated to its exact size,
so an out-of-bounds read or write of the generated code (rows past T in a partial token group, a split's K-chunks,
the partials' strides, the ticket of the last group) aborts the child. Cases: two groups with a one-token second
group (n = 4 bf16), the largest T = 64 (eight groups, n = 8 fp32), one token (n = 2 fp16). A planted short input
shows the check can fail. Skipped where g++ has no libasan."""

from __future__ import annotations

import subprocess

from tl_kernels import pre_decode

from .asan_launch import run_under_asan
from .cuda_emu import kernel_sources

CASES = [(4, 128, "bfloat16", 9, 3), (8, 64, "float32", 64, 2), (2, 192, "float16", 1, 3)]


def _run(tmp_path, plant: bool) -> subprocess.CompletedProcess:
    cases = [
        dict(n=n, C=C, dtype=dt, T=T, S=S, groups=-(-T // pre_decode.TB), max_groups=pre_decode.MAX_GROUPS,
             source=kernel_sources(pre_decode.pre_decode_fwd_kernel(n, C, dt, 20, 0.0)))
        for n, C, dt, T, S in CASES
    ]  # fmt: skip
    return run_under_asan("asan_pre_decode_runner.py", {"cases": cases}, tmp_path, plant, timeout=900)


def test_pre_decode_kernel_stays_in_bounds(tmp_path):
    proc = _run(tmp_path, plant=False)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stderr[-3000:]


def test_asan_catches_a_planted_short_input(tmp_path):
    proc = _run(tmp_path, plant=True)
    assert proc.returncode != 0 and "AddressSanitizer: heap-buffer-overflow" in proc.stderr, proc.stderr[-2000:]
