"""``make bench`` on a CPU (the mode CI runs), the byte model's floors, bench-compare's logic on synthetic results
and the optional third-party baselines (skip path, and the adapters against fake modules with the documented APIs)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from mhc import reference as ref
from profiling import __main__ as front
from profiling import baselines, bench, block, bytemodel, compare


def test_make_bench_cpu_mode_says_so_prints_floors_and_runs_the_harness(tmp_path, capsys):
    """What `make bench` does without a GPU: a plain statement, the H100/H200 floor tables with the 90% assumption
    named, then the harness on the CPU kernels (kernels, block, baselines' skip notes, three plots)."""
    assert front.main(["bench", "--device", "cpu", "--no-cupti", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no GPU timings are made" in out and "ASSUMPTION" in out
    assert "**H100 SXM**: nominal 3.35 TB/s" in out and "**H200**: nominal 4.80 TB/s" in out
    result = json.loads((tmp_path / "bench.json").read_text())
    meta = result["meta"]
    assert {"device", "driver", "torch", "tilelang", "commit", "date", "copy_GBps"} <= set(meta)
    assert {(r["op"], r["mode"]) for r in result["records"]} >= {("post_res", "fwd"), ("pre_mapping", "bwd")}
    for r in result["records"]:
        assert r["floor_us"] > 0 and r["x_floor"] == pytest.approx(r["us"] / r["floor_us"])
        assert r["bytes"] == bytemodel.op_bytes(r["op"], r["mode"], r["T"], r["n"], r["C"], 2)
    variants = {r["variant"] for r in result["block"]}
    assert {"plain", "mhc", "mhc-no-stream"} <= variants
    mhc_row = next(r for r in result["block"] if r["variant"] == "mhc")
    assert mhc_row["overhead_pct"] is not None and mhc_row["floor_overhead_pct"] > 0
    if "mhc-recompute" not in variants:
        assert any("mhc-recompute" in note and "skipped" in note for note in result["block_notes"])
    for name in ("tilekernels", "liger"):
        if not meta["baselines"][name]["available"]:
            assert "not importable" in meta["baselines"][name]["note"]
    md = (tmp_path / "bench.md").read_text()
    assert "| post_res | fwd |" in md and "## Transformer block" in md and "## Baselines" in md
    for png in ("bench.png", "alternatives.png", "block.png"):
        assert (tmp_path / png).stat().st_size > 0


def test_floors_match_the_spec_table():
    """Spec §6.2 (nominal H100 3.35 TB/s): post fwd 113 µs and post bwd 176 µs at C=2560, T=8192; H200 post fwd
    79 µs; C=7168, T=16384 post fwd 631 µs."""
    h100, h200 = bytemodel.NOMINAL_GBPS["H100 SXM"], bytemodel.NOMINAL_GBPS["H200"]
    f = bytemodel.floor_us
    assert f(bytemodel.post_res_bytes(8192, 4, 2560, 2, "fwd"), h100) == pytest.approx(113, abs=1)
    assert f(bytemodel.post_res_bytes(8192, 4, 2560, 2, "bwd"), h100) == pytest.approx(176, abs=1)
    assert f(bytemodel.post_res_bytes(8192, 4, 2560, 2, "fwd"), h200) == pytest.approx(79, abs=1)
    assert f(bytemodel.post_res_bytes(16384, 4, 7168, 2, "fwd"), h100) == pytest.approx(631, abs=1)
    assert bytemodel.residual_add_bytes(1, 7168, 2, "fwd") == 6 * 7168  # "a plain residual add costs 6C"
    extra = bytemodel.block_extra_bytes(1, 4, 2560, 2)
    assert extra == 2 * (bytemodel.site_bytes(1, 4, 2560, 2, "fwd+bwd") - 12 * 2560)
    assert bench.post_res_bytes is bytemodel.post_res_bytes  # one byte model


def _result(device, records, blocks=()):
    return {"meta": {"device": device}, "records": list(records), "block": list(blocks)}


def _rec(op, C, us, kernel_us=None):
    return {"op": op, "mode": "fwd", "n": 4, "T": 16384, "C": C, "us": us, "kernel_us": kernel_us}


def test_bench_compare_flags_slowdowns_over_10_percent(tmp_path, capsys):
    base = _result("H100", [_rec("post_res", 2560, 100.0, 90.0), _rec("post_res", 4096, 100.0),
                            _rec("sinkhorn", 0, 10.0), _rec("pre_mapping", 2560, 50.0)],
                   [{"variant": "mhc", "n": 4, "T": 4096, "C": 2560, "us": 1000.0}])  # fmt: skip
    cur = _result("H100", [_rec("post_res", 2560, 100.0, 100.0), _rec("post_res", 4096, 105.0),
                           _rec("sinkhorn", 0, 7.0), _rec("post_res", 7168, 1.0)],
                  [{"variant": "mhc", "n": 4, "T": 4096, "C": 2560, "us": 1200.0}])  # fmt: skip
    report = compare.compare(base, cur)
    slower = {c.key[1] + str(c.key[-1]): c for c in report["slower"]}
    # the CUPTI kernel time wins over the median when both runs have it: 90 -> 100 is +11%
    assert set(slower) == {"post_resC=2560", "mhcC=2560"} and slower["post_resC=2560"].metric == "kernel_us"
    assert [c.key[1] for c in report["faster"]] == ["sinkhorn"] and report["same"] == 1
    assert len(report["only_baseline"]) == 1 and len(report["only_current"]) == 1
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "bench.json").write_text(json.dumps(base))
    (tmp_path / "cur.json").write_text(json.dumps(cur))
    assert compare.main_compare(tmp_path / "base", tmp_path / "cur.json") == 1
    text = capsys.readouterr().out
    assert text.count("FLAG") == 2 and "+20.0%" in text
    (tmp_path / "same.json").write_text(json.dumps(base))
    assert compare.main_compare(tmp_path / "base", tmp_path / "same.json") == 0
    assert compare.main_compare(tmp_path / "missing", tmp_path / "same.json") == 2
    with pytest.raises(ValueError, match="not comparable"):
        compare.compare(base, _result("H200", []))
    assert front.main(["compare", "--baseline", str(tmp_path / "base"), "--current", str(tmp_path / "cur.json")]) == 1


# ---------------------------------------------------------------------------------------------------- baselines


def test_absent_baselines_are_skipped_with_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "tile_kernels", None)  # import fails like an absent package
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    for b in baselines.load_all():
        assert not b.available and "not importable" in b.note
        assert b.case("post_res", "fwd", {}) is None


def _inputs(T=6, n=4, C=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, n, C, generator=g)
    return {"y": torch.randn(T, C, generator=g), "x": x, "h_post": torch.rand(T, n, generator=g) * 2,
            "h_res": ref.sinkhorn(torch.randn(T, n, n, generator=g)), "grad": torch.randn(T, n, C, generator=g),
            "L": torch.randn(T, n, n, generator=g) * 2, "gL": torch.randn(T, n, n, generator=g), "iters": 20}  # fmt: skip


def _fake_tile_kernels(transpose=True):
    """TileKernels' documented conventions in plain torch: [S, T, ...] tensors, post_layer_mix [..., n, 1], comb the
    transpose of h_res, in-place outputs for Sinkhorn."""
    mod = types.ModuleType("tile_kernels")
    mod.__version__ = "2.1.0-fake"

    def mhc_post_fwd(x, residual, post_layer_mix, comb_res_mix, out=None):
        comb = comb_res_mix.transpose(-1, -2) if transpose else comb_res_mix
        y = ref.post_res(x.flatten(0, 1), residual.flatten(0, 1), post_layer_mix.flatten(0, 1)[..., 0],
                         comb.flatten(0, 1))  # fmt: skip
        out.copy_(y.view_as(out))
        return out

    def mhc_sinkhorn_fwd(comb_res_mix, comb_res_mix_out, repeat, eps):
        comb_res_mix_out.copy_(ref.sinkhorn(comb_res_mix.transpose(-1, -2), repeat, eps).transpose(-1, -2))

    def mhc_sinkhorn_bwd(grad_output, x, grad_input, repeat, eps, token_block_size):  # an unknown required parameter
        raise AssertionError("never called")

    mod.mhc_post_fwd, mod.mhc_sinkhorn_fwd, mod.mhc_sinkhorn_bwd = mhc_post_fwd, mhc_sinkhorn_fwd, mhc_sinkhorn_bwd
    return mod


def test_tilekernels_adapter_bridges_the_conventions(monkeypatch):
    monkeypatch.setitem(sys.modules, "tile_kernels", _fake_tile_kernels())
    (tk,) = baselines.load_all(("tilekernels",))
    assert tk.available and "2.1.0-fake" in tk.note
    d = _inputs()
    assert callable(tk.case("post_res", "fwd", d)) and callable(tk.case("sinkhorn", "fwd", d))
    assert tk.case("sinkhorn", "bwd", d) is None and "'token_block_size'" in tk.notes[("sinkhorn", "bwd")]
    assert tk.case("post_res", "bwd", d) is None and "mhc_post_bwd" in tk.notes[("post_res", "bwd")]
    assert tk.case("pre_mapping", "fwd", d) is None


def test_a_baseline_that_disagrees_with_the_reference_is_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "tile_kernels", _fake_tile_kernels(transpose=False))
    (tk,) = baselines.load_all(("tilekernels",))
    assert tk.case("post_res", "fwd", _inputs()) is None
    assert "disagrees with the reference" in tk.notes[("post_res", "fwd")]


