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

import functools

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


# ---------------------------------------------------------------------------------------------------- pre-mapping

# The fused pre-mapping runs four TileLang kernels (tl_kernels/pre_proj.py, tl_kernels/pre_finalize.py) and, in the
# backward, the Sinkhorn backward kernel of tl_kernels/sinkhorn.py:
#   fwd: pre_proj_fwd (x @ phi and sum x^2, split-K partials) -> pre_finalize_fwd (coefficients, Sinkhorn, H_pre x)
#   bwd: pre_finalize_bwd (<g_li, x_i>, d logits of pre/post, res logits) -> sinkhorn_bwd -> pre_proj_bwd (d_x, d_phi
#        partials); d_phi, d_alpha and d_bias are summed over splits / tokens with torch reductions (fixed order).
PRE_MAPPING_STREAMS = (1, 2, 4, 6, 8)


def _num_sms(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def pre_mapping_kernel_supported(n: int, C: int, iters: int) -> bool:
    """Whether the TileLang pre-mapping kernels serve this shape (else the reference runs)."""
    from tl_kernels import sinkhorn

    if n not in PRE_MAPPING_STREAMS or C % _checks.CUDA_HIDDEN_MULTIPLE != 0 or C > 65536:
        return False
    try:
        sinkhorn._bwd_plan(n, iters, 0.0)  # the Sinkhorn backward's shared-memory budget limits iters
    except ValueError:
        return False
    return True


def _pre_mapping_on_reference(residual: Tensor, phi: Tensor, iters: int) -> bool:
    if residual.dtype == torch.float64 or phi.dtype == torch.float64:
        return True
    return not pre_mapping_kernel_supported(residual.shape[1], residual.shape[2], iters)


def pre_mapping_fwd(
    residual: Tensor,
    phi: Tensor,
    alpha: Tensor,
    bias: Tensor,
    iters: int,
    post_mult: float,
    rms_eps: float,
    sinkhorn_eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _checks.pre_mapping(residual, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps, "mhc::pre_mapping_fwd")
    if _pre_mapping_on_reference(residual, phi, iters):
        return reference.pre_mapping(residual, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps)
    _int32_safe("mhc::pre_mapping_fwd", residual)
    T, n, C = residual.shape
    m = n * n + 2 * n
    f32 = dict(device=residual.device, dtype=torch.float32)
    layer_input = residual.new_empty((T, C))
    h_post, h_pre = torch.empty(T, n, **f32), torch.empty(T, n, **f32)
    h_res = torch.empty(T, n, n, **f32)
    proj, rinv = torch.empty(T, m, **f32), torch.empty(T, **f32)
    if T > 0:
        from tl_kernels import pre_finalize, pre_proj

        dt = _TL_DTYPES[residual.dtype]
        sms = _num_sms(residual.device)
        splits = pre_proj.choose_splits(T, n, C, sms, "fwd")
        proj_part = torch.empty(splits, T, m, **f32)
        sq_part = torch.empty(splits, T, **f32)
        pre_proj.pre_proj_fwd_kernel(n, C, dt)(residual.view(T, n * C), phi, proj_part, sq_part)
        slices = pre_finalize.choose_slices(T, C, dt, sms)
        pre_finalize.pre_finalize_fwd_kernel(n, C, dt, iters, float(sinkhorn_eps))(
            proj_part, sq_part, alpha, bias, residual, layer_input, h_post, h_res, h_pre, proj, rinv,
            float(rms_eps), float(post_mult), slices,
        )  # fmt: skip
    return layer_input, h_post, h_res, h_pre, proj, rinv


def pre_mapping_bwd(
    grad_layer_input: Tensor,
    grad_h_post: Tensor,
    grad_h_res: Tensor,
    grad_h_pre: Tensor,
    residual: Tensor,
    phi: Tensor,
    alpha: Tensor,
    bias: Tensor,
    h_pre: Tensor,
    h_post: Tensor,
    proj: Tensor,
    rinv: Tensor,
    iters: int,
    post_mult: float,
    sinkhorn_eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    args = (
        grad_layer_input, grad_h_post, grad_h_res, grad_h_pre, residual, phi, alpha, bias,
        h_pre, h_post, proj, rinv, iters, post_mult, sinkhorn_eps,
    )  # fmt: skip
    ops._check_pre_mapping_bwd(*args)
    if _pre_mapping_on_reference(residual, phi, iters):
        return reference.pre_mapping_backward(*args)
    _int32_safe("mhc::pre_mapping_bwd", residual)
    T, n, C = residual.shape
    m, K = n * n + 2 * n, n * C
    f32 = dict(device=residual.device, dtype=torch.float32)
    d_residual = torch.empty_like(residual)
    if T == 0:
        return d_residual, torch.zeros(K, m, **f32), torch.zeros(3, **f32), torch.zeros(m, **f32)
    from tl_kernels import pre_finalize, pre_proj, sinkhorn

    dt = _TL_DTYPES[residual.dtype]
    d_pp = torch.empty(T, 2 * n, **f32)
    res_logits = torch.empty(T, n, n, **f32)
    pre_finalize.pre_finalize_bwd_kernel(n, C, dt)(
        grad_layer_input, residual, grad_h_pre, grad_h_post, h_pre, h_post, proj, rinv, alpha, bias,
        d_pp, res_logits, float(post_mult),
    )  # fmt: skip
    d_res = torch.empty(T, n, n, **f32)
    sinkhorn.sinkhorn_bwd_kernel(n, iters, float(sinkhorn_eps))(grad_h_res, res_logits, d_res)
    d_logits = torch.cat([d_pp, d_res.view(T, n * n)], dim=1)
    splits = pre_proj.choose_splits(T, n, C, _num_sms(residual.device), "bwd")
    d_phi_part = torch.empty(splits, K, m, **f32)
    pre_proj.pre_proj_bwd_kernel(n, C, dt, False)(
        residual.view(T, K), phi, d_logits, proj, rinv, alpha, h_pre, grad_layer_input, d_residual.view(T, K),
        d_phi_part,
    )  # fmt: skip
    d_phi = d_phi_part.sum(0)
    d_bias = d_logits.sum(0)
    d_scale = (d_logits * proj * rinv[:, None]).sum(0)
    d_alpha = torch.stack([d_scale[:n].sum(), d_scale[n : 2 * n].sum(), d_scale[2 * n :].sum()])
    return d_residual, d_phi, d_alpha, d_bias


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
ops.pre_mapping_fwd.register_kernel("cuda")(pre_mapping_fwd)
ops.pre_mapping_bwd.register_kernel("cuda")(pre_mapping_bwd)
