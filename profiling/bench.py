"""Paper-style kernel timings for the mHC ops: microseconds, achieved GB/s and percent of the device's measured copy
bandwidth, for our kernels beside PyTorch eager and ``torch.compile`` of the reference.

    python -m profiling.bench                        # full sweep on the local GPU, results under profiling/results/<gpu>/
    python -m profiling.bench --quick                # a few shapes
    python -m profiling.bench --device cpu --quick   # dry run of the harness on a CPU (host timer, tiny shapes)
    python -m profiling.bench --device cpu --quick --timer standin   # the CUDA timing code, stand-in timer

Timer (:func:`make_timer`): TileLang's ``do_bench`` with the CUDA-event backend (L2 flushed before every call,
256 MB), reporting the median and the 20th/80th percentiles of the per-call times, then its CUPTI backend for the
mean kernel time alone (``kernel_us``; TileLang 0.1.15's CUPTI backend returns one float and ignores
``quantiles``). On a CPU the host clock. Bytes are the minimum traffic per token (spec
§6.2): every input read once, every output written once, activations in their dtype, coefficients fp32:

=====================  ==============================================================
post_res fwd           reads (n+1)·C activations + 4·(n²+n) B, writes n·C
post_res bwd           reads (2n+1)·C activations + 4·(n²+n) B, writes (n+1)·C + 4·(n²+n) B
sinkhorn fwd / bwd     4·n² B in, 4·n² B out / 8·n² B in, 4·n² B out
pre_mapping fwd        reads 2·n·C activations (projection, then F_pre), writes C + coefficients and partials
pre_mapping bwd        reads 2·(n+1)·C activations (two passes over x and g_li), writes n·C + small vectors
=====================  ==============================================================

The copy bandwidth is measured on the device (a 1 GiB bf16 ``copy_``, read + write), so "% copy" is the fraction of
what this GPU can actually move, not of a datasheet number. Targets from the kernel issue (H100, n=4): post_res
forward and backward at least 85% of copy bandwidth at T=16384 for C in {2560, 4096, 7168}; Sinkhorn forward +
backward at T=16384, 20 iterations, under 15 µs.

Outputs (``--out``, default ``profiling/results/<gpu>/``): ``bench.json`` (meta: device, torch, tilelang, commit,
date, timer, copy bandwidth; one record per op, mode and shape), ``bench.md`` (table), ``bench.png`` (plot).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import signal
import statistics
import sys
import time
from typing import NamedTuple

import torch

import mhc
from mhc import reference as ref
from profiling import gpu_run

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

    def bench(fn) -> Timing:
        fn()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e6)
        ts.sort()
        return Timing(statistics.median(ts), ts[1], ts[-2])

    return bench, "host clock (CPU dry run), median of 5"


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


def post_res_bytes(T, n, C, esize, mode):
    coef = 4 * (n * n + n)
    fwd = T * ((n + 1) * C * esize + coef + n * C * esize)
    bwd = T * ((2 * n + 1) * C * esize + coef + (n + 1) * C * esize + coef)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def sinkhorn_bytes(T, n, mode):
    fwd, bwd = T * 8 * n * n, T * 12 * n * n
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def pre_mapping_bytes(T, n, C, esize, mode, splits=1):
    """The two-read design (spec §6.2): fwd reads x twice (projection, then F_pre) and writes layer_input, plus the
    coefficient outputs and split partials; bwd reads x and g_li twice (the <g_li, x_i> pass, then the d_x/d_phi
    pass) and writes d_x, plus the small per-token vectors. phi stays in L2 and is not counted."""
    m = n * n + 2 * n
    small_fwd = 4 * (2 * n + n * n + m + 1) + 2 * 4 * splits * (m + 1)
    small_bwd = 4 * (3 * n + n * n + 2 * n + m + 1 + 2 * m + 2 * n * n)
    fwd = T * (2 * n * C * esize + C * esize + small_fwd)
    bwd = T * (2 * (n * C + C) * esize + n * C * esize + small_bwd)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def pre_mapping_cases(T, n, C, dtype, device):
    """``{mode: (ours, eager reference, reference builder)}``, the call arguments of each mode's reference."""
    g = torch.Generator(device="cpu").manual_seed(T + C + 1)
    m, K = n * n + 2 * n, n * C
    x = torch.randn(T, n, C, generator=g).to(device, dtype)
    phi = (torch.randn(K, m, generator=g) / K**0.5).to(device)
    alpha = torch.tensor([0.7, 0.5, 1.2], device=device)
    bias = (torch.randn(m, generator=g) * 0.5).to(device)
    fwd_args = (x, phi, alpha, bias, ITERS, 2.0, 1e-6, 0.0)
    out = torch.ops.mhc.pre_mapping_fwd(*fwd_args)
    grads = (
        torch.randn(T, C, generator=g).to(device, dtype),
        torch.randn(T, n, generator=g).to(device),
        torch.randn(T, n, n, generator=g).to(device),
        torch.randn(T, n, generator=g).to(device),
    )
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


