"""Tiny TileLang kernels whose speed is known by hand, to check the performance model (tests/cpu/test_perf_model.py).

* :func:`copy_kernel`: ``y = x`` over ``[rows, 2048]`` bf16, one row per 256-thread block, 128-bit accesses. It
  moves exactly its bytes and does nothing else: the model must predict about 100% of copy bandwidth.
* :func:`smem_kernel(stride)`: each thread sums 256 floats from shared memory at word ``(tx * stride + it) % 2048``.
  ``stride = 1``: the 32 lanes of a warp read 32 consecutive words (conflict-free, 1 wavefront per read);
  ``stride = 8``: lanes ``l`` and ``l + 4k`` hit the same bank with different words, 8 per bank (8 wavefronts).
  The model must see 8x the shared-memory time.
* :func:`div_kernel(divide)`: the same loop over ``it`` reading ``x[row, (tx + it * step) % 256]``, where with
  ``divide`` the column is ``(it * step) // d`` computed in 64 bits with ``d`` a runtime argument (a 64-bit division
  sequence per iteration, as in issue 17's ``T.ceildiv(..., num_splits)``), without it the same shift by a constant.
  The model must count one division sequence per iteration and warp.

Launch them through :func:`launch` (meta tensors: nothing is allocated).
"""

from __future__ import annotations

import functools

import tilelang.language as T
import torch

from tl_kernels import _common
from tl_kernels.tools import codegen

from .capture import Launch

__all__ = ["COLS", "copy_kernel", "div_kernel", "launch", "smem_kernel"]

COLS = 2048
ITERS = 256


def _compile(func):
    with codegen.capture_ptx() as seed:  # keep nvcc's PTX: the model then needs no second nvcc run
        kernel = _common.compile_program(func)
        seed(kernel)
    return kernel


@functools.cache
def copy_kernel():
    rows = T.dynamic("rows")

    @T.prim_func
    def probe_copy(x: T.Tensor((rows, COLS), "bfloat16"), y: T.Tensor((rows, COLS), "bfloat16")):
        with T.Kernel(rows, threads=256) as bx:
            for j in T.Parallel(COLS):
                y[bx, j] = x[bx, j]

    return _compile(probe_copy)


@functools.cache
def smem_kernel(stride: int):
    rows = T.dynamic("rows")

    @T.prim_func
    def probe_smem(x: T.Tensor((rows, COLS), "float32"), y: T.Tensor((rows, 256), "float32")):
        with T.Kernel(rows, threads=256) as bx:
            s = T.alloc_shared((COLS,), "float32")
            acc = T.alloc_local((1,), "float32")
            tx = T.get_thread_binding()
            for j in T.Parallel(COLS):
                s[j] = x[bx, j]
            T.sync_threads()
            acc[0] = T.float32(0)
            for it in T.serial(ITERS):
                acc[0] += s[(tx * stride + it) % COLS]
            y[bx, tx] = acc[0]

    return _compile(probe_smem)


@functools.cache
def div_kernel(divide: bool):
    rows = T.dynamic("rows")

    @T.prim_func
    def probe_div(x: T.Tensor((rows, 256), "float32"), y: T.Tensor((rows, 256), "float32"), d: T.int32):
        with T.Kernel(rows, threads=256) as bx:
            acc = T.alloc_local((1,), "float32")
            tx = T.get_thread_binding()
            acc[0] = T.float32(0)
            for it in T.serial(ITERS):
                wide = T.cast(it, "int64") * T.int64(977) + T.cast(tx, "int64")
                col = wide // T.cast(d, "int64") if divide else T.shift_right(wide, T.int64(3))
                acc[0] += x[bx, T.cast(col % T.int64(256), "int32")]
            y[bx, tx] = acc[0]

    return _compile(probe_div)


def launch(kernel, rows: int) -> Launch:
    """A recorded launch of a probe over ``rows`` rows, with meta tensors as arguments."""
    name = kernel.prim_func.attrs["global_symbol"]
    meta = {"device": "meta"}
    if name == "probe_copy":
        args = (
            torch.empty(rows, COLS, dtype=torch.bfloat16, **meta),
            torch.empty(rows, COLS, dtype=torch.bfloat16, **meta),
        )
    elif name == "probe_smem":
        args = (torch.empty(rows, COLS, **meta), torch.empty(rows, 256, **meta))
    else:
        args = (torch.empty(rows, 256, **meta), torch.empty(rows, 256, **meta), 8)
    return Launch(kernel, args, name)
