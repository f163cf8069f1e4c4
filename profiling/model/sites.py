"""The ``site_fwd`` / ``site_bwd`` records: a residual site as :class:`mhc.MHCStack` runs it by default, and its
latency at decode sizes.

Two kinds of record (the ``site`` field):

* ``"chain"`` (the default): the steady-state site of a chain. A stack of :data:`capture.CHAIN_SITES` sites with the
  default ``recompute_block`` is captured on fake tensors (:func:`capture.chain_ops`) and the launches of one
  interior site are kept: the *unit* between its sublayer and the next site's, i.e. its F_post,res and the next
  site's pre-mapping, which the stack fuses into one ``mhc::boundary_*`` op. In a long chain every site costs one
  such unit, so this is what a site costs in a model.
* ``"single"``: a stack of one site (no next site, so no fused boundary): its pre-mapping and F_post,res.
* ``"chain_unfused"``: the chain's unit with the boundary kernels disabled (``boundary`` in
  ``mhc._cuda.DISABLED`` while the ops are replayed, as ``MHC_DISABLE_KERNELS=boundary`` does on a GPU): the
  boundary ops then run post_res and the pre-mapping separately. The benchmark's "unfused" row.
* ``"chain_clusters"``: the chain's unit with the fused boundary backward's opt-in thread block cluster variant
  (``mhc._cuda.use_boundary_clusters`` while the ops are replayed, as ``MHC_BOUNDARY_CLUSTERS=1``; ``python -m
  profiling model --site chain chain_clusters --kernel site_bwd``). The benchmark's "fused_clusters" row.

``"chain"`` replays what the runtime would run: the cluster variant only where ``MHC_BOUNDARY_CLUSTERS=1``
(``mhc._cuda.BOUNDARY_CLUSTERS``; off by default). Every record says which in ``boundary_clusters``.

Fields beyond those of every record (:mod:`.bounds`):

* ``bytes``: the site's own traffic, every tensor argument of each of its launches once (inputs read, outputs
  written), from the captured launches; ``bytes_per_token``; ``bytes_floor``: the byte model of the design
  (:func:`profiling.bytemodel.chain_site_bytes` for the chain, ``site_bytes`` for the others);
  ``pct_copy_bw = bytes_floor / copy bandwidth / t_pred`` (100% = the design at the floor), as for the kernel
  records.
* ``bytes_recompute``, ``launches_recompute``, ``t_recompute_us``: the block recompute's replay of the forward ops
  (Eq. 20), which runs inside the backward; ``site_bwd``'s ``bytes``, ``launches`` and ``t_pred_us`` EXCLUDE it
  (``t_pred_includes_recompute: false`` says so in every record), and ``t_pred_with_recompute_us`` is their sum
  (what a training step's backward pays per site).
* ``t_site_eager_us``, ``t_site_graph_us``, ``t_site_graph_pdl_us``: the latency of the site's launches in
  sequence (:func:`sequence_latency`) in eager PyTorch, in a CUDA graph, and in a graph with programmatic dependent
  launch for the kernels that use it (``pdl_launches``), with the assumed overheads of
  :class:`profiling.model.gpus.LaunchOverhead`. At decode sizes (T in {1, 8, 64}) this is the predicted latency of a
  site; at large T it approaches ``t_pred_us``.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from mhc._cuda import TORCH_DTYPES as _DTYPES
from profiling import bytemodel

from . import bounds, capture, gpus

__all__ = [
    "DECODE_SITE_KINDS",
    "PDL_MARK",
    "SITE_KINDS",
    "predict_site",
    "predict_stack",
    "sequence_latency",
    "uses_pdl",
]

SITE_KINDS = ("chain", "single", "chain_unfused", "chain_clusters")
#: the kinds of the decode table (``site_fwd`` only: ``chain_clusters``'s forward is ``chain``'s)
DECODE_SITE_KINDS = ("chain", "single", "chain_unfused")
#: What TileLang 0.1.15 emits for ``T.pdl_sync()`` (the dependent kernel's wait), in the generated CUDA.
PDL_MARK = "cudaGridDependencySynchronize"


@functools.lru_cache(maxsize=32)
def _ops(site: str, n: int, C: int, dtype: str, T: int):
    """(forward, backward, recompute) ops of the site's unit."""
    td = _DTYPES[dtype]
    if site in ("chain", "chain_unfused", "chain_clusters"):
        chain = capture.chain_ops(n, C, td, T)
        ops = chain.unit_ops()
        meta = {"chain_sites": capture.CHAIN_SITES, "chain_site": chain.site, "recompute_block": chain.recompute_block}
    else:
        ops = capture.site_ops(n, C, td, T)
        meta = {}
    by_phase = {p: [o for o in ops if o.phase == p] for p in ("fwd", "bwd", "recompute")}
    return by_phase, meta


