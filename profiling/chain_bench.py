"""Fused against unfused residual boundaries (issue 18), on a GPU: ``mhc.MHCStack`` with the boundary kernels on
(the default, ``fused``), on with the fused backward's opt-in thread block cluster variant (``fused_clusters``:
``mhc._cuda.use_boundary_clusters``, as ``MHC_BOUNDARY_CLUSTERS=1``) and off (``unfused``:
``mhc._cuda.disable_kernels("boundary")``, as ``MHC_DISABLE_KERNELS=boundary``), each measurement beside the
performance model's prediction for the same stack, so that a GPU run calibrates it. The cluster variant changes the
backward only, so it is timed in the ``fwd+bwd`` modes only: the run decides whether the model's prediction (the
cluster variant slower, docs/design.md section 7) holds.

Entries (``result["chain"]`` of ``profiling.bench``; one record per (sublayer, variant, mode, C, T)):

* ``sublayer="identity"``: a stack of :data:`profiling.model.capture.CHAIN_SITES` sites with identity sublayers (the
  stack the model captures), the default ``recompute_block``. Modes: ``fwd`` (the training forward, gradients
  recorded), ``fwd+bwd`` (forward then backward, the block recompute's replay included) at the quick token count,
  and ``decode`` (forward under ``torch.no_grad``: every boundary fused) at T in {1, 8, 64}. ``model_us`` is the
  model's time of the mHC ops of the whole stack (:func:`profiling.model.sites.predict_stack`; for ``decode``, the
  sites times the eager latency of the interior site, ``t_site_eager_us``).
* ``sublayer="block"``: :data:`BLOCK_SITES` sites of a pre-norm Transformer (attention, SwiGLU FFN alternating, as
  ``profiling.block``), forward + backward. ``model_us`` is the model's time of the mHC ops alone (the sublayers
  are not modelled): compare the measured fused-unfused difference with the modelled one.

GPU only: without CUDA :func:`run` returns no record and a note, as the other GPU entries do. The prediction is
computed after the timings (:func:`annotate`, CPU work), and only on an H100 or H200.
"""

from __future__ import annotations

import contextlib

import torch

import mhc

SUBLAYERS = ("identity", "block")
VARIANTS = ("fused", "unfused", "fused_clusters")
#: the variants of the forward-only modes (``fwd``, ``decode``): the cluster variant runs the default's forward
FORWARD_VARIANTS = ("fused", "unfused")
DECODE_TOKENS = (1, 8, 64)
#: Two Transformer blocks: the default recompute block is 2 sites, so each block's attention and FFN sites are
#: joined by one fused boundary, as in a model.
BLOCK_SITES = 4


@contextlib.contextmanager
def boundary_kernels(on: bool):
    """The fused boundary kernels on or off (``mhc._cuda.DISABLED``), restored afterwards."""
    from mhc import _cuda

    was_off = "boundary" in _cuda.DISABLED
    (_cuda.enable_kernels if on else _cuda.disable_kernels)("boundary")
    try:
        yield
    finally:
        (_cuda.disable_kernels if was_off else _cuda.enable_kernels)("boundary")


@contextlib.contextmanager
def variant_kernels(variant: str):
    """The boundary kernels of ``variant`` (:data:`VARIANTS`) for the ``with`` block, the previous state restored."""
    from mhc import _cuda

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    with boundary_kernels(variant != "unfused"), _cuda.use_boundary_clusters(variant == "fused_clusters"):
        yield


