"""Input validation for every mHC op: one function per op, called by the real kernels *and* by the fake (meta)
implementations, so a bad input fails with the same clear error in eager mode, under ``FakeTensorMode`` and while
``torch.compile`` traces, always before any kernel launches.

Errors are ``TypeError`` (wrong dtype or Python type) or ``ValueError`` (wrong rank, shape, device, layout or value),
and every message names what was expected and what was received. Only tensor metadata is read, never data, so no
check synchronises with the device.

Every tensor an op reads must also start on a 16-byte boundary (:func:`require_aligned`): the CUDA kernels use
128-bit loads and stores, and a contiguous view at an odd storage offset would fault on the GPU. The public functions
in :mod:`mhc.functional` copy such a tensor (:func:`aligned_contiguous`) instead.

The CUDA kernels' own limits (``n``, ``C``, element counts, coefficient dtype) are *not* errors: where a kernel cannot
serve a shape, :mod:`mhc._cuda` runs the PyTorch reference instead, with one warning per configuration.
:func:`cuda_kernel_unsupported` makes that decision; it is a pure function of shapes and dtypes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tl_kernels import _common as _tl_common  # standard library only: imports neither TileLang nor CUDA

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
COEFFICIENT_DTYPES = (torch.float32, torch.float64)

# Limits of the CUDA kernels (tl_kernels); outside them (and for float64) CUDA tensors run the PyTorch reference.
CUDA_POST_RES_STREAMS = _tl_common.ACTIVATION_STREAMS
CUDA_SINKHORN_MAX_N = 16
CUDA_HIDDEN_MULTIPLE = _tl_common.HIDDEN_MULTIPLE
CUDA_MAX_HIDDEN = _tl_common.MAX_HIDDEN
CUDA_MAX_ELEMENTS = 2**31  # the kernels index with 32-bit offsets
#: byte alignment every tensor's data must have (128-bit vector loads and stores)
ALIGN_BYTES = 16


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def require_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor, got {type(t).__name__}")


def require_dtype(op: str, name: str, t: Tensor, allowed) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{op}: expected {name}.dtype in ({_names(allowed)}), got {str(t.dtype).replace('torch.', '')}")


def require_rank(op: str, name: str, t: Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{op}: expected {name} of rank {rank} {layout}, got shape {_shape(t)}")


def require_shape(op: str, name: str, t: Tensor, expected: tuple, layout: str) -> None:
    if _shape(t) != tuple(expected):
        raise ValueError(f"{op}: expected {name} of shape {tuple(expected)} {layout}, got {_shape(t)}")


def require_contiguous(op: str, name: str, t: Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{op}: expected {name} to be contiguous, got strides {tuple(t.stride())}")


def byte_offset(t: Tensor):
    """Bytes from the start of the storage to ``t``'s first element (metadata only: works on fake tensors)."""
    return t.storage_offset() * t.element_size()


def require_aligned(op: str, name: str, t: Tensor) -> None:
    """``t``'s data must start on an :data:`ALIGN_BYTES` boundary. Storages are allocated aligned, so this is the
    storage offset in bytes (``storage_offset * element_size``), which fake tensors carry too."""
    offset = byte_offset(t)
    if offset % ALIGN_BYTES != 0:
        raise ValueError(
            f"{op}: expected {name} to start on a {ALIGN_BYTES}-byte boundary, got a view at byte offset {offset} "
            f"(storage_offset {t.storage_offset()} x {t.element_size()} B); pass {name}.clone() or use the mhc.* "
            "functions, which copy it"
        )


def aligned_contiguous(t: Tensor) -> Tensor:
    """``t`` contiguous and starting on an :data:`ALIGN_BYTES` boundary: ``t`` itself when it already is, else a
    copy (what the public functions and the autograd backward pass to the ops).

    While ``torch.compile`` traces, Dynamo cannot read a storage offset, so only ``contiguous()`` is applied there: a
    misaligned view that reaches an op inside a compiled region is refused at trace time by the op's fake (a clear
    ``ValueError``), never a fault on the GPU."""
    t = t.contiguous()
    if torch.compiler.is_compiling():
        return t
    if byte_offset(t) % ALIGN_BYTES != 0:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def require_same_device(op: str, **tensors: Tensor) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{op}: expected all tensors on one device, got {first_name} on {first.device} and {name} on {t.device}"
            )


def require_same_dtype(op: str, **tensors: Tensor) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"{op}: expected {name}.dtype == {first_name}.dtype ({str(first.dtype).replace('torch.', '')}), "
                f"got {str(t.dtype).replace('torch.', '')}"
            )


