"""Where a run comes from: the repository root and the checked-out commit, for the benchmark records
(:mod:`profiling.bench`) and the GPU-run summary (:mod:`profiling.gpu_run`).

Standard library only, and it imports nothing of this package, so both can use it without importing each other
(:mod:`profiling.gpu_run` must start even when torch or TileLang cannot load).
"""

from __future__ import annotations

import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: what ``profiling/gpu_prep.sh`` packs for the GPU machine (``.git`` does not travel there)
DEVICE_DIR = ROOT / ".device"


def commit() -> str:
    """The checked-out commit (``+dirty`` when tracked files changed): from git, else from ``.device/commit.txt``
    (written on the development machine by ``profiling/gpu_prep.sh``, since ``.git`` does not travel to the GPU
    machine), else ``"unknown"``."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=20)
        if head.returncode == 0 and head.stdout.strip():
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, cwd=ROOT, timeout=20,
            ).stdout.strip()  # fmt: skip
            return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    path = DEVICE_DIR / "commit.txt"
    if path.is_file() and path.read_text().split():
        return path.read_text().split()[0] + " (from .device/commit.txt)"
    return "unknown"
