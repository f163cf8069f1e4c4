"""Time bounds per launch and per model kernel, and the JSON records of ``python -m profiling model``.

For one kernel launch on a GPU ``g`` (:mod:`profiling.model.gpus`), with ``S`` = g.sms, ``f`` = g.clock_hz and the
counts of :mod:`profiling.model.counts`:

* ``t_dram = bytes / copy_bandwidth``, ``bytes`` = every tensor argument once (inputs read, outputs written);
* ``t_issue = waves_sm * max(issued / 4, fma / r_fma, alu / r_alu, mufu / r_mufu, lsu / r_lsu, tensor / r_tc)
  / (S * f)``: warp instructions per SM against the issue rate (4 schedulers x 1 per cycle) and each pipe's rate;
  ``waves_sm = ceil(blocks / S) / (blocks / S)`` charges the SM that gets one block more;
* ``t_smem = waves_sm * wavefronts / (S * f * 1 wavefront per cycle)``, conflicts included;
* ``t_latency = max(ceil(blocks / slots) * rounds * L, ceil(blocks / slots) * w_max * cpi / f)``: Little's law. A
  warp waits about one DRAM latency ``L`` per round of global loads it issues before using them (``rounds``: loads
  per warp, grouped by the SASS loop that holds them, one group per pass); ``slots = S x`` resident blocks per SM
  (registers, shared memory, threads). Equivalently the bytes in flight per SM, ``resident warps x bytes per round``,
  must cover ``L x bandwidth / S`` for the DRAM bound to be reachable; the records report both. The second term is
  the busiest warp alone on its scheduler (:func:`warp_cycles`, ``warp_cycles`` in the records): an in-order
  scoreboard over its SASS with each pipe's result latency and issue occupancy, so independent instructions
  issue one per cycle and a dependent one waits for its operand (FP32 4 cycles, MUFU 18, shared memory 30, a global
  load the DRAM latency). It replaces ``w_max x 4`` cycles (every instruction waiting 4 cycles for the previous
  one), which charged 16 cycles to four independent FFMAs that issue in 4 and only 4 to a MUFU result that takes
  18 (docs/benchmarks.md, "The dependent chain");
* ``t_pred = max(t_dram, t_issue, t_smem, t_latency, launch_us)``. The maximum, not the sum: the four resources
  work concurrently when enough warps are resident, and each bound alone is a floor; a kernel near two bounds runs
  slower than either (not modelled). ``launch_us`` is the least time a launch occupies the stream (small T).

Torch glue ops: ``t_pred = max(bytes / copy_bandwidth, launch_us)``. A model kernel made of several launches (the
pre-mapping, a site) sums its launches' ``t_pred`` and each bound. ``pct_copy_bw = bytes / copy_bandwidth / t_pred``
with ``bytes`` from :mod:`profiling.bytemodel` (the floor), so 100% means the floor.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import dataclass

import torch

from mhc._cuda import TORCH_DTYPES as _DTYPES
from profiling import bytemodel

from . import capture, counts, gpus, sass

__all__ = ["KERNELS", "LaunchModel", "launch_model", "predict", "records", "warp_cycles"]

KERNELS = (
    "post_res_fwd", "post_res_bwd", "pre_mapping_fwd", "pre_mapping_bwd",
    "sinkhorn_fwd", "sinkhorn_bwd", "site_fwd", "site_bwd",
)  # fmt: skip
#: Data-dependent conditions of the normal path (see counts): the Sinkhorn's exp-domain check succeeds.
ASSUME = {"ok[0]": 1}


@dataclass
class LaunchModel:
    name: str
    bytes: int
    t_dram_us: float
    t_issue_us: float
    t_smem_us: float
    t_latency_us: float
    t_pred_us: float
    detail: dict


@functools.lru_cache(maxsize=64)
def _info_for(source_hash: str, kernel) -> counts.KernelInfo:
    from tl_kernels.tools import codegen

    resources = codegen.analyze(kernel)
    return counts.kernel_info(
        kernel.prim_func.attrs["global_symbol"],
        codegen.cuda_source(kernel),
        codegen.sass_with_line_info(kernel),
        resources,
    )


def kernel_info(kernel) -> counts.KernelInfo:
    """SASS, source structure and ptxas resources of a compiled kernel (memoised per source text)."""
    from tl_kernels.tools import codegen

    return _info_for(hashlib.sha256(codegen.cuda_source(kernel).encode()).hexdigest(), kernel)


def _bind(kernel, args) -> tuple[dict[str, int], tuple[int, int, int], int | None]:
    """The kernel's dynamic sizes and scalar arguments from the launch arguments, and its grid from the TIR."""
    from tvm import arith, tirx

    pf = kernel.prim_func
    values: dict = {}
    scalars: dict[str, int] = {}
    for param, arg in zip(pf.params, args, strict=False):
        buf = pf.buffer_map.get(param)
        if buf is not None and isinstance(arg, torch.Tensor):
            for dim, size in zip(buf.shape, arg.shape, strict=False):
                if isinstance(dim, tirx.Var):
                    values[dim] = int(size)
                    scalars[dim.name] = int(size)
        elif buf is None and isinstance(arg, (int, bool)) and not isinstance(arg, float):
            values[param] = int(arg)
            scalars[param.name] = int(arg)
    grid = {"blockIdx.x": 1, "blockIdx.y": 1, "blockIdx.z": 1}
    threads = {"threadIdx.x": 1, "threadIdx.y": 1, "threadIdx.z": 1}
    analyzer = arith.Analyzer()
    found = []

    def visit(node):
        if isinstance(node, tirx.For) and node.thread_binding is not None:
            found.append((node.thread_binding.thread_tag, node.extent))

    tirx.stmt_functor.post_order_visit(pf.body, visit)
    for tag, extent in found:
        value = analyzer.simplify(tirx.stmt_functor.substitute(extent, values))
        if tag in grid:
            grid[tag] = int(value)
        elif tag in threads and isinstance(value, tirx.IntImm):
            threads[tag] = int(value)
    n_threads = threads["threadIdx.x"] * threads["threadIdx.y"] * threads["threadIdx.z"]
    return scalars, (grid["blockIdx.x"], grid["blockIdx.y"], grid["blockIdx.z"]), n_threads if n_threads > 1 else None


