"""Activation memory of :class:`mhc.MHCStack` against the recompute block ``L_r`` (paper Eq. 20), on the CPU.

Counts bytes exactly, by storage: every tensor storage created while the forward runs is tracked (weak references,
through a ``TorchDispatchMode``); after the forward, the storages still alive are what the autograd graph keeps for
backward ("resident"); during the backward, the largest sum of live tracked storages is the "peak" (it includes the
replayed block and the gradients being formed). The model is ``L`` sites with FFN sublayers (``C -> 4C -> C``).

    python -m profiling.recompute_memory --layers 24 --n 4 --C 64 --tokens 512

prints one row per ``L_r`` with the bytes in units of ``C * tokens * 4`` (fp32 elements of ``C`` per token) next to
the model of ``mhc/recompute.py``: ``n*(ceil(L/L_r) - 1)`` for the kept block inputs (the first is the caller's
input, not counted), and the transient ``n*L_r`` replayed in backward. GPU numbers (``torch.cuda.max_memory_allocated``)
are left to a GPU run: ``tests/gpu/test_recompute_gpu.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import mhc


class StorageTracker(TorchDispatchMode):
    """Tracks every output storage created under it; ``live_bytes()`` sums those still alive."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, tuple[weakref.ref, int]] = {}
        self.peak = 0
        self.track_peak = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = id(s)
                if key not in self.refs or self.refs[key][0]() is None:
                    self.refs[key] = (weakref.ref(s), s.nbytes())
        if self.track_peak:
            self.peak = max(self.peak, self.live_bytes())
        return out

    def live_bytes(self) -> int:
        return sum(nbytes for ref, nbytes in self.refs.values() if ref() is not None)


def make_stack(L: int, n: int, C: int, recompute_block, device="cpu") -> mhc.MHCStack:
    def ffn():
        return nn.Sequential(nn.RMSNorm(C), nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

    layers = [mhc.MHC(ffn(), C, n, kind="ffn", layer_index=i, post_stream=None) for i in range(L)]
    return mhc.MHCStack(layers, recompute_block=recompute_block).to(device)


def measure(stack: mhc.MHCStack, x: torch.Tensor) -> tuple[int, int]:
    """(resident bytes after forward, peak live bytes during backward) of tensors created by the step."""
    tracker = StorageTracker()
    with tracker:
        out = stack(x)
        loss = out.float().square().mean()
        del out
        resident = tracker.live_bytes() - loss.untyped_storage().nbytes()
        tracker.track_peak = True
        loss.backward()
    return resident, tracker.peak


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--C", type=int, default=64)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--json", default=None, help="write the table here")
    a = p.parse_args(argv)
    L, n, C, T = a.layers, a.n, a.C, a.tokens
    torch.manual_seed(0)
    x = torch.randn(T, n, C, requires_grad=True)
    unit = C * T * 4
    rows = []
    base_stack = make_stack(L, n, C, None)
    for r in [None, *range(1, L + 1)]:
        if r is not None and r not in (1, 2, 3, 4, 6, 8, 12, L) and r != mhc.optimal_block(n, L):
            continue
        stack = make_stack(L, n, C, r)
        stack.load_state_dict(base_stack.state_dict())
        resident, peak = measure(stack, x)
        blocks = math.ceil(L / r) if r else None
        rows.append(
            {
                "L_r": r or "off",
                "resident_units": resident / unit,
                "peak_units": peak / unit,
                "model_kept_inputs_units": n * (blocks - 1) if r else None,
                "model_transient_units": n * r if r else None,
                "eq20_cost_units": n * blocks + (n + 2) * r if r else (n + 2) * L,
            }
        )
    ref = next(row for row in rows if row["L_r"] == L)
    print(f"L={L} n={n} C={C} tokens={T}; units of C*tokens*4 bytes; Eq. 20 optimum L_r*={mhc.optimal_block(n, L)}")
    print(f"{'L_r':>4} {'resident':>9} {'resident-res(L)':>16} {'model n(ceil(L/L_r)-1)':>22} {'peak':>8} {'Eq20':>6}")
    for row in rows:
        extra = row["resident_units"] - ref["resident_units"]
        model = row["model_kept_inputs_units"]
        print(
            f"{row['L_r']!s:>4} {row['resident_units']:9.2f} {extra:16.2f} {'' if model is None else model:>22} "
            f"{row['peak_units']:8.2f} {row['eq20_cost_units']:6}"
        )
    result = {"L": L, "n": n, "C": C, "tokens": T, "optimal": mhc.optimal_block(n, L), "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
