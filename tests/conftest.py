"""Shared test setup: a stable per-test seed, the `gpu` marker, and a guard against sessions that test nothing."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """Every test gets its own reproducible seed: sha256 of its node id."""
    value = int.from_bytes(hashlib.sha256(request.node.nodeid.encode()).digest()[:4], "little") % (2**31)
    torch.manual_seed(value)
    return value


def pytest_sessionfinish(session, exitstatus):
    """Fail a session that collected tests but passed none (everything skipped or deselected)."""
    if exitstatus != 0 or getattr(session.config, "workerinput", None) is not None:
        return
    if session.config.option.collectonly:  # collecting is all such a session is asked to do
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    passed = len(reporter.stats.get("passed", []))
    if passed == 0:
        reporter.write_line("ERROR: no test passed in this session (all skipped or none collected)", red=True)
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
