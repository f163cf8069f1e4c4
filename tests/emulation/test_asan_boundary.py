"""The emulated boundary forward and backward (tl_kernels/boundary.py, boundary_bwd.py) under AddressSanitizer (g++ -fsanitize=address, libasan
preloaded into a child python): every tensor is allocated to its exact size, so an out-of-bounds read or write of the
generated code (a missing guard for rows past T, a wrong stride in the split's channel blocks or the phi rows)
aborts the child. Forward: partial token tiles at n = 4 bf16 (BC = 64) and n = 8 fp32 (BC = 32), several splits, one token;
backward: a partial block of several tokens and a one-token block; the fully fused backward and its d_h
reduction: partial token tiles over two splits, g = 32 with idle rows, two passes, one token, the default without
thread block clusters and the opt-in clusters of 2 and 8 (distributed shared memory reads checked against the
peer's allocation by the emulator).
A planted short input shows the check can fail. Skipped where g++ has no libasan."""

from __future__ import annotations

import subprocess

from tl_kernels import boundary, boundary_bwd, post_res, pre_reduce

from .asan_launch import run_under_asan
from .cuda_emu import kernel_sources

CASES = [(4, 128, "bfloat16", 67, 2), (8, 64, "float32", 3, 2), (2, 192, "float16", 1, 3)]
BWD_CASES = [(4, 64, "float32", 19), (4, 1280, "bfloat16", 2)]  # several tokens a block (partial); one a block
# the fused backward (n, C, dtype, T, S, clusters): partial token tiles over two splits (n = 4 bf16), g = 32 with idle
# rows (n = 8 bf16), two passes (n = 1 fp32), one token; the opt-in thread block clusters of 2 (the first four), of 8
# with a d_h slot reused (four tiles a split), none (three channel blocks); the default, without clusters (one d_h
# partial a channel block), on the first two shapes and with eight channel blocks
FUSED_CASES = [
    (4, 128, "bfloat16", 70, 2, True),
    (8, 64, "bfloat16", 33, 2, True),
    (1, 128, "float32", 5, 1, True),
    (6, 192, "float16", 1, 1, True),
    (4, 512, "bfloat16", 130, 1, True),
    (4, 192, "bfloat16", 40, 2, True),
    (4, 128, "bfloat16", 70, 2, False),
    (8, 64, "bfloat16", 33, 2, False),
    (4, 512, "bfloat16", 130, 1, False),
]


def _run(tmp_path, plant: bool) -> subprocess.CompletedProcess:
    cases = [
        dict(n=n, C=C, dtype=dt, T=T, S=S, source=kernel_sources(boundary.boundary_fwd_kernel(n, C, dt)))
        for n, C, dt, T, S in CASES
    ]
    bwd_cases = [
        dict(n=n, C=C, dtype=dt, T=T, blocks=-(-T // post_res._plan(n, C, dt).tpb),
             source=kernel_sources(boundary.boundary_bwd_kernel(n, C, dt)))
        for n, C, dt, T in BWD_CASES
    ]  # fmt: skip
    fused_cases = [
        dict(n=n, C=C, dtype=dt, T=T, S=S, R=-(-T // boundary_bwd.COEF_BM), cb=boundary_bwd.fused_plan(n, C, dt).blocks,
             groups=boundary_bwd.fused_plan(n, C, dt, cl).groups,
             reduce_blocks=1 + -(-T * (n * n + n) // pre_reduce.THREADS)
             + -(-(n * C * (n * n + 2 * n) // pre_reduce.VEC) // pre_reduce.THREADS),
             source=kernel_sources(boundary_bwd.boundary_bwd_fused_kernel(n, C, dt, cl)),
             reduce_source=kernel_sources(boundary_bwd.boundary_reduce_bwd_kernel(n)))
        for n, C, dt, T, S, cl in FUSED_CASES
    ]  # fmt: skip
    payload = {"cases": cases, "bwd_cases": bwd_cases, "fused_cases": fused_cases}
    return run_under_asan("asan_boundary_runner.py", payload, tmp_path, plant, timeout=900)


def test_boundary_kernel_stays_in_bounds(tmp_path):
    proc = _run(tmp_path, plant=False)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stderr[-3000:]


def test_asan_catches_a_planted_short_input(tmp_path):
    proc = _run(tmp_path, plant=True)
    assert proc.returncode != 0 and "AddressSanitizer: heap-buffer-overflow" in proc.stderr, proc.stderr[-2000:]
