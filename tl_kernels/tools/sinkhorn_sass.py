"""SASS instruction counts of the Sinkhorn kernels, per token, without a GPU (the tables of docs/benchmarks.md,
"Sinkhorn"):

    python -m tl_kernels.tools.sinkhorn_sass [--iters 20] [--eps 0.0] [--n 2 4 6 8 16]

For each n and direction it compiles the kernel for the pinned target, disassembles it (``codegen.sass``: ptxas,
cuobjdump, nvdisasm) and counts instructions: the loops that hold the MUFU work are the Sinkhorn iterations (the
forward's one loop runs ``iters`` times; the backward's recompute loop ``iters`` times and its sweep loop
``iters - 1`` times), everything else runs once. It also prints registers, shared memory, tokens per block, warps per
SM sub-partition (scheduler) at T = 4096 and 16384 on an H100 (132 SMs, 4 schedulers each, resident blocks limited by
registers, shared memory and threads), and an issue-bound estimate: instructions per token x T / 32 (a warp issues
one instruction for 32 tokens) / (132 x 4 x 1.755e9 per second), i.e. one warp instruction per scheduler per cycle
at the boost clock. That is a lower bound on time when the
schedulers are kept busy; with fewer than ~4 warps per scheduler latency dominates instead. Estimates, not
measurements.
"""

from __future__ import annotations

import argparse
import math
import re

from .. import sinkhorn, sinkhorn_plan
from .._common import H100_SMS as SMS
from .._common import REGS_PER_SM, SMEM_PER_SM, THREADS_PER_SM
from . import codegen

SCHEDULERS, CLOCK_HZ = 4, 1.755e9


