"""Launch an ASan runner script (asan_runner.py, asan_boundary_runner.py) in a child python with libasan preloaded
and the emulator's sources built with ``-fsanitize=address``. Shared by the ASan tests; skips where g++ has no
libasan."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent


def libasan() -> str:
    """Path of g++'s libasan.so (the test skips when there is none)."""
    try:
        path = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    except OSError:
        path = ""
    if not path or not os.path.isabs(path) or not os.path.exists(path):
        pytest.skip("g++ has no libasan")
    return path


def run_under_asan(runner: str, payload: dict, tmp_path: pathlib.Path, plant: bool, timeout: int):
    """Write ``payload`` (generated sources and launch data) as JSON and run ``runner`` on it under ASan."""
    path = tmp_path / "sources.json"
    path.write_text(json.dumps(payload))
    env = dict(
        os.environ,
        LD_PRELOAD=libasan(),
        ASAN_OPTIONS="detect_leaks=0:verify_asan_link_order=0",
        MHC_EMU_CFLAGS="-fsanitize=address -fno-omit-frame-pointer",
    )
    cmd = [sys.executable, str(HERE / runner), str(path), *(["--plant"] if plant else [])]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
