"""The structure of a TileLang-generated CUDA kernel, read from its source text: the scopes (``for`` loops, ``if`` /
``else`` branches) that enclose every line, the integer locals the conditions use, and the shared-memory accesses
with their index expressions.

TileLang prints one statement per line, every ``for``/``if``/``else`` with braces on its own line
(``for (int kk = 0; kk < BOUND; ++kk) {``, ``if (COND) {``, ``} else {``), integer locals as ``int NAME = EXPR;``,
dynamic shared buffers as ``void* NAME = ((void*)((char*)buf_dyn_shmem + OFFSET));`` and accesses as
``((T*)NAME)[INDEX]`` or ``*(V*)(((T*)NAME) + INDEX)``; static ones as ``__shared__ T NAME[N];``. Lines that do not
fit are kept as plain statements of the enclosing scope.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .cexpr import strip_comments

__all__ = ["KernelSource", "Scope", "SharedAccess", "parse"]

_ELEMENT = {
    "float": 4, "int": 4, "uint": 4, "unsigned": 4, "int64_t": 8, "uint64_t": 8, "double": 8, "half_t": 2,
    "bfloat16_t": 2, "half": 2, "short": 2, "char": 1, "uchar": 1, "signed char": 1, "int8_t": 1, "uint8_t": 1,
    "float2": 8, "float4": 16, "uint2": 8, "uint4": 16, "int2": 8, "int4": 16, "uint1": 4, "ulonglong2": 16,
}  # fmt: skip

_FOR = re.compile(r"^for \((?:int|int64_t|uint) (\w+) = (.+?); \1 < (.+); \+\+\1\) \{$")
_IF = re.compile(r"^if \((.*)\) \{$")
_ELSE_IF = re.compile(r"^\} else if \((.*)\) \{$")
_DEF = re.compile(r"^(?:const )?(?:int|int64_t|uint|bool|unsigned int) (\w+)(?: = (.+))?;$")
_ASSIGN = re.compile(r"^(\w+) = (.+);$")
_DYN = re.compile(r"void\* (\w+) = \(\(void\*\)\(\(char\*\)buf_dyn_shmem \+ (\d+)\)\);")
_STATIC = re.compile(r"__shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[(\d*)\];")


@dataclass(eq=False)
class Scope:
    kind: str  # "root", "for", "if", "else", "block"
    line: int
    parent: Scope | None = None
    var: str | None = None  # for
    init: str | None = None
    bound: str | None = None
    cond: str | None = None  # if / else: the if's condition (else negates it)
    depth: int = 0

    def chain(self) -> list[Scope]:
        out, s = [], self
        while s is not None:
            out.append(s)
            s = s.parent
        return out[::-1]


@dataclass
class SharedAccess:
    line: int
    buffer: str
    base: int  # byte offset of the buffer (0 for static buffers, which get their own bank mapping)
    element_bytes: int
    width_bytes: int  # bytes per thread of the access
    index: str  # C expression, in elements of element_bytes
    write: bool


@dataclass
class KernelSource:
    name: str
    threads: int | None
    line_scope: dict[int, Scope] = field(default_factory=dict)
    scopes: list[Scope] = field(default_factory=list)
    defs: dict[str, str] = field(default_factory=dict)
    shared: dict[int, list[SharedAccess]] = field(default_factory=dict)
    global_accesses: dict[int, int] = field(default_factory=dict)  # line -> accesses of pointer arguments


def _balanced(text: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index just past the bracket that closes the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_ch:
            depth += 1
        elif text[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_ch}{close_ch} in {text!r}")


def _shared_accesses(lineno: int, text: str, buffers: dict[str, tuple[int, str | None]]) -> list[SharedAccess]:
    out = []
    for name, (base, static_type) in buffers.items():  # noqa: B007 (closures below use name, base)
        if static_type is None:
            # *(V*)(((T*)NAME) + (INDEX))  or  ((T*)NAME)[INDEX]
            for m in re.finditer(r"\*\((\w+)\*\)\(\(\((\w+)\*\)" + re.escape(name) + r"\) \+ ", text):
                end = _balanced(text, m.start() + len(f"*({m.group(1)}*)"), "(", ")")
                index = text[m.end() : end - 1]
                out.append((m.start(), end, m.group(2), m.group(1), index, name, base))
            for m in re.finditer(r"\(\((\w+)\*\)" + re.escape(name) + r"\)\[", text):
                end = _balanced(text, m.end() - 1, "[", "]")
                out.append((m.start(), end, m.group(1), m.group(1), text[m.end() : end - 1], name, base))
        else:
            for m in re.finditer(r"(?<![\w.])" + re.escape(name) + r"\[", text):
                end = _balanced(text, m.end() - 1, "[", "]")
                out.append((m.start(), end, static_type, static_type, text[m.end() : end - 1], name, base))
    accesses = []
    for start, end, elem, vec, index, name, base in out:
        if not index.strip():  # the declaration itself
            continue
        rest = text[end:].lstrip()
        write = text[:start].strip() == "" and rest.startswith("=") and not rest.startswith("==")
        ebytes = _ELEMENT.get(elem, 4)
        accesses.append(SharedAccess(lineno, name, base, ebytes, _ELEMENT.get(vec, ebytes), index, write))
    return accesses


def parse(source: str) -> KernelSource:
    """Parse the first ``__global__`` function with a body in ``source`` (lines numbered from 1, as nvcc sees
    them)."""
    lines = source.splitlines()
    start = None
    for i, line in enumerate(lines):
        if "__global__" in line and line.rstrip().endswith("{"):
            start = i
            break
    if start is None:
        raise ValueError("no __global__ function with a body in the source")
    header = lines[start]
    name = re.search(r"(\w+)\s*\(", re.sub(r"__launch_bounds__\([^)]*\)", "", header.split("__global__")[1])).group(1)
    bounds = re.search(r"__launch_bounds__\((\d+)", header)
    ks = KernelSource(name=name, threads=int(bounds.group(1)) if bounds else None)
    pointers = re.findall(r"\*\s*(?:__restrict__\s+)?(\w+)\s*[,)]", header)
    pointer_use = (
        re.compile(r"(?<![\w.])(?:" + "|".join(map(re.escape, pointers)) + r")\s*(?:\[|\+)") if pointers else None
    )
    root = Scope("root", start + 1)
    ks.scopes.append(root)
    stack = [root]
    buffers: dict[str, tuple[int, str | None]] = {}
    declared: set[str] = set()
    assignments: dict[str, list[tuple[str, Scope]]] = {}
    for i in range(start + 1, len(lines)):
        lineno = i + 1
        text = strip_comments(lines[i]).strip()
        if not stack:
            break
        top = stack[-1]
        if m := _DYN.search(text):
            buffers[m.group(1)] = (int(m.group(2)), None)
        if (m := _STATIC.search(text)) and m.group(2) != "buf_dyn_shmem":
            buffers[m.group(2)] = (0, m.group(1).strip())
        if m := _FOR.match(text):
            s = Scope("for", lineno, top, var=m.group(1), init=m.group(2), bound=m.group(3), depth=top.depth + 1)
            ks.scopes.append(s)
            stack.append(s)
            ks.line_scope[lineno] = s  # the header's compare and increment run once per iteration
            continue
        if m := _ELSE_IF.match(text):
            closed = stack.pop()
            els = Scope("else", lineno, closed.parent, cond=closed.cond, depth=closed.depth)
            s = Scope("if", lineno, els, cond=m.group(1), depth=els.depth + 1)
            s.nested_else = True  # closing brace pops both
            ks.scopes += [els, s]
            stack += [els, s]
            ks.line_scope[lineno] = els
            continue
        if text == "} else {":
            closed = stack.pop()
            cond = closed.cond if closed.kind == "if" else None
            s = Scope("else" if cond is not None else "block", lineno, closed.parent, cond=cond, depth=closed.depth)
            ks.scopes.append(s)
            stack.append(s)
            ks.line_scope[lineno] = closed.parent
            continue
        if m := _IF.match(text):
            ks.line_scope[lineno] = top  # the condition is evaluated in the enclosing scope
            s = Scope("if", lineno, top, cond=m.group(1), depth=top.depth + 1)
            ks.scopes.append(s)
            stack.append(s)
            continue
        ks.line_scope[lineno] = top
        if m := _DEF.match(text):
            declared.add(m.group(1))
            assignments.setdefault(m.group(1), [])
            if m.group(2) is not None:
                assignments[m.group(1)].append((m.group(2), top))
        elif (m := _ASSIGN.match(text)) and m.group(1) in declared:
            assignments[m.group(1)].append((m.group(2), top))
        if pointer_use is not None and (uses := len(pointer_use.findall(text))):
            ks.global_accesses[lineno] = uses
        acc = _shared_accesses(lineno, text, buffers) if buffers else []
        if acc:
            ks.shared[lineno] = acc
        opens, closes = text.count("{"), text.count("}")
        for _ in range(closes - opens if closes > opens else 0):
            closed = stack.pop()
            if getattr(closed, "nested_else", False):
                stack.pop()
        if opens > closes and text.endswith("{"):
            s = Scope("block", lineno, top, depth=top.depth + 1)
            ks.scopes.append(s)
            stack.append(s)
    # An integer local assigned once is its expression (of the loop variables where it sits in a loop). One assigned
    # several times outside every loop (a TileLang ``T.alloc_var`` prints ``int count = 0;`` and later
    # ``count = EXPR;``) takes its last assignment; one reassigned inside a loop varies and stays unknown.
    for name, assigned in assignments.items():
        in_loop = any(any(x.kind == "for" for x in scope.chain()) for _, scope in assigned)
        if len(assigned) == 1 or (assigned and not in_loop):
            ks.defs[name] = assigned[-1][0]
    return ks
