"""A performance model of every shipped kernel and of a whole residual site, computed without a GPU.

    python -m profiling model [--json PATH] [--n 4] [--C 2560 7168] [--T 16384] [--dtype bfloat16] [--gpu H100 H200]

It reads the kernels as they are on disk each time (compiled through TileLang's cache; SASS and ptxas results cached
by :mod:`tl_kernels.codegen`), finds the launches a site makes by running :mod:`mhc` on fake tensors
(:mod:`.capture`), counts each launch's warp instructions by pipe, shared-memory wavefronts and global-load rounds
from its SASS and CUDA source (:mod:`.counts`), and turns them into time bounds (:mod:`.bounds`) for the GPUs of
:mod:`.gpus`. ``docs/benchmarks.md`` ("Performance model") explains the formulas and the limits.

:func:`predict` is the hook for a GPU run: it returns the record of one (kernel, n, C, dtype, T, gpu), to be stored
beside the measured time.
"""

from .bounds import KERNELS, predict, records

__all__ = ["KERNELS", "predict", "records"]
