"""``python -m profiling model``: print the model's table, optionally write the JSON records."""

from __future__ import annotations

import argparse
import json
import time

from . import bounds, gpus, predict, records, sites

#: Decode token counts (issue 18): the site's latency per launch sequence at these T.
DECODE_TOKENS = (1, 8, 64)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m profiling model",
        description="Performance model of every shipped kernel and of a whole site, without a GPU "
        "(docs/benchmarks.md, 'Performance model').",
    )
    ap.add_argument("--json", metavar="PATH", help="write the records (a JSON list) to PATH")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--C", type=int, nargs="+", default=[2560, 7168])
    ap.add_argument("--T", type=int, nargs="+", default=[16384])
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--gpu", nargs="+", default=list(gpus.GPUS), choices=list(gpus.GPUS))
    ap.add_argument("--kernel", nargs="+", default=list(bounds.KERNELS), choices=list(bounds.KERNELS))
    ap.add_argument(
        "--site",
        nargs="+",
        default=["chain"],
        choices=list(sites.SITE_KINDS),
        help="site_fwd/site_bwd: the steady-state site of a chain of fused sites (default; the fused backward's "
        "thread block clusters where MHC_BOUNDARY_CLUSTERS=1), one site alone, the chain unfused, and/or the chain "
        "with the fused backward's thread block clusters (chain_clusters)",
    )
    ap.add_argument(
        "--decode",
        action="store_true",
        help=f"the decode table instead: site_fwd (chain and single) at T in {DECODE_TOKENS}, latency per site in "
        "eager mode, in a CUDA graph and with programmatic dependent launch",
    )
    ap.add_argument(
        "--beside", metavar="BENCH_JSON",
        help="instead: a GPU run's bench.json (profiling/results/<gpu>/); print measured beside predicted for its "
        "rows (at its measured copy bandwidth)",
    )  # fmt: skip
    return ap


def beside(path: str) -> list[dict]:
    """Measured (a GPU run's ``bench.json``) beside predicted, for the rows the model covers and the fused-vs-unfused
    stack records (``chain``: for the Transformer, the model covers the mHC ops only), at the run's copy bandwidth:
    the calibration table."""
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    meta = result["meta"]
    gpu = next((g for g in gpus.GPUS if g in str(meta.get("device", ""))), None)
    if gpu is None:
        raise ValueError(f"{path}: expected a run on an H100 or H200, got device {meta.get('device')!r}")
    dtype = str(meta.get("dtype", "bfloat16")).replace("torch.", "")
    rows = []
    for r in result["records"]:
        kernel = f"{r['op']}_{r['mode']}"
        if kernel not in bounds.KERNELS:
            continue
        p = predict(
            kernel, r["n"], r["C"], dtype, r["T"], gpu, copy_gbps=meta["copy_GBps"], site=r.get("site", "chain")
        )
        measured = r.get("kernel_us") or r["us"]
        rows.append({**p, "measured_us": measured, "measured_over_pred": measured / p["t_pred_us"]})
    from profiling import chain_bench

    for r in result.get("chain") or []:  # fused against unfused boundaries: the model's time of the stack's mHC ops
        predicted = chain_bench.prediction(r, gpu, dtype, meta["copy_GBps"])
        measured = r["us"]
        rows.append({
            "kernel": f"chain_{r['sublayer']}_{r['mode']}_{r['variant']}", "n": r["n"], "C": r["C"], "T": r["T"],
            "gpu": gpu, "t_pred_us": predicted, "measured_us": measured, "measured_over_pred": measured / predicted,
        })  # fmt: skip
    return rows


def markdown(records: list[dict]) -> str:
    head = ("| gpu | kernel | C | T | launches | MB | t_dram | t_issue | t_smem | t_latency | t_pred µs | % copy |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    rows = [
        f"| {r['gpu']} | {_label(r)} | {r['C']} | {r['T']} | {r['launches']} | "
        f"{r.get('bytes_floor', r['bytes']) / 1e6:.1f} | "
        f"{r['t_dram_us']:.1f} | {r['t_issue_us']:.1f} | {r['t_smem_us']:.1f} | {r['t_latency_us']:.1f} | "
        f"{r['t_pred_us']:.1f} | {r['pct_copy_bw']:.0f} |"
        for r in records
    ]
    return "\n".join([head, *rows])


def _label(r: dict) -> str:
    return f"{r['kernel']} ({r['site']})" if "site" in r else r["kernel"]


def site_markdown(records: list[dict]) -> str:
    """The site records' own columns: bytes per token in units of C, the recompute replay, the launch sequence's
    latency (eager, CUDA graph, graph + PDL)."""
    head = ("| gpu | kernel | site | C | T | launches | bytes/token | floor/token | t_pred µs | % copy | recompute "
            "launches, µs | eager µs | graph µs | graph+PDL µs |\n" + "|---" * 14 + "|")  # fmt: skip
    rows = [
        f"| {r['gpu']} | {r['kernel']} | {r['site']} | {r['C']} | {r['T']} | {r['launches']} | "
        f"{r['bytes_per_token'] / r['C']:.2f}C | {r['bytes_floor'] / r['T'] / r['C']:.2f}C | {r['t_pred_us']:.1f} | "
        f"{r['pct_copy_bw']:.0f} | {r['launches_recompute']}, {r['t_recompute_us']:.1f} | {r['t_site_eager_us']:.1f} | "
        f"{r['t_site_graph_us']:.1f} | {r['t_site_graph_pdl_us']:.1f} |"
        for r in records
        if "site" in r
    ]
    return "\n".join([head, *rows])


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    start = time.perf_counter()
    if args.beside:
        rows = beside(args.beside)
        print(
            "| kernel | n | C | T | measured µs | predicted µs | measured / predicted |\n|---|---|---|---|---|---|---|"
        )
        for r in rows:
            print(f"| {r['kernel']} | {r['n']} | {r['C']} | {r['T']} | {r['measured_us']:.1f} | {r['t_pred_us']:.1f} | "
                  f"{r['measured_over_pred']:.2f} |")  # fmt: skip
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(rows, f, indent=1)
        return 0
    if args.decode:
        args.T, args.kernel, args.site = list(DECODE_TOKENS), ["site_fwd"], list(sites.DECODE_SITE_KINDS)
    recs = records(args.kernel, args.n, tuple(args.C), args.dtype, tuple(args.T), tuple(args.gpu), tuple(args.site))
    copy = ", ".join(f"{g} {gpus.GPUS[g].copy_gbps / 1000:.3g} TB/s" for g in args.gpu)
    print(f"Performance model (n={args.n}, {args.dtype}; assumed copy bandwidth {copy}; estimates from SASS, "
          "not measurements; bytes = byte model floor, % copy = floor / t_pred):\n")  # fmt: skip
    if not args.decode:
        print(markdown(recs))
    if any("site" in r for r in recs):
        print(f"\nSites ({', '.join(args.site)}; bytes = the site's own launches, site_bwd without the recompute "
              "replay, which is listed apart; latency of the launch sequence with the assumed per-launch overheads of "
              "profiling/model/gpus.py LaunchOverhead):\n")  # fmt: skip
        print(site_markdown(recs))
    print(f"\n({time.perf_counter() - start:.0f} s; per-launch inputs: --json PATH)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(recs, f, indent=1)
        print(f"wrote {len(recs)} records to {args.json}")
    return 0
