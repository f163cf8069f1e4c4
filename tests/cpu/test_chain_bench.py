"""The fused-vs-unfused boundary benchmark (profiling/chain_bench.py) on the CPU: its skip without a GPU, the timed
calls on the CPU kernels at tiny shapes, the switch of the boundary kernels, the model's prediction beside each
record and the table. The timings themselves need a GPU (the GPU run's bench stage)."""

from __future__ import annotations

import pytest
import torch

from mhc import _cuda
from profiling import bench, chain_bench


def test_skips_without_a_gpu():
    records, notes = chain_bench.run(bench.host_bench, (64,), 8, (128,), 8, 4, torch.float32, "cpu")
    assert records == [] and len(notes) == 1 and "needs a CUDA GPU" in notes[0]


@pytest.mark.parametrize("was_off", [False, True])
def test_boundary_switch_restores_the_previous_state(was_off):
    saved = set(_cuda.DISABLED)
    try:
        (_cuda.disable_kernels if was_off else _cuda.enable_kernels)("boundary")
        for on in (True, False):
            with chain_bench.boundary_kernels(on):
                assert ("boundary" in _cuda.DISABLED) is (not on)
            assert ("boundary" in _cuda.DISABLED) is was_off
    finally:
        _cuda.DISABLED.clear()
        _cuda.DISABLED.update(saved)


@pytest.mark.parametrize(
    ("sublayer", "mode", "C"), [("identity", "fwd", 64), ("identity", "fwd+bwd", 64), ("identity", "decode", 64),
                                ("block", "fwd+bwd", 128)],
)  # fmt: skip
def test_measure_on_the_cpu_kernels(sublayer, mode, C):
    calls = []

    def timer(fn):
        calls.append(fn)
        fn()
        return bench.Timing(10.0 * len(calls), 9.0, 11.0, None)

    r = chain_bench.measure(timer, sublayer, "unfused", mode, 4, C, 8, torch.float32, "cpu")
    sites = 12 if sublayer == "identity" else chain_bench.BLOCK_SITES
    assert (r["sublayer"], r["variant"], r["mode"], r["C"], r["T"], r["sites"]) == (
        sublayer,
        "unfused",
        mode,
        C,
        8,
        sites,
    )
    assert r["us"] == 10.0 and r["us_per_site"] == pytest.approx(10.0 / sites) and r["model_us"] is None
    with pytest.raises(ValueError, match="variant must be one of"):
        chain_bench.measure(timer, sublayer, "both", mode, 4, C, 8, torch.float32, "cpu")


def test_fwd_bwd_step_makes_gradients():
    stack = chain_bench.build("identity", 3, 4, 64, "cpu", torch.float32)
    x = torch.randn(1, 8, 4, 64, requires_grad=True)
    chain_bench.step_fn(stack, x, torch.randn_like(x), "fwd+bwd")()
    assert x.grad is not None and all(p.grad is not None for p in stack.parameters())
    with pytest.raises(ValueError, match="mode must be"):
        chain_bench.step_fn(stack, x, x, "bwd")


def test_cases_cover_every_variant():
    """Every variant in the fwd+bwd modes; the cluster variant (backward only) not in the forward-only ones."""
    cases = chain_bench.cases((2560, 7168), 16384, (2560,), 4096)
    assert set(chain_bench.VARIANTS) == {"fused", "unfused", "fused_clusters"}
    assert len(cases) == 2 * (3 + 2 * (1 + len(chain_bench.DECODE_TOKENS))) + 3
    for sublayer, _, mode, C, T in cases:
        others = {v for s, v, m, c, t in cases if (s, m, c, t) == (sublayer, mode, C, T)}
        assert others == set(chain_bench.VARIANTS if mode == "fwd+bwd" else chain_bench.FORWARD_VARIANTS)


