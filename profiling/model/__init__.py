"""A performance model of every shipped kernel and of a whole residual site, computed without a GPU.

    python -m profiling model [--json PATH] [--n 4] [--C 2560 7168] [--T 16384] [--dtype bfloat16] [--gpu H100 H200]

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

from .bounds import KERNELS, predict, records

__all__ = ["KERNELS", "annotate", "measured_beside", "predict", "records"]

_DTYPE_NAMES = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32"}
#: ``MHC_BENCH_MODEL``: ``0`` off, ``all`` every timed row, default the target token count only (each prediction
#: takes 1-3 s of CPU on the GPU machine, which a full sweep's hundreds of rows cannot afford).
MODEL_ENV = "MHC_BENCH_MODEL"
DEFAULT_TOKENS = (16384,)
_FAILED: list[str] = []


def measured_beside(op: str, mode: str, T: int, n: int, C: int, dtype, copy_gbps: float) -> float | None:
    """The predicted µs for a benchmark row (``op``/``mode`` as in ``profiling.bench``), at the measured copy
    bandwidth, when the row runs on an H100 or H200, the model covers it and ``MHC_BENCH_MODEL`` selects it; else
    ``None``. Never raises: a model failure must not cost a GPU run its measurements (it warns once, then the model
    stays off for the process)."""
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
        return predict(kernel, n, C, dtype_name, T, gpu, copy_gbps=copy_gbps)["t_pred_us"]
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
        value = measured_beside(r["op"], r["mode"], r["T"], r.get("n", meta.get("n")), r["C"], dtype, copy_gbps)
        r["model_us"] = value
        added = added or value is not None
    return added
