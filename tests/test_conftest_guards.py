"""tests/conftest.py turns a skip caused by one of our own modules failing to import into a failure, and leaves
skips for optional third-party packages alone (run on a throwaway test file in a child pytest)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_an_import_skip_of_our_own_module_fails_the_run(tmp_path):
    (tmp_path / "test_probe.py").write_text(
        "import pytest\n\n"
        "def test_own():\n    pytest.importorskip('tl_kernels.no_such_module')\n\n"
        "def test_third_party():\n    pytest.importorskip('no_such_third_party_package')\n\n"
        "def test_ok():\n    pass\n"
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "tests.conftest", "-p", "no:cacheprovider",
           "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout
    assert "1 failed, 1 passed, 1 skipped" in proc.stdout, proc.stdout[-2000:]