@contextlib.contextmanager
def _boundary_kernels(on: bool):
    """The boundary kernels on or off while ops are replayed (``mhc._cuda.DISABLED``), restored afterwards."""
    from mhc import _cuda

    was_off = "boundary" in _cuda.DISABLED
    (_cuda.enable_kernels if on else _cuda.disable_kernels)("boundary")
    try:
        yield
    finally:
        (_cuda.disable_kernels if was_off else _cuda.enable_kernels)("boundary")


def _clusters(site: str) -> bool:
    """Whether ``site``'s replay runs the fused boundary backward's cluster variant (see the module docstring)."""
    from mhc import _cuda

    return site == "chain_clusters" or (site == "chain" and _cuda.BOUNDARY_CLUSTERS)


def _launches(ops, sms: int, site: str, clusters: bool | None = None):
    from mhc import _cuda

    clusters = _clusters(site) if clusters is None else clusters
    with _boundary_kernels(site != "chain_unfused"), _cuda.use_boundary_clusters(clusters):
        return capture.launches_of(ops, sms)


def uses_pdl(item) -> bool:
    """Whether a launch waits through programmatic dependent launch (its CUDA source has :data:`PDL_MARK`)."""
    if not isinstance(item, capture.Launch):
        return False
    from tl_kernels.tools import codegen

    return PDL_MARK in codegen.cuda_source(item.kernel)


def sequence_latency(parts: list[dict], overhead: gpus.LaunchOverhead = gpus.LAUNCH) -> dict[str, float]:
    """Latency of dependent launches on one stream. Each part has ``t_exec_us`` (its work: the largest of its DRAM,
    issue, shared-memory and latency bounds) and ``pdl`` (whether it waits through programmatic dependent launch):

    * eager: ``sum(max(t_exec + graph_gap, host))``, the GPU's work and gap or the host's launch rate;
    * graph: ``sum(t_exec + graph_gap)``;
    * graph + PDL: ``sum(t_exec + (pdl_gap if pdl else graph_gap))``.
    """
    g, p, h = overhead.graph_gap_us, overhead.pdl_gap_us, overhead.host_us
    return {
        "eager": sum(max(x["t_exec_us"] + g, h) for x in parts),
        "graph": sum(x["t_exec_us"] + g for x in parts),
        "graph_pdl": sum(x["t_exec_us"] + (p if x["pdl"] else g) for x in parts),
    }


def _part(item, g: gpus.GPU) -> dict:
    m = bounds.launch_model(item, g) if isinstance(item, capture.Launch) else bounds.glue_model(item, g)
    return {
        "name": m.name, "bytes": m.bytes, "t_dram_us": m.t_dram_us, "t_issue_us": m.t_issue_us,
        "t_smem_us": m.t_smem_us, "t_latency_us": m.t_latency_us, "t_pred_us": m.t_pred_us,
        "t_exec_us": max(m.t_dram_us, m.t_issue_us, m.t_smem_us, m.t_latency_us), "pdl": uses_pdl(item), **m.detail,
    }  # fmt: skip


def _floor(site: str, mode: str, n: int, C: int, esize: int, T: int) -> int:
    if site in ("chain", "chain_clusters"):
        return bytemodel.chain_site_bytes(T, n, C, esize, mode)
    return bytemodel.site_bytes(T, n, C, esize, mode)


