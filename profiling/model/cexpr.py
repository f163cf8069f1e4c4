"""A small evaluator of the C expressions TileLang writes into its CUDA source (loop bounds, ``if`` conditions,
shared-memory indices), over numpy arrays: one evaluation covers every sampled block, thread and loop iteration.

Semantics are C's for the integer subset that appears there: ``/`` truncates toward zero, ``%`` takes the sign of
the dividend, comparisons and ``&&``/``||``/``!`` give 0/1, ``?:`` selects, ``(int)``-style casts of integers are
ignored (the values involved stay far below 2**31) and ``min``/``max`` are elementwise. Anything else (a float
variable, a load from memory, a call) raises :class:`Unknown`: the caller then treats the expression as
data-dependent.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

__all__ = ["Unknown", "compile_expr", "strip_comments"]


class Unknown(Exception):
    """The expression depends on something the model does not know (data, a float, an unknown name)."""


_TOKEN = re.compile(
    r"\s*(?:(?P<num>0[xX][0-9a-fA-F]*\.?[0-9a-fA-F]*[pP][-+]?\d+[fF]?|0[xX][0-9a-fA-F]+[uUlL]*"
    r"|\d+\.\d*(?:[eE][-+]?\d+)?[fF]?|\d+[eE][-+]?\d+[fF]?|\d+[uUlL]*)"
    r"|(?P<name>[A-Za-z_]\w*)|(?P<op><<|>>|<=|>=|==|!=|&&|\|\||[-+*/%<>&|^!~?:()\[\],.]))"
)
_TYPES = {
    "int", "int64_t", "uint", "uint32_t", "uint64_t", "unsigned", "signed", "long", "short", "char", "uchar",
    "bool", "float", "double", "half_t", "bfloat16_t", "int8_t", "uint8_t", "int16_t", "uint16_t", "size_t",
}  # fmt: skip
_INT_TYPES = _TYPES - {"float", "double", "half_t", "bfloat16_t"}
_BINARY = {
    "||": 4, "&&": 5, "|": 6, "^": 7, "&": 8, "==": 9, "!=": 9,
    "<": 10, "<=": 10, ">": 10, ">=": 10, "<<": 11, ">>": 11, "+": 12, "-": 12, "*": 13, "/": 13, "%": 13,
}  # fmt: skip

Env = Callable[[str], object]
Node = Callable[[Env], object]


def strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", text)


def _tokens(text: str) -> list[tuple[str, str]]:
    text = strip_comments(text)
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise Unknown(f"cannot tokenize {text[pos : pos + 20]!r}")
        pos = m.end()
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
    return out


def _number(tok: str):
    t = tok.rstrip("uUlL") if not tok.lower().startswith("0x") or "p" not in tok.lower() else tok
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", t):
        return int(t, 16)
    if re.fullmatch(r"\d+", t):
        return int(t)
    raise Unknown(f"floating-point literal {tok}")  # the model only reasons about integers


def _tdiv(a, b):
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    safe = np.where(b == 0, 1, b)
    q = np.abs(a) // np.abs(safe)
    return np.where((a < 0) ^ (safe < 0), -q, q)


def _apply(op: str, a, b):
    if op == "/":
        return _tdiv(a, b)
    if op == "%":
        return np.asarray(a, dtype=np.int64) - _tdiv(a, b) * np.asarray(b, dtype=np.int64)
    if op == "&&":
        return np.logical_and(a, b)
    if op == "||":
        return np.logical_or(a, b)
    fn = {
        "+": np.add, "-": np.subtract, "*": np.multiply, "<<": np.left_shift, ">>": np.right_shift,
        "&": np.bitwise_and, "|": np.bitwise_or, "^": np.bitwise_xor,
        "<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal, "==": np.equal, "!=": np.not_equal,
    }[op]  # fmt: skip
    if op in ("<", "<=", ">", ">=", "==", "!="):
        return fn(a, b)  # bool arrays stand for C's 0/1 (numpy promotes them in arithmetic)
    return fn(_int(a), _int(b))


def _int(v):
    v = np.asarray(v)
    return v.astype(np.int64) if v.dtype == bool else v


class _Parser:
    def __init__(self, tokens):
        self.toks, self.i = tokens, 0

    def peek(self, k=0):
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else ("end", "")

    def take(self, value=None):
        tok = self.peek()
        if value is not None and tok[1] != value:
            raise Unknown(f"expected {value!r}, got {tok[1]!r}")
        self.i += 1
        return tok

    def expr(self, min_prec=0) -> Node:
        left = self.unary()
        while True:
            kind, op = self.peek()
            if kind == "op" and op == "?" and min_prec <= 3:
                self.take()
                then = self.expr(0)
                self.take(":")
                other = self.expr(3)
                left = (lambda c, t, o: lambda env: np.where(np.asarray(c(env)) != 0, t(env), o(env)))(
                    left, then, other
                )
                continue
            prec = _BINARY.get(op) if kind == "op" else None
            if prec is None or prec < min_prec:
                return left
            self.take()
            right = self.expr(prec + 1)
            left = (lambda o, a, b: lambda env: _apply(o, a(env), b(env)))(op, left, right)

    def _cast_ahead(self) -> int:
        """Length of a ``(type[*])`` cast starting at the current ``(``, else 0."""
        j = 1
        names = []
        while self.peek(j)[0] == "name" and self.peek(j)[1] in _TYPES:
            names.append(self.peek(j)[1])
            j += 1
        if not names:
            return 0
        pointer = False
        while self.peek(j)[1] == "*":
            pointer = True
            j += 1
        if self.peek(j)[1] != ")":
            return 0
        self._cast_int = not pointer and all(n in _INT_TYPES for n in names)
        return j + 1

    def unary(self) -> Node:
        kind, tok = self.peek()
        if kind == "op" and tok in ("-", "+", "!", "~"):
            self.take()
            inner = self.unary()
            if tok == "-":
                return lambda env: -np.asarray(inner(env), dtype=np.int64)
            if tok == "!":
                return lambda env: (np.asarray(inner(env)) == 0).astype(np.int64)
            if tok == "~":
                return lambda env: ~np.asarray(inner(env), dtype=np.int64)
            return inner
        if kind == "op" and tok == "(":
            n = self._cast_ahead()
            if n:
                is_int = self._cast_int
                self.i += n
                inner = self.unary()
                if not is_int:
                    raise Unknown("cast to a float or pointer type")
                return inner
            self.take("(")
            inner = self.expr(0)
            self.take(")")
            return self.postfix(inner, None)
        if kind == "num":
            self.take()
            value = _number(tok)
            return self.postfix(lambda env: value, None)
        if kind == "name":
            self.take()
            name = tok
            while self.peek()[1] == "." and self.peek(1)[0] == "name":
                self.take()
                name += "." + self.take()[1]
            if self.peek()[1] == "(":  # a call: min / max only
                self.take("(")
                args = [self.expr(0)]
                while self.peek()[1] == ",":
                    self.take()
                    args.append(self.expr(0))
                self.take(")")
                if name not in ("min", "max") or len(args) != 2:
                    raise Unknown(f"call to {name}")
                fn = np.minimum if name == "min" else np.maximum
                return (lambda f, a, b: lambda env: f(a(env), b(env)))(fn, *args)
            return self.postfix(None, name)
        raise Unknown(f"unexpected token {tok!r}")

    def postfix(self, node: Node | None, name: str | None) -> Node:
        while self.peek()[1] == "[":
            self.take("[")
            index = self.expr(0)
            self.take("]")
            if name is None:
                raise Unknown("indexing an expression")
            try:  # a constant index names one element (``ok[0]``), which an assumption may give a value
                name = f"{name}[{int(index(lambda _n: (_ for _ in ()).throw(Unknown(_n))))}]"
            except Unknown as exc:
                raise Unknown(f"load {name}[...]") from exc
        if node is None:
            return (lambda n: lambda env: env(n))(name)
        return node


def compile_expr(text: str) -> Node:
    """Compile a C expression into ``f(env)``, where ``env(name)`` returns a value or raises :class:`Unknown`."""
    parser = _Parser(_tokens(text))
    node = parser.expr(0)
    if parser.peek()[0] != "end":
        raise Unknown(f"trailing tokens in {text!r}")
    return node
