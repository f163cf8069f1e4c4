"""A performance model of every shipped kernel and of a whole residual site, computed without a GPU.

    python -m profiling model [--json PATH] [--n 4] [--C 2560 7168] [--T 16384] [--dtype bfloat16] [--gpu H100 H200]
                              [--site chain single] [--decode]

It reads the kernels as they are on disk each time (compiled through TileLang's cache; SASS and ptxas results cached
by :mod:`tl_kernels.tools.codegen`), finds the launches a site makes by running :mod:`mhc` on fake tensors
(:mod:`.capture`), counts each launch's warp instructions by pipe, shared-memory wavefronts and global-load rounds
from its SASS and CUDA source (:mod:`.counts`), and turns them into time bounds (:mod:`.bounds`) for the GPUs of
:mod:`.gpus`. ``docs/benchmarks.md`` ("Performance model") explains the formulas and the limits.

:func:`predict` is the hook for a GPU run: it returns the record of one (kernel, n, C, dtype, T, gpu), to be stored
beside the measured time; :func:`annotate` is what ``profiling.bench`` calls once its timings are written.
"""

from __future__ import annotations

import warnings

from . import bounds, sites
from .bounds import KERNELS

__all__ = ["KERNELS", "annotate", "measured_beside", "predict", "records"]


def predict(
    kernel: str, n: int, C: int, dtype: str, T: int, gpu: str, copy_gbps: float | None = None, site: str = "chain"
) -> dict:
    """The model's record for one (kernel, n, C, dtype, T, gpu): :func:`.sites.predict_site` for ``site_fwd`` and
    ``site_bwd`` (``site``: one of :data:`.sites.SITE_KINDS`), :func:`.bounds.predict` for the other kernels."""
    if kernel in ("site_fwd", "site_bwd"):
        return sites.predict_site(kernel, n, C, dtype, T, gpu, copy_gbps=copy_gbps, site=site)
    return bounds.predict(kernel, n, C, dtype, T, gpu, copy_gbps=copy_gbps)


def records(
    kernels=KERNELS,
    n=4,
    hidden=(2560, 7168),
    dtype="bfloat16",
    tokens=(16384,),
    gpu_names=("H100", "H200"),
    site_kinds=("chain",),
) -> list[dict]:
    """Records for every combination (the default: the issue's target table); the site kernels once per kind in
    ``site_kinds``."""
    out = []
    for g in gpu_names:
        for C in hidden:
            for T in tokens:
                for k in kernels:
                    for s in site_kinds if k.startswith("site_") else ("",):
                        out.append(predict(k, n, C, dtype, T, g, site=s) if s else predict(k, n, C, dtype, T, g))
    return out


_DTYPE_NAMES = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32"}
#: ``MHC_BENCH_MODEL``: ``0`` off, ``all`` every timed row, default the target token count only (each prediction
#: takes 1-3 s of CPU on the GPU machine, which a full sweep's hundreds of rows cannot afford).
MODEL_ENV = "MHC_BENCH_MODEL"
DEFAULT_TOKENS = (16384,)
_FAILED: list[str] = []


def measured_beside(
    op: str, mode: str, T: int, n: int, C: int, dtype, copy_gbps: float, site: str = "chain"
) -> float | None:
    """The predicted µs for a benchmark row (``op``/``mode`` as in ``profiling.bench``; ``site`` for the site
    kernels), at the measured copy bandwidth, when the row runs on an H100 or H200, the model covers it and
    ``MHC_BENCH_MODEL`` selects it; else ``None``. Never raises: a model failure must not cost a GPU run its
    measurements (it warns once, then the model stays off for the process)."""
    import os

    import torch

    kernel = f"{op}_{mode}"
    setting = os.environ.get(MODEL_ENV, "")
    if setting == "0" or _FAILED or (setting != "all" and T not in DEFAULT_TOKENS):
        return None
    if kernel not in KERNELS or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    gpu = next((g for g in ("H100", "H200") if g in name), None)
    dtype_name = _DTYPE_NAMES.get(str(dtype), str(dtype) if str(dtype) in _DTYPE_NAMES.values() else None)
    if gpu is None or dtype_name is None:
        return None
    try:
        return predict(kernel, n, C, dtype_name, T, gpu, copy_gbps=copy_gbps, site=site)["t_pred_us"]
    except Exception as exc:  # noqa: BLE001 - see the docstring
        _FAILED.append(f"{kernel}: {exc}")
        warnings.warn(f"performance model failed for {kernel} n={n} C={C} T={T} (now off): {exc}", stacklevel=2)
        return None


def annotate(result: dict) -> bool:
    """Add ``model_us`` to the records of a ``profiling.bench`` result (see :func:`measured_beside`); whether any
    record got one."""
    meta = result.get("meta", {})
    dtype, copy_gbps = meta.get("dtype", "bfloat16"), meta.get("copy_GBps")
    if not copy_gbps:
        return False
    added = False
    for r in result.get("records", []):
        n = r.get("n", meta.get("n"))
        value = measured_beside(r["op"], r["mode"], r["T"], n, r["C"], dtype, copy_gbps, site=r.get("site", "chain"))
        r["model_us"] = value
        added = added or value is not None
    return added