def build(sublayer: str, sites: int, n: int, C: int, device, dtype) -> mhc.MHCStack:
    """``sites`` ``mhc.MHC`` sites (attention and FFN kinds alternating) in an ``MHCStack`` with its defaults."""
    if sublayer not in SUBLAYERS:
        raise ValueError(f"sublayer must be one of {SUBLAYERS}, got {sublayer!r}")
    layers = []
    for k in range(sites):
        kind = ("attn", "ffn")[k % 2]
        if sublayer == "identity":
            f = torch.nn.Identity()
        else:
            from profiling import block

            kw = {"device": device, "dtype": dtype}
            f = block.Attention(C, max(1, C // block.HEAD_DIM), **kw) if kind == "attn" else block.SwiGLU(
                C, block.ffn_hidden(C), **kw
            )  # fmt: skip
        layers.append(mhc.MHC(f, C, n_streams=n, kind=kind, layer_index=k).to(device))
    return mhc.MHCStack(layers)


def step_fn(stack, x, g, mode: str):
    """The timed call: ``fwd`` (gradients recorded), ``fwd+bwd``, or ``decode`` (forward under ``no_grad``)."""
    if mode == "decode":

        def fn():
            with torch.no_grad():
                stack(x)

    elif mode == "fwd":

        def fn():
            stack(x)

    elif mode == "fwd+bwd":

        def fn():
            for p in stack.parameters():
                p.grad = None
            stack(x).backward(g)

    else:
        raise ValueError(f"mode must be 'fwd', 'fwd+bwd' or 'decode', got {mode!r}")
    return fn


def measure(bench, sublayer: str, variant: str, mode: str, n: int, C: int, T: int, dtype, device) -> dict:
    """One record: the stack built, warmed up and timed with ``bench`` (``profiling.bench``'s timer)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant not in FORWARD_VARIANTS and mode != "fwd+bwd":
        raise ValueError(f"variant {variant!r} differs in the backward only: mode must be 'fwd+bwd', got {mode!r}")
    from profiling.model import capture

    sites = capture.CHAIN_SITES if sublayer == "identity" else BLOCK_SITES
    torch.manual_seed(0)
    stack = build(sublayer, sites, n, C, device, dtype)
    x = torch.randn(1, T, n, C, device=device, dtype=dtype, requires_grad=mode != "decode")
    g = torch.randn(1, T, n, C, device=device, dtype=dtype)
    fn = step_fn(stack, x, g, mode)
    with variant_kernels(variant):
        fn()  # compile and warm up
        t = bench(fn)
    return {
        "entry": "chain", "sublayer": sublayer, "variant": variant, "mode": mode, "n": n, "C": C, "T": T,
        "sites": sites, "us": t.us, "p20_us": t.p20_us, "p80_us": t.p80_us, "kernel_us": t.kernel_us,
        "us_per_site": t.us / sites, "model_us": None,
    }  # fmt: skip


def cases(hidden, tokens: int, block_hidden, block_tokens: int) -> list[tuple]:
    """(sublayer, variant, mode, C, T) of a run: every variant in the ``fwd+bwd`` modes, :data:`FORWARD_VARIANTS`
    in the others."""
    out = []
    for C in hidden:
        for variant in VARIANTS:
            out += [("identity", variant, "fwd+bwd", C, tokens)]
            if variant in FORWARD_VARIANTS:
                out += [("identity", variant, "fwd", C, tokens)]
                out += [("identity", variant, "decode", C, T) for T in DECODE_TOKENS]
    for C in block_hidden:
        out += [("block", variant, "fwd+bwd", C, block_tokens) for variant in VARIANTS]
    return out


def run(bench, hidden, tokens, block_hidden, block_tokens, n, dtype, device, progress=None) -> tuple[list, list]:
    """Every case of :func:`cases` on a CUDA device; ``(records, notes)``. Without CUDA: no record, one note."""
    if torch.device(device).type != "cuda":
        return [], ["fused vs unfused boundaries: skipped (needs a CUDA GPU)"]
    records, notes = [], []
    for sublayer, variant, mode, C, T in cases(hidden, tokens, block_hidden, block_tokens):
        try:
            records.append(measure(bench, sublayer, variant, mode, n, C, T, dtype, device))
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: recorded, not fatal
            notes.append(f"chain {sublayer} {variant} {mode} C={C} T={T}: failed: {type(exc).__name__}: {exc}"[:240])
        torch.cuda.empty_cache()
        if progress:
            progress.update()
    return records, notes


def prediction(r: dict, gpu: str, dtype: str, copy_gbps: float) -> float:
    """The model's µs for a record (see the module docstring)."""
    from profiling.model import sites

    fused, clusters = r["variant"] != "unfused", r["variant"] == "fused_clusters"
    if r["mode"] == "decode":
        kind = {"fused": "chain", "unfused": "chain_unfused", "fused_clusters": "chain_clusters"}[r["variant"]]
        rec = sites.predict_site("site_fwd", r["n"], r["C"], dtype, r["T"], gpu, copy_gbps=copy_gbps, site=kind)
        return r["sites"] * rec["t_site_eager_us"]
    stack = sites.predict_stack(
        r["n"], r["C"], dtype, r["T"], gpu, fused, copy_gbps=copy_gbps, sites=r["sites"], clusters=clusters
    )
    return stack["fwd"] + (stack["bwd"] if r["mode"] == "fwd+bwd" else 0.0)


def annotate(result: dict, gpu: str | None = None) -> bool:
    """Add ``model_us`` to the chain records of a bench result on an H100 or H200 (``gpu``: the device name; by
    default the current CUDA device's). Never raises: a model failure must not cost a run its measurements."""
    import os
    import warnings

    from profiling import model

    recs = result.get("chain") or []
    meta = result.get("meta", {})
    if not recs or os.environ.get(model.MODEL_ENV, "") == "0" or not meta.get("copy_GBps"):
        return False
    if gpu is None:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    name = next((g for g in ("H100", "H200") if g in gpu), None)
    if name is None:
        return False
    dtype = str(meta.get("dtype", "bfloat16")).replace("torch.", "")
    added = False
    for r in recs:
        try:
            r["model_us"] = prediction(r, name, dtype, meta["copy_GBps"])
            added = True
        except Exception as exc:  # noqa: BLE001 - see the docstring
            warnings.warn(f"performance model failed for chain record {r}: {exc}", stacklevel=2)
            return added
    return added


def markdown(records: list[dict], notes: list[str]) -> list[str]:
    if not records and not notes:
        return []
    lines = [
        "",
        "## Fused against unfused boundaries (MHCStack)",
        "",
        "Stack time (µs) with the boundary kernels on (fused), on with the fused backward's thread block clusters "
        "(clusters, `MHC_BOUNDARY_CLUSTERS=1`; fwd+bwd only) and off (unfused), per site, and the performance "
        "model's time of the stack's mHC ops (`model µs`; the Transformer block's sublayers are not modelled). "
        "Decode: forward under no_grad.",
        "",
        "| sublayer | mode | C | T | sites | fused µs | clusters µs | unfused µs | fused / unfused | "
        "clusters / fused | model fused µs | model clusters µs | model unfused µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["sublayer"], r["mode"], r["C"], r["T"], r["variant"]): r for r in records}
    for key in dict.fromkeys(k[:4] for k in by_key):
        f, c, u = (by_key.get((*key, v)) for v in ("fused", "fused_clusters", "unfused"))
        ref = f or c or u

        def v(r, k):
            return "-" if r is None or r.get(k) is None else f"{r[k]:.1f}"

        def ratio(a, b):
            return f"{a['us'] / b['us']:.2f}" if a and b and a.get("us") and b.get("us") else "-"

        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {ref['sites']} | {v(f, 'us')} | {v(c, 'us')} | "
            f"{v(u, 'us')} | {ratio(f, u)} | {ratio(c, f)} | {v(f, 'model_us')} | {v(c, 'model_us')} | "
            f"{v(u, 'model_us')} |"
        )
    lines += [f"- {note}" for note in notes]
    return lines
