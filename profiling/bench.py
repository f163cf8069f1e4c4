"""Paper-style kernel timings for the mHC ops: microseconds, achieved GB/s and percent of the device's measured copy
bandwidth, for our kernels beside PyTorch eager and ``torch.compile`` of the reference.

    python -m profiling.bench                        # full sweep on the local GPU, results under profiling/results/<gpu>/
    python -m profiling.bench --quick                # a few shapes
    python -m profiling.bench --device cpu --quick   # dry run of the harness on a CPU (host timer, tiny shapes)

Timer: TileLang's ``do_bench`` with the CUPTI backend (kernel time only, L2 flushed between runs, 256 MB), reporting
the median and the 20th/80th percentiles; on a CPU the host clock. Bytes are the minimum traffic per token (spec
§6.2): every input read once, every output written once, activations in their dtype, coefficients fp32:

=====================  ==============================================================
post_res fwd           reads (n+1)·C activations + 4·(n²+n) B, writes n·C
post_res bwd           reads (2n+1)·C activations + 4·(n²+n) B, writes (n+1)·C + 4·(n²+n) B
sinkhorn fwd / bwd     4·n² B in, 4·n² B out / 8·n² B in, 4·n² B out
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
import statistics
import subprocess
import sys
import time

import torch

import mhc
from mhc import reference as ref

ROOT = pathlib.Path(__file__).resolve().parents[1]
ITERS = 20


# ---------------------------------------------------------------------------------------------------- timing


def make_timer(device: str):
    """Returns ``(bench, description)``; ``bench(fn) -> (median_us, p20_us, p80_us)``."""
    if device == "cuda":
        from tilelang.profiler import do_bench

        def bench(fn):
            q = do_bench(fn, warmup=25, rep=200, backend="cupti", quantiles=[0.2, 0.5, 0.8])
            return q[1] * 1e3, q[0] * 1e3, q[2] * 1e3

        return bench, "tilelang do_bench, CUPTI kernel time, L2 flushed (256 MB), median [p20, p80]"

    def bench(fn):
        fn()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e6)
        ts.sort()
        return statistics.median(ts), ts[1], ts[-2]

    return bench, "host clock (CPU dry run), median of 5"


def copy_bandwidth_gbs(device: str, bench) -> float:
    numel = (1 << 29) if device == "cuda" else (1 << 22)
    a = torch.randn(numel, device=device).to(torch.bfloat16)
    b = torch.empty_like(a)
    us = bench(lambda: b.copy_(a))[0]
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


def run(args) -> dict:
    device = args.device
    bench, how = make_timer(device)
    copy_gbs = copy_bandwidth_gbs(device, bench)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    n = args.n
    tokens = [4096, 8192, 16384, 65536]
    hidden = [1280, 1920, 2560, 4096, 7168]
    if args.quick:
        tokens, hidden = [16384], [2560, 7168]
    if device == "cpu":
        tokens, hidden = [64], [256]
    rows = []
    compiled = {}

    def time_baselines(name, eager_fn, builder, call_args):
        eager_us = bench(eager_fn)[0]
        comp_us = None
        if not args.no_compile:
            try:
                if name not in compiled:
                    compiled[name] = torch.compile(builder)
                cfn = compiled[name]
                comp_us = bench(lambda: cfn(*call_args))[0]
            except Exception as exc:  # noqa: BLE001 - a failing baseline is reported, not fatal
                print(f"torch.compile baseline for {name} failed: {exc}", file=sys.stderr)
        return eager_us, comp_us

    progress = _progress(len(tokens) * len(hidden) * 2 + len(tokens) * 3, "bench")
    for T in tokens:
        for C in hidden:
            cases, call_args, grad = post_res_cases(T, n, C, dtype, device)
            for mode, (ours, eager, builder) in cases.items():
                med, p20, p80 = bench(ours)
                base_args = call_args if mode == "fwd" else (grad, *call_args)
                eager_us, comp_us = time_baselines(f"post_res_{mode}", eager, builder, base_args)
                nbytes = post_res_bytes(T, n, C, dtype.itemsize, mode)
                rows.append(_row("post_res", mode, T, n, C, med, p20, p80, nbytes, copy_gbs, eager_us, comp_us))
                progress.update()
            del cases, call_args, grad
        L = torch.randn(T, n, n, device=device) * 2
        gL = torch.randn_like(L)
        sk = sinkhorn_cases(L, gL)
        times = {}
        for mode, (ours, eager, builder) in sk.items():
            med, p20, p80 = bench(ours)
            times[mode] = med
            base_args = (L, ITERS) if mode == "fwd" else (gL, L, ITERS)
            eager_us, comp_us = time_baselines(f"sinkhorn_{mode}", eager, builder, base_args)
            rows.append(
                _row("sinkhorn", mode, T, n, 0, med, p20, p80, sinkhorn_bytes(T, n, mode), copy_gbs, eager_us, comp_us)
            )
            progress.update()
        total = times["fwd"] + times["bwd"]
        rows.append(
            _row(
                "sinkhorn", "fwd+bwd", T, n, 0, total, None, None, sinkhorn_bytes(T, n, "fwd+bwd"), copy_gbs, None, None
            )
        )
        progress.update()
    progress.close()
    meta = _meta(device, how, copy_gbs, dtype, n)
    return {"meta": meta, "records": rows}


def _row(op, mode, T, n, C, us, p20, p80, nbytes, copy_gbs, eager_us, comp_us):
    gbs = nbytes / (us * 1e-6) / 1e9
    return {
        "op": op, "mode": mode, "T": T, "n": n, "C": C, "us": us, "p20_us": p20, "p80_us": p80, "bytes": nbytes,
        "GBps": gbs, "pct_copy": 100 * gbs / copy_gbs, "eager_us": eager_us, "compile_us": comp_us,
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
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        commit = ""
    try:
        import tilelang

        tl_version = tilelang.__version__
    except Exception:  # noqa: BLE001
        tl_version = None
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__, "tilelang": tl_version, "mhc": mhc.__version__, "commit": commit,
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
        "| op | mode | T | C | µs | p20-p80 µs | GB/s | % copy | eager µs | compile µs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        spread = f"{r['p20_us']:.1f}-{r['p80_us']:.1f}" if r["p20_us"] is not None else "–"
        eager = f"{r['eager_us']:.1f}" if r["eager_us"] is not None else "–"
        comp = f"{r['compile_us']:.1f}" if r["compile_us"] is not None else "–"
        C = r["C"] or "–"
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['T']} | {C} | {r['us']:.1f} | {spread} | {r['GBps']:.0f} | "
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
    args = ap.parse_args(argv)
    result = run(args)
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