@pytest.mark.parametrize("variant", ["fused", "unfused", "fused_clusters"])
def test_variant_kernels_switch_and_restore(variant):
    """Each variant's boundary kernels and cluster setting inside the block, the previous state after it (also
    after an exception)."""
    saved, clusters = set(_cuda.DISABLED), _cuda.BOUNDARY_CLUSTERS
    try:
        _cuda.disable_kernels("boundary")
        _cuda.boundary_clusters(True)
        with pytest.raises(KeyError), chain_bench.variant_kernels(variant):
            assert ("boundary" in _cuda.DISABLED) is (variant == "unfused")
            assert _cuda.BOUNDARY_CLUSTERS is (variant == "fused_clusters")
            raise KeyError
        assert "boundary" in _cuda.DISABLED and _cuda.BOUNDARY_CLUSTERS is True
        with pytest.raises(ValueError, match="variant must be one of"), chain_bench.variant_kernels("clusters"):
            pass
    finally:
        _cuda.DISABLED.clear()
        _cuda.DISABLED.update(saved)
        _cuda.boundary_clusters(clusters)


def test_measure_the_cluster_variant_in_fwd_bwd_only():
    def timer(fn):
        fn()
        return bench.Timing(5.0, 4.0, 6.0, None)

    r = chain_bench.measure(timer, "identity", "fused_clusters", "fwd+bwd", 4, 64, 8, torch.float32, "cpu")
    assert (r["variant"], r["us"]) == ("fused_clusters", 5.0)
    with pytest.raises(ValueError, match="backward only"):
        chain_bench.measure(timer, "identity", "fused_clusters", "decode", 4, 64, 8, torch.float32, "cpu")


def test_annotate_puts_the_model_beside_each_record(monkeypatch):
    """On an H100 each record gets the model's µs for its stack (profiling.model.sites), at the run's bandwidth."""
    from profiling import model
    from profiling.model import sites

    monkeypatch.delenv(model.MODEL_ENV, raising=False)
    base = {"entry": "chain", "n": 4, "C": 2560, "sites": 12, "sublayer": "identity", "model_us": None}
    recs = [
        {**base, "variant": "fused", "mode": "fwd+bwd", "T": 16384},
        {**base, "variant": "unfused", "mode": "fwd", "T": 16384},
        {**base, "variant": "fused", "mode": "decode", "T": 8},
        {**base, "variant": "fused_clusters", "mode": "fwd+bwd", "T": 16384},
    ]
    result = {"meta": {"dtype": "bfloat16", "copy_GBps": 2900.0}, "chain": recs}
    assert not chain_bench.annotate(result, gpu="NVIDIA A100")  # not a modelled GPU
    assert chain_bench.annotate(result, gpu="NVIDIA H100 80GB HBM3")
    fused = sites.predict_stack(4, 2560, "bfloat16", 16384, "H100", True, copy_gbps=2900.0)
    unfused = sites.predict_stack(4, 2560, "bfloat16", 16384, "H100", False, copy_gbps=2900.0)
    decode = sites.predict_site("site_fwd", 4, 2560, "bfloat16", 8, "H100", copy_gbps=2900.0)
    assert recs[0]["model_us"] == pytest.approx(fused["fwd"] + fused["bwd"])
    assert recs[1]["model_us"] == pytest.approx(unfused["fwd"])
    assert recs[2]["model_us"] == pytest.approx(12 * decode["t_site_eager_us"])
    assert fused["fwd"] < unfused["fwd"] and fused["bwd"] < unfused["bwd"]  # the fusion saves bytes and launches
    clustered = sites.predict_stack(4, 2560, "bfloat16", 16384, "H100", True, copy_gbps=2900.0, clusters=True)
    assert recs[3]["model_us"] == pytest.approx(clustered["fwd"] + clustered["bwd"])
    # the same forward; the backward differs (the clustered fused backward is another kernel)
    assert clustered["fwd"] == pytest.approx(fused["fwd"]) and clustered["bwd"] != pytest.approx(fused["bwd"])
    lines = "\n".join(chain_bench.markdown(recs, ["a note"]))
    assert "| identity | fwd+bwd | 2560 | 16384 | 12 |" in lines and "- a note" in lines
    row = next(line for line in lines.splitlines() if line.startswith("| identity | fwd+bwd |"))
    assert f"| {recs[3]['model_us']:.1f} |" in row  # the cluster variant's model column
    monkeypatch.setenv(model.MODEL_ENV, "0")
    assert not chain_bench.annotate(result, gpu="NVIDIA H100 80GB HBM3")
