"""Stage 2 of the GPU run: every shipped kernel configuration against the float64 reference.

    python -m profiling.check_configs [--device cuda] [--tokens 0 1 7 129 1000] [--family F] [--json PATH]

For each family in :data:`tl_kernels.registry.FAMILIES` (and any other family the registry lists) and each of its
configurations, the family's check function from :mod:`profiling.families` runs at every token count. One line per
configuration is printed (worst error ratio over its outputs and token counts; pass when <= 1), and ``--json``
is rewritten after every configuration, so a run cut short keeps what it measured. Exit status 0 when everything
checked passed and no family failed for want of a check function; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
import traceback

import torch

from profiling import families
from tl_kernels import registry


def _families() -> list[str]:
    names = list(registry.FAMILIES)
    for cfg in registry.ALL_CONFIGS:
        if cfg.family not in names:
            names.append(cfg.family)
    return names


def check_config(cfg, tokens, device: str, seed: int = 0) -> dict:
    """Runs the family's check at every token count; ``{"name", "ok", "worst_ratio", "max_abs", "per_T", "error"}``."""
    fn = families.CHECKS[cfg.family]
    per_t, worst, max_abs, error = {}, 0.0, {}, None
    for T in tokens:
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + T)
        try:
            errs = fn(cfg, T, device, gen)
        except Exception as exc:  # noqa: BLE001 - reported per configuration, the sweep goes on
            error = f"T={T}: {type(exc).__name__}: {exc}"
            per_t[T] = {"error": error, "traceback": traceback.format_exc(limit=6)}
            worst = float("inf")
            continue
        per_t[T] = {name: {"max_abs": e.max_abs, "ratio": e.ratio} for name, e in errs.items()}
        for name, e in errs.items():
            worst = max(worst, e.ratio) if e.ratio == e.ratio else float("inf")  # NaN ratio -> inf
            max_abs[name] = max(max_abs.get(name, 0.0), e.max_abs)
    ok = error is None and worst <= 1.0
    return {"name": cfg.name, "ok": ok, "worst_ratio": worst, "max_abs": max_abs, "per_T": per_t, "error": error}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, nargs="+", help="token counts (default: per family, profiling.families)")
    ap.add_argument("--family", action="append", help="only this family (repeatable)")
    ap.add_argument("--json", help="write the results here (rewritten after every configuration)")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.json) if args.json else None
    report = {"device": args.device, "families": {}, "configs": []}
    if args.device == "cuda":
        report["device_name"] = torch.cuda.get_device_name()
    status = 0
    t0 = time.perf_counter()
    for family in _families():
        if args.family and family not in args.family:
            continue
        cfgs = registry.configs(family)
        note = families.family_status(family, cfgs)
        report["families"][family] = note or f"checked {len(cfgs)} configurations"
        if note:
            print(f"{family}: {note}", flush=True)
            if note.startswith("fail"):
                status = 1
            continue
        tokens = tuple(args.tokens) if args.tokens else families.tokens_for(family)
        for cfg in cfgs:
            t1 = time.perf_counter()
            res = check_config(cfg, tokens, args.device)
            res["seconds"] = time.perf_counter() - t1
            report["configs"].append(res)
            worst = res["worst_ratio"]
            line = f"{'PASS' if res['ok'] else 'FAIL'} {cfg.name:<48} worst err/tol {worst:9.3g}"
            if res["error"]:
                line += f"  {res['error']}"
            print(line, flush=True)
            if not res["ok"]:
                status = 1
            if out:
                _write(out, report)
    report["seconds"] = time.perf_counter() - t0
    n_ok = sum(r["ok"] for r in report["configs"])
    report["summary"] = f"{n_ok}/{len(report['configs'])} configurations passed"
    print(report["summary"], flush=True)
    if out:
        _write(out, report)
    return status


def _write(path: pathlib.Path, report: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")
    sys.exit(main())
