"""``make bench`` and ``make bench-compare``: paper-style kernel and block timings.

    python -m profiling                    # = bench: the full sweep on the local GPU -> profiling/results/<gpu>/
    python -m profiling bench --quick      # the target shapes (a few minutes with compiles); any profiling.bench flag
    python -m profiling compare            # a quick run into build/bench-current/, then against the committed results
    python -m profiling compare --current DIR [--baseline DIR] [--threshold 0.1]   # two existing runs
    python -m profiling floors             # the analytic floor tables for H100 and H200
    python -m profiling model [--json PATH]  # the performance model (SASS-based, no GPU): docs/benchmarks.md

Without a CUDA GPU, ``bench`` says so, prints the analytic floor tables (byte model, nominal bandwidth times an
assumed 90%) and the performance model's predictions (``model``), and runs the harness on the CPU kernels at tiny
shapes into ``build/bench-cpu/`` (not committed), so the harness itself is exercised; its timings say nothing about
a GPU.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CPU_OUT = ROOT / "build" / "bench-cpu"
CURRENT_OUT = ROOT / "build" / "bench-current"


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_bench(rest: list[str]) -> int:
    from profiling import bench, bytemodel

    args = bench.parser().parse_args(rest)
    if args.device == "cuda" and not _has_gpu():
        args.device = "cpu"
    if args.device == "cpu":
        why = "--device cpu" if _has_gpu() else "No CUDA GPU on this machine"
        print(f"{why}: no GPU timings are made in this run.")
        print("What the byte model predicts instead (docs/benchmarks.md):\n")
        print(bytemodel.floor_markdown(n=args.n))
        _print_model(args.n)
        print("Timing the CPU kernels at tiny shapes so the harness itself runs (these numbers say nothing about "
              "a GPU):\n", flush=True)  # fmt: skip
        rest = [*rest, "--device", "cpu"]
        if args.out is None:
            rest += ["--out", str(CPU_OUT)]
        if not args.quick:
            rest.append("--quick")
        if "--no-compile" not in rest:
            rest.append("--no-compile")  # torch.compile of the reference on a CPU takes minutes; not the point here
    return bench.main(rest)


def _print_model(n: int) -> None:
    """The performance model's table on a machine without a GPU (a failure is reported, not fatal to the bench)."""
    from profiling.model import cli

    try:
        cli.main(["--n", str(n)])
    except Exception as exc:  # noqa: BLE001 - e.g. no nvdisasm: the CPU harness run below still has value
        print(f"(performance model unavailable: {type(exc).__name__}: {exc})")
    print()


def cmd_compare(rest: list[str]) -> int:
    from profiling import bench, compare

    ap = argparse.ArgumentParser(prog="python -m profiling compare", description=compare.__doc__.splitlines()[0])
    ap.add_argument("--current", help="an existing run (folder or bench.json); default: run the quick profile now")
    ap.add_argument("--baseline", help="default: profiling/results/<gpu>/")
    ap.add_argument("--threshold", type=float, default=compare.THRESHOLD, help="flag slowdowns above this fraction")
    ap.add_argument("--full", action="store_true", help="run the full sweep instead of --quick")
    args, bench_args = ap.parse_known_args(rest)
    baseline = pathlib.Path(args.baseline) if args.baseline else ROOT / "profiling" / "results" / bench.gpu_dir_name()
    current = args.current
    if current is None:
        if not _has_gpu():
            print("bench-compare: no CUDA GPU on this machine, so no current run to compare: the committed results are "
                  "GPU timings (exit 2). Compare two existing runs with --current DIR [--baseline DIR].")  # fmt: skip
            return compare.NOTHING_TO_COMPARE
        current = CURRENT_OUT
        rc = bench.main([*([] if args.full else ["--quick"]), *bench_args, "--out", str(current)])
        if rc:
            return rc
    return compare.main_compare(baseline, current, args.threshold)


def cmd_floors(rest: list[str]) -> int:
    from profiling import bytemodel

    ap = argparse.ArgumentParser(prog="python -m profiling floors")
    ap.add_argument("--n", type=int, default=4)
    args = ap.parse_args(rest)
    print(bytemodel.floor_markdown(n=args.n))
    return 0


def cmd_model(rest: list[str]) -> int:
    from profiling.model import cli

    return cli.main(rest)


COMMANDS = {"bench": cmd_bench, "compare": cmd_compare, "floors": cmd_floors, "model": cmd_model}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "bench"
    return COMMANDS[command](argv)


if __name__ == "__main__":
    os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")
    sys.exit(main())
