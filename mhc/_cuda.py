"""The CUDA kernels behind the ``mhc::`` ops: TileLang programs from :mod:`tl_kernels`, registered with
``register_kernel("cuda")`` over the reference.

Each wrapper validates (the same :mod:`mhc._checks` function as the fake), allocates every output with torch on the
current stream (so the ops stay allocation-transparent for ``torch.compile`` and CUDA graphs), skips the launch when
there are no tokens, and launches on PyTorch's current CUDA stream (TileLang's tvm-ffi adapter uses it). The kernel for
a configuration is compiled on first use, then served from TileLang's disk cache and an in-memory cache; compile
before capturing a CUDA graph (call the op once, or :func:`warmup`).

float64 tensors on CUDA run the PyTorch reference (the kernels are built for bf16/fp16/fp32 activations and fp32
coefficients). Nothing here runs at import beyond the registration.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, ops, reference

_TL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _int32_safe(op: str, *tensors: Tensor) -> None:
    """The kernels index with 64-bit offsets only where TileLang emits them; refuse what could overflow 32 bits."""
    for t in tensors:
        if t.numel() >= 2**31:
            raise ValueError(
                f"{op}: the CUDA kernel supports tensors of fewer than 2**31 elements, got {tuple(t.shape)} "
                f"({t.numel()} elements); split the tokens into chunks"
            )


# ---------------------------------------------------------------------------------------------------- Sinkhorn


def sinkhorn_fwd(logits: Tensor, iters: int, eps: float) -> Tensor:
    _checks.sinkhorn(logits, iters, eps, "mhc::sinkhorn_fwd")
    if logits.dtype == torch.float64:
        return reference.sinkhorn(logits, iters, eps)
    _int32_safe("mhc::sinkhorn_fwd", logits)
    out = torch.empty_like(logits)
    if logits.shape[0] > 0:
        from tl_kernels.sinkhorn import sinkhorn_fwd_kernel

        sinkhorn_fwd_kernel(logits.shape[-1], iters, float(eps))(logits, out)
    return out


def sinkhorn_bwd(grad_out: Tensor, logits: Tensor, iters: int, eps: float) -> Tensor:
    _checks.sinkhorn_bwd(grad_out, logits, iters, eps, "mhc::sinkhorn_bwd")
    if logits.dtype == torch.float64:
        return reference.sinkhorn_backward(grad_out, logits, iters, eps)
    _int32_safe("mhc::sinkhorn_bwd", logits)
    grad_logits = torch.empty_like(logits)
    if logits.shape[0] > 0:
        from tl_kernels.sinkhorn import sinkhorn_bwd_kernel

        sinkhorn_bwd_kernel(logits.shape[-1], iters, float(eps))(grad_out, logits, grad_logits)
    return grad_logits


# ---------------------------------------------------------------------------------------------------- post/res


def post_res_fwd(layer_output: Tensor, residual: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    _checks.post_res(layer_output, residual, h_post, h_res, "mhc::post_res_fwd")
    if residual.dtype == torch.float64 or h_res.dtype == torch.float64:
        return reference.post_res(layer_output, residual, h_post, h_res)
    _int32_safe("mhc::post_res_fwd", residual)
    out = torch.empty_like(residual)
    T, n, C = residual.shape
    if T > 0:
        from tl_kernels.post_res import post_res_fwd_kernel

        post_res_fwd_kernel(n, C, _TL_DTYPES[residual.dtype])(layer_output, residual, h_post, h_res, out)
    return out


def post_res_bwd(
    grad_out: Tensor, layer_output: Tensor, residual: Tensor, h_post: Tensor, h_res: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _checks.post_res_bwd(grad_out, layer_output, residual, h_post, h_res, "mhc::post_res_bwd")
    if residual.dtype == torch.float64 or h_res.dtype == torch.float64:
        return reference.post_res_backward(grad_out, layer_output, residual, h_post, h_res)
    _int32_safe("mhc::post_res_bwd", residual)
    d_layer_output = torch.empty_like(layer_output)
    d_residual = torch.empty_like(residual)
    d_h_post = torch.empty_like(h_post)
    d_h_res = torch.empty_like(h_res)
    T, n, C = residual.shape
    if T > 0:
        from tl_kernels.post_res import post_res_bwd_kernel

        kernel = post_res_bwd_kernel(n, C, _TL_DTYPES[residual.dtype])
        kernel(grad_out, layer_output, residual, h_post, h_res, d_layer_output, d_residual, d_h_post, d_h_res)
    return d_layer_output, d_residual, d_h_post, d_h_res


def warmup(
    *,
    hidden_sizes=(),
    streams=(4,),
    dtypes=(torch.bfloat16,),
    sinkhorn_iters: int = 20,
    sinkhorn_eps: float = 0.0,
) -> int:
    """Compile (or load from the disk cache) every kernel these settings will use, before CUDA-graph capture.

    Returns the number of kernels made ready. Needs no GPU (kernels compile for the pinned target).
    """
    from tl_kernels import post_res, sinkhorn

    count = 0
    for n in streams:
        sinkhorn.sinkhorn_fwd_kernel(n, sinkhorn_iters, float(sinkhorn_eps))
        sinkhorn.sinkhorn_bwd_kernel(n, sinkhorn_iters, float(sinkhorn_eps))
        count += 2
        for C in hidden_sizes:
            for dt in dtypes:
                post_res.post_res_fwd_kernel(n, C, _TL_DTYPES[dt])
                post_res.post_res_bwd_kernel(n, C, _TL_DTYPES[dt])
                count += 2
    return count


ops.sinkhorn_fwd.register_kernel("cuda")(sinkhorn_fwd)
ops.sinkhorn_bwd.register_kernel("cuda")(sinkhorn_bwd)
ops.post_res_fwd.register_kernel("cuda")(post_res_fwd)
ops.post_res_bwd.register_kernel("cuda")(post_res_bwd)