def predict_site(
    kernel: str, n: int, C: int, dtype: str, T: int, gpu: str, copy_gbps: float | None = None, site: str = "chain"
) -> dict:
    """The record of ``site_fwd`` or ``site_bwd`` (see the module docstring); ``site`` one of
    :data:`SITE_KINDS`."""
    if kernel not in ("site_fwd", "site_bwd"):
        raise ValueError(f"kernel must be 'site_fwd' or 'site_bwd', got {kernel!r}")
    if site not in SITE_KINDS:
        raise ValueError(f"site must be one of {SITE_KINDS}, got {site!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
    g = gpus.gpu(gpu, copy_gbps)
    mode = kernel.rpartition("_")[2]
    ops, meta = _ops(site, n, C, dtype, T)
    clusters = _clusters(site)
    own = [_part(x, g) for x in _launches(ops[mode], g.sms, site, clusters)]
    rec = [_part(x, g) for x in _launches(ops["recompute"], g.sms, site, clusters)] if mode == "bwd" else []
    if not own:
        raise ValueError(f"{kernel} ({site}): no launch captured for n={n} C={C} T={T}")
    floor = _floor(site, mode, n, C, _DTYPES[dtype].itemsize, T)
    nbytes = sum(p["bytes"] for p in own)
    t_pred = sum(p["t_pred_us"] for p in own)
    t_rec = float(sum(p["t_pred_us"] for p in rec))
    latency = sequence_latency(own)
    return {
        "kernel": kernel, "site": site, "boundary_clusters": clusters, "n": n, "C": C, "dtype": dtype, "T": T, "gpu": g.name,
        "bytes": nbytes, "bytes_moved": nbytes, "bytes_per_token": nbytes / T if T else 0.0, "bytes_floor": floor,
        "launches": len(own),
        "t_dram_us": sum(p["t_dram_us"] for p in own), "t_issue_us": sum(p["t_issue_us"] for p in own),
        "t_smem_us": sum(p["t_smem_us"] for p in own), "t_latency_us": sum(p["t_latency_us"] for p in own),
        "t_pred_us": t_pred, "pct_copy_bw": 100.0 * bytemodel.floor_us(floor, g.copy_gbps) / t_pred,
        "copy_gbps": g.copy_gbps,
        "bytes_recompute": sum(p["bytes"] for p in rec), "launches_recompute": len(rec), "t_recompute_us": t_rec,
        "t_pred_includes_recompute": False, "t_pred_with_recompute_us": t_pred + t_rec,
        "t_site_eager_us": latency["eager"], "t_site_graph_us": latency["graph"],
        "t_site_graph_pdl_us": latency["graph_pdl"], "pdl_launches": sum(p["pdl"] for p in own),
        **meta, "parts": own, "parts_recompute": rec,
    }  # fmt: skip


def predict_stack(
    n: int,
    C: int,
    dtype: str,
    T: int,
    gpu: str,
    fused: bool = True,
    copy_gbps: float | None = None,
    sites: int = capture.CHAIN_SITES,
    clusters: bool | None = None,
) -> dict[str, float]:
    """The model's time for the mHC ops of a whole stack of ``sites`` sites (``MHCStack`` with the default
    recompute block, every site, not only an interior one), boundary kernels on or off: ``{"fwd": µs, "bwd": µs
    (the replay included), "sites": sites}``. What ``profiling.chain_bench`` puts beside a measured stack of the
    same shape (identical launches are modelled once). ``clusters``: the fused boundary backward's cluster variant
    (``None``: what the runtime runs, ``mhc._cuda.BOUNDARY_CLUSTERS``)."""
    from mhc import _cuda

    clusters = _cuda.BOUNDARY_CLUSTERS if clusters is None else bool(clusters)
    return _predict_stack(n, C, dtype, T, gpu, fused, copy_gbps, sites, clusters and fused)


@functools.lru_cache(maxsize=64)
def _predict_stack(n, C, dtype, T, gpu, fused, copy_gbps, sites, clusters) -> dict[str, float]:
    g = gpus.gpu(gpu, copy_gbps)
    chain = capture.chain_ops(n, C, _DTYPES[dtype], T, sites)
    site = ("chain_clusters" if clusters else "chain") if fused else "chain_unfused"
    memo: dict = {}

    def t(item) -> float:
        if isinstance(item, capture.Glue):
            return bounds.glue_model(item, g).t_pred_us
        key = (id(item.kernel), tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in item.args))
        if key not in memo:
            memo[key] = bounds.launch_model(item, g).t_pred_us
        return memo[key]

    out = {"fwd": 0.0, "bwd": 0.0, "sites": float(sites)}
    for op in chain.ops:
        phase = "fwd" if op.phase == "fwd" else "bwd"
        out[phase] += sum(t(x) for x in _launches([op], g.sms, site, clusters))
    return out