def post_res_cases(T, n, C, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(T + C)
    y = torch.randn(T, C, generator=g).to(device, dtype)
    x = torch.randn(T, n, C, generator=g).to(device, dtype)
    h_post = (torch.rand(T, n, generator=g) * 2).to(device)
    h_res = ref.sinkhorn(torch.randn(T, n, n, generator=g)).to(device)
    grad = torch.randn(T, n, C, generator=g).to(device, dtype)
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


FULL_TOKENS, FULL_HIDDEN = (4096, 8192, 16384, 65536), (1280, 1920, 2560, 4096, 7168)
#: ``--quick``: the target shapes of the kernel issue (n=4, T=16384).
QUICK_TOKENS, QUICK_HIDDEN = (16384,), (2560, 4096, 7168)
#: decode-sized token counts for the fused pre-mapping forward (GPU runs only).
DECODE_TOKENS = (1, 13, 137)
#: a CPU run (host timer or stand-in): tiny shapes, the harness is what is exercised.
CPU_TOKENS, CPU_HIDDEN = (64,), (256,)


def shapes(args) -> tuple[tuple[int, ...], tuple[int, ...]]:
    tokens, hidden = (QUICK_TOKENS, QUICK_HIDDEN) if args.quick else (FULL_TOKENS, FULL_HIDDEN)
    if args.device == "cpu":
        tokens, hidden = CPU_TOKENS, CPU_HIDDEN
    return tuple(args.tokens or tokens), tuple(args.hidden or hidden)


def run(args) -> dict:
    device = args.device
    if args.timer == "standin":  # the CUDA timing path with a host-clock stand-in for the device timer
        bench, how = make_timer("cuda", do_bench=standin_do_bench, cupti=not args.no_cupti)
        how = "STAND-IN for the device timer (dry run): " + how
    else:
        bench, how = make_timer(device, cupti=not args.no_cupti)
    copy_gbs = copy_bandwidth_gbs(device, bench)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    n = args.n
    tokens, hidden = shapes(args)
    rows = []
    compiled = {}

    def time_baselines(name, eager_fn, builder, call_args):
        eager_us = bench(eager_fn).us
        comp_us = None
        if not args.no_compile:
            try:
                if name not in compiled:
                    compiled[name] = torch.compile(builder)
                cfn = compiled[name]
                comp_us = bench(lambda: cfn(*call_args)).us
            except Exception as exc:  # noqa: BLE001 - a failing baseline is reported, not fatal
                print(f"torch.compile baseline for {name} failed: {exc}", file=sys.stderr)
        return eager_us, comp_us

    decode = len(DECODE_TOKENS) * len(hidden) if device != "cpu" else 0
    progress = _progress(len(tokens) * len(hidden) * 3 + len(tokens) * 3 + decode, "bench")
    truncated = False
    try:
        _sweep(args, bench, copy_gbs, dtype, n, tokens, hidden, rows, time_baselines, progress)
        if args.device != "cpu":
            _decode(args, bench, copy_gbs, dtype, n, hidden, rows, time_baselines, progress)
    except _Stopped:
        truncated = True
        print("bench: stopped (SIGTERM); writing what was measured", file=sys.stderr)
    progress.close()
    meta = _meta(device, how, copy_gbs, dtype, n)
    meta["truncated"] = truncated
    return {"meta": meta, "records": rows}


class _Stopped(BaseException):  # not caught by the "except Exception" around a baseline
    pass


def _on_sigterm(signum, frame):
    raise _Stopped


def _sweep(args, bench, copy_gbs, dtype, n, tokens, hidden, rows, time_baselines, progress):
    device = args.device
    for T in tokens:
        for C in hidden:
            cases, call_args, grad = post_res_cases(T, n, C, dtype, device)
            for mode, (ours, eager, builder) in cases.items():
                t = bench(ours)
                base_args = call_args if mode == "fwd" else (grad, *call_args)
                eager_us, comp_us = time_baselines(f"post_res_{mode}", eager, builder, base_args)
                nbytes = post_res_bytes(T, n, C, dtype.itemsize, mode)
                rows.append(_row("post_res", mode, T, n, C, t, nbytes, copy_gbs, eager_us, comp_us))
                progress.update()
            del cases, call_args, grad
            _pre_mapping_rows(args, bench, copy_gbs, dtype, n, T, C, rows, time_baselines, ("fwd", "bwd"))
            progress.update()
        L = torch.randn(T, n, n, device=device) * 2
        gL = torch.randn_like(L)
        sk = sinkhorn_cases(L, gL)
        times = {}
        for mode, (ours, eager, builder) in sk.items():
            t = bench(ours)
            times[mode] = t
            base_args = (L, ITERS) if mode == "fwd" else (gL, L, ITERS)
            eager_us, comp_us = time_baselines(f"sinkhorn_{mode}", eager, builder, base_args)
            rows.append(_row("sinkhorn", mode, T, n, 0, t, sinkhorn_bytes(T, n, mode), copy_gbs, eager_us, comp_us))
            progress.update()
        kernel = None
        if times["fwd"].kernel_us is not None and times["bwd"].kernel_us is not None:
            kernel = times["fwd"].kernel_us + times["bwd"].kernel_us
        total = Timing(times["fwd"].us + times["bwd"].us, None, None, kernel)
        rows.append(_row("sinkhorn", "fwd+bwd", T, n, 0, total, sinkhorn_bytes(T, n, "fwd+bwd"), copy_gbs, None, None))
        progress.update()


def _pre_mapping_rows(args, bench, copy_gbs, dtype, n, T, C, rows, time_baselines, modes):
    cases, call_args = pre_mapping_cases(T, n, C, dtype, args.device)
    for mode in modes:
        ours, eager, builder = cases[mode]
        t = bench(ours)
        eager_us, comp_us = time_baselines(f"pre_mapping_{mode}", eager, builder, call_args[mode])
        nbytes = pre_mapping_bytes(T, n, C, dtype.itemsize, mode)
        rows.append(_row("pre_mapping", mode, T, n, C, t, nbytes, copy_gbs, eager_us, comp_us))


def _decode(args, bench, copy_gbs, dtype, n, hidden, rows, time_baselines, progress):
    """Decode-sized forward of the fused pre-mapping (T = 1, 13, 137): launch-latency bound, two launches."""
    for T in DECODE_TOKENS:
        for C in hidden:
            _pre_mapping_rows(args, bench, copy_gbs, dtype, n, T, C, rows, time_baselines, ("fwd",))
            progress.update()


def _row(op, mode, T, n, C, t: Timing, nbytes, copy_gbs, eager_us, comp_us):
    gbs = nbytes / (t.us * 1e-6) / 1e9
    return {
        "op": op, "mode": mode, "T": T, "n": n, "C": C, "us": t.us, "p20_us": t.p20_us, "p80_us": t.p80_us,
        "kernel_us": t.kernel_us, "bytes": nbytes, "GBps": gbs, "pct_copy": 100 * gbs / copy_gbs,
        "eager_us": eager_us, "compile_us": comp_us,
    }  # fmt: skip


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


def _meta(device, how, copy_gbs, dtype, n):
    commit_id = gpu_run.commit()
    try:
        import tilelang

        tl_version = tilelang.__version__
    except Exception:  # noqa: BLE001
        tl_version = None
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__, "tilelang": tl_version, "mhc": mhc.__version__, "commit": commit_id,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "timer": how,
        "copy_GBps": copy_gbs, "dtype": str(dtype).removeprefix("torch."), "n": n, "sinkhorn_iters": ITERS,
        "python": sys.version.split()[0],
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------- reports


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"# mHC kernel timings: {m['device']}",
        "",
        f"commit `{m['commit'][:12]}`, {m['date']}, torch {m['torch']}, tilelang {m['tilelang']}, "
        f"activations {m['dtype']}, n={m['n']}, Sinkhorn {m['sinkhorn_iters']} iterations.",
        f"Measured copy bandwidth: {m['copy_GBps']:.0f} GB/s (read + write). Timer: {m['timer']}.",
        "",
        "| op | mode | T | C | µs | p20-p80 µs | kernel µs (CUPTI) | GB/s | % copy | eager µs | compile µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        spread = f"{r['p20_us']:.1f}-{r['p80_us']:.1f}" if r["p20_us"] is not None else "–"
        eager = f"{r['eager_us']:.1f}" if r["eager_us"] is not None else "–"
        comp = f"{r['compile_us']:.1f}" if r["compile_us"] is not None else "–"
        kern = f"{r['kernel_us']:.1f}" if r.get("kernel_us") is not None else "–"
        C = r["C"] or "–"
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['T']} | {C} | {r['us']:.1f} | {spread} | {kern} | {r['GBps']:.0f} | "
            f"{r['pct_copy']:.0f} | {eager} | {comp} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in ("fwd", "bwd"):
        for T in sorted({r["T"] for r in result["records"] if r["op"] == "post_res"}):
            pts = [(r["C"], r["pct_copy"]) for r in result["records"] if r["op"] == "post_res" and r["mode"] == mode
                   and r["T"] == T]  # fmt: skip
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"post_res {mode}, T={T}")
    ax.axhline(85, color="grey", linestyle="--", linewidth=1, label="target 85%")
    ax.set_xlabel("C (hidden size)")
    ax.set_ylabel("% of measured copy bandwidth")
    ax.set_title(f"post/res mapping, n={result['meta']['n']}, {result['meta']['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gpu_dir_name() -> str:
    name = torch.cuda.get_device_name().lower() if torch.cuda.is_available() else "cpu"
    for key in ("h100", "h200", "b200", "gb200", "a100"):
        if key in name:
            return key
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--out", default=None, help="output folder (default: profiling/results/<gpu>/)")
    ap.add_argument("--tokens", type=int, nargs="+", help="token counts (override the defaults)")
    ap.add_argument("--hidden", type=int, nargs="+", help="hidden sizes C (override the defaults)")
    ap.add_argument("--no-cupti", action="store_true", help="skip the CUPTI kernel-time pass")
    ap.add_argument(
        "--timer", choices=["device", "standin"], default="device",
        help="standin: the CUDA timing code with a host-clock stand-in for do_bench (dry run on a CPU)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # the GPU run's stage limit: keep what was measured
    try:
        result = run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    out = pathlib.Path(args.out) if args.out else ROOT / "profiling" / "results" / gpu_dir_name()
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (out / "bench.md").write_text(md)
    plot(result, out / "bench.png")
    print(md)
    print(f"wrote {out / 'bench.json'}, bench.md, bench.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")
    sys.exit(main())