def test_liger_adapter_against_its_documented_api(monkeypatch):
    pkg, ops, mod = (types.ModuleType(name) for name in ("liger_kernel", "liger_kernel.ops", "liger_kernel.ops.mhc"))

    def mhc_post_res_fwd(x, f_out, h_post, h_res, *, out=None, block_n=None):
        out.copy_(ref.post_res(f_out, x, h_post, h_res))
        return out

    def mhc_split_sinkhorn_fwd(mix, b, alpha_pre, alpha_post, alpha_res, *, tmax, pre_eps, sinkhorn_eps, post_mult):
        n = 4
        logits = (mix[:, 2 * n :] * alpha_res + b[2 * n :]).view(-1, n, n)
        h = ref.sinkhorn(logits.transpose(-1, -2), tmax, sinkhorn_eps).transpose(-1, -2)
        return torch.sigmoid(mix[:, :n]), 2 * torch.sigmoid(mix[:, n : 2 * n]), h

    mod.mhc_post_res_fwd, mod.mhc_split_sinkhorn_fwd = mhc_post_res_fwd, mhc_split_sinkhorn_fwd
    pkg.ops, ops.mhc = ops, mod
    for name, m in (("liger_kernel", pkg), ("liger_kernel.ops", ops), ("liger_kernel.ops.mhc", mod)):
        monkeypatch.setitem(sys.modules, name, m)
    (lg,) = baselines.load_all(("liger",))
    d = _inputs()
    assert lg.available and callable(lg.case("post_res", "fwd", d)) and callable(lg.case("sinkhorn", "fwd", d))
    assert lg.case("sinkhorn", "bwd", d) is None and "mhc_sinkhorn_bwd" in lg.notes[("sinkhorn", "bwd")]


