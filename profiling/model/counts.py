"""Dynamic instruction counts of one kernel launch, from its SASS and its CUDA source, without running it.

Every SASS instruction carries the kernel-source line it came from (:mod:`profiling.model.sass`); the line sits in a
chain of source scopes (:mod:`profiling.model.source`): ``for`` loops and ``if``/``else`` branches. A warp executes
an instruction once per iteration of every enclosing loop that is still a loop in the SASS (a backward branch
whose body holds the instruction), divided by the unroll factor of that SASS loop, and only when some lane of the
warp satisfies every enclosing condition. Loop bounds and conditions are C expressions of ``blockIdx``,
``threadIdx``, the kernel's scalar arguments (``num_tokens``, ``num_splits``, ...) and integer locals; they are
evaluated with numpy for every thread of a sample of blocks (:mod:`profiling.model.cexpr`). Loops that ptxas
unrolled completely are already copies in the SASS and count once.

A condition that depends on data (a load, a float) cannot be evaluated: ``assume`` gives values for such names
(``{"ok[0]": 1}``: the Sinkhorn's exp-domain check passes); otherwise the ``if`` side is taken and the ``else`` side
is not, and the condition is listed in ``unknown_conditions``.

Shared memory: for each ``LDS``/``STS`` the access on its source line is evaluated for the 32 lanes of every warp
of the first block (loop variables at 0), giving the wavefronts one execution needs: per phase (32, 16 or 8 lanes
for 4-, 8- and 16-byte accesses), the largest number of distinct 4-byte words that fall into one of the 32 banks.
``LDSM`` counts 1, 2 or 4 wavefronts (``.x1``, ``.x2``, ``.x4``), assumed conflict-free (its addresses are computed
inside TileLang's templates).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from . import cexpr, sass, source

__all__ = ["KernelInfo", "LaunchCounts", "count", "kernel_info"]

MAX_SAMPLED_BLOCKS = 96
MAX_ELEMENTS = 24_000_000  # total threads x blocks kept for one launch
MAX_KEY_ELEMENTS = 1_500_000  # blocks x threads x loop iterations evaluated for one scope


@dataclass
class KernelInfo:
    name: str
    src: source.KernelSource
    ins: list[sass.Instruction]
    loops: list[sass.Loop]
    loop_scope: list[source.Scope | None]  # the source for-loop each SASS loop implements
    unroll: list[int]
    registers: int
    smem_bytes: int
    spill_bytes: int


@dataclass
class LaunchCounts:
    grid: tuple[int, int, int]
    threads: int
    warps_per_block: int
    by_pipe: dict[str, float] = field(default_factory=dict)  # warp instructions, whole launch
    issued: float = 0.0
    int64: float = 0.0
    div_sequences: float = 0.0
    div_sequences_static: int = 0
    smem_wavefronts: float = 0.0
    smem_ideal_wavefronts: float = 0.0
    ldg_bytes: float = 0.0  # bytes requested by global loads (32 lanes each)
    load_rounds_per_warp: float = 0.0  # dependent rounds of global loads a warp waits for
    max_warp_instructions: float = 0.0
    # executions of each SASS instruction (index into KernelInfo.ins) by the warp that runs it most often
    warp_executions: list[float] = field(default_factory=list)
    unknown_conditions: list[str] = field(default_factory=list)
    conflicts: list[dict] = field(default_factory=list)
    loops: list[dict] = field(default_factory=list)


def _width(opcode: str) -> int:
    for suffix, w in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in opcode:
            return w
    return 4


def _loop_scopes(ks: source.KernelSource, ins, loops) -> list[source.Scope | None]:
    """The deepest source ``for`` that encloses at least 90% of a SASS loop's (line-annotated) instructions."""
    out = []
    for lp in loops:
        votes: dict[int, int] = defaultdict(int)
        scopes: dict[int, source.Scope] = {}
        total = 0
        for i in lp.body:
            scope = ks.line_scope.get(ins[i].line)
            if scope is None:
                continue
            total += 1
            for s in scope.chain():
                if s.kind == "for":
                    votes[id(s)] += 1
                    scopes[id(s)] = s
        good = [scopes[k] for k, v in votes.items() if total and v >= 0.9 * total]
        out.append(max(good, key=lambda s: s.depth) if good else None)
    return out


