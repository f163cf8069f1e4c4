"""SASS with source lines: parse ``nvdisasm -gi`` output (:func:`tl_kernels.tools.codegen.sass_with_line_info`), find
the loops (backward branches), and put every instruction in a pipe.

Pipes (what bounds an instruction's throughput on an SM of compute capability 9.0; rates in
:mod:`profiling.model.gpus`):

* ``fma``: FP32 and packed FP16 arithmetic and the integer multiply-add (``FFMA FADD FMUL HFMA2 IMAD ...``);
* ``alu``: integer and logic, compares, selects, moves, conversions between registers (``IADD3 LOP3 ISETP SHF SEL
  MOV PRMT LEA FSETP FMNMX ...``);
* ``mufu``: the multi-function unit and the conversions that share its rate (``MUFU F2I I2F F2F FRND``);
* ``lsu``: memory instructions (``LDG STG LDS STS LDSM LDGSTS ATOM RED SHFL LDL STL``);
* ``tensor``: ``HMMA IMMA HGMMA``;
* ``fp64``: ``DADD DMUL DFMA``;
* ``uniform`` (the per-warp uniform datapath, ``U*``) and ``control`` (``BRA BAR EXIT BSSY ...``): issue slots only.

Also flagged, as the issue asks: 64-bit integer instructions (``.X`` carries, ``IMAD.WIDE``, ``.64``/``.EX``) and
integer division sequences (a ``MUFU.RCP`` fed by an ``I2F...RP``: the reciprocal-based ``/`` and ``%`` ptxas emits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Instruction", "Loop", "classify", "loops", "parse_annotated"]

_ADDR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_BRA_LABEL = re.compile(r"\bBRA\b.*?`?\((\.L_x_\d+)\)")


@dataclass
class Instruction:
    addr: int
    text: str
    line: int | None  # the kernel source line (.cu) the instruction belongs to, through inlining
    opcode: str
    pipe: str
    branch_to: str | None = None
    dsmem: bool = False  # a generic LD/ST into the shared-memory window of another block of the cluster


@dataclass
class Loop:
    start: int  # address of the branch target (the loop head)
    end: int  # address of the backward branch
    body: list[int]  # instruction indices

    def contains(self, addr: int) -> bool:
        return self.start <= addr <= self.end


def _opcode(text: str) -> str:
    t = re.sub(r"^@!?U?P\w+\s+", "", text.strip())
    return t.split()[0] if t else ""


def classify(opcode: str) -> str:
    """The pipe of a SASS opcode (see the module docstring)."""
    base = opcode.split(".")[0]
    if base in ("HMMA", "IMMA", "HGMMA", "BMMA", "DMMA", "QGMMA", "IGMMA"):
        return "tensor"
    if base in ("MUFU", "F2I", "I2F", "F2F", "FRND", "I2FP", "F2IP"):
        return "mufu"
    if base in ("DADD", "DMUL", "DFMA", "DSETP", "DMNMX"):
        return "fp64"
    if base in ("LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDGSTS", "ATOM", "ATOMG", "ATOMS", "RED", "REDG",
                "SHFL", "LDL", "STL", "LD", "ST", "MATCH", "LDGDEPBAR", "UBLKCP", "UTMALDG", "UTMASTG"):  # fmt: skip
        return "lsu"
    if base.startswith("U") and base not in ("UNDEF",):
        return "uniform"
    if base in ("BRA", "BRX", "JMP", "EXIT", "RET", "CALL", "BAR", "BSSY", "BSYNC", "WARPSYNC", "NOP", "YIELD",
                "DEPBAR", "MEMBAR", "ERRBAR", "CCTL", "BPT", "KILL", "NANOSLEEP", "WARPGROUP", "ELECT", "VOTEU"):  # fmt: skip
        return "control"
    if base in ("FFMA", "FADD", "FMUL", "FFMA2", "FADD2", "FMUL2", "HFMA2", "HADD2", "HMUL2", "IMAD", "IDP", "IMUL",
                "FSWZADD", "FCHK"):  # fmt: skip
        return "fma"
    return "alu"


def is_int64(text: str) -> bool:
    op = _opcode(text)
    return bool(re.search(r"\.(X|WIDE|64|EX)\b", op)) and op.split(".")[0] in (
        "IADD3", "IMAD", "LEA", "SHF", "ISETP", "IADD", "LOP3", "IMNMX", "VIMNMX",
    )  # fmt: skip


def parse_annotated(text: str, source_names: tuple[str, ...] = ("tvm_kernels.cu",)) -> list[Instruction]:
    """Instructions of the first function in ``nvdisasm -gi`` output, each with its kernel-source line.

    A source line is taken from the ``//##`` comments before the instruction: the one in a file named like
    ``source_names`` (TileLang writes the kernel as ``tvm_kernels.cu``), directly or as the ``inlined at`` site of a
    template line; instructions before the first such comment get ``None``. Internal subroutines appended after the
    function (``$__internal_*``, e.g. the slow path of a 64-bit division) are left out: only their ``CALL`` counts."""
    out: list[Instruction] = []
    labels: dict[str, int] = {}
    pending_labels: list[str] = []
    line: int | None = None
    chain: list[tuple[str, int, str | None, int | None]] = []
    seen_function = False
    for raw in text.splitlines():
        if raw.startswith(".text.") or re.match(r"^\w+:$", raw.strip()):
            if seen_function and out:
                break  # the next function
            seen_function = True
            continue
        if raw.strip().startswith("$__internal") and raw.strip().endswith(":") and out:
            break  # a subroutine ptxas appended (the slow path of 64-bit division): runs only when called
        if m := _LABEL.match(raw.strip()):
            pending_labels.append(m.group(1))
            continue
        if m := _LINE.search(raw):
            file, ln, at_file, at_ln = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            chain.append((file, ln, at_file, int(at_ln) if at_ln else None))
            continue
        if m := _ADDR.match(raw):
            if chain:
                found = None
                for file, ln, at_file, at_ln in chain:
                    if any(file.endswith(s) for s in source_names):
                        found = ln
                    elif at_file and any(at_file.endswith(s) for s in source_names):
                        found = at_ln
                line = found if found is not None else line
                chain = []
            addr, body = int(m.group(1), 16), m.group(2)
            for label in pending_labels:
                labels[label] = addr
            pending_labels = []
            op = _opcode(body)
            b = _BRA_LABEL.search(body)
            out.append(Instruction(addr, body, line, op, classify(op), b.group(1) if b else None))
    for ins in out:
        if ins.branch_to is not None:
            ins.branch_to = labels.get(ins.branch_to, ins.branch_to)
    mark_dsmem(out)
    return out


_DEST = re.compile(r"^(?:@!?U?P\w+\s+)?[\w.]+\s+(R\d+)\b")
_MOVE = re.compile(r"^(?:@!?U?P\w+\s+)?(?:MOV|IMAD\.MOV\.U32)\s+(R\d+),\s+(?:RZ,\s+RZ,\s+)?(R\d+)(?:\.reuse)?\s*$")
_GENERIC_ACCESS = re.compile(r"^(?:@!?U?P\w+\s+)?(?:LD|ST)\.E\S*\s+(?:R\d+,\s+)?\[R(\d+)(?:\.64)?(?:\+[^\]]*)?\]")


def mark_dsmem(ins: list[Instruction]) -> None:
    """Flag the distributed shared memory accesses (``ld/st.shared::cluster``): ptxas compiles them to generic
    ``LD.E``/``ST.E`` whose 64-bit address has the shared-memory window (``S2R Rx, SR_SWINHI``) as its high word
    and the peer's ``mapa`` address as its low word. Tracked in address order through plain register moves; any
    other write to a register ends its tracking. Such an access goes over the SM-to-SM network, not to DRAM."""
    window: set[str] = set()
    for x in ins:
        text = x.text.strip()
        if m := _GENERIC_ACCESS.match(text):
            x.dsmem = f"R{int(m.group(1)) + 1}" in window
        if x.opcode.split(".")[0] in ("ST", "STG", "STS", "STL", "BRA", "EXIT", "BAR", "RED") or not (
            d := _DEST.match(text)
        ):
            continue
        dest = d.group(1)
        moved = _MOVE.match(text)
        if (x.opcode == "S2R" and "SR_SWINHI" in text) or (moved and moved.group(2) in window):
            window.add(dest)
        else:
            window.discard(dest)


def loops(ins: list[Instruction]) -> list[Loop]:
    """Every backward branch as a loop from its target to the branch, outer loops first."""
    index = {x.addr: i for i, x in enumerate(ins)}
    found = []
    for i, x in enumerate(ins):
        target = x.branch_to
        # a branch to itself is the trap after EXIT, not a loop
        if isinstance(target, int) and target < x.addr and target in index:
            found.append(Loop(target, x.addr, list(range(index[target], i + 1))))
    return sorted(found, key=lambda lp: (lp.start, -lp.end))


def copies_per_pass(
    ins: list[Instruction], loop: Loop, expected: dict[int, float], element_bytes: dict[int, int] | None = None
) -> int:
    """Source iterations per pass of a SASS loop from its memory instructions: for each source line of the loop's
    body, the loop's LDG/STG/LDS/STS attributed to the line divided by ``expected[line]``, the line's memory
    accesses per source iteration (its accesses times the trips of the unrolled loops between it and the loop); the
    median over such lines, rounded (1 when no line has memory instructions). A line with ``element_bytes`` known
    counts a vector instruction as the elements it moves (``STS.128`` of floats: 4 source accesses)."""
    per_line: dict[int, float] = {}
    for i in loop.body:
        x = ins[i]
        if x.line in expected and x.opcode.split(".")[0] in ("LDG", "STG", "LDS", "STS"):
            width = 16 if ".128" in x.opcode else 8 if ".64" in x.opcode else 4
            elements = max(1, width // element_bytes[x.line]) if element_bytes and x.line in element_bytes else 1
            per_line[x.line] = per_line.get(x.line, 0) + elements
    ratios = sorted(per_line[ln] / expected[ln] for ln in per_line)
    return max(1, round(ratios[len(ratios) // 2])) if ratios else 1


def unroll_factor(ins: list[Instruction], loop: Loop) -> int | None:
    """Source iterations per pass of a SASS loop, from the counter that decides the backward branch: the branch's
    predicate is set by an ``ISETP``/``UISETP`` of the loop; a register it compares that the loop increments onto
    itself by a small constant (``IADD3 R, R, 0xN``, ``VIADD``, ``UIADD3``) gives N. ``None`` when that cannot be
    told (no such compare, or a counter stepping by more than 64: a byte offset)."""
    body = [ins[i].text for i in loop.body]
    m = re.match(r"^@(!?)(U?P\d+)\s+BRA", body[-1])
    if not m:
        return None
    preds = {m.group(2)}
    compared: set[str] = set()
    for t in reversed(body[:-1]):
        t2 = re.sub(r"^@!?U?P\w+\s+", "", t)
        dest = re.match(r"U?(ISETP|PLOP3)\S* (U?P\d+),", t2)
        if not dest or dest.group(2) not in preds:
            continue
        if dest.group(1) == "PLOP3":  # a predicate copied from a uniform one: follow it
            preds |= set(re.findall(r"\bU?P\d+\b", t2.split(",", 1)[1])) - {"PT", "UPT"}
            continue
        compared = set(re.findall(r"\bU?R\d+\b", t2.split(",", 2)[-1]))
        break
    steps = []
    for t in body:
        t = re.sub(r"^@!?U?P\w+\s+", "", t)
        mm = re.match(r"U?(?:IADD3|VIADD) (U?R\d+), (?:\1, (-?0x[0-9a-f]+)|(-?0x[0-9a-f]+), \1)(?:, U?RZ)*$", t)
        if mm and mm.group(1) in compared:
            step = abs(int(mm.group(2) or mm.group(3), 16))
            if 1 <= step <= 64:
                steps.append(step)
    return min(steps) if steps else None
