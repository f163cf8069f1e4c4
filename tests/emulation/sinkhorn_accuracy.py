"""Measure the Sinkhorn kernels' error against float64 in the CPU emulation of their generated CUDA (the numbers of
docs/benchmarks.md, "Sinkhorn accuracy"; the tests assert the tolerances, this prints the measured values):

    PYTHONPATH=. python -m tests.emulation.sinkhorn_accuracy [--n 2 4 7 8 10 12 16] [--tokens 256]

For each n, logit scale (N(0, 4) and N(0, 100) logits) and approximate-math mode (every ex2/lg2/rcp.approx result
moved up, then down, by its documented worst-case error, subnormals flushed; see cuda_emu.py), it runs the forward
and the backward (eps = 0, 20 iterations: the factored exp domain) on ``--tokens`` tokens and prints max |out - ref|
and max |grad - ref| / max |grad_out| against mhc.reference in float64. Seeded: the same command prints the same
numbers.
"""

from __future__ import annotations

import argparse

import torch

from mhc import reference as ref
from tl_kernels import sinkhorn

from .cuda_emu import EmulatedKernel

ITERS = 20


def measure(n: int, tokens: int, std: float, approx: str, seed: int = 0) -> tuple[float, float]:
    """(forward max |err|, backward max |err| / max |grad_out|) for one configuration."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, n, n, generator=gen) * std
    grad_out = torch.randn(tokens, n, n, generator=gen)
    fwd = EmulatedKernel(sinkhorn.sinkhorn_fwd_kernel(n, ITERS, 0.0), approx=approx)
    bwd = EmulatedKernel(sinkhorn.sinkhorn_bwd_kernel(n, ITERS, 0.0), approx=approx)
    out = torch.empty_like(logits)
    fwd(logits=logits, out=out, num_tokens=tokens, grid=-(-tokens // fwd.threads))
    grad = torch.empty_like(logits)
    bwd(grad_out=grad_out, logits=logits, grad_logits=grad, num_tokens=tokens, grid=-(-tokens // bwd.threads))
    want_out = ref.sinkhorn(logits.double(), ITERS, 0.0)
    want_grad = ref.sinkhorn_backward(grad_out.double(), logits.double(), ITERS, 0.0)
    fwd_err = float((out.double() - want_out).abs().max())
    bwd_err = float((grad.double() - want_grad).abs().max() / grad_out.abs().max())
    return fwd_err, bwd_err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 7, 8, 10, 12, 16])
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args(argv)
    print("| n | logits | approx | forward max abs err | backward max abs err / max abs grad_out |")
    print("|---|---|---|---|---|")
    for n in args.n:
        for std in (2.0, 10.0):
            for approx in ("up", "down"):
                f, b = measure(n, args.tokens, std, approx)
                print(f"| {n} | N(0, {std * std:g}) | {approx} | {f:.2e} | {b:.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
