"""GPU memory of MHCStack block recompute (not run on the CPU-only CI): the peak allocated memory of a training step
falls with recompute, and the resident activation memory follows n*C*(ceil(L/L_r) - 1) per token."""

from __future__ import annotations

import math

import pytest
import torch

from profiling.recompute_memory import make_stack

pytestmark = pytest.mark.gpu


def _step_memory(r, L, n, C, T):
    torch.manual_seed(0)
    stack = make_stack(L, n, C, r, device="cuda").to(torch.bfloat16)
    x = torch.randn(T, n, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = stack(x)
    resident = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    return resident, torch.cuda.max_memory_allocated() - before


def test_recompute_memory_on_gpu():
    L, n, C, T = 24, 4, 1280, 4096
    unit = n * C * T * 2  # one bf16 residual
    plain_res, plain_peak = _step_memory(None, L, n, C, T)
    full_res, _ = _step_memory(L, L, n, C, T)
    for r in (2, 4, 8):
        res, peak = _step_memory(r, L, n, C, T)
        extra = (res - full_res) / unit
        assert abs(extra - (math.ceil(L / r) - 1)) < 0.05, (r, extra)
        assert peak < plain_peak
        print(
            f"L_r={r}: resident {res / 2**20:.1f} MiB (plain {plain_res / 2**20:.1f}), peak {peak / 2**20:.1f} MiB "
            f"(plain {plain_peak / 2**20:.1f})"
        )
