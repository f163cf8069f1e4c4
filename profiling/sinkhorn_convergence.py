"""Column error of the truncated Sinkhorn-Knopp iteration (Eq. 9) against the spread of the logits, on the CPU.

Rows of ``mhc.sinkhorn``'s output sum to 1 exactly (the last half-step normalises rows); columns sum to 1 only up to
the truncation error of ``iters`` steps. This script measures that error, ``max_j |sum_i h_res[i, j] - 1|``, for
i.i.d. ``N(0, std^2)`` logits (``--samples`` matrices per cell, float64, :func:`mhc.reference.sinkhorn`); docs/spec.md
§3.3 quotes its output and explains the regime. Run::

    python -m profiling.sinkhorn_convergence            # n in {2, 4, 8, 16}, iters in {10, 20}
    python -m profiling.sinkhorn_convergence --n 4 --iters 20 --samples 4000
"""

from __future__ import annotations

import argparse

import torch

from mhc import reference

STDS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 10.0, 100.0, 1e4)


def column_error(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Per-matrix ``max_j |sum_i h[i, j] - 1|`` of ``sinkhorn(logits, iters)``."""
    h = reference.sinkhorn(logits, iters)
    return (h.sum(-2) - 1).abs().amax(-1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8, 16], help="stream counts")
    ap.add_argument("--iters", type=int, nargs="+", default=[10, 20], help="iteration counts")
    ap.add_argument("--samples", type=int, default=2000, help="random matrices per cell")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    g = torch.Generator().manual_seed(a.seed)
    print("column error max_j |sum_i h[i,j] - 1| of sinkhorn(std * randn(n, n)), float64: median / p99 / max")
    for n in a.n:
        for iters in a.iters:
            print(f"\nn = {n}, iters = {iters}")
            print(f"{'std':>8}  {'median':>9}  {'p99':>9}  {'max':>9}")
            for std in STDS:
                z = torch.randn(a.samples, n, n, generator=g, dtype=torch.float64) * std
                err = column_error(z, iters)
                q = torch.quantile(err, torch.tensor([0.5, 0.99], dtype=torch.float64))
                print(f"{std:8.3g}  {q[0]:9.2e}  {q[1]:9.2e}  {err.max():9.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
