"""SASS-level figures of the pre-mapping kernels (tl_kernels/pre_proj.py, tl_kernels/pre_finalize.py) without a GPU:

    python -m tl_kernels.tools.pre_mapping_sass [--n 4] [--C 2560 7168] [--dtype bfloat16] [--T 16384]

For each kernel it compiles the configuration for the pinned target, disassembles it (``codegen.sass``) and reports
the hot loop (instructions per iteration, per thread), the warp instructions per token that loop costs, the integer
division sequences inside it (``I2F.*.RP`` reciprocal idioms and ``CALL``s to the 64-bit division routine), local
memory instructions, its widest global load, registers and shared memory (ptxas), resident blocks per SM on an H100
(65536 registers in 8-register steps per thread, 228 KB of shared memory, 2048 threads, 32 blocks), the grid at
``T`` against the resident slots (132 SMs), and the DRAM bytes per token of the byte model in the module docstrings.
Counts, not timings: nothing here has run on a GPU.

Hot loops: pre_proj fwd, one K-chunk of BK = 64 columns (a warp covers 16 tokens); pre_proj bwd, one token tile of
BM = 64 tokens of the block's K-slice, inner MMA loop included at its trip count (a block of 4 warps covers 64
tokens x 64 channels); pre_finalize fwd, one 16-byte chunk per stream of one token (a block of 4 warps moves 128
chunks of a token per iteration); pre_finalize bwd, one chunk of post_res's mapping.
"""

from __future__ import annotations

import argparse
import math
import re

from .. import _common, post_res, pre_finalize, pre_proj
from .._common import BLOCKS_PER_SM, REGS_PER_SM, SMEM_PER_SM, THREADS_PER_SM
from .._common import H100_SMS as SMS
from . import codegen

_LOCAL = re.compile(r"\b(?:LDL|STL)\b")
_LDG = re.compile(r"\bLDG\.E(?:\.(\d+))?")


def division_sequences(body: list[str]) -> int:
    """Integer division sequences in a list of SASS instructions: the reciprocal idiom ``I2F[.U32].RP`` of a 32-bit
    division by a variable, and ``CALL``s (ptxas calls a subroutine for 64-bit division)."""
    return sum(1 for text in body if "I2F" in text and ".RP" in text or re.search(r"\bCALL\b", text))


def local_memory(body: list[str]) -> int:
    return sum(bool(_LOCAL.search(text)) for text in body)


def widest_load_bits(body: list[str]) -> int:
    """Widest ``LDG`` in bits (``LDG.E`` alone is 32 bits; ``.64``, ``.128`` as written)."""
    widths = [int(m.group(1) or 32) for text in body for m in [_LDG.search(text)] if m]
    return max(widths, default=0)


def _body(ins, loop):
    return [text for addr, text in ins if loop["start"] <= addr <= loop["end"]]


def _outermost(loops):
    return [
        a for a in loops if not any(b is not a and b["start"] <= a["start"] and a["end"] <= b["end"] for b in loops)
    ]


def _inner(loops, outer):
    return [a for a in loops if a is not outer and outer["start"] <= a["start"] and a["end"] <= outer["end"]]


