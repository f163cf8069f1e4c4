"""bench-compare with nothing to compare says so and exits 2, as docs/benchmarks.md states (it used to exit 0 on a
machine without a GPU)."""

from __future__ import annotations

import json

import pytest
import torch

from profiling import __main__ as front
from profiling import compare


def _run(device, records):
    return {"meta": {"device": device}, "records": records, "block": []}


def _rec(op, us):
    return {"op": op, "mode": "fwd", "n": 4, "T": 16, "C": 64, "us": us}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_compare_without_a_gpu_exits_2_and_says_why(capsys):
    assert front.main(["compare"]) == 2
    assert "no CUDA GPU on this machine" in capsys.readouterr().out


def test_compare_of_runs_without_a_common_record_exits_2(tmp_path, capsys):
    (tmp_path / "base.json").write_text(json.dumps(_run("H100", [_rec("a", 10.0)])))
    (tmp_path / "cur.json").write_text(json.dumps(_run("H100", [_rec("b", 10.0)])))
    assert compare.main_compare(tmp_path / "base.json", tmp_path / "cur.json") == 2
    assert "nothing was compared" in capsys.readouterr().out
    (tmp_path / "cur.json").write_text(json.dumps(_run("H100", [_rec("a", 10.5)])))
    assert compare.main_compare(tmp_path / "base.json", tmp_path / "cur.json") == 0


def test_docs_state_the_exit_status():
    import pathlib

    text = " ".join((pathlib.Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md").read_text().split())
    assert "It exits 2, saying why on one line, when there is nothing to compare" in text