def occupancy(g: gpus.GPU, threads: int, registers: int, smem_bytes: int) -> dict:
    """Resident blocks per SM and what limits them (CUDA occupancy rules for compute capability 9.0: registers
    allocated per warp in units of 256, shared memory plus 1 KB reserved per block)."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    limits = {
        "threads": g.threads_per_sm // (warps * 32),
        "registers": g.regs_per_sm // (regs_per_warp * warps),
        "shared_memory": g.smem_per_sm // (smem_bytes + g.smem_reserved_per_block) if smem_bytes else g.blocks_per_sm,
        "blocks": g.blocks_per_sm,
    }
    blocks = max(0, min(limits.values()))
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps, "limited_by": min(limits, key=limits.get),
            "limits": limits}  # fmt: skip


def launch_model(launch: capture.Launch, g: gpus.GPU) -> LaunchModel:
    """The bounds of one TileLang launch (see the module docstring)."""
    info = kernel_info(launch.kernel)
    scalars, grid, tir_threads = _bind(launch.kernel, launch.args)
    threads = info.src.threads or tir_threads or 128
    c = counts.count(info, grid, threads, scalars, ASSUME)
    nbytes = capture._tensor_bytes(launch.args)
    blocks = grid[0] * grid[1] * grid[2]
    occ = occupancy(g, threads, info.registers, info.smem_bytes)
    slots = max(1, occ["blocks_per_sm"]) * g.sms
    per_sm = math.ceil(blocks / g.sms)
    waves_sm = per_sm / (blocks / g.sms) if blocks else 1.0
    f, S = g.clock_hz, g.sms
    pipes = c.by_pipe
    tensor_rate = g.mma_tf32_flop_per_clk / 2048.0  # m16n8k8 TF32: 2048 FLOP
    cycles = {
        "issue": c.issued / g.schedulers,
        "fma": pipes.get("fma", 0.0) / g.fma_rate,
        "alu": pipes.get("alu", 0.0) / g.alu_rate,
        "mufu": pipes.get("mufu", 0.0) / g.mufu_rate,
        "lsu": pipes.get("lsu", 0.0) / g.lsu_rate,
        "tensor": pipes.get("tensor", 0.0) / tensor_rate,
        "fp64": pipes.get("fp64", 0.0) / g.fp64_rate,
    }
    issue_limiter = max(cycles, key=cycles.get)
    t_issue = waves_sm * cycles[issue_limiter] / (S * f) * 1e6
    t_smem = waves_sm * c.smem_wavefronts / g.smem_wavefronts_per_clk / (S * f) * 1e6
    t_dram = bytemodel.floor_us(nbytes, g.copy_gbps)
    waves = math.ceil(blocks / slots) if blocks else 0
    t_mem_lat = waves * c.load_rounds_per_warp * g.dram_latency_us
    chain_cycles = warp_cycles(info.ins, c.warp_executions, g)
    t_chain = waves * chain_cycles / f * 1e6
    t_latency = max(t_mem_lat, t_chain)
    t_pred = max(t_dram, t_issue, t_smem, t_latency, g.launch_us)
    resident_warps = min(occ["warps_per_sm"], -(-blocks // S) * c.warps_per_block)
    bytes_per_round = c.ldg_bytes / max(1.0, blocks * c.warps_per_block * max(c.load_rounds_per_warp, 1.0))
    detail = {
        "kernel": info.name, "grid": list(grid), "threads": threads, "scalars": scalars,
        "registers": info.registers, "smem_bytes": info.smem_bytes, "spill_bytes": info.spill_bytes,
        "occupancy": occ, "waves": waves,
        "warp_instructions": {k: round(v) for k, v in sorted(pipes.items())},
        "warp_instructions_total": round(c.issued), "issue_limiter": issue_limiter,
        "int64_instructions": round(c.int64), "division_sequences": round(c.div_sequences),
        "division_sequences_in_sass": c.div_sequences_static,
        "smem_wavefronts": round(c.smem_wavefronts), "smem_wavefronts_conflict_free": round(c.smem_ideal_wavefronts),
        "bank_conflicts": c.conflicts,
        "global_load_bytes_requested": round(c.ldg_bytes), "load_rounds_per_warp": c.load_rounds_per_warp,
        "bytes_in_flight_per_sm": round(resident_warps * bytes_per_round),
        "latency_bandwidth_product_per_sm": round(g.dram_latency_us * 1e-6 * g.copy_gbps * 1e9 / S),
        "t_load_latency_us": t_mem_lat, "t_dependent_chain_us": t_chain,
        "max_warp_instructions": round(c.max_warp_instructions), "warp_cycles": round(chain_cycles),
        "sass_loops": c.loops, "unknown_conditions": c.unknown_conditions,
    }  # fmt: skip
    return LaunchModel(info.name, nbytes, t_dram, t_issue, t_smem, t_latency, t_pred, detail)


def glue_model(glue: capture.Glue, g: gpus.GPU) -> LaunchModel:
    t_dram = bytemodel.floor_us(glue.bytes, g.copy_gbps)
    detail = {"kernel": glue.name, "torch_glue": True}
    return LaunchModel(glue.name, glue.bytes, t_dram, 0.0, 0.0, 0.0, max(t_dram, g.launch_us), detail)


def _floor_bytes(kernel: str, n: int, C: int, esize: int, T: int) -> int:
    op, _, mode = kernel.rpartition("_")
    if op == "site":
        return bytemodel.site_bytes(T, n, C, esize, mode)
    return bytemodel.op_bytes(op, mode, T, n, C, esize)


def _launches(kernel: str, n: int, C: int, dtype: torch.dtype, T: int, sms: int):
    op, _, phase = kernel.rpartition("_")
    if op == "site":
        out = []
        for o in capture.site_ops(n, C, dtype, T):
            if o.phase != phase:
                continue
            if o.name.startswith("mhc::"):
                out += capture.expand(o, sms)
            elif o.nbytes:
                out.append(capture.Glue(o.name, o.nbytes))
        return out
    return capture.op_launches(op, n, C, dtype, T, sms, phase)


def predict(kernel: str, n: int, C: int, dtype: str, T: int, gpu: str, copy_gbps: float | None = None) -> dict:
    """The model's record for one (kernel, n, C, dtype, T, gpu): bounds, prediction, % of copy bandwidth, and the
    per-launch inputs (instructions by pipe, occupancy, conflicts) for auditing. ``copy_gbps`` replaces the
    assumed copy bandwidth with a measured one (a GPU run)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
    g = gpus.gpu(gpu, copy_gbps)
    td = _DTYPES[dtype]
    parts = []
    for item in _launches(kernel, n, C, td, T, g.sms):
        parts.append(launch_model(item, g) if isinstance(item, capture.Launch) else glue_model(item, g))
    floor = _floor_bytes(kernel, n, C, td.itemsize, T)
    t_pred = sum(p.t_pred_us for p in parts)
    return {
        "kernel": kernel, "n": n, "C": C, "dtype": dtype, "T": T, "gpu": g.name,
        "bytes": floor, "bytes_moved": sum(p.bytes for p in parts), "launches": len(parts),
        "t_dram_us": sum(p.t_dram_us for p in parts), "t_issue_us": sum(p.t_issue_us for p in parts),
        "t_smem_us": sum(p.t_smem_us for p in parts), "t_latency_us": sum(p.t_latency_us for p in parts),
        "t_pred_us": t_pred, "pct_copy_bw": 100.0 * bytemodel.floor_us(floor, g.copy_gbps) / t_pred,
        "copy_gbps": g.copy_gbps,
        "parts": [
            {"name": p.name, "bytes": p.bytes, "t_dram_us": p.t_dram_us, "t_issue_us": p.t_issue_us,
             "t_smem_us": p.t_smem_us, "t_latency_us": p.t_latency_us, "t_pred_us": p.t_pred_us, **p.detail}
            for p in parts
        ],
    }  # fmt: skip


