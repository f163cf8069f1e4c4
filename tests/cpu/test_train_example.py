"""Smoke test of examples/train_tiny_lm.py: a few steps of each residual kind, metrics and plots written."""

from __future__ import annotations

import importlib.util
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
    spec = importlib.util.spec_from_file_location("train_tiny_lm", os.path.join(ROOT, "examples", "train_tiny_lm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_tiny_lm_smoke(tmp_path):
    ex = _load()
    argv = "--residual plain,hc,mhc --steps 3 --hidden 32 --blocks 2 --batch 2 --seq 16 --log-every 2 --recompute"
    summary = ex.main([*argv.split(), "--out", str(tmp_path)])
    for name in ("metrics.json", "loss.png", "composite_gain_depth.png", "composite_gain_steps.png"):
        assert (tmp_path / name).stat().st_size > 0
    results = json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert results.keys() == {"plain", "hc", "mhc"}
    for name, r in results.items():
        assert len(r["loss"]) == 3 and all(math.isfinite(v) for v in r["loss"])
        if name != "plain":
            d = r["final_diagnostics"]
            assert d["layers"] == 4 and r["gain_step"] == [0, 2]
            assert all(g > 0 for g in d["composite_forward"])
    # mHC's forward gains are 1 up to rounding (rows of a Sinkhorn output sum to 1); HC's start at exactly 1 (A_r = I)
    assert max(abs(g - 1) for g in results["mhc"]["final_diagnostics"]["single_forward"]) < 1e-5
    assert results["hc"]["composite_forward_max"][0] == 1.0
    assert summary["source_entropy_nats"] < math.log(3) + 1e-6


def test_hc_init_is_a_pre_norm_residual():
    ex = _load()
    import torch

    sub = torch.nn.Linear(8, 8)
    site = ex.HyperConnection(sub, 8, 4, layer_index=5)
    h = torch.randn(3, 4, 8)
    want = h + sub(h[:, 1]).unsqueeze(1)  # reads stream 5 % 4 = 1, writes F to every stream, H_res = I
    torch.testing.assert_close(site(h), want)


def test_help_text_is_a_whole_sentence(capsys):
    """--help used to end mid-sentence ('... the paper's stability')."""
    import pytest

    with pytest.raises(SystemExit):
        _load().main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the paper's stability claim" in text and "checked at toy scale, on the CPU." in text