def _constant(text: str) -> int | None:
    try:
        value = _compile(text)(lambda name: (_ for _ in ()).throw(cexpr.Unknown(name)))
    except cexpr.Unknown:
        return None
    return int(value)


def _accesses_per_iteration(ks, loop_scope, accesses: dict[int, int], rolled: set[int]) -> dict[int, float]:
    """Memory accesses per iteration of ``loop_scope`` for each source line inside it: the line's accesses times
    the constant trip counts of the loops between (which ptxas unrolled); lines under another SASS loop or a loop
    of unknown length are left out."""
    out = {}
    for line, n in accesses.items():
        scope = ks.line_scope.get(line)
        if scope is None:
            continue
        chain = scope.chain()
        if loop_scope not in chain:
            continue
        factor = 1
        for s in chain[chain.index(loop_scope) + 1 :]:
            if s.kind != "for":
                continue
            lo, hi = _constant(s.init), _constant(s.bound)
            if id(s) in rolled or lo is None or hi is None:
                factor = 0
                break
            factor *= max(0, hi - lo)
        if factor:
            out[line] = n * factor
    return out


def kernel_info(name: str, cuda_src: str, sass_text: str, resources: dict) -> KernelInfo:
    ks = source.parse(cuda_src)
    ins = sass.parse_annotated(sass_text)
    lps = sass.loops(ins)
    scopes = _loop_scopes(ks, ins, lps)
    accesses = dict(ks.global_accesses)
    for line, acc in ks.shared.items():
        accesses[line] = accesses.get(line, 0) + len(acc)
    rolled = {id(s) for s in scopes if s is not None}
    elements = {line: max(a.element_bytes for a in acc) for line, acc in ks.shared.items() if acc}
    unroll = []
    for lp, scope in zip(lps, scopes, strict=True):
        expected = _accesses_per_iteration(ks, scope, accesses, rolled) if scope is not None else {}
        by_counter = sass.unroll_factor(ins, lp)
        unroll.append(by_counter if by_counter is not None else sass.copies_per_pass(ins, lp, expected, elements))
    return KernelInfo(
        name=name, src=ks, ins=ins, loops=lps, loop_scope=scopes, unroll=unroll, registers=int(resources.get("registers") or 0),
        smem_bytes=int(resources.get("smem_bytes") or 0), spill_bytes=int(resources.get("spill_bytes") or 0),
    )  # fmt: skip


class _Env:
    """Names for the evaluator: block and thread indices, kernel scalars, loop variables, integer locals."""

    def __init__(self, base: dict, defs: dict[str, str], assume: dict[str, int]):
        self.values = dict(base)
        self.defs = defs
        self.assume = assume
        self.compiled: dict[str, object] = {}

    def __call__(self, name: str):
        if name in self.values:
            return self.values[name]
        if name in self.assume:
            return self.assume[name]
        if name in self.defs:
            fn = self.compiled.get(name)
            if fn is None:
                fn = self.compiled[name] = cexpr.compile_expr(self.defs[name])
            self.values[name] = None  # guards against a self-reference
            try:
                value = fn(self)
            finally:
                self.values.pop(name, None)
            self.values[name] = value
            return value
        raise cexpr.Unknown(name)


_COMPILED: dict[str, object] = {}


def _compile(text: str):
    if text not in _COMPILED:
        try:
            _COMPILED[text] = cexpr.compile_expr(text)
        except cexpr.Unknown as exc:
            _COMPILED[text] = exc
    fn = _COMPILED[text]
    if isinstance(fn, cexpr.Unknown):
        raise fn
    return fn


def _names(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_]\w*", cexpr.strip_comments(text)))