def records(kernels=KERNELS, n=4, hidden=(2560, 7168), dtype="bfloat16", tokens=(16384,), gpu_names=("H100", "H200")):
    """Records for every combination (the default: the issue's target table)."""
    return [
        predict(k, n, C, dtype, T, g) for g in gpu_names for C in hidden for T in tokens for k in kernels
    ]  # fmt: skip


# ------------------------------------------------------------------------------------- the dependent chain

_NO_DEST = {
    "STS", "STG", "ST", "STL", "STSM", "RED", "REDG", "LDGSTS", "BAR", "BRA", "BRX", "JMP", "EXIT", "RET", "CALL",
    "MEMBAR", "BSSY", "BSYNC", "WARPSYNC", "NOP", "YIELD", "DEPBAR", "LDGDEPBAR", "CCTL", "ERRBAR", "BPT", "KILL",
    "NANOSLEEP", "ARRIVES", "SYNCS",
}  # fmt: skip
_STORES = {"STS", "STG", "ST", "STL", "RED", "REDG"}
_SHORT_VARIABLE = {"LDS", "LDSM", "ATOMS", "SHFL", "LDC", "ULDC", "S2R", "S2UR", "CS2R", "MATCH", "VOTE"}
_GLOBAL = {"LDG", "LD", "LDL", "ATOM", "ATOMG"}
_REG = re.compile(r"(?<![\w.])(U?R\d+|U?P\d)(\.64|\.128)?(?![\w])")


