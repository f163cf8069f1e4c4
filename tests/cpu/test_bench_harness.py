"""The benchmark harness runs end to end on a CPU (dry run) and writes its three reports."""

from __future__ import annotations

import json

import pytest

from profiling import bench


@pytest.mark.slow
def test_bench_dry_run_writes_reports(tmp_path):
    assert bench.main(["--device", "cpu", "--quick", "--no-compile", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    ops = {(r["op"], r["mode"]) for r in result["records"]}
    assert ops == {("post_res", "fwd"), ("post_res", "bwd"), ("sinkhorn", "fwd"), ("sinkhorn", "bwd"),
                   ("sinkhorn", "fwd+bwd")}  # fmt: skip
    assert all(r["us"] > 0 and r["GBps"] > 0 for r in result["records"])
    assert result["meta"]["copy_GBps"] > 0 and result["meta"]["commit"]
    assert "| post_res | fwd |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_byte_model_matches_spec_table():
    """Spec §6.2 (bf16, n=4): post fwd 18C + 80 B per token, post bwd 28C + 160 B."""
    C = 7168
    assert bench.post_res_bytes(1, 4, C, 2, "fwd") == 18 * C + 80
    assert bench.post_res_bytes(1, 4, C, 2, "bwd") == 28 * C + 160
