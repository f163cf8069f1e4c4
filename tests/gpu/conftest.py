"""GPU tests run in strict mode: ``MHC_STRICT_KERNELS=1`` (mhc/_cuda.py), so a call that no CUDA kernel serves (a
disabled family, a shape out of range, float64) raises instead of passing on the PyTorch reference. A test that
checks the fallback itself opts out by requesting the ``allow_fallback`` fixture."""

from __future__ import annotations

import pytest

from mhc import _cuda


@pytest.fixture(autouse=True)
def strict_kernels(monkeypatch):
    monkeypatch.setenv(_cuda.STRICT_ENV, "1")


@pytest.fixture
def allow_fallback(strict_kernels, monkeypatch):
    """Turns strict mode off for one test (one that checks the reference fallback and its warning)."""
    monkeypatch.setenv(_cuda.STRICT_ENV, "0")
