"""Paper-style kernel timings for the mHC ops: microseconds, achieved GB/s, percent of the device's measured copy
bandwidth and time against the floor ``bytes / copy bandwidth``, for our kernels beside PyTorch eager and
``torch.compile`` of the reference and, when they import, TileKernels and Liger (:mod:`profiling.baselines`); plus
the Transformer-block overhead (:mod:`profiling.block`). ``python -m profiling`` (``make bench``) is the front end.

    python -m profiling.bench                        # full sweep on the local GPU, results under profiling/results/<gpu>/
    python -m profiling.bench --quick                # the target shapes (T=16384) and the block at C=2560, 4096
    python -m profiling.bench --n-sweep 2 6 8        # also other stream counts (quick shapes)
    python -m profiling.bench --device cpu --quick   # dry run of the harness on a CPU (host timer, tiny shapes)
    python -m profiling.bench --device cpu --quick --timer standin   # the CUDA timing code, stand-in timer

Timer (:func:`make_timer`): TileLang's ``do_bench`` with the CUDA-event backend (L2 flushed before every call,
256 MB, 25 ms warm-up, 200 ms of repetitions), reporting the median and the 20th/80th percentiles of the per-call
times, then its CUPTI backend for the mean kernel time alone (``kernel_us``; TileLang 0.1.15's CUPTI backend
returns one float and ignores ``quantiles``). On a CPU the host clock (:func:`host_bench`: at least 7 calls and
0.2 s per measurement), and records whose p20-p80 range is wider than half their median are flagged as noise in
``bench.md`` and on stderr (:func:`noise_warning`). Bytes come from the one byte model, :mod:`profiling.bytemodel`
(``docs/spec.md`` §10: every input read once, every output written once).

The copy bandwidth is measured on the device (a 1 GiB bf16 ``copy_``, read + write), so "% copy" is the fraction of
what this GPU can actually move, not of a datasheet number, and ``floor_us`` = bytes / that bandwidth
(TransformerEngine's t_min). Targets from the kernel issue (H100, n=4): post_res forward and backward at least 85%
of copy bandwidth at T=16384 for C in {2560, 4096, 7168}; Sinkhorn forward + backward at T=16384, 20 iterations,
under 15 µs.

Outputs (``--out``, default ``profiling/results/<gpu>/``): ``bench.json`` (meta: device, driver, torch, tilelang,
commit, date, timer, copy bandwidth, baseline notes; one record per op, mode and shape; ``block`` records),
``bench.md`` (tables), ``bench.png`` (bandwidth against T per kernel), ``alternatives.png`` (time against the
alternatives), ``block.png`` (block overhead per C).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import pathlib
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

import torch

import mhc
from mhc import reference as ref
from profiling import baselines as third_party
from profiling import block as block_bench
from profiling import bytemodel, chain_bench, model, provenance
from profiling.bytemodel import post_res_bytes, pre_mapping_bytes, sinkhorn_bytes  # noqa: F401 (the harness API)

ROOT = pathlib.Path(__file__).resolve().parents[1]
ITERS = 20


# ---------------------------------------------------------------------------------------------------- timing

QUANTILES = (0.2, 0.5, 0.8)


class Timing(NamedTuple):
    """One measurement in microseconds: median and 20th/80th percentiles of the per-call times, and the mean kernel
    time reported by CUPTI (``None`` where not measured)."""

    us: float
    p20_us: float | None
    p80_us: float | None
    kernel_us: float | None = None


def _quantiles_ms(result, k: int) -> list[float] | None:
    """``do_bench``'s answer to a request for ``k`` quantiles: a list of ``k`` floats, or ``None`` when it returned a
    single float (TileLang 0.1.15's CUPTI backend ignores ``quantiles``; a future one might again)."""
    if isinstance(result, (list, tuple)):
        if len(result) != k:
            raise ValueError(f"do_bench returned {len(result)} quantiles, expected {k}")
        return [float(v) for v in result]
    if isinstance(result, (int, float)):
        return None
    raise TypeError(f"do_bench returned {type(result).__name__}, expected a float or a list of floats")


def make_timer(device: str, do_bench=None, *, cupti: bool = True):
    """Returns ``(bench, description)``; ``bench(fn) -> Timing``.

    ``device == "cuda"``: TileLang's ``do_bench`` (or the ``do_bench`` given, a stand-in with the same signature for
    dry runs and tests) with the CUDA-event backend, L2 flushed before every call, asked for the 20/50/80th
    percentiles; then, when ``cupti``, its CUPTI backend for the mean kernel time alone (no launch or event overhead;
    in TileLang 0.1.15 that backend ignores ``quantiles`` and returns one float). Otherwise the host clock.
    """
    if device == "cuda":
        if do_bench is None:
            from tilelang.profiler import do_bench

        def bench(fn) -> Timing:
            raw = do_bench(fn, warmup=25, rep=200, backend="event", quantiles=list(QUANTILES), return_mode="median")
            q = _quantiles_ms(raw, len(QUANTILES))
            if q is None:  # a single number: the median alone
                med, p20, p80 = float(raw) * 1e3, None, None
            else:
                med, p20, p80 = q[1] * 1e3, q[0] * 1e3, q[2] * 1e3
            kernel = None
            if cupti:
                k = do_bench(fn, warmup=25, rep=200, backend="cupti")
                kq = _quantiles_ms(k, 1) if isinstance(k, (list, tuple)) else None
                kernel = (kq[0] if kq else float(k)) * 1e3
            return Timing(med, p20, p80, kernel)

        how = "tilelang do_bench: CUDA events per call, L2 flushed (256 MB), median [p20, p80]"
        return bench, how + ("; CUPTI mean kernel time" if cupti else "")

    return host_bench, (
        f"host clock (CPU dry run): median [p20, p80] of {CPU_MIN_CALLS}-{CPU_MAX_CALLS} calls (at least "
        f"{CPU_MIN_S:g} s) after one warm-up call"
    )


#: the host-clock timer's repetitions: at least CPU_MIN_CALLS calls and CPU_MIN_S seconds, at most CPU_MAX_CALLS
CPU_MIN_CALLS, CPU_MAX_CALLS, CPU_MIN_S = 7, 100, 0.2
#: a record whose p20-p80 range is wider than this fraction of its median is flagged as noise (:func:`unstable`)
UNSTABLE_SPREAD = 0.5


def host_bench(fn, clock=time.perf_counter) -> Timing:
    """The host-clock timer of CPU runs: one warm-up call, then calls until both :data:`CPU_MIN_CALLS` calls and
    :data:`CPU_MIN_S` seconds are reached (at most :data:`CPU_MAX_CALLS`); median and 20th/80th percentiles. On a
    busy machine single calls swing by an order of magnitude, so a handful of calls is not enough; the spread shows
    how far the median can be trusted (:func:`unstable`)."""
    fn()
    ts: list[float] = []
    start = clock()
    while len(ts) < CPU_MAX_CALLS and (len(ts) < CPU_MIN_CALLS or clock() - start < CPU_MIN_S):
        t0 = clock()
        fn()
        ts.append((clock() - t0) * 1e6)
    ts.sort()
    q = statistics.quantiles(ts, n=5, method="inclusive")  # 20th, 40th, 60th, 80th percentiles
    return Timing(statistics.median(ts), q[0], q[3])


def spread(record: dict) -> float | None:
    """``(p80 - p20) / median`` of a record, ``None`` without percentiles."""
    if record.get("p20_us") is None or record.get("p80_us") is None or not record.get("us"):
        return None
    return (record["p80_us"] - record["p20_us"]) / record["us"]


def unstable(records: list[dict], limit: float = UNSTABLE_SPREAD) -> list[dict]:
    """The records whose p20-p80 range exceeds ``limit`` times their median: too noisy to mean anything."""
    return [r for r in records if (s := spread(r)) is not None and s > limit]


def noise_warning(result: dict) -> str | None:
    """One paragraph naming how many records are too noisy, with the machine's load, or ``None``."""
    records = [*result.get("records", []), *result.get("block", [])]
    bad = unstable(records)
    if not bad:
        return None
    worst = max(bad, key=spread)
    load = result["meta"].get("loadavg")
    where = f" (load average {load:.1f} on {os.cpu_count()} cores)" if load is not None else ""
    name = worst.get("op") or worst.get("variant")
    return (
        f"**Unstable timings**: {len(bad)} of {len(records)} records have a p20-p80 range wider than "
        f"{UNSTABLE_SPREAD:.0%} of their median (worst: {name} {worst.get('mode', '')}, "
        f"{spread(worst):.0%}){where}. The machine is busy or the calls are too short to time: treat those numbers "
        "as noise and rerun on an idle machine."
    )


def standin_do_bench(fn, warmup=25, rep=100, quantiles=None, backend="event", return_mode="mean", **_):
    """A host-clock stand-in for ``tilelang.profiler.do_bench`` with TileLang 0.1.15's return conventions, so the
    CUDA timing path runs on a machine without a GPU: milliseconds; ``backend="cupti"`` returns one float whatever
    ``quantiles`` says; the event backend returns a list for two or more quantiles, one float for one or none."""
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if backend == "cupti":
        return statistics.fmean(times)
    if backend != "event":
        raise ValueError(f"stand-in do_bench: unsupported backend {backend!r}")
    if quantiles is not None:
        values = torch.quantile(
            torch.tensor(times, dtype=torch.float64), torch.tensor(list(quantiles), dtype=torch.float64)
        )
        values = values.tolist()
        return values[0] if len(values) == 1 else values
    return {"mean": statistics.fmean, "median": statistics.median, "min": min, "max": max}[return_mode](times)


def copy_bandwidth_gbs(device: str, bench) -> float:
    numel = (1 << 29) if device == "cuda" else (1 << 22)
    a = torch.randn(numel, device=device).to(torch.bfloat16)
    b = torch.empty_like(a)
    us = bench(lambda: b.copy_(a)).us
    return 2 * a.numel() * a.element_size() / (us * 1e-6) / 1e9


# ---------------------------------------------------------------------------------------------------- workloads


def pre_mapping_cases(T, n, C, dtype, device):
    """``{mode: (ours, eager reference, reference builder)}``, the call arguments of each mode's reference."""
    g = torch.Generator(device=device).manual_seed(T + C + 1)
    m, K = n * n + 2 * n, n * C
    x = _randn(g, T, n, C, dtype=dtype)
    phi = _randn(g, K, m) / K**0.5
    alpha = torch.tensor([0.7, 0.5, 1.2], device=device)
    bias = _randn(g, m) * 0.5
    fwd_args = (x, phi, alpha, bias, ITERS, 2.0, 1e-6, 0.0)
    out = torch.ops.mhc.pre_mapping_fwd(*fwd_args)
    grads = (_randn(g, T, C, dtype=dtype), _randn(g, T, n), _randn(g, T, n, n), _randn(g, T, n))
    bwd_args = (*grads, x, phi, alpha, bias, out[3], out[1], out[4], out[5], ITERS, 2.0, 0.0)
    cases = {
        "fwd": (lambda: torch.ops.mhc.pre_mapping_fwd(*fwd_args), lambda: ref.pre_mapping(*fwd_args), ref.pre_mapping),
        "bwd": (
            lambda: torch.ops.mhc.pre_mapping_bwd(*bwd_args),
            lambda: ref.pre_mapping_backward(*bwd_args),
            ref.pre_mapping_backward,
        ),
    }
    return cases, {"fwd": fwd_args, "bwd": bwd_args}


def _randn(g, *shape, dtype=torch.float32):
    """Drawn on the generator's device (no host copy of GB-sized inputs)."""
    return torch.randn(*shape, generator=g, device=g.device, dtype=dtype)


def post_res_cases(T, n, C, dtype, device):
    g = torch.Generator(device=device).manual_seed(T + C)
    y = _randn(g, T, C, dtype=dtype)
    x = _randn(g, T, n, C, dtype=dtype)
    h_post = torch.rand(T, n, generator=g, device=device) * 2
    h_res = ref.sinkhorn(_randn(g, T, n, n))
    grad = _randn(g, T, n, C, dtype=dtype)
    args = (y, x, h_post, h_res)

    def ours_fwd():
        return torch.ops.mhc.post_res_fwd(*args)

    def ours_bwd():
        return torch.ops.mhc.post_res_bwd(grad, *args)

    def ref_fwd(fn=ref.post_res):
        return lambda: fn(*args)

    def ref_bwd(fn=ref.post_res_backward):
        return lambda: fn(grad, *args)

    return (
        {
            "fwd": (ours_fwd, ref_fwd(), ref.post_res),
            "bwd": (ours_bwd, ref_bwd(), ref.post_res_backward),
        },
        args,
        grad,
    )


def sinkhorn_cases(L, gL):
    """``{mode: (ours, eager reference, reference builder)}`` for the Sinkhorn kernels."""
    return {
        "fwd": (lambda: torch.ops.mhc.sinkhorn_fwd(L, ITERS, 0.0), lambda: ref.sinkhorn(L, ITERS), ref.sinkhorn),
        "bwd": (
            lambda: torch.ops.mhc.sinkhorn_bwd(gL, L, ITERS, 0.0),
            lambda: ref.sinkhorn_backward(gL, L, ITERS),
            ref.sinkhorn_backward,
        ),
    }


#: The full sweep (issue 11): decode (1, 13), split-K (512) and training token counts; the paper's C and DeepSeek's.
FULL_TOKENS, FULL_HIDDEN = (1, 13, 512, 4096, 16384, 65536), (1280, 1920, 2560, 4096, 7168)
#: ``--quick``: the target shapes of the kernel issue (n=4, T=16384).
QUICK_TOKENS, QUICK_HIDDEN = (16384,), (2560, 4096, 7168)
#: Sinkhorn alone (the latency issue) is also timed at these token counts in ``--quick`` on a GPU: ~1 s in all.
SINKHORN_TOKENS = (1, 13, 4096, 16384, 65536)
#: The Transformer block: C in {2560, 4096}, one sequence of 4096 tokens (the paper's sequence length).
BLOCK_HIDDEN, BLOCK_TOKENS = (2560, 4096), 4096
#: a CPU run (host timer or stand-in): tiny shapes, the harness is what is exercised.
CPU_TOKENS, CPU_HIDDEN = (64,), (256,)
CPU_BLOCK_HIDDEN, CPU_BLOCK_TOKENS = (64,), 32  # float32 on a CPU (bf16 matmuls are slow there)
#: Implementations timed beside ours, in table order (record key prefix, column title).
ALTERNATIVES = (("eager", "eager"), ("compile", "torch.compile"), ("tilekernels", "TileKernels"), ("liger", "Liger"))


def shapes(args) -> tuple[tuple[int, ...], tuple[int, ...]]:
    tokens, hidden = (QUICK_TOKENS, QUICK_HIDDEN) if args.quick else (FULL_TOKENS, FULL_HIDDEN)
    if args.device == "cpu":
        tokens, hidden = CPU_TOKENS, CPU_HIDDEN
    return tuple(args.tokens or tokens), tuple(args.hidden or hidden)


def block_shapes(args) -> tuple[tuple[int, ...], int]:
    if args.device == "cpu":
        return CPU_BLOCK_HIDDEN, CPU_BLOCK_TOKENS
    return tuple(args.block_hidden or BLOCK_HIDDEN), args.block_tokens or BLOCK_TOKENS


def run(args) -> dict:
    device = args.device
    if args.timer == "standin":  # the CUDA timing path with a host-clock stand-in for the device timer
        bench, how = make_timer("cuda", do_bench=standin_do_bench, cupti=not args.no_cupti)
        how = "STAND-IN for the device timer (dry run): " + how
    else:
        bench, how = make_timer(device, cupti=not args.no_cupti)
    copy_gbs = copy_bandwidth_gbs(device, bench)
    from mhc._cuda import TORCH_DTYPES

    dtype = TORCH_DTYPES[args.dtype]
    tokens, hidden = shapes(args)
    others = [] if args.no_baselines else third_party.load_all()
    rows, compiled = [], {}

    def time_baselines(name, eager_fn, builder, call_args):
        """Eager and torch.compile of the reference; a failure (e.g. out of memory) is a ``None`` and a note."""
        eager_us = comp_us = None
        try:
            eager_us = bench(eager_fn).us
        except Exception as exc:  # noqa: BLE001 - a failing baseline is reported, not fatal
            print(f"eager baseline for {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if not args.no_compile:
            try:
                if name not in compiled:
                    compiled[name] = torch.compile(builder)
                cfn = compiled[name]
                comp_us = bench(lambda: cfn(*call_args)).us
            except Exception as exc:  # noqa: BLE001
                print(f"torch.compile baseline for {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        _free(device)
        return eager_us, comp_us

    def time_others(op, mode, inputs):
        out = {}
        for b in others:
            fn = b.case(op, mode, inputs)
            if fn is not None:
                try:
                    out[b.name] = bench(fn).us
                except Exception as exc:  # noqa: BLE001
                    b.notes[(op, mode)] = f"{b.label} {op} {mode} failed while timing: {type(exc).__name__}: {exc}"
        return out

    ns = [args.n] + [k for k in (args.n_sweep or []) if k != args.n]
    block_hidden, block_tokens = block_shapes(args)
    n_blocks = 0 if args.no_block else len(block_hidden) * len(block_bench.VARIANTS)
    extra = (len(ns) - 1) * len(QUICK_TOKENS if device != "cpu" else CPU_TOKENS) * len(hidden) * 5
    if args.quick and device != "cpu":
        extra += 3 * len([t for t in SINKHORN_TOKENS if t not in tokens])
    progress = _progress(len(tokens) * (len(hidden) * 5 + 3) + extra + n_blocks, "bench")
    truncated = False
    block_records, block_notes = [], []
    chain_records, chain_notes = [], []
    try:
        for i, n in enumerate(ns):
            sweep_tokens = tokens if i == 0 else (QUICK_TOKENS if device != "cpu" else CPU_TOKENS)
            _sweep(args, bench, copy_gbs, dtype, n, sweep_tokens, hidden, rows, time_baselines, time_others, progress)
            if args.quick and i == 0:
                for T in (t for t in (SINKHORN_TOKENS if device != "cpu" else ()) if t not in sweep_tokens):
                    _sinkhorn_rows(bench, copy_gbs, dtype, n, T, device, rows, time_baselines, time_others, progress)
        if not args.no_block:
            # on a CPU the host clock (host_bench) even under --timer standin: the kernels exercised the timer's code
            block_timer = bench if device != "cpu" else make_timer("cpu")[0]
            block_records, block_notes = block_bench.run(
                block_timer, copy_gbs, block_hidden, block_tokens, args.n, torch.float32 if device == "cpu" else dtype,
                device, progress,
            )  # fmt: skip
        if not args.no_chain:
            chain_records, chain_notes = _chain_rows(args, bench, dtype, tokens, hidden, block_hidden, block_tokens)
    except _Stopped:
        truncated = True
        print("bench: stopped (SIGTERM); writing what was measured", file=sys.stderr)
    progress.close()
    meta = _meta(device, how, copy_gbs, dtype, args.n)
    meta["truncated"] = truncated
    meta["n_sweep"] = ns
    meta["baselines"] = {b.name: {"label": b.label, "available": b.available, "note": b.note} for b in others}
    meta["baseline_skips"] = sorted({note for b in others for note in b.notes.values()})
    if args.no_baselines:
        meta["baseline_skips"] = ["third-party baselines not run (--no-baselines)"]
    return {
        "meta": meta, "records": rows, "block": block_records, "block_notes": block_notes,
        "chain": chain_records, "chain_notes": chain_notes,
    }  # fmt: skip


def _chain_rows(args, bench, dtype, tokens, hidden, block_hidden, block_tokens) -> tuple[list, list]:
    """Fused against unfused boundaries (``profiling.chain_bench``): T = 16384 (the sweep's largest token count if it
    has not that one), the sweep's hidden sizes (``--quick``: the largest only, as the block's), the block shapes;
    GPU only (on a CPU it returns one note)."""
    T = 16384 if 16384 in tokens else max(tokens)
    if args.quick:  # the GPU run's short stage: the target shape alone
        hidden, block_hidden = (max(hidden),), (max(block_hidden),)
    return chain_bench.run(bench, hidden, T, block_hidden, block_tokens, args.n, dtype, args.device)


def _free(device):
    if device == "cuda":
        torch.cuda.empty_cache()


class _Stopped(BaseException):  # not caught by the "except Exception" around a baseline
    pass


def _on_sigterm(signum, frame):
    raise _Stopped


def _sweep(args, bench, copy_gbs, dtype, n, tokens, hidden, rows, time_baselines, time_others, progress):
    device = args.device
    for T in tokens:
        for C in hidden:
            cases, call_args, grad = post_res_cases(T, n, C, dtype, device)
            inputs = {"y": call_args[0], "x": call_args[1], "h_post": call_args[2], "h_res": call_args[3],
                      "grad": grad, "iters": ITERS}  # fmt: skip
            for mode, (ours, eager, builder) in cases.items():
                t = bench(ours)
                base_args = call_args if mode == "fwd" else (grad, *call_args)
                eager_us, comp_us = time_baselines(f"post_res_{mode}", eager, builder, base_args)
                alt = time_others("post_res", mode, inputs)
                rows.append(_row("post_res", mode, T, n, C, t, dtype, copy_gbs, eager_us, comp_us, alt))
                progress.update()
            del cases, call_args, grad, inputs
            _free(device)
            _pre_mapping_rows(args, bench, copy_gbs, dtype, n, T, C, rows, time_baselines, ("fwd", "bwd"))
            progress.update(3)
        _sinkhorn_rows(bench, copy_gbs, dtype, n, T, device, rows, time_baselines, time_others, progress)
        progress.update()


def _sinkhorn_rows(bench, copy_gbs, dtype, n, T, device, rows, time_baselines, time_others, progress):
    """Sinkhorn fwd, bwd and fwd+bwd at T tokens (20 iterations), with the baselines and, on a GPU, the previous
    log-domain kernels beside the defaults."""
    L = torch.randn(T, n, n, device=device) * 2
    gL = torch.randn_like(L)
    sk = sinkhorn_cases(L, gL)
    times, alts = {}, {}
    for mode, (ours, eager, builder) in sk.items():
        t = bench(ours)
        times[mode] = t
        base_args = (L, ITERS) if mode == "fwd" else (gL, L, ITERS)
        eager_us, comp_us = time_baselines(f"sinkhorn_{mode}", eager, builder, base_args)
        alts[mode] = time_others("sinkhorn", mode, {"L": L, "gL": gL, "iters": ITERS})
        rows.append(_row("sinkhorn", mode, T, n, 0, t, dtype, copy_gbs, eager_us, comp_us, alts[mode]))
        progress.update()
    kernel = None
    if times["fwd"].kernel_us is not None and times["bwd"].kernel_us is not None:
        kernel = times["fwd"].kernel_us + times["bwd"].kernel_us
    total = Timing(times["fwd"].us + times["bwd"].us, None, None, kernel)
    both = {k: alts["fwd"][k] + alts["bwd"][k] for k in alts["fwd"] if k in alts["bwd"]}
    rows.append(_row("sinkhorn", "fwd+bwd", T, n, 0, total, dtype, copy_gbs, None, None, both))
    if device == "cuda":  # the previous log-domain kernels, kept reachable until the defaults are measured faster
        from tl_kernels.sinkhorn import sinkhorn_bwd_kernel, sinkhorn_fwd_kernel

        out = torch.empty_like(L)
        old_fwd, old_bwd = sinkhorn_fwd_kernel(n, ITERS, 0.0, False), sinkhorn_bwd_kernel(n, ITERS, 0.0, False)
        t_fwd = bench(functools.partial(old_fwd, L, out))
        t_bwd = bench(functools.partial(old_bwd, gL, L, out))
        rows.append(_row("sinkhorn", "fwd-log", T, n, 0, t_fwd, dtype, copy_gbs, None, None, {}))
        rows.append(_row("sinkhorn", "bwd-log", T, n, 0, t_bwd, dtype, copy_gbs, None, None, {}))


def _pre_mapping_rows(args, bench, copy_gbs, dtype, n, T, C, rows, time_baselines, modes):
    cases, call_args = pre_mapping_cases(T, n, C, dtype, args.device)
    for mode in modes:
        ours, eager, builder = cases[mode]
        t = bench(ours)
        eager_us, comp_us = time_baselines(f"pre_mapping_{mode}", eager, builder, call_args[mode])
        rows.append(_row("pre_mapping", mode, T, n, C, t, dtype, copy_gbs, eager_us, comp_us, {}))
    del cases, call_args
    if args.device == "cuda" and "bwd" in modes:
        _accumulate_rows(bench, copy_gbs, dtype, n, T, C, rows)
    _free(args.device)


def _accumulate_rows(bench, copy_gbs, dtype, n, T, C, rows):
    """The pre-mapping backward's d_x pass with the residual gradient from post_res summed separately (the kernel,
    then autograd's add) against the kernel variant that accumulates it (``pre_proj_bwd(..., accumulate=True)``):
    what a site-level op would save. Direct kernel launches, CUDA only."""
    from tl_kernels import pre_proj

    m, K = n * n + 2 * n, n * C
    dt = str(dtype).removeprefix("torch.")
    try:
        plain, acc = pre_proj.pre_proj_bwd_kernel(n, C, dt, False), pre_proj.pre_proj_bwd_kernel(n, C, dt, True)
    except ValueError:
        return  # a shape the kernels do not serve
    g = torch.Generator(device="cuda").manual_seed(T + C + 2)
    x = torch.randn(T, K, device="cuda", generator=g).to(dtype)
    phi = torch.randn(K, m, device="cuda", generator=g) / K**0.5
    d_pp, d_res = torch.randn(T, 2 * n, device="cuda", generator=g), torch.randn(T, n * n, device="cuda", generator=g)
    proj = torch.randn(T, m, device="cuda", generator=g)
    rinv, alpha = torch.rand(T, device="cuda", generator=g) + 0.5, torch.tensor([0.7, 0.5, 1.2], device="cuda")
    h_pre, g_li = torch.rand(T, n, device="cuda", generator=g), torch.randn(T, C, device="cuda", generator=g).to(dtype)
    d_post = torch.randn(T, K, device="cuda", generator=g).to(dtype)  # the gradient post_res produced
    d_x = torch.empty_like(x)
    splits = pre_proj.choose_splits(T, n, C, torch.cuda.get_device_properties(0).multi_processor_count, "bwd")
    part = torch.empty(splits, K, m, device="cuda")
    coef = torch.empty(-(-T // pre_proj.BM), 2 * m, device="cuda")
    args = (x, phi, d_pp, d_res, proj, rinv, alpha, h_pre, g_li)

    def separate():
        plain(*args, d_x, part, coef)
        return d_x + d_post

    def accumulate():
        acc(*args, d_post, d_x, part, coef)
        return d_x

    for mode, fn in (("separate", separate), ("accumulate", accumulate)):
        rows.append(_row("pre_proj_bwd", mode, T, n, C, bench(fn), dtype, copy_gbs, None, None, {}))


def _row(op, mode, T, n, C, t: Timing, dtype, copy_gbs, eager_us, comp_us, others: dict):
    nbytes = bytemodel.op_bytes(op, mode, T, n, C, dtype.itemsize)
    gbs = nbytes / (t.us * 1e-6) / 1e9
    floor = bytemodel.floor_us(nbytes, copy_gbs)
    row = {
        "op": op, "mode": mode, "T": T, "n": n, "C": C, "us": t.us, "p20_us": t.p20_us, "p80_us": t.p80_us,
        "kernel_us": t.kernel_us, "bytes": nbytes, "GBps": gbs, "pct_copy": 100 * gbs / copy_gbs,
        "GBps_kernel": nbytes / (t.kernel_us * 1e-6) / 1e9 if t.kernel_us else None,
        "floor_us": floor, "x_floor": t.us / floor if floor > 0 else None,
        "eager_us": eager_us, "compile_us": comp_us,
        "tilekernels_us": others.get("tilekernels"), "liger_us": others.get("liger"),
    }  # fmt: skip
    for key, _ in ALTERNATIVES:
        alt = row[f"{key}_us"]
        row[f"speedup_{key}"] = alt / t.us if alt is not None and t.us > 0 else None
    return row


def _progress(total, desc):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency

        class _Null:
            def update(self, *_):
                pass

            def close(self):
                pass

        return _Null()


def driver_version() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)  # fmt: skip
        return (out.stdout.strip().splitlines() or [None])[0]
    except (OSError, subprocess.SubprocessError):
        return None


def _meta(device, how, copy_gbs, dtype, n):
    commit_id = provenance.commit()
    try:
        import tilelang

        tl_version = tilelang.__version__
    except Exception:  # noqa: BLE001
        tl_version = None
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu"),
        "driver": driver_version() if device == "cuda" else None, "cuda": torch.version.cuda,
        "torch": torch.__version__, "tilelang": tl_version, "mhc": mhc.__version__, "commit": commit_id,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "timer": how,
        "copy_GBps": copy_gbs, "dtype": str(dtype).removeprefix("torch."), "n": n, "sinkhorn_iters": ITERS,
        "python": sys.version.split()[0],
        "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------- reports


def _f(v, fmt="{:.1f}"):
    return "–" if v is None else fmt.format(v)


def _alt(r, key):
    us, sp = r.get(f"{key}_us"), r.get(f"speedup_{key}")
    return "–" if us is None else f"{us:.1f} ({sp:.2f}x)" if sp is not None else f"{us:.1f}"


def _time_legend(timer: str) -> str:
    """What the µs columns are, for the timer that made them."""
    if timer.startswith("host clock"):
        return "µs: median per call on the host clock (a CPU run), p20-p80 beside it; no kernel time."
    if timer.startswith("STAND-IN"):
        return "µs: the CUDA timing code driven by a host-clock stand-in (a dry run), p20-p80 beside it."
    return "µs: median per call (CUDA events, L2 flushed), p20-p80 beside it; kernel µs: CUPTI mean kernel time."


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"# mHC kernel timings: {m['device']}",
        "",
        f"commit `{m['commit'][:12]}`, {m['date']}, driver {m.get('driver') or '–'}, torch {m['torch']}, "
        f"tilelang {m['tilelang']}, activations {m['dtype']}, Sinkhorn {m['sinkhorn_iters']} iterations.",
        f"Measured copy bandwidth: {m['copy_GBps']:.0f} GB/s (read + write). Timer: {m['timer']}.",
        "",
        _time_legend(m["timer"]) + " "
        "GB/s and % copy from the byte model (docs/benchmarks.md) and the median; floor µs = bytes / measured copy "
        "bandwidth (t_min), x floor = µs / floor; model µs: the performance model's prediction at the measured copy "
        "bandwidth (profiling/model). Alternatives: µs (our speed-up over them).",
        "",
        "| op | mode | n | T | C | µs | p20-p80 µs | kernel µs | GB/s | % copy | floor µs | x floor | model µs | "
        + " | ".join(title for _, title in ALTERNATIVES)
        + " |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(ALTERNATIVES),
    ]
    for r in result["records"]:
        spread = f"{r['p20_us']:.1f}-{r['p80_us']:.1f}" if r["p20_us"] is not None else "–"
        alts = " | ".join(_alt(r, key) for key, _ in ALTERNATIVES)
        lines.append(
            f"| {r['op']} | {r['mode']} | {r.get('n', m['n'])} | {r['T']} | {r['C'] or '–'} | {r['us']:.1f} | "
            f"{spread} | {_f(r.get('kernel_us'))} | {r['GBps']:.0f} | {r['pct_copy']:.0f} | "
            f"{_f(r.get('floor_us'))} | {_f(r.get('x_floor'), '{:.2f}')} | {_f(r.get('model_us'))} | {alts} |"
        )
    warning = noise_warning(result)
    if warning:
        lines += ["", warning]
    lines += block_bench.markdown(result.get("block", []), result.get("block_notes", []))
    lines += chain_bench.markdown(result.get("chain", []), result.get("chain_notes", []))
    notes = [f"{v['label']}: {v['note']}" for v in m.get("baselines", {}).values()] + m.get("baseline_skips", [])
    if notes:
        lines += ["", "## Baselines", ""] + [f"- {note}" for note in notes]
    if m.get("truncated"):
        lines += ["", "**Truncated**: the run was stopped before the sweep finished."]
    return "\n".join(lines) + "\n"


def plot(result: dict, out: pathlib.Path) -> list[pathlib.Path]:
    """``bench.png`` (% of copy bandwidth against T, per kernel and C), ``alternatives.png`` (time of each
    implementation at the largest T, per kernel) and ``block.png`` (block overhead per C). Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = result["meta"]
    recs = [r for r in result["records"] if r.get("n", meta["n"]) == meta["n"]]
    kinds = [(op, mode) for op in ("post_res", "pre_mapping", "sinkhorn") for mode in ("fwd", "bwd")
             if any(r["op"] == op and r["mode"] == mode for r in recs)]  # fmt: skip
    paths = []
    cols = max(1, min(3, len(kinds)))
    rows_n = max(1, math.ceil(len(kinds) / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    for ax, (op, mode) in zip(axes.flat, kinds, strict=False):
        for C in sorted({r["C"] for r in recs if r["op"] == op}):
            pts = sorted((r["T"], r["pct_copy"]) for r in recs if r["op"] == op and r["mode"] == mode and r["C"] == C)
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"C={C}" if C else "fp32 n×n")
        ax.axhline(100, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_title(f"{op} {mode}", fontsize=9)
        ax.set_xlabel("T (tokens)", fontsize=8)
        ax.set_ylabel("% of measured copy bandwidth", fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(kinds) :]:
        ax.axis("off")
    fig.suptitle(f"mHC kernels, n={meta['n']}, {meta['device']}", fontsize=10)
    fig.tight_layout()
    paths.append(out / "bench.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # time against the alternatives at the largest T, largest C of each kernel
    Tmax = max((r["T"] for r in recs), default=0)
    chosen = []
    for op, mode in kinds:
        cand = [r for r in recs if r["op"] == op and r["mode"] == mode and r["T"] == Tmax]
        if cand:
            chosen.append(max(cand, key=lambda r: r["C"]))
    fig, ax = plt.subplots(figsize=(8, 4))
    impls = [("us", "ours")] + [(f"{k}_us", title) for k, title in ALTERNATIVES]
    width = 0.8 / len(impls)
    for j, (key, title) in enumerate(impls):
        xs = [i + j * width for i, r in enumerate(chosen) if r.get(key)]
        ys = [r[key] for r in chosen if r.get(key)]
        if ys:
            ax.bar(xs, ys, width, label=title)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(chosen))])
    ax.set_xticklabels([f"{r['op']} {r['mode']}\nC={r['C'] or '–'}" for r in chosen], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("µs (median, log scale)")
    ax.set_title(f"time against the alternatives, T={Tmax}, {meta['device']}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "alternatives.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    blocks = result.get("block", [])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    hidden = sorted({r["C"] for r in blocks})
    variants = [v for v in block_bench.VARIANTS if v != "plain" and any(r["variant"] == v for r in blocks)]
    width = 0.8 / max(1, len(variants))
    for j, v in enumerate(variants):
        pts = [(i + j * width, r["overhead_pct"]) for i, C in enumerate(hidden) for r in blocks
               if r["variant"] == v and r["C"] == C and r["overhead_pct"] is not None]  # fmt: skip
        if pts:
            ax.bar(*zip(*pts, strict=True), width, label=v)
    floors = [(i + 0.4 - width / 2, r["floor_overhead_pct"]) for i, C in enumerate(hidden) for r in blocks
              if r["variant"] == "mhc" and r["C"] == C and r["floor_overhead_pct"] is not None]  # fmt: skip
    if floors:
        ax.plot(*zip(*floors, strict=True), "k_", markersize=30, label="byte-model floor")
    ax.axhline(bytemodel.PAPER_OVERHEAD_PCT, color="red", linestyle="--", linewidth=1, label="paper 6.7%")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(hidden))])
    ax.set_xticklabels([f"C={C}" for C in hidden])
    ax.set_ylabel("block fwd+bwd overhead over plain (%)")
    ax.set_title(f"mHC block overhead, n={meta['n']}, {meta['device']}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "block.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def gpu_dir_name() -> str:
    name = torch.cuda.get_device_name().lower() if torch.cuda.is_available() else "cpu"
    for key in ("h100", "h200", "b200", "gb200", "a100"):
        if key in name:
            return key
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="the target shapes only (fits the GPU run's stage 3)")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--n-sweep", type=int, nargs="+", help="extra stream counts, at the quick token count")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--no-baselines", action="store_true", help="skip TileKernels and Liger even when importable")
    ap.add_argument("--no-block", action="store_true", help="skip the Transformer-block overhead")
    ap.add_argument("--no-chain", action="store_true", help="skip fused against unfused boundaries (MHCStack)")
    ap.add_argument("--out", default=None, help="output folder (default: profiling/results/<gpu>/)")
    ap.add_argument("--tokens", type=int, nargs="+", help="token counts (override the defaults)")
    ap.add_argument("--hidden", type=int, nargs="+", help="hidden sizes C (override the defaults)")
    ap.add_argument("--block-hidden", type=int, nargs="+", help="block hidden sizes (default 2560 4096)")
    ap.add_argument("--block-tokens", type=int, help="block sequence length (default 4096)")
    ap.add_argument("--no-cupti", action="store_true", help="skip the CUPTI kernel-time pass")
    ap.add_argument(
        "--timer", choices=["device", "standin"], default="device",
        help="standin: the CUDA timing code with a host-clock stand-in for do_bench (dry run on a CPU)",
    )  # fmt: skip
    return ap


def write(result: dict, out: pathlib.Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (out / "bench.md").write_text(md)
    plot(result, out)
    return md


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # the GPU run's stage limit: keep what was measured
    try:
        result = run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    out = pathlib.Path(args.out) if args.out else ROOT / "profiling" / "results" / gpu_dir_name()
    md = write(result, out)
    # predictions beside the measurements, once those are on disk (CPU work only), each set written when made
    for annotate in (model.annotate, chain_bench.annotate):
        if annotate(result):
            (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
            md = markdown(result)
            (out / "bench.md").write_text(md)
    print(md)
    warning = noise_warning(result)
    if warning:
        print("WARNING: " + warning.replace("**", ""), file=sys.stderr)
    print(f"wrote {out / 'bench.json'}, bench.md, bench.png, alternatives.png, block.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")
    sys.exit(main())