def _regs(token: str, width: int = 1) -> list[str]:
    """Register names in an operand; ``R4.64`` (an address pair) or a ``width`` > 1 names consecutive registers."""
    out = []
    for m in _REG.finditer(token.replace(".reuse", "")):
        name, suffix = m.group(1), m.group(2)
        w = {".64": 2, ".128": 4}.get(suffix or "", width) if name.lstrip("U").startswith("R") else 1
        prefix = name.rstrip("0123456789")
        num = int(name[len(prefix) :])
        out += [f"{prefix}{num + k}" for k in range(w)]
    return out


def _operands(text: str) -> tuple[list[str], str, list[str]]:
    """(guard registers, opcode, operands) of one SASS instruction text."""
    guard = []
    m = re.match(r"^@!?(U?P\w+)\s+", text)
    if m:
        guard = _regs(m.group(1))
        text = text[m.end() :]
    parts = text.split(None, 1)
    ops = [o.strip() for o in parts[1].split(",")] if len(parts) > 1 else []
    return guard, parts[0] if parts else "", ops


def _dests_sources(text: str) -> tuple[list[str], list[str]]:
    guard, opcode, ops = _operands(text)
    base = opcode.split(".")[0]
    wide = 4 if ".128" in opcode else 2 if (".64" in opcode or ".WIDE" in opcode) else 1
    pair = 2 if base in ("DADD", "DMUL", "DFMA", "DSETP", "DMNMX") else 1
    if base in _NO_DEST or not ops:
        srcs = guard[:]
        for k, o in enumerate(ops):
            last_data = base in _STORES and k == len(ops) - 1
            srcs += _regs(o, wide if last_data else pair)
        return [], srcs
    dest_width = wide
    if base == "HMMA":
        dest_width = 4
    elif base == "LDSM":
        m = re.search(r"\.M88\.(\d)", opcode)
        dest_width = int(m.group(1)) if m else 1
    elif pair == 2 and base != "DSETP":
        dest_width = 2
    dests = _regs(ops[0], dest_width)
    k = 1
    while k < len(ops) and re.fullmatch(r"U?P(\d|T)", ops[k]):  # further predicate results (IADD3 R, P, ...)
        dests += _regs(ops[k])
        k += 1
    srcs = guard[:]
    for o in ops[k:]:
        srcs += _regs(o, pair)
    return dests, srcs


