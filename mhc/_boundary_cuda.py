"""The CUDA kernels of ``mhc::boundary_fwd`` and ``mhc::boundary_bwd``: launch wrappers over
``tl_kernels.boundary``, ``tl_kernels.boundary_bwd``, ``tl_kernels.pre_finalize`` and ``tl_kernels.sinkhorn``,
registered with ``register_kernel("cuda")`` over the ops' composed default (:mod:`mhc.boundary_ops`).

Each wrapper validates (the checks of the op and its fake), allocates every output with torch on the current stream
and launches through :func:`mhc._cuda._launch` (the device guard). Where the fused kernels cannot serve a call
(:func:`fused_reason`: float64, shapes without a kernel, ``boundary`` disabled) the op runs the composed unfused ops,
which use their own CUDA kernels or fall back to the reference with one warning per configuration.

* :func:`_boundary_fwd_cuda`: two launches, ``boundary_fwd`` (x_next and site l+1's projection partials) and
  ``pre_finalize_fwd`` (coefficients, Sinkhorn, H_pre x).
* :func:`_boundary_bwd_cuda`: four launches, ``pre_finalize_bwd``, ``sinkhorn_bwd``, the fused
  ``boundary_bwd_fused`` and its reduction ``boundary_reduce_bwd`` (its docstring has the byte counts).
* :func:`_boundary_bwd_unfused_cuda`: the previous backward, ``mhc::pre_mapping_bwd``'s CUDA kernel then
  ``boundary_bwd`` (post_res(l)'s backward on the summed gradient); kept for comparison.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .boundary_ops import _check_bwd, _check_fwd, boundary_bwd, boundary_fwd, composed_bwd, composed_fwd


def fused_reason(residual: Tensor, h_post: Tensor, h_res: Tensor, phi: Tensor, iters: int) -> str | None:
    """Why the fused CUDA forward does not serve this call (``None``: it does). Then the op runs the unfused CUDA
    kernels (which fall back to the reference themselves where they cannot serve it)."""
    from . import _cuda

    if "boundary" in _cuda.DISABLED:
        return f"the boundary kernels are disabled ({_cuda.DISABLE_ENV} or mhc._cuda.disable_kernels)"
    return _cuda._post_res_reason(residual, h_post, h_res) or _cuda._pre_mapping_reason(residual, phi, iters)


def _boundary_fwd_cuda(layer_output, residual, h_post, h_res, phi, alpha, bias, iters, post_mult, rms_eps, s_eps):
    from . import _cuda

    args = (layer_output, residual, h_post, h_res, phi, alpha, bias, iters, post_mult, rms_eps, s_eps)
    _check_fwd(*args)
    if fused_reason(residual, h_post, h_res, phi, iters) is not None:
        return composed_fwd(*args)
    T, n, C = residual.shape
    m = n * n + 2 * n
    f32 = dict(device=residual.device, dtype=torch.float32)
    x_next = torch.empty_like(residual)
    layer_input = residual.new_empty((T, C))
    h_post_n, h_pre_n, h_res_n = torch.empty(T, n, **f32), torch.empty(T, n, **f32), torch.empty(T, n, n, **f32)
    proj, rinv = torch.empty(T, m, **f32), torch.empty(T, **f32)
    if T > 0:
        from tl_kernels import boundary as tl_boundary
        from tl_kernels import pre_finalize

        dt, dev = _cuda._TL_DTYPES[residual.dtype], residual.device
        sms = _cuda._num_sms(dev)
        splits = tl_boundary.choose_splits(T, n, C, dt, sms)
        proj_part, sq_part = torch.empty(splits, T, m, **f32), torch.empty(splits, T, **f32)
        kernel = tl_boundary.boundary_fwd_kernel(n, C, dt)
        _cuda._launch(dev, kernel, layer_output, residual, h_post, h_res, phi, x_next, proj_part, sq_part)
        _cuda._launch(
            dev, pre_finalize.pre_finalize_fwd_kernel(n, C, dt, iters, float(s_eps)),
            proj_part, sq_part, alpha, bias, x_next, layer_input, h_post_n, h_res_n, h_pre_n, proj, rinv,
            float(rms_eps), float(post_mult), pre_finalize.choose_slices(T, C, dt, sms),
        )  # fmt: skip
    return x_next, layer_input, h_post_n, h_res_n, h_pre_n, proj, rinv


boundary_fwd.register_kernel("cuda")(_boundary_fwd_cuda)


def _boundary_bwd_cuda(*args):
    """Four launches, no torch op between them: ``pre_finalize_bwd`` (``<g_li, x_next>`` and the coefficient
    gradients; reads x_next 8C and g_li 2C; its ``grad_pre=False`` variant when ``g_pre`` is None), ``sinkhorn_bwd``,
    ``tl_kernels.boundary_bwd``'s fused backward (x_next recomputed from ``x``, ``y``; site l+1's d x_next, the incoming
    ``grad_x_next`` and post_res(l)'s backward, none of the three gradients of x_next written: 30C) and its
    reduction ``boundary_reduce_bwd`` (d_phi, d_alpha, d_bias as ``pre_reduce_bwd``, and the d_h sum): 40C a token
    at n = 4, bf16, plus the d_h partials (``C / 64 x 80`` bytes written and read; ``C / 64 / cs x 80`` with the
    opt-in thread block clusters of ``cs`` channel blocks, ``mhc._cuda.BOUNDARY_CLUSTERS``), against 64C for
    :func:`_boundary_bwd_unfused_cuda`. d_layer_output, d_residual, d_alpha and d_bias are bit for bit the
    unfused path's; d_h_post, d_h_res differ by the order of fp32 sums, d_phi by the order of its fp32 (TF32-product)
    sums over tokens (docs/design.md section 7)."""
    from . import _cuda

    _check_bwd(args)
    (g_xn, g_li, g_post, g_res, g_pre, y, x, h_post, h_res, x_next, phi, alpha, bias,
     h_pre_n, h_post_n, proj, rinv, iters, post_mult, s_eps) = args  # fmt: skip
    if fused_reason(x, h_post, h_res, phi, iters) is not None:
        return composed_bwd(*args)
    T, n, C = x.shape
    m, K, nn = n * n + 2 * n, n * C, n * n
    f32 = dict(device=x.device, dtype=torch.float32)
    d_y, d_x = torch.empty_like(y), torch.empty_like(x)
    d_hp, d_hr = torch.empty_like(h_post), torch.empty_like(h_res)
    if T == 0:
        return d_y, d_x, d_hp, d_hr, torch.zeros(K, m, **f32), torch.zeros(3, **f32), torch.zeros(m, **f32)
    from tl_kernels import boundary_bwd as tl_boundary_bwd
    from tl_kernels import pre_finalize, pre_reduce, sinkhorn

    dt, dev = _cuda._TL_DTYPES[x.dtype], x.device
    d_pp, res_logits = torch.empty(T, 2 * n, **f32), torch.empty(T, n, n, **f32)
    _cuda._launch(  # g_pre None: the kernel's grad_pre=False variant never reads its grad_h_pre (h_pre_n stands in)
        dev, pre_finalize.pre_finalize_bwd_kernel(n, C, dt, g_pre is not None),
        g_li, x_next, h_pre_n if g_pre is None else g_pre, g_post, h_pre_n, h_post_n, proj, rinv, alpha, bias, d_pp, res_logits, float(post_mult),
    )  # fmt: skip
    d_res = torch.empty(T, n, n, **f32)
    _cuda._launch(dev, sinkhorn.sinkhorn_bwd_kernel(n, iters, float(s_eps)), g_res, res_logits, d_res)
    clusters = _cuda.BOUNDARY_CLUSTERS  # the opt-in thread block cluster variant (MHC_BOUNDARY_CLUSTERS)
    plan = tl_boundary_bwd.fused_plan(n, C, dt, clusters)
    splits = tl_boundary_bwd.fused_choose_splits(T, n, C, dt, _cuda._num_sms(dev))
    d_phi = torch.empty(K, m, **f32)
    d_phi_part = torch.empty(splits, K, m, **f32)  # summed (copied at S = 1) by the last launch, with d_h
    d_coef_part = torch.empty(-(-T // tl_boundary_bwd.COEF_BM), 2 * m, **f32)  # pre_proj_bwd's 64-token rows
    dh_part = torch.empty(plan.groups, T, nn + n, **f32)  # one d_h partial per channel block (per cluster: clusters)
    _cuda._launch(
        dev, tl_boundary_bwd.boundary_bwd_fused_kernel(n, C, dt, clusters),
        g_xn, y, x, h_post, h_res, phi, d_pp, d_res.view(T, nn), proj, rinv, alpha, h_pre_n, g_li,
        d_y, d_x, dh_part, d_phi_part, d_coef_part,
    )  # fmt: skip
    d_alpha, d_bias = torch.empty(3, **f32), torch.empty(m, **f32)
    kq = K * m // pre_reduce.VEC
    _cuda._launch(
        dev, tl_boundary_bwd.boundary_reduce_bwd_kernel(n), d_phi_part.view(splits, kq, pre_reduce.VEC), d_coef_part,
        dh_part, d_phi.view(kq, pre_reduce.VEC), d_alpha, d_bias, d_hr, d_hp,
    )  # fmt: skip
    return d_y, d_x, d_hp, d_hr, d_phi, d_alpha, d_bias


def _boundary_bwd_unfused_cuda(*args):
    """The previous CUDA backward (kept for comparison, and the fallback's shape): ``mhc::pre_mapping_bwd`` (site
    l+1's d x_next, d_phi, d_alpha, d_bias), then ``tl_kernels.boundary``'s ``boundary_bwd``: post_res(l)'s
    backward on ``grad_x_next + d x_next`` without writing the sum (64C a token at n = 4, bf16, against 80C
    composed; bit for bit the composed result)."""
    from . import _cuda

    _check_bwd(args)
    (g_xn, g_li, g_post, g_res, g_pre, y, x, h_post, h_res, x_next, phi, alpha, bias,
     h_pre_n, h_post_n, proj, rinv, iters, post_mult, s_eps) = args  # fmt: skip
    if fused_reason(x, h_post, h_res, phi, iters) is not None:
        return composed_bwd(*args)
    g_pre = torch.zeros_like(h_pre_n) if g_pre is None else g_pre
    d_xn, d_phi, d_alpha, d_bias = _cuda.pre_mapping_bwd(  # the op's CUDA kernel, called directly
        g_li, g_post, g_res, g_pre, x_next, phi, alpha, bias, h_pre_n, h_post_n, proj, rinv, iters, post_mult, s_eps
    )
    d_y, d_x = torch.empty_like(y), torch.empty_like(x)
    d_hp, d_hr = torch.empty_like(h_post), torch.empty_like(h_res)
    T, n, C = x.shape
    if T > 0:
        from tl_kernels import boundary as tl_boundary

        kernel = tl_boundary.boundary_bwd_kernel(n, C, _cuda._TL_DTYPES[x.dtype])
        _cuda._launch(x.device, kernel, g_xn, d_xn, y, x, h_post, h_res, d_y, d_x, d_hp, d_hr)
    return d_y, d_x, d_hp, d_hr, d_phi, d_alpha, d_bias


boundary_bwd.register_kernel("cuda")(_boundary_bwd_cuda)
