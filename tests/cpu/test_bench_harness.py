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
                   ("sinkhorn", "fwd+bwd"), ("pre_mapping", "fwd"), ("pre_mapping", "bwd")}  # fmt: skip
    assert all(r["us"] > 0 and r["GBps"] > 0 for r in result["records"])
    assert result["meta"]["copy_GBps"] > 0 and result["meta"]["commit"]
    assert "| post_res | fwd |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_byte_model_matches_spec_table():
    """Spec §6.2 (bf16, n=4): post fwd 18C + 80 B per token, post bwd 28C + 160 B."""
    C = 7168
    assert bench.post_res_bytes(1, 4, C, 2, "fwd") == 18 * C + 80
    assert bench.post_res_bytes(1, 4, C, 2, "bwd") == 28 * C + 160


def test_pre_mapping_byte_model_is_the_two_read_design():
    """Issue 8's byte counts (bf16, n=4): forward 18C per token (8C projection + 10C F_pre), backward 28C (two
    passes over x and g_li, one write of d_x), plus a few hundred bytes of coefficients, independent of C."""
    for C in (2560, 7168):
        fwd, bwd = bench.pre_mapping_bytes(1, 4, C, 2, "fwd"), bench.pre_mapping_bytes(1, 4, C, 2, "bwd")
        assert 18 * C < fwd < 18 * C + 640
        assert 28 * C < bwd < 28 * C + 640


class _FakeDoBench:
    """TileLang 0.1.15's ``do_bench`` return conventions (read from tilelang/profiler/bench.py): the event backend
    returns a list for several quantiles; the CUPTI backend ignores ``quantiles`` and returns one float. Times in ms."""

    def __init__(self, event_ms=(0.010, 0.012, 0.015), cupti_ms=0.009):
        self.event_ms, self.cupti_ms, self.calls = list(event_ms), cupti_ms, []

    def __call__(self, fn, warmup=25, rep=100, quantiles=None, backend="event", return_mode="mean", **kw):
        fn()
        self.calls.append((backend, quantiles, return_mode))
        if backend == "cupti":
            return self.cupti_ms
        assert backend == "event"
        return self.event_ms if quantiles and len(quantiles) > 1 else self.event_ms[1]


def test_cuda_timer_reads_percentiles_from_events_and_kernel_time_from_cupti():
    fake = _FakeDoBench()
    bench_fn, how = bench.make_timer("cuda", do_bench=fake)
    calls = []
    t = bench_fn(lambda: calls.append(1))
    assert t.us == pytest.approx(12.0) and t.p20_us == pytest.approx(10.0) and t.p80_us == pytest.approx(15.0)
    assert t.kernel_us == pytest.approx(9.0)
    assert [c[0] for c in fake.calls] == ["event", "cupti"] and fake.calls[0][1] == [0.2, 0.5, 0.8]
    assert calls and "CUPTI" in how


def test_cuda_timer_survives_a_single_float_for_quantiles():
    """A backend that answers a quantile request with one number (as 0.1.15's CUPTI does) gives the median alone."""

    def one_float(fn, **kw):
        fn()
        return 0.02

    t = bench.make_timer("cuda", do_bench=one_float, cupti=False)[0](lambda: None)
    assert t == bench.Timing(20.0, None, None, None)
    with pytest.raises(ValueError, match="2 quantiles, expected 3"):
        bench.make_timer("cuda", do_bench=lambda fn, **kw: [1.0, 2.0], cupti=False)[0](lambda: None)


def test_standin_follows_tilelang_conventions():
    assert isinstance(bench.standin_do_bench(lambda: None, backend="cupti", quantiles=[0.2, 0.5, 0.8]), float)
    q = bench.standin_do_bench(lambda: None, backend="event", quantiles=[0.2, 0.5, 0.8])
    assert isinstance(q, list) and len(q) == 3 and q[0] <= q[1] <= q[2]


def test_cuda_timing_path_end_to_end_with_standin(tmp_path):
    """The CUDA branch of the harness (stand-in device timer, CPU tensors): rows carry p20/p80 and a kernel time."""
    assert bench.main(["--device", "cpu", "--quick", "--no-compile", "--timer", "standin", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["meta"]["timer"].startswith("STAND-IN")
    timed = [r for r in result["records"] if r["mode"] != "fwd+bwd"]
    assert all(r["p20_us"] <= r["us"] <= r["p80_us"] and r["kernel_us"] > 0 for r in timed)


def test_accumulate_byte_model_saves_the_separate_sum():
    """The site-level saving of pre_proj_bwd(accumulate=True): autograd's separate sum reads two [T, n, C] gradients
    and writes one; accumulating reads only the given one: 2nC elements a token less (16C bytes at n=4, bf16)."""
    C = 4096
    separate = bench.bytemodel.residual_grad_bytes(1, 4, C, 2, "separate")
    accumulate = bench.bytemodel.residual_grad_bytes(1, 4, C, 2, "accumulate")
    assert separate - accumulate == 16 * C and accumulate == 26 * C