def _latency_cycles(x: sass.Instruction, g: gpus.GPU) -> float:
    base = x.opcode.split(".")[0]
    if x.dsmem:  # another block's shared memory: the SM-to-SM network, not DRAM
        return g.dsmem_latency_cycles
    if base in _GLOBAL:
        return g.dram_latency_us * 1e-6 * g.clock_hz
    if base in _SHORT_VARIABLE:
        return g.smem_latency_cycles
    return {"mufu": g.mufu_latency_cycles, "tensor": g.mma_latency_cycles, "fp64": g.fp64_latency_cycles}.get(
        x.pipe, g.dependent_cpi
    )


def _pipe_cycles(pipe: str, g: gpus.GPU) -> float:
    """Cycles one warp instruction holds its pipe on one scheduler's partition (a quarter of the SM)."""
    per_sm = {"fma": g.fma_rate, "alu": g.alu_rate, "mufu": g.mufu_rate, "lsu": g.lsu_rate, "fp64": g.fp64_rate,
              "tensor": g.mma_tf32_flop_per_clk / 2048.0}.get(pipe)  # fmt: skip
    return g.schedulers / per_sm if per_sm else 1.0


def warp_cycles(ins: list[sass.Instruction], executions: list[float], g: gpus.GPU, costs: list | None = None) -> float:
    """Cycles one warp takes alone on its scheduler: an in-order scoreboard over the SASS.

    Each executed instruction issues at the earliest cycle that is at least one after the previous issue, when
    every register it reads (and writes) is ready and its pipe is free on this quarter of the SM; its result is
    ready ``_latency_cycles`` later (FP32/integer 4, MUFU, shared memory and shuffles, global loads the DRAM
    latency, loads from a peer block's shared memory (distributed shared memory) the SM-to-SM latency,
    :mod:`profiling.model.gpus`), and it holds its pipe ``schedulers / rate`` cycles (MUFU 8, an
    integer-pipe op 2, FFMA 1). An instruction costs the cycles between its issue and the previous one; a loop's
    body is played twice in a row (the second pass, with the loop-carried registers of the first, is the steady
    state) and its cost is weighted by ``executions`` (its executions by the busiest warp). Waits on asynchronous
    copies (``DEPBAR``) are not modelled: ``t_load_latency`` covers them."""
    parsed = [_dests_sources(x.text) if e > 0 else ([], []) for x, e in zip(ins, executions, strict=True)]
    lat = [_latency_cycles(x, g) for x in ins]
    occ = [_pipe_cycles(x.pipe, g) for x in ins]
    ready: dict[str, float] = {}
    pipe_free: dict[str, float] = {}
    cost = [0.0] * len(ins)
    clock = [0.0]  # issue cycle of the last instruction

    def play(i: int) -> None:
        if executions[i] <= 0:
            return
        dests, srcs = parsed[i]
        t = clock[0] + 1.0
        for r in (*srcs, *dests):
            t = max(t, ready.get(r, 0.0))
        t = max(t, pipe_free.get(ins[i].pipe, 0.0))
        cost[i] = t - clock[0]
        clock[0] = t
        pipe_free[ins[i].pipe] = t + occ[i]
        for r in dests:
            ready[r] = t + lat[i]

    index = {x.addr: k for k, x in enumerate(ins)}
    for i, x in enumerate(ins):
        play(i)
        if isinstance(x.branch_to, int) and x.branch_to < x.addr and x.branch_to in index:
            for k in range(index[x.branch_to], i + 1):  # the steady-state pass of the loop
                play(k)
    if costs is not None:
        costs[:] = cost
    return float(sum(c * e for c, e in zip(cost, executions, strict=True)))