def _unroll(sass_text: str, loop: dict, slot_bytes: int = 0) -> int:
    """How many source iterations one pass of a SASS loop runs, from the loop counter's self-increment (``IADD3 Rk,
    Rk, 0xN`` or the uniform ``UIADD3 URk, URk, 0xN``, N of either sign, the register also tested by an
    ``ISETP``/``UISETP`` of the loop): |N| itself when it is a small count, or |N| / slot_bytes when the counter is a
    byte offset into the backward's history (one slot of u, v or a, b per iteration; the sweep walks it downwards);
    else 1. ptxas unrolls some loops by 2 to 8."""
    body = [text for addr, text in codegen.sass_instructions(sass_text) if loop["start"] <= addr <= loop["end"]]
    compared = {
        reg for text in body if text.split()[0].lstrip("U").startswith("ISETP") for reg in re.findall(r"U?R\d+", text)
    }
    factors = []
    for text in body:
        m = re.match(r"U?IADD3 (U?R\d+), \1, (-?0x[0-9a-f]+), U?RZ", text)
        if not (m and m.group(1) in compared):
            continue
        step = abs(int(m.group(2), 16))  # the backward's sweep walks its history downwards
        if step <= 8:
            factors.append(step)
        elif slot_bytes and step % slot_bytes == 0 and step // slot_bytes <= 8:
            factors.append(step // slot_bytes)
    return max(factors, default=1)


def _iteration_trips(direction: str, n: int, iters: int, eps: float) -> list[int]:
    """Trip counts of the iteration loops, in address order, on the normal path (fallback loops: 0 trips).

    * forward, exp-domain plan: the factored loop (``iters - 1``), then the log-domain fallback;
    * backward, exp-domain plan: the factored recompute (``iters - 2``, first and last iterations peeled), the sweep
      on H (``iters - 1``), then the log-domain recompute and sweep of the fallback;
    * log-domain plans: the forward loop (``iters``), or the backward's recompute (``iters``) and sweep
      (``iters - 1``)."""
    if direction == "fwd":
        plan = sinkhorn_plan.fwd_plan(n, iters, eps)
        return [iters - 1, 0] if sinkhorn_plan.uses_exp_domain(plan) else [iters]
    plan = sinkhorn_plan.bwd_plan(n, iters, eps)
    return [iters - 2, iters - 1, 0, 0] if sinkhorn_plan.uses_exp_domain(plan) else [iters, iters - 1]


def per_token(direction: str, n: int, iters: int, eps: float) -> dict:
    """SASS instructions one token executes on the normal path: every instruction outside the iteration loops once
    (that includes the straight-line code of the fallback path, which the normal path skips: an overestimate of a
    few hundred instructions), plus each iteration loop's body times its passes (see _iteration_trips). Iteration
    loops are the outermost loops without global-memory instructions (the others are staging copies)."""
    kernel = (sinkhorn.sinkhorn_fwd_kernel if direction == "fwd" else sinkhorn.sinkhorn_bwd_kernel)(n, iters, eps)
    text = codegen.sass(kernel)
    total = len(codegen.sass_instructions(text))
    loops = codegen.sass_loops(text)
    outer = [
        a
        for a in loops
        if not a["global"] and not any(b is not a and b["start"] <= a["start"] and a["end"] <= b["end"] for b in loops)
    ]
    plan = (sinkhorn_plan.fwd_plan if direction == "fwd" else sinkhorn_plan.bwd_plan)(n, iters, eps)
    trips = _iteration_trips(direction, n, iters, eps)
    # ptxas may unroll a small fallback loop completely (n = 2): its code is then counted once as straight-line
    # code, and the total is an overestimate (marked in the table).
    fallback_unrolled = len(outer) < len(trips) and not any(trips[len(outer) :])
    if fallback_unrolled:
        trips = trips[: len(outer)]
    if len(outer) != len(trips):
        raise RuntimeError(f"{direction} n={n}: expected {len(trips)} iteration loops, found {outer}")
    count = total - sum(loop["instructions"] for loop in outer)
    # one history slot (u and v of every token; either layout of sinkhorn_plan.hist_index)
    slot_bytes = 4 * 2 * n * plan.tokens_per_block if direction == "bwd" else 0
    unroll = [_unroll(text, loop, slot_bytes) for loop in outer]
    passes = [-(-t // u) for u, t in zip(unroll, trips, strict=True)]
    count += sum(loop["instructions"] * p for loop, p in zip(outer, passes, strict=True))
    stats = codegen.ptxas_stats(codegen.ptx(kernel))
    regs = next(iter(stats.values()))["registers"]
    tpb = plan.tokens_per_block
    regs_alloc = -(-regs // 8) * 8 * -(-tpb // 32) * 32  # per block, allocation granularity of 8 per thread
    per_sm = min(REGS_PER_SM // regs_alloc, SMEM_PER_SM // max(plan.smem_bytes, 1), THREADS_PER_SM // tpb)
    warps = {}
    for T in (4096, 16384):
        blocks = math.ceil(T / tpb)
        resident = min(blocks, per_sm * SMS)
        warps[T] = resident * math.ceil(tpb / 32) / (SMS * SCHEDULERS)
    return {
        "n": n, "direction": direction, "per_token": count, "fallback_unrolled": fallback_unrolled,
        "loops": [f"{loop['instructions']}/{u}" for loop, u in zip(outer, unroll, strict=True)],
        "mufu_per_pass": [loop["mufu"] for loop in outer], "registers": regs, "smem": plan.smem_bytes,
        "tokens_per_block": tpb, "warps_per_scheduler": warps,
        # one warp instruction per scheduler per cycle; a warp issues for 32 tokens (one token per thread)
        "issue_us": {T: count * T / 32 / (SMS * SCHEDULERS * CLOCK_HZ) * 1e6 for T in (4096, 16384)},
    }  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--eps", type=float, default=0.0)
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 6, 7, 8, 10, 16])
    args = ap.parse_args(argv)
    print("| n | kernel | SASS/token | loop bodies (instructions/iterations per pass) | regs | smem B | tokens/block | warps/scheduler T=4096, 16384 "
          "| issue-bound us T=4096, 16384 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.n:
        for direction in ("fwd", "bwd"):
            r = per_token(direction, n, args.iters, args.eps)
            w, t = r["warps_per_scheduler"], r["issue_us"]
            mark = "*" if r["fallback_unrolled"] else ""
            print(f"| {n} | {direction} | {r['per_token']}{mark} | {' + '.join(map(str, r['loops']))} | {r['registers']} | "
                  f"{r['smem']} | {r['tokens_per_block']} | {w[4096]:.2f}, {w[16384]:.2f} | "
                  f"{t[4096]:.1f}, {t[16384]:.1f} |")  # fmt: skip
    print("\n\\* includes a fallback loop that ptxas unrolled completely: an overestimate of the normal path.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
