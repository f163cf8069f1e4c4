"""Emulation fixtures: ``approx_mode`` runs a test once with every approximate-math result moved up by the
instruction's documented worst-case error and once moved down (see cuda_emu.py); accuracy tests of kernels that use
approximate math (Sinkhorn, pre_finalize) take it, so their tolerances hold at the hardware's error bounds."""

from __future__ import annotations

import pytest

from . import cuda_emu


@pytest.fixture(params=["up", "down"])
def approx_mode(request, monkeypatch) -> str:
    monkeypatch.setitem(cuda_emu.DEFAULTS, "approx", request.param)
    return request.param
