"""The emulated pre-mapping kernels under AddressSanitizer (g++ -fsanitize=address, libasan preloaded into a child
python): every tensor is allocated to its exact size, so an out-of-bounds read or write of the generated code (a
missing guard for rows past T, a wrong stride) aborts the child. A planted short input shows the check can fail.
Covers pre_proj fwd and bwd (accumulate variant; TF32 MMA emulated), pre_finalize fwd and bwd, pre_reduce bwd (both
variants: a row count below the parts), and the Sinkhorn kernels (n = 4, 7, 16: exp domain in registers and in
shared memory, with tokens that take the log-domain fallback), partial tiles and blocks. Skipped where g++ has no
libasan."""

from __future__ import annotations

import subprocess

from tl_kernels import post_res, pre_finalize, pre_proj, pre_reduce, sinkhorn

from .asan_launch import run_under_asan
from .cuda_emu import kernel_sources


def _run(tmp_path, plant: bool) -> subprocess.CompletedProcess:
    kernels = {
        "pre_proj_fwd": pre_proj.pre_proj_fwd_kernel(4, 128, "bfloat16"),
        "pre_proj_bwd": pre_proj.pre_proj_bwd_kernel(4, 128, "bfloat16", True),
        "pre_finalize_fwd": pre_finalize.pre_finalize_fwd_kernel(4, 1280, "bfloat16", 20, 0.0),
        "pre_finalize_bwd": pre_finalize.pre_finalize_bwd_kernel(4, 64, "float32"),
        "pre_reduce_bwd": pre_reduce.pre_reduce_bwd_kernel(4, True),
        "pre_reduce_bwd_coef": pre_reduce.pre_reduce_bwd_kernel(4, False),
    }
    src = {"pre_finalize_bwd_blocks": -(-19 // post_res._plan(4, 64, "float32").tpb)}
    for n in (4, 7, 16):  # K, H in registers (n = 4, 7) or in the tile rows (n = 16)
        kernels[f"sinkhorn_fwd_{n}"] = sinkhorn.sinkhorn_fwd_kernel(n, 20, 0.0)
        kernels[f"sinkhorn_bwd_{n}"] = sinkhorn.sinkhorn_bwd_kernel(n, 20, 0.0)
        tpb = sinkhorn._bwd_plan(n, 20, 0.0).tokens_per_block
        src[f"sinkhorn_{n}_threads"] = tpb
        src[f"sinkhorn_{n}_blocks"] = -(-(tpb + 3) // tpb)
        src[f"sinkhorn_fwd_{n}_blocks"] = -(-(tpb + 3) // sinkhorn._fwd_plan(n, 20, 0.0).tokens_per_block)
    src.update({name: kernel_sources(k) for name, k in kernels.items()})  # source, shared memory size, ftz
    return run_under_asan("asan_runner.py", src, tmp_path, plant, timeout=600)


def test_pre_mapping_kernels_stay_in_bounds(tmp_path):
    proc = _run(tmp_path, plant=False)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stderr[-3000:]


def test_asan_catches_a_planted_short_input(tmp_path):
    proc = _run(tmp_path, plant=True)
    assert proc.returncode != 0 and "AddressSanitizer: heap-buffer-overflow" in proc.stderr, proc.stderr[-2000:]
