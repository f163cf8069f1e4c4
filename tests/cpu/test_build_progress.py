"""`python -m tl_kernels.build` shows progress whatever stderr is: a tqdm bar on a terminal, plain lines in a log."""

from __future__ import annotations

import io

from tl_kernels.tools import build


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_line_progress_prints_done_total_elapsed_and_eta():
    out, clock = io.StringIO(), _Clock()
    with build.LineProgress(40, "Compiling kernels", out, interval_s=20.0, clock=clock) as bar:
        for i in range(40):
            clock.t += 1.5  # 1.5 s per config
            bar.set_postfix_str(f"cfg{i}")
            bar.update()
    lines = out.getvalue().splitlines()
    assert lines[0] == "Compiling kernels: 40 configurations to build"
    assert lines[1] == "Compiling kernels: 2/40 (5%), 0:03 elapsed, ETA 0:57, last: cfg1"  # every 5%: 2 configs
    assert lines[-1] == "Compiling kernels: 40/40 (100%), 1:00 elapsed, last: cfg39"
    assert len(lines) == 1 + 20  # one line per 5%, none repeated at the end


def test_line_progress_prints_on_time_when_configs_are_slow():
    out, clock = io.StringIO(), _Clock()
    with build.LineProgress(1000, "Compiling kernels", out, interval_s=20.0, clock=clock) as bar:
        clock.t = 25.0
        bar.update()  # 1 of 1000 is far below a 5% step, but 25 s have passed
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("Compiling kernels: 1/1000 (0%), 0:25 elapsed, ETA 6:56:15")
    assert len(lines) == 2


def test_cli_asks_for_progress_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    seen = {}

    def fake_build(configs, **kw):
        seen.update(kw)
        return []

    monkeypatch.setattr(build, "build", fake_build)
    monkeypatch.setattr(build, "report", lambda results, **kw: {"ok": True, "summary": {}})
    monkeypatch.setattr(build, "summary_line", lambda summary: "summary")
    monkeypatch.setattr(build, "format_table", lambda results: "")
    assert build.main(["--family", "sinkhorn", "--jobs", "1"]) == 0  # pytest's captured stderr is no terminal
    assert seen["progress"] is True
    assert build.main(["--family", "sinkhorn", "--jobs", "1", "--quiet"]) == 0
    assert seen["progress"] is False


def test_progress_is_plain_lines_without_a_terminal():
    assert isinstance(build._progress(3, True, tty=False), build.LineProgress)
    bar = build._progress(3, True, tty=True)
    assert not isinstance(bar, build.LineProgress)
    bar.close()


def test_shipped_cache_entries_lists_every_config_from_the_manifest(tmp_path, monkeypatch):
    """What profiling/gpu_prep.sh packs: each shipped configuration's cache entry, relative to the cache; a missing
    one is an error that names the configuration."""
    import re

    import pytest

    from tl_kernels import registry

    cache, codegen_dir = tmp_path / "cache", tmp_path / "codegen"
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(cache))
    monkeypatch.setenv("MHC_CODEGEN_CACHE_DIR", str(codegen_dir))
    entries = {}
    for i, cfg in enumerate(registry.ALL_CONFIGS):
        path = cache / "0.1.15" / "linux-x86_64" / "kernels" / f"k{i}"
        path.mkdir(parents=True)
        entries[cfg.name] = {"cache_path": str(path)}
    build._save_manifest(build.manifest_fingerprint(), entries)
    got = build.shipped_cache_entries()
    assert got == [f"0.1.15/linux-x86_64/kernels/k{i}" for i in range(len(registry.ALL_CONFIGS))]
    (cache / "0.1.15" / "linux-x86_64" / "kernels" / "k3").rmdir()
    with pytest.raises(RuntimeError, match=re.escape(registry.ALL_CONFIGS[3].name)):
        build.shipped_cache_entries()
