"""Block-level overhead of mHC: one standard pre-norm Transformer block (RMSNorm + causal SDPA attention, RMSNorm
+ SwiGLU FFN), forward + backward, with a plain residual against ``mhc.MHC`` sites (n streams), the single-GPU
analogue of the paper's 6.7% (which also hides communication behind DualPipe: one GPU cannot reproduce that part).

Variants (``VARIANTS``):

* ``plain``: ``x + F(x)`` twice, residual ``[B, S, C]``;
* ``mhc``: both sites as ``mhc.MHC(F, C, n)`` with ``post_stream="auto"`` (the FFN site's F_post,res on the
  high-priority stream), residual ``[B, S, n, C]``;
* ``mhc-no-stream``: the same with ``post_stream=None`` (everything on the current stream);
* ``mhc-recompute``: both sites in ``mhc.MHCStack(..., recompute_block=2)`` (the paper's block recompute, Eq. 20:
  the mHC activations are rebuilt in backward), skipped with a note if that container is missing.

The timed step is ``forward; backward(grad)`` with parameter gradients (set to ``None`` before each step). Peak
memory is ``torch.cuda.max_memory_allocated`` during one step, minus what was allocated before it. The byte-model
floor of the overhead is :func:`profiling.bytemodel.block_extra_bytes` at the measured copy bandwidth, divided by
the plain block's time: the overhead mHC would have if its kernels ran at copy speed and nothing overlapped.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import mhc
from profiling import bytemodel

VARIANTS = ("plain", "mhc", "mhc-no-stream", "mhc-recompute")
#: The recomputing mHC container of ``mhc`` (mhc/recompute.py).
RECOMPUTE_NAMES = ("MHCStack",)
HEAD_DIM = 128


class Attention(nn.Module):
    def __init__(self, c: int, heads: int, **kw):
        super().__init__()
        self.heads = heads
        self.norm = nn.RMSNorm(c, **kw)
        self.qkv = nn.Linear(c, 3 * c, bias=False, **kw)
        self.proj = nn.Linear(c, c, bias=False, **kw)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).flatten(-2))


class SwiGLU(nn.Module):
    def __init__(self, c: int, hidden: int, **kw):
        super().__init__()
        self.norm = nn.RMSNorm(c, **kw)
        self.gate_up = nn.Linear(c, 2 * hidden, bias=False, **kw)
        self.down = nn.Linear(hidden, c, bias=False, **kw)

    def forward(self, x):
        gate, up = self.gate_up(self.norm(x)).chunk(2, dim=-1)
        return self.down(nn.functional.silu(gate) * up)


def ffn_hidden(c: int) -> int:
    """SwiGLU width: 8/3 C rounded up to a multiple of 256 (the LLaMA convention)."""
    return 256 * math.ceil(8 * c / 3 / 256)


class PlainBlock(nn.Module):
    def __init__(self, c, heads, **kw):
        super().__init__()
        self.attn, self.ffn = Attention(c, heads, **kw), SwiGLU(c, ffn_hidden(c), **kw)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.ffn(x)


class MHCBlock(nn.Module):
    def __init__(self, c, heads, n, post_stream, **kw):
        super().__init__()
        dev = kw.get("device")
        self.attn = mhc.MHC(Attention(c, heads, **kw), c, n, kind="attn", layer_index=0, post_stream=post_stream,
                            device=dev)  # fmt: skip
        self.ffn = mhc.MHC(SwiGLU(c, ffn_hidden(c), **kw), c, n, kind="ffn", layer_index=1, post_stream=post_stream,
                           device=dev)  # fmt: skip

    def forward(self, h):
        return self.ffn(self.attn(h))


def recompute_factory():
    """``(name, class)`` of the recomputing container in this ``mhc``, or ``(None, None)``."""
    for name in RECOMPUTE_NAMES:
        cls = getattr(mhc, name, None)
        if cls is not None:
            return name, cls
    return None, None


def build(variant: str, c: int, n: int, heads: int, device, dtype) -> nn.Module:
    kw = {"device": device, "dtype": dtype}
    if variant == "plain":
        return PlainBlock(c, heads, **kw)
    if variant in ("mhc", "mhc-no-stream"):
        return MHCBlock(c, heads, n, "auto" if variant == "mhc" else None, **kw)
    if variant == "mhc-recompute":
        name, cls = recompute_factory()
        if cls is None:
            raise NotImplementedError(f"mhc has none of {', '.join(RECOMPUTE_NAMES)} (recompute not merged yet)")
        inner = MHCBlock(c, heads, n, "auto", **kw)
        # mhc.MHCStack(sites, recompute_block=L_r): one recompute block over the block's two sites
        return cls([inner.attn, inner.ffn], recompute_block=2)
    raise ValueError(f"block: unknown variant {variant!r}")


def _step(model, x, g):
    def step():
        for p in model.parameters():
            p.grad = None
        out = model(x)
        out.backward(g)

    return step


def peak_bytes(step, device) -> int | None:
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def run(bench, copy_gbs, hidden, tokens, n, dtype, device, progress=None, variants=VARIANTS) -> tuple[list, list]:
    """Times every variant at every C; returns ``(records, notes)``. ``tokens`` = one sequence of that length."""
    records, notes = [], []
    esize = torch.empty((), dtype=dtype).element_size()
    for C in hidden:
        heads = max(1, C // HEAD_DIM)
        plain_us = None
        extra = bytemodel.block_extra_bytes(tokens, n, C, esize)
        floor_pct = None
        for variant in variants:
            try:
                torch.manual_seed(0)
                model = build(variant, C, n, heads, device, dtype)
            except NotImplementedError as exc:
                notes.append(f"block {variant} C={C}: skipped: {exc}")
                if progress:
                    progress.update()
                continue
            shape = (1, tokens, C) if variant == "plain" else (1, tokens, n, C)
            x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
            g = torch.randn(shape, device=device, dtype=dtype)
            step = _step(model, x, g)
            try:
                step()  # compile and warm up
                mem = peak_bytes(step, device)
                t = bench(step)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: recorded, not fatal
                notes.append(f"block {variant} C={C}: failed: {type(exc).__name__}: {str(exc)[:160]}")
                if progress:
                    progress.update()
                continue
            finally:
                del step
            if variant == "plain":
                plain_us = t.us
                floor_pct = 100 * bytemodel.floor_us(extra, copy_gbs) / t.us
            overhead = None if plain_us is None or variant == "plain" else 100 * (t.us / plain_us - 1)
            records.append({
                "variant": variant, "C": C, "T": tokens, "n": 1 if variant == "plain" else n, "heads": heads,
                "ffn": ffn_hidden(C), "us": t.us, "p20_us": t.p20_us, "p80_us": t.p80_us, "kernel_us": t.kernel_us,
                "peak_MiB": None if mem is None else mem / 2**20, "overhead_pct": overhead,
                "floor_overhead_pct": None if variant == "plain" else floor_pct,
                "extra_bytes": 0 if variant == "plain" else extra, "paper_pct": bytemodel.PAPER_OVERHEAD_PCT,
            })  # fmt: skip
            del model, x, g
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            if progress:
                progress.update()
    return records, notes


def markdown(records: list[dict], notes: list[str]) -> list[str]:
    if not records and not notes:
        return []
    lines = [
        "",
        "## Transformer block, forward + backward",
        "",
        f"Pre-norm block (RMSNorm + causal SDPA attention, RMSNorm + SwiGLU FFN), one sequence. Overhead = time / "
        f"plain - 1. Floor = the byte model's extra mHC traffic at the measured copy bandwidth / plain time. Paper: "
        f"{bytemodel.PAPER_OVERHEAD_PCT}% end to end at n=4 in its training setup, with DualPipe overlap, which one GPU "
        "cannot reproduce (the model behind that number is not stated; docs/spec.md §11).",
        "",
        "| C | T | variant | µs | p20-p80 µs | overhead % | floor % | paper % | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        spread = f"{r['p20_us']:.0f}-{r['p80_us']:.0f}" if r["p20_us"] is not None else "–"
        ov = f"{r['overhead_pct']:+.1f}" if r["overhead_pct"] is not None else "–"
        fl = f"{r['floor_overhead_pct']:.1f}" if r["floor_overhead_pct"] is not None else "–"
        mem = f"{r['peak_MiB']:.0f}" if r["peak_MiB"] is not None else "–"
        paper = f"{r['paper_pct']}" if r["variant"] != "plain" else "–"
        lines.append(
            f"| {r['C']} | {r['T']} | {r['variant']} | {r['us']:.0f} | {spread} | {ov} | {fl} | {paper} | {mem} |"
        )
    lines += [f"- {note}" for note in notes]
    return lines