def test_bench_times_an_importable_baseline_and_reports_the_speedup(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tile_kernels", _fake_tile_kernels())
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    assert bench.main(["--device", "cpu", "--quick", "--no-compile", "--no-block", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    post = next(r for r in result["records"] if r["op"] == "post_res" and r["mode"] == "fwd")
    assert post["tilekernels_us"] > 0 and post["speedup_tilekernels"] == pytest.approx(
        post["tilekernels_us"] / post["us"]
    )
    assert any("mhc_post_bwd" in note for note in result["meta"]["baseline_skips"])
    assert "TileKernels" in (tmp_path / "bench.md").read_text()


def test_recompute_variant_is_an_mhc_stack_with_the_plain_gradients():
    torch.manual_seed(0)
    model = block.build("mhc-recompute", 64, 4, 1, "cpu", torch.float32)
    assert isinstance(model, block.mhc.MHCStack) and model.recompute_block == 2
    x = torch.randn(2, 8, 4, 64, requires_grad=True)
    model(x).square().sum().backward()
    want = x.grad.clone()
    x.grad = None
    model.recompute_block = 0
    model(x).square().sum().backward()
    torch.testing.assert_close(x.grad, want, rtol=1e-6, atol=1e-6)


def test_recompute_variant_is_optional(monkeypatch):
    for name in block.RECOMPUTE_NAMES:
        monkeypatch.delattr(block.mhc, name, raising=False)
    with pytest.raises(NotImplementedError, match="recompute"):
        block.build("mhc-recompute", 64, 4, 1, "cpu", torch.float32)


def test_docs_floor_excerpt_is_the_byte_model():
    """docs/benchmarks.md quotes `python -m profiling floors`: every number there must be what the model gives."""
    import pathlib

    text = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md").read_text()
    gpus = {"H100": "H100 SXM", "H200": "H200"}
    labels = ["pre fwd", "post fwd", "pre bwd", "post bwd", "site fwd+bwd", "plain add fwd+bwd"]
    checked = 0
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[0] in gpus:
            gbps = bytemodel.NOMINAL_GBPS[gpus[cells[0]]] * bytemodel.ACHIEVABLE
            C, T = int(cells[1]), int(cells[2])
            row = bytemodel.floor_rows(gbps, hidden=(C,), tokens=(T,))[0]
            assert [float(c) for c in cells[3:]] == [round(row[k], 1) for k in labels], line
            checked += 1
    assert checked >= 4