def _sample_blocks(grid: tuple[int, int, int]) -> tuple[np.ndarray, float]:
    total = grid[0] * grid[1] * grid[2]
    if total <= MAX_SAMPLED_BLOCKS:
        linear = np.arange(total)
    else:
        linear = np.unique(np.linspace(0, total - 1, MAX_SAMPLED_BLOCKS).round().astype(np.int64))
    return linear, total / len(linear)


def count(
    info: KernelInfo, grid: tuple[int, int, int], threads: int, scalars: dict[str, int], assume: dict | None = None
) -> LaunchCounts:
    """Warp-instruction counts by pipe, shared wavefronts and global-load rounds of one launch (see the module
    docstring)."""
    assume = dict(assume or {})
    ks = info.src
    warps = -(-threads // 32)
    linear, scale = _sample_blocks(grid)
    gx, gy = grid[0], grid[1]
    bx, by, bz = linear % gx, (linear // gx) % gy, linear // (gx * gy)
    nb = len(linear)
    while nb * warps * 32 > MAX_ELEMENTS // 64 and nb > 8:  # keep the arrays small; scale compensates
        linear = linear[::2]
        bx, by, bz = linear % gx, (linear // gx) % gy, linear // (gx * gy)
        scale = grid[0] * grid[1] * grid[2] / len(linear)
        nb = len(linear)
    tx = np.arange(warps * 32)
    base = {
        "blockIdx.x": bx.reshape(nb, 1), "blockIdx.y": by.reshape(nb, 1), "blockIdx.z": bz.reshape(nb, 1),
        "threadIdx.x": tx.reshape(1, -1), "threadIdx.y": 0, "threadIdx.z": 0,
        "gridDim.x": grid[0], "gridDim.y": grid[1], "gridDim.z": grid[2], "blockDim.x": threads,
        **scalars,
    }  # fmt: skip
    lane_valid = (tx < threads).reshape(1, -1)
    result = LaunchCounts(grid=grid, threads=threads, warps_per_block=warps)
    unknown: set[str] = set()

    # loops: which SASS loops hold each instruction
    holders: list[tuple[int, ...]] = [() for _ in info.ins]
    for k, lp in enumerate(info.loops):
        for i in lp.body:
            holders[i] = (*holders[i], k)

    def referenced_fors(chain, extra_text=""):
        texts = [s.cond for s in chain if s.cond] + [s.bound for s in chain if s.kind == "for"] + [extra_text]
        names: set[str] = set()
        for t in texts:
            names |= _names(t)
        # locals referenced indirectly
        frontier = list(names)
        while frontier:
            n = frontier.pop()
            if n in ks.defs:
                new = _names(ks.defs[n]) - names
                names |= new
                frontier += list(new)
        return names

    cache: dict[tuple, tuple[float, float]] = {}

    def multiplicity(scope: source.Scope, rolled: tuple[int, ...]) -> tuple[float, float]:
        """(warp executions over the launch, largest executions of one warp) for an instruction in ``scope``
        held by the SASS loops ``rolled``."""
        key = (id(scope), rolled)
        if key in cache:
            return cache[key]
        chain = scope.chain()
        counted = {id(info.loop_scope[k]): info.unroll[k] for k in rolled if info.loop_scope[k] is not None}
        refs = referenced_fors(chain)
        axes: list[source.Scope] = [s for s in chain if s.kind == "for" and (id(s) in counted or s.var in refs)]
        ndim = 2 + len(axes)
        pad = [1] * len(axes)

        def make_env(sel):
            return _Env(
                {**base, "blockIdx.x": bx[sel].reshape(-1, 1, *pad), "blockIdx.y": by[sel].reshape(-1, 1, *pad),
                 "blockIdx.z": bz[sel].reshape(-1, 1, *pad), "threadIdx.x": tx.reshape(1, -1, *pad)},
                ks.defs, assume,
            )  # fmt: skip

        env = make_env(slice(None))
        try_sizes = []
        for s in axes:
            try:
                lo = np.asarray(_compile(s.init)(env))
                hi = np.asarray(_compile(s.bound)(env))
                size = int(max(0, np.max(hi) - min(0, int(np.min(lo)))))
            except cexpr.Unknown:
                unknown.add(f"line {s.line}: for bound {s.bound}")
                size = 1
            try_sizes.append(max(1, min(size, 4096)))
        # bound the arrays: fewer sampled blocks for scopes inside long loops (the count is scaled back)
        step = max(1, math.ceil(nb * warps * 32 * math.prod(try_sizes) / MAX_KEY_ELEMENTS))
        sel = slice(None, None, step)
        nbk = len(range(nb)[sel])
        env = make_env(sel)
        for a, s in enumerate(axes):
            shp = [1] * ndim
            shp[2 + a] = try_sizes[a]
            env.values[s.var] = np.arange(try_sizes[a]).reshape(shp)
        mask = np.broadcast_to(lane_valid, (nbk, warps * 32)).reshape(nbk, warps * 32, *pad)
        for s in chain:
            if s.kind == "for":
                if s in axes:
                    try:
                        idx = env.values[s.var]
                        lo = _compile(s.init)(env)
                        hi = _compile(s.bound)(env)
                        cond = (idx >= lo) & (idx < hi)
                    except cexpr.Unknown:
                        cond = True
                    mask = mask & _fit(cond, ndim)
                continue
            if s.kind in ("if", "else") and s.cond is not None:
                try:
                    c = np.asarray(_compile(s.cond)(env)) != 0
                except cexpr.Unknown as exc:
                    unknown.add(f"line {s.line}: {s.cond[:120]} ({exc})")
                    c = np.asarray(True)
                    if s.kind == "else":
                        c = np.asarray(False)
                    mask = mask & _fit(c, ndim)
                    continue
                mask = mask & _fit(~c if s.kind == "else" else c, ndim)
        full = np.broadcast_to(mask, (nbk, warps * 32, *try_sizes))
        per_warp = full.reshape(nbk, warps, 32, *try_sizes).any(axis=2)  # (blocks, warps, *axes)
        # axes of loops that are not rolled around this instruction: exists
        for a in reversed(range(len(axes))):
            if id(axes[a]) not in counted:
                per_warp = per_warp.any(axis=2 + a)
        weights = 1.0
        for s in axes:
            if id(s) in counted:
                weights /= counted[id(s)]
        per_warp_counts = per_warp.reshape(nbk, warps, -1).sum(axis=2) * weights
        value = (
            float(per_warp_counts.sum()) * scale * nb / nbk,
            float(per_warp_counts.max()) if per_warp_counts.size else 0.0,
        )
        cache[key] = value
        return value

    by_pipe: dict[str, float] = defaultdict(float)
    per_warp_max = 0.0
    ldg_groups: dict[tuple[int, ...], float] = defaultdict(float)
    smem_cache: dict[tuple[int, str, int], tuple[float, float]] = {}
    root = ks.scopes[0]
    result.warp_executions = [0.0] * len(info.ins)
    for i, x in enumerate(info.ins):
        scope = ks.line_scope.get(x.line, root) if x.line is not None else root
        total, one_warp = multiplicity(scope, holders[i])
        result.warp_executions[i] = one_warp
        if total == 0:
            continue
        by_pipe[x.pipe] += total
        per_warp_max += one_warp
        if sass.is_int64(x.text):
            result.int64 += total
        if x.opcode.startswith("MUFU.RCP") and any(
            info.ins[j].opcode.startswith("I2F") and ".RP" in info.ins[j].opcode for j in range(max(0, i - 6), i)
        ):
            result.div_sequences += total
            result.div_sequences_static += 1
        base_op = x.opcode.split(".")[0]
        if base_op in ("LDG", "LDGSTS"):  # LDGSTS (cp.async): a global load written straight to shared memory
            result.ldg_bytes += total * 32 * _width(x.opcode)
            ldg_groups[holders[i]] = max(ldg_groups[holders[i]], one_warp)
        if base_op == "LDGSTS":
            ideal = max(1, _width(x.opcode) * 32 // 128)
            result.smem_wavefronts += total * ideal
            result.smem_ideal_wavefronts += total * ideal
        if base_op in ("LDS", "STS", "LDSM", "STSM", "ATOMS"):
            wf, ideal = _smem_wavefronts(info, x, scalars, assume, smem_cache, threads, result)
            result.smem_wavefronts += total * wf
            result.smem_ideal_wavefronts += total * ideal
    result.by_pipe = dict(by_pipe)
    result.issued = float(sum(by_pipe.values()))
    result.max_warp_instructions = per_warp_max
    result.load_rounds_per_warp = float(sum(ldg_groups.values()))
    result.unknown_conditions = sorted(unknown)
    for k, lp in enumerate(info.loops):
        s = info.loop_scope[k]
        result.loops.append({
            "sass_instructions": len(lp.body), "unroll": info.unroll[k],
            "source_line": s.line if s else None, "source_loop": f"{s.var} < {s.bound}"[:160] if s else None,
        })  # fmt: skip
    return result


def _fit(cond, ndim):
    c = np.asarray(cond)
    if c.ndim < ndim:
        c = c.reshape(*c.shape, *([1] * (ndim - c.ndim)))
    return c


def _smem_wavefronts(info, x, scalars, assume, memo, threads, result) -> tuple[float, float]:
    """(wavefronts, conflict-free wavefronts) of one warp-wide execution of shared-memory instruction ``x``."""
    op = x.opcode
    width = _width(op)
    ideal = max(1, width * 32 // 128)
    if op.startswith(("LDSM", "STSM")):  # LDSM.16.M88.4 = ldmatrix .x4: four 8x8 matrices, 4 wavefronts
        m = re.search(r"\.MT?88(?:\.(\d))?", op)
        k = int(m.group(1)) if m and m.group(1) else 1
        return float(k), float(k)
    write = op.startswith("STS")
    key = (x.line or -1, "w" if write else "r", width)
    if key in memo:
        return memo[key]
    accesses = [a for a in info.src.shared.get(x.line, []) if a.write == write]
    worst = None
    for a in accesses:
        try:
            wf = _access_wavefronts(info, a, scalars, assume, threads, width)
        except cexpr.Unknown:
            continue
        worst = wf if worst is None else max(worst, wf)
    if worst is None:
        memo[key] = (float(ideal), float(ideal))
        return memo[key]
    wf = max(float(worst), float(ideal))
    memo[key] = (wf, float(ideal))
    if wf > ideal:
        result.conflicts.append({"line": x.line, "opcode": op, "wavefronts": wf, "ideal": ideal})
    return memo[key]


def _access_wavefronts(info, a: source.SharedAccess, scalars, assume, threads, sass_width) -> float:
    """Wavefronts of the worst warp of block 0 for one source access, loop variables at 0 and data unknown."""
    values = {"blockIdx.x": 0, "blockIdx.y": 0, "blockIdx.z": 0, "threadIdx.y": 0, "threadIdx.z": 0, **scalars}
    for s in info.src.scopes:
        if s.kind == "for":
            values.setdefault(s.var, 0)
    worst = 0.0
    for w in range(max(1, threads // 32)):
        lanes = np.arange(32) + 32 * w
        env = _Env({**values, "threadIdx.x": lanes}, info.src.defs, assume)
        index = np.broadcast_to(np.asarray(_compile(a.index)(env), dtype=np.int64), (32,))
        addr = a.base + index * a.element_bytes
        # the SASS access decides the width: ptxas merges consecutive elements of unrolled source accesses (four
        # 4-byte stores become one STS.128) or splits wide ones; the source gives each lane's first address
        width = max(sass_width, 4)
        words_per_lane = width // 4
        phase = 32 // words_per_lane if words_per_lane <= 4 else 8
        total = 0.0
        for p in range(0, 32, phase):
            words = set()
            for lane in range(p, p + phase):
                for k in range(words_per_lane):
                    words.add(int(addr[lane]) // 4 + k)
            per_bank: dict[int, int] = defaultdict(int)
            for wd in words:
                per_bank[wd % 32] += 1
            total += max(per_bank.values())
        worst = max(worst, total)
    return worst if not math.isnan(worst) else 1.0
