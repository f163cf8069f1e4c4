"""Shared test setup: a stable per-test seed, the `gpu` marker, and guards against sessions that test nothing and
against our own modules (mhc, tl_kernels, profiling, tests) being skipped for failing to import: such a skip is turned
into a failure (only optional third-party packages may be importorskip'ed)."""

from __future__ import annotations

import hashlib
import os
import re

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


_OWN_IMPORT = re.compile(r"(could not import|No module named) '(mhc|tl_kernels|profiling|tests)(\.|')")


def _own_import_skip(report) -> bool:
    if not report.skipped:
        return False
    longrepr = report.longrepr
    message = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return bool(_OWN_IMPORT.search(message))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _own_import_skip(report):
        report.outcome = "failed"
        report.longrepr = f"a project module failed to import (turned into a skip): {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _own_import_skip(report):
        report.outcome = "failed"
        report.longrepr = f"a project module failed to import (turned into a skip): {report.longrepr}"


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
