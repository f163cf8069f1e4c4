"""The CPU side of ``make bench``: a host-clock timer that repeats enough to report a spread, a warning when the
spread is too wide to mean anything, a table legend that names the clock actually used, and a whole --help text."""

from __future__ import annotations

import itertools

import pytest

from profiling import bench


class _FakeClock:
    """Every call of the timed function takes the next duration in ``durations_s``."""

    def __init__(self, durations_s):
        self.t = 0.0
        self.durations = itertools.cycle(durations_s)

    def __call__(self):
        return self.t

    def tick(self):
        self.t += next(self.durations)


def test_host_bench_repeats_until_calls_and_time_suffice():
    clock = _FakeClock([5e-3])
    t = bench.host_bench(clock.tick, clock=clock)
    assert t.us == pytest.approx(5000.0) and t.p20_us == pytest.approx(5000.0) and t.p80_us == pytest.approx(5000.0)
    assert clock.t == pytest.approx(5e-3 + bench.CPU_MIN_S, rel=0.03)  # warm-up + 0.2 s of calls (40 calls)
    fast = _FakeClock([1e-4])
    bench.host_bench(fast.tick, clock=fast)
    assert fast.t == pytest.approx(1e-4 * (1 + bench.CPU_MAX_CALLS))  # capped
    slow = _FakeClock([1.0])
    bench.host_bench(slow.tick, clock=slow)
    assert slow.t == pytest.approx(1.0 * (1 + bench.CPU_MIN_CALLS))  # slow calls: the minimum count only


def test_a_wide_spread_is_flagged_and_a_narrow_one_is_not():
    noisy = _FakeClock([1e-3, 1e-3, 30e-3, 2e-3, 1e-3, 9e-3, 1e-3])  # a loaded machine: 30x swings
    t = bench.host_bench(noisy.tick, clock=noisy)
    rec = {"op": "post_res", "mode": "fwd", "us": t.us, "p20_us": t.p20_us, "p80_us": t.p80_us}
    calm = {"op": "sinkhorn", "mode": "fwd", "us": 10.0, "p20_us": 9.5, "p80_us": 11.0}
    assert bench.unstable([rec, calm]) == [rec]
    result = {"meta": {"loadavg": 5.0}, "records": [rec, calm], "block": []}
    text = bench.noise_warning(result)
    assert text.startswith("**Unstable timings**: 1 of 2 records") and "load average 5.0" in text
    assert bench.noise_warning({"meta": {}, "records": [calm], "block": []}) is None


def test_legend_names_the_clock():
    _, how = bench.make_timer("cpu")
    assert "host clock" in bench._time_legend(how) and "CUDA events" not in bench._time_legend(how)
    assert "CUDA events, L2 flushed" in bench._time_legend("tilelang do_bench: CUDA events per call")


def test_help_text_is_a_whole_sentence(capsys):
    with pytest.raises(SystemExit):
        bench.parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "percent of the device's measured copy bandwidth and time against the floor" in text
    assert "(:mod:`profiling.block`)" in text or "Transformer-block overhead" in text