def require_int(op: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{op}: expected {name} to be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{op}: expected {name} >= {minimum}, got {value}")


def require_float(op: str, name: str, value, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{op}: expected {name} to be a float, got {type(value).__name__}")
    # comparisons only (no math.isfinite), so symbolic floats under torch.compile(dynamic=True) trace; NaN fails too
    if not (0 <= value < math.inf) or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{op}: expected {name} to be finite and {bound}, got {value}")


def cuda_kernel_unsupported(family: str, *, n: int, C: int = 0, numel: int = 0, dtypes=()) -> str | None:
    """Why the CUDA kernel of ``family`` cannot serve this call (``None`` when it can). Pure: shapes and dtypes in,
    a reason out. ``numel`` is the largest element count among the tensors, ``dtypes`` the inputs' dtypes.

    The wrapper in :mod:`mhc._cuda` then runs the PyTorch reference (a correct answer, never a crash) and warns once
    per configuration."""
    if any(d == torch.float64 for d in dtypes):
        return "float64 inputs"
    if numel >= CUDA_MAX_ELEMENTS:
        return f"{numel} elements in one tensor (the kernel supports fewer than 2**31)"
    if family == "sinkhorn":
        if not 1 <= n <= CUDA_SINKHORN_MAX_N:
            return f"n={n} (the kernel supports n <= {CUDA_SINKHORN_MAX_N})"
    elif family in ("post_res", "pre_mapping"):
        if n not in CUDA_POST_RES_STREAMS:
            return f"n={n} (the kernel supports n in {CUDA_POST_RES_STREAMS})"
        if C % CUDA_HIDDEN_MULTIPLE != 0 or C > CUDA_MAX_HIDDEN:
            return f"C={C} (the kernel needs a multiple of {CUDA_HIDDEN_MULTIPLE} up to {CUDA_MAX_HIDDEN})"
    else:
        return f"no CUDA kernel for family {family!r}"
    return None


# ---------------------------------------------------------------------------------------------------- per op


def sinkhorn(logits: Tensor, iters: int, eps: float, op: str = "mhc.sinkhorn") -> None:
    """``logits [T, n, n]`` fp32/fp64, contiguous; ``iters >= 1``; ``eps >= 0``."""
    require_tensor(op, "logits", logits)
    require_rank(op, "logits", logits, 3, "[T, n, n]")
    n = logits.shape[-1]
    if logits.shape[-2] != n or n < 1:
        raise ValueError(f"{op}: expected logits of shape [T, n, n] with n >= 1, got {_shape(logits)}")
    require_dtype(op, "logits", logits, COEFFICIENT_DTYPES)
    require_contiguous(op, "logits", logits)
    require_aligned(op, "logits", logits)
    require_int(op, "iters", iters, 1)
    require_float(op, "eps", eps)


def sinkhorn_bwd(grad_out: Tensor, logits: Tensor, iters: int, eps: float, op: str = "mhc.sinkhorn_bwd") -> None:
    sinkhorn(logits, iters, eps, op)
    require_tensor(op, "grad_out", grad_out)
    require_shape(op, "grad_out", grad_out, _shape(logits), "(the shape of logits)")
    require_same_dtype(op, logits=logits, grad_out=grad_out)
    require_same_device(op, logits=logits, grad_out=grad_out)
    require_contiguous(op, "grad_out", grad_out)
    require_aligned(op, "grad_out", grad_out)


def post_res(layer_output: Tensor, residual: Tensor, h_post: Tensor, h_res: Tensor, op: str = "mhc.post_res") -> None:
    """``layer_output [T, C]``, ``residual [T, n, C]`` (same dtype, bf16/fp16/fp32/fp64), ``h_post [T, n]``,
    ``h_res [T, n, n]`` (same dtype, fp32/fp64); one device; contiguous."""
    for name, t in (("layer_output", layer_output), ("residual", residual), ("h_post", h_post), ("h_res", h_res)):
        require_tensor(op, name, t)
    require_rank(op, "residual", residual, 3, "[T, n, C]")
    T, n, C = residual.shape
    if n < 1 or C < 1:
        raise ValueError(f"{op}: expected residual [T, n, C] with n >= 1 and C >= 1, got {_shape(residual)}")
    require_shape(op, "layer_output", layer_output, (T, C), "[T, C]")
    require_shape(op, "h_post", h_post, (T, n), "[T, n]")
    require_shape(op, "h_res", h_res, (T, n, n), "[T, n, n]")
    require_dtype(op, "residual", residual, ACTIVATION_DTYPES)
    require_same_dtype(op, residual=residual, layer_output=layer_output)
    require_dtype(op, "h_post", h_post, COEFFICIENT_DTYPES)
    require_same_dtype(op, h_post=h_post, h_res=h_res)
    require_same_device(op, residual=residual, layer_output=layer_output, h_post=h_post, h_res=h_res)
    for name, t in (("layer_output", layer_output), ("residual", residual), ("h_post", h_post), ("h_res", h_res)):
        require_contiguous(op, name, t)
        require_aligned(op, name, t)


def post_res_bwd(
    grad_out: Tensor,
    layer_output: Tensor,
    residual: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    op: str = "mhc.post_res_bwd",
) -> None:
    post_res(layer_output, residual, h_post, h_res, op)
    require_tensor(op, "grad_out", grad_out)
    require_shape(op, "grad_out", grad_out, _shape(residual), "(the shape of residual)")
    require_same_dtype(op, residual=residual, grad_out=grad_out)
    require_same_device(op, residual=residual, grad_out=grad_out)
    require_contiguous(op, "grad_out", grad_out)
    require_aligned(op, "grad_out", grad_out)


def pre_mapping(
    residual: Tensor,
    phi: Tensor,
    alpha: Tensor,
    bias: Tensor,
    iters: int,
    post_mult: float,
    rms_eps: float,
    sinkhorn_eps: float,
    op: str = "mhc.pre_mapping",
) -> None:
    """``residual [T, n, C]`` (bf16/fp16/fp32/fp64), ``phi [n*C, n*n+2n]``, ``alpha [3]``, ``bias [n*n+2n]`` (one
    coefficient dtype, fp32/fp64); one device; contiguous; ``iters >= 1``; ``post_mult > 0``; eps values >= 0."""
    for name, t in (("residual", residual), ("phi", phi), ("alpha", alpha), ("bias", bias)):
        require_tensor(op, name, t)
    require_rank(op, "residual", residual, 3, "[T, n, C]")
    _, n, C = residual.shape
    if n < 1 or C < 1:
        raise ValueError(f"{op}: expected residual [T, n, C] with n >= 1 and C >= 1, got {_shape(residual)}")
    m = n * n + 2 * n
    require_shape(op, "phi", phi, (n * C, m), "[n*C, n*n + 2n] (pre | post | res)")
    require_shape(op, "alpha", alpha, (3,), "[3] (pre, post, res)")
    require_shape(op, "bias", bias, (m,), "[n*n + 2n]")
    require_dtype(op, "residual", residual, ACTIVATION_DTYPES)
    require_dtype(op, "phi", phi, COEFFICIENT_DTYPES)
    require_same_dtype(op, phi=phi, alpha=alpha, bias=bias)
    require_same_device(op, residual=residual, phi=phi, alpha=alpha, bias=bias)
    for name, t in (("residual", residual), ("phi", phi), ("alpha", alpha), ("bias", bias)):
        require_contiguous(op, name, t)
        require_aligned(op, name, t)
    require_int(op, "iters", iters, 1)
    require_float(op, "post_mult", post_mult, positive=True)
    require_float(op, "rms_eps", rms_eps)
    require_float(op, "sinkhorn_eps", sinkhorn_eps)


def pre_mapping_bwd(
    grads: dict[str, Tensor],
    residual: Tensor,
    phi: Tensor,
    alpha: Tensor,
    bias: Tensor,
    saved: dict[str, Tensor],
    iters: int,
    post_mult: float,
    sinkhorn_eps: float,
    op: str = "mhc.pre_mapping_bwd",
) -> None:
    """The forward's checks plus: every gradient and saved tensor has the forward output's shape and dtype."""
    pre_mapping(residual, phi, alpha, bias, iters, post_mult, 0.0, sinkhorn_eps, op)
    T, n, C = residual.shape
    m = n * n + 2 * n
    expected = {
        "grad_layer_input": ((T, C), residual.dtype),
        "grad_h_post": ((T, n), phi.dtype),
        "grad_h_res": ((T, n, n), phi.dtype),
        "grad_h_pre": ((T, n), phi.dtype),
        "h_pre": ((T, n), phi.dtype),
        "h_post": ((T, n), phi.dtype),
        "proj": ((T, m), phi.dtype),
        "rinv": ((T,), phi.dtype),
    }
    for name, t in {**grads, **saved}.items():
        require_tensor(op, name, t)
        shape, dtype = expected[name]
        require_shape(op, name, t, shape, "")
        if t.dtype != dtype:
            raise TypeError(f"{op}: expected {name}.dtype == {dtype}, got {t.dtype}")
        require_same_device(op, residual=residual, **{name: t})
        require_contiguous(op, name, t)
        require_aligned(op, name, t)
