"""A small set of kernel launches for compute-sanitizer (memcheck, racecheck), driven by the registry: for every
family with a check function in :mod:`profiling.families`, the first, middle and last configuration of each
direction, at token counts that leave partial thread blocks (and 1). Run as

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python -m profiling.sanitize_cases

(without PyTorch's caching allocator every tensor is its own cudaMalloc, so memcheck sees an out-of-bounds access
even when it would land inside a larger cached block). The results are compared with the reference as in stage 2;
a mismatch exits 1. ``--device cpu`` runs the same code on the reference (dry run).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from profiling import families
from profiling.check_configs import _families, check_config
from tl_kernels import registry

TOKENS = (1, 37, 129)


def pick(cfgs: list, seen: set | None = None) -> list:
    """First, middle and last configuration of each direction, in registry order. ``seen`` collects what each pick
    launches (check function, direction and shape): families checked through the same op (``pre_proj`` and
    ``pre_finalize`` both run the fused pre-mapping) do not launch the same case twice."""
    seen = set() if seen is None else seen
    chosen = []
    for direction in registry.DIRECTIONS:
        sub = [c for c in cfgs if c.direction == direction]
        for cfg in (sub[:1] + sub[len(sub) // 2 : len(sub) // 2 + 1] + sub[-1:]) if sub else []:
            kw = cfg.kwargs
            key = (families.CHECKS.get(cfg.family), direction, *(kw.get(k) for k in ("n", "C", "dtype")))
            if cfg not in chosen and key not in seen:
                seen.add(key)
                chosen.append(cfg)
    return chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help="token counts (default %(default)s)")
    args = ap.parse_args(argv)
    status = 0
    seen: set = set()
    for family in _families():
        cfgs = registry.configs(family)
        note = families.family_status(family, cfgs)
        if note:
            print(f"{family}: {note}", flush=True)
            status |= note.startswith("fail")
            continue
        for cfg in pick(cfgs, seen):
            tokens = tuple(args.tokens)
            res = check_config(cfg, tokens, args.device, seed=1)
            print(f"{'ran' if res['ok'] else 'MISMATCH'} {cfg.name} T={tokens} {res['error'] or ''}", flush=True)
            status |= not res["ok"]
    if args.device == "cuda":
        torch.cuda.synchronize()
    print("sanitize cases ran", flush=True)
    return int(status)


if __name__ == "__main__":
    os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")
    sys.exit(main())