def _resident(regs: int, smem: int, threads: int) -> int:
    regs_alloc = -(-max(regs, 1) // 8) * 8 * threads
    return min(REGS_PER_SM // regs_alloc, SMEM_PER_SM // max(smem, 1), THREADS_PER_SM // threads, BLOCKS_PER_SM)


def hot_loop(kernel_name: str, n: int, C: int, dtype: str) -> dict:
    """The hot loop of one kernel: ``{"instructions"`` (one iteration, inner loops at their trip counts),
    ``"divisions"``, ``"local"``, ``"ldg_bits"``, ``"hmma"``, plus the whole kernel's ``"sass"`` text}."""
    kernel = _kernel(kernel_name, n, C, dtype)
    text = codegen.sass(kernel)
    ins = codegen.sass_instructions(text)
    loops = codegen.sass_loops(text)
    outer = _outermost(loops)
    if kernel_name in ("pre_proj_fwd", "pre_proj_bwd"):
        cands = [a for a in outer if any("HMMA" in t for t in _body(ins, a))]
    elif kernel_name == "pre_finalize_fwd":  # the apply loop stores layer_input; its inner loop runs per token
        cands = [a for a in loops if any(t.startswith("STG") for t in _body(ins, a)) and not _inner(loops, a)]
    else:
        cands = [a for a in outer if a["global"]]
    if len(cands) != 1:
        raise RuntimeError(f"{kernel_name} n={n} C={C} {dtype}: expected one hot loop, found {cands}")
    loop = cands[0]
    body = _body(ins, loop)
    count = len(body)
    hmma = sum("HMMA" in t for t in body)
    if kernel_name == "pre_proj_bwd":
        # the MMA loop of T.gemm stays rolled: its trip count follows from the MMAs a tile needs per thread
        inner = _inner(loops, loop)
        mp = pre_proj.padded_width(n * n + 2 * n)
        warps = pre_proj.bwd_threads(n) // 32
        need = 2 * (pre_proj.BM // 16) * (pre_proj.BK // 8) * (mp // 8) // warps  # d_x and d_phi GEMMs
        for a in inner:
            inner_hmma = sum("HMMA" in t for t in _body(ins, a))
            if inner_hmma:
                extra = (need - hmma) // inner_hmma
                count += a["instructions"] * extra
                hmma += inner_hmma * extra
    return {
        "instructions": count,
        "divisions": division_sequences(body),
        "local": local_memory([t for _, t in ins]),
        "ldg_bits": widest_load_bits(body),
        "stg128": any(t.startswith("STG.E.128") for t in body),
        "hmma": hmma,
        "sass": text,
    }


def _kernel(kernel_name: str, n: int, C: int, dtype: str):
    if kernel_name == "pre_proj_fwd":
        return pre_proj.pre_proj_fwd_kernel(n, C, dtype)
    if kernel_name == "pre_proj_bwd":
        return pre_proj.pre_proj_bwd_kernel(n, C, dtype, False)
    if kernel_name == "pre_finalize_fwd":
        return pre_finalize.pre_finalize_fwd_kernel(n, C, dtype, 20, 0.0)
    if kernel_name == "pre_finalize_bwd":
        return pre_finalize.pre_finalize_bwd_kernel(n, C, dtype)
    raise ValueError(f"unknown kernel {kernel_name!r}")


KERNELS = ("pre_proj_fwd", "pre_proj_bwd", "pre_finalize_fwd", "pre_finalize_bwd")


def report(kernel_name: str, n: int, C: int, dtype: str, T: int) -> dict:
    """Everything in the table for one kernel and shape."""
    loop = hot_loop(kernel_name, n, C, dtype)
    stats = codegen.analyze(_kernel(kernel_name, n, C, dtype))
    regs, smem = stats["registers"], stats["smem_bytes"]
    e = _common.ELEMENT_BYTES[dtype]
    m, K = n * n + 2 * n, n * C
    if kernel_name == "pre_proj_fwd":
        threads = pre_proj.FWD_THREADS
        splits = pre_proj.choose_splits(T, n, C, SMS, "fwd")
        grid = pre_proj.fwd_tiles(T) * splits
        per_token = loop["instructions"] * (K // pre_proj.BK) / 16  # warp instructions; a warp covers 16 tokens
        bytes_token = e * K + splits * (m + 1) * 4  # x, the partials
    elif kernel_name == "pre_proj_bwd":
        threads = pre_proj.bwd_threads(n)
        splits = pre_proj.choose_splits(T, n, C, SMS, "bwd")
        grid = K // pre_proj.BK * splits
        per_token = loop["instructions"] * (threads // 32) * (K // pre_proj.BK) / pre_proj.BM
        bytes_token = e * (2 * K + C)  # x, d_x, g_li (once per stream when L2 keeps it: the floor)
    elif kernel_name == "pre_finalize_fwd":
        threads = pre_finalize.THREADS
        vec = _common.VECTOR_BYTES // e
        slices = pre_finalize.choose_slices(T, C, dtype, SMS)
        splits = slices
        grid = -(-T // pre_finalize.TOKENS) * slices
        per_token = loop["instructions"] * (C // vec) / 32  # one iteration moves one chunk of a token; 32 lanes
        bytes_token = e * (K + C) + pre_proj.choose_splits(T, n, C, SMS, "fwd") * (m + 1) * 4
    else:
        plan = post_res._plan(n, C, dtype)
        threads = plan.threads
        splits = 1
        grid = -(-T // plan.tpb)
        per_token = loop["instructions"] * plan.chunks / 32
        bytes_token = e * (K + C)
    resident = _resident(regs, smem, threads)
    slots = resident * SMS
    return {
        "kernel": kernel_name, "n": n, "C": C, "dtype": dtype, "T": T,
        "loop": loop["instructions"], "per_token": per_token, "divisions": loop["divisions"],
        "local": loop["local"], "ldg_bits": loop["ldg_bits"], "hmma": loop["hmma"],
        "registers": regs, "spill": stats["spill_bytes"], "smem": smem, "threads": threads,
        "blocks_per_sm": resident, "grid": grid, "slots": slots, "waves": grid / slots, "splits": splits,
        "bytes_per_token": bytes_token,
    }  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4])
    ap.add_argument("--C", type=int, nargs="+", default=[2560, 7168])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--T", type=int, default=16384)
    args = ap.parse_args(argv)
    print("| kernel | n | C | SASS/iteration | warp SASS/token | int divisions | LDL/STL | widest LDG | HMMA/iteration "
          "| regs | smem B | threads | blocks/SM | grid / slots (waves) | splits | DRAM bytes/token |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.n:
        for C in args.C:
            for name in KERNELS:
                r = report(name, n, C, args.dtype, args.T)
                print(f"| {name} | {n} | {C} | {r['loop']} | {r['per_token']:.0f} | {r['divisions']} | {r['local']} | "
                      f"{r['ldg_bits']} | {r['hmma']} | {r['registers']} | {r['smem']} | {r['threads']} | "
                      f"{r['blocks_per_sm']} | {r['grid']} / {r['slots']} ({math.ceil(r['waves'] * 100) / 100:.2f}) | "
                      f"{r['splits']} | {r['bytes_per_token']} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
