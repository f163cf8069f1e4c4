"""The residual boundary between two consecutive mHC sites as one op pair: site l's F_post,res fused with site l+1's
pre-mapping, ``mhc::boundary_fwd`` and ``mhc::boundary_bwd``.

Math (per token; ``y`` = site l's sublayer output, ``x`` = site l's residual, ``h_post``/``h_res`` = site l's
coefficients, ``phi``/``alpha``/``bias`` = site l+1's parameters)::

    x_next = h_res @ x + h_post^T y                                          (Eq. 3, mhc.reference.post_res)
    (layer_input, h_post', h_res', h_pre', proj, rinv) = pre_mapping(x_next, phi, alpha, bias, ...)   (Eq. 14-19)

so ``boundary_fwd(y, x, h_post, h_res, phi, ...)`` equals ``post_res`` followed by ``pre_mapping`` by definition
(:func:`boundary_reference`). The backward (:func:`boundary_backward_reference`) takes the gradient arriving at
``x_next`` from its other consumers (the next site's post_res) and the gradients of the pre-mapping outputs::

    (d_x_next', d_phi, d_alpha, d_bias) = pre_mapping_backward(grads of the pre-mapping outputs, x_next, ...)
    g_total = grad_x_next + d_x_next'           (rounded to the residual dtype, as autograd sums the two)
    (d_y, d_x, d_h_post, d_h_res) = post_res_backward(g_total, y, x, h_post, h_res)

Ops (``T`` tokens, ``n`` streams, ``C`` hidden, ``m = n*n + 2n``):

* ``mhc::boundary_fwd(layer_output [T,C], residual [T,n,C], h_post [T,n], h_res [T,n,n], phi [nC,m], alpha [3],
  bias [m], iters, post_mult, rms_eps, sinkhorn_eps) -> (x_next [T,n,C], layer_input [T,C], h_post' [T,n],
  h_res' [T,n,n], h_pre' [T,n], proj [T,m], rinv [T])``; ``proj`` and ``rinv`` are non-differentiable statistics.
* ``mhc::boundary_bwd(grad_x_next, grad_layer_input, grad_h_post', grad_h_res', grad_h_pre', layer_output,
  residual, h_post, h_res, x_next, phi, alpha, bias, h_pre', h_post', proj, rinv, iters, post_mult, sinkhorn_eps)
  -> (d_layer_output, d_residual, d_h_post, d_h_res, d_phi, d_alpha, d_bias)``; ``grad_h_pre'`` may be None (zero:
  the undefined gradient of an unused ``h_pre'``, passed down instead of a zero-filled tensor).

Where each piece lives (this module holds the specification and re-exports the rest):

* :mod:`mhc.boundary_ops`: the op declarations, fakes, checks and autograd; the high-priority twins
  ``mhc::boundary_hp_fwd`` / ``boundary_hp_bwd`` (the same ops forked to the high-priority stream and joined, for a
  boundary after an FFN site); the default kernel (every device), which composes the unfused ops (bit for bit the
  unfused path on the CPU); and :func:`boundary`, the differentiable function on ``[..., n, C]`` activations;
* :mod:`mhc._boundary_cuda`: the CUDA launches (:func:`fused_reason`, ``_boundary_fwd_cuda``, ``_boundary_bwd_cuda``);
* :mod:`mhc.boundary_chain`: :func:`run_sites`, :func:`fusable`, :func:`post_pre`, the chaining of ``mhc.MHC`` sites
  that ``mhc.MHCStack`` uses on its plain path and inside eager recompute blocks.

CUDA design. The forward is two launches: ``tl_kernels.boundary`` (x_next and site l+1's projection partials, from
the registers that hold x_next) and the unchanged ``tl_kernels.pre_finalize`` (coefficients, Sinkhorn, H_pre x).
x_next is bit for bit post_res's; proj and the sums of squares differ from pre_proj's only in the order of fp32 sums
(the TF32 budget of ``tl_kernels.pre_proj``), so every coefficient differs from the unfused path by that rounding.
The backward is four launches: ``pre_finalize_bwd`` and ``sinkhorn_bwd``, then ``tl_kernels.boundary_bwd``'s fused
backward, which recomputes x_next from ``x`` and ``y`` in registers, forms site l+1's d x_next as ``pre_proj_bwd``
does, adds ``grad_x_next`` (rounded as autograd's accumulation) and applies post_res(l)'s backward to the sum,
writing none of the three, then one reduction (d_phi, d_alpha, d_bias, d_h). d_layer_output, d_residual, d_alpha
and d_bias are bit for bit the unfused CUDA path's; d_h_post, d_h_res and d_phi differ by the order of fp32 sums
(emulated: tests/emulation/test_boundary_op_emulated.py). The bytes each launch moves, against post_res +
pre_mapping, are the performance model's (``python -m profiling model --site chain single``; docs/benchmarks.md).
Where the fused kernels cannot serve a call (float64, shapes without a kernel: :func:`fused_reason`), or
``boundary`` is in ``MHC_DISABLE_KERNELS``, the ops run the unfused ops, which use their own CUDA kernels or fall
back to the reference with one warning per configuration.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference

# the CUDA implementations and the composed defaults are re-exported for the emulation tests and the performance
# model's replay (profiling/model/capture.py); importing _boundary_cuda registers the CUDA kernels
from ._boundary_cuda import (  # noqa: F401
    _boundary_bwd_cuda,
    _boundary_bwd_unfused_cuda,
    _boundary_fwd_cuda,
    fused_reason,
)
from .boundary_chain import fusable, post_pre, run_sites
from .boundary_ops import (
    boundary,
    boundary_bwd,
    boundary_fwd,
    boundary_hp_bwd,
    boundary_hp_fwd,
    composed_bwd,  # noqa: F401
    composed_fwd,  # noqa: F401
)

__all__ = [
    "boundary",
    "boundary_backward_reference",
    "boundary_bwd",
    "boundary_fwd",
    "boundary_hp_bwd",
    "boundary_hp_fwd",
    "boundary_reference",
    "fusable",
    "post_pre",
    "run_sites",
]


# ---------------------------------------------------------------------------------------------------- reference


def boundary_reference(
    layer_output: Tensor,
    residual: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    phi: Tensor,
    alpha: Tensor,
    bias: Tensor,
    iters: int = 20,
    post_mult: float = 2.0,
    rms_eps: float = 1e-6,
    sinkhorn_eps: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``x_next = post_res(layer_output, residual, h_post, h_res)`` and ``pre_mapping(x_next, ...)``: returns
    ``(x_next, layer_input, h_post', h_res', h_pre', proj, rinv)`` (see the module docstring)."""
    x_next = reference.post_res(layer_output, residual, h_post, h_res)
    return (x_next, *reference.pre_mapping(x_next, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps))


def boundary_backward_reference(
    grad_x_next: Tensor,
    grad_layer_input: Tensor,
    grad_h_post_next: Tensor,
    grad_h_res_next: Tensor,
    grad_h_pre_next: Tensor | None,
    layer_output: Tensor,
    residual: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    x_next: Tensor,
    phi: Tensor,
    alpha: Tensor,
    bias: Tensor,
    h_pre_next: Tensor,
    h_post_next: Tensor,
    proj: Tensor,
    rinv: Tensor,
    iters: int = 20,
    post_mult: float = 2.0,
    sinkhorn_eps: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """VJP of :func:`boundary_reference` w.r.t. ``(layer_output, residual, h_post, h_res, phi, alpha, bias)``;
    ``grad_x_next`` is the gradient reaching ``x_next`` from its other consumers (see the module docstring);
    ``grad_h_pre_next`` None: zero (``h_pre'`` unused)."""
    if grad_h_pre_next is None:
        grad_h_pre_next = torch.zeros_like(h_pre_next)
    d_xn, d_phi, d_alpha, d_bias = reference.pre_mapping_backward(
        grad_layer_input, grad_h_post_next, grad_h_res_next, grad_h_pre_next, x_next, phi, alpha, bias,
        h_pre_next, h_post_next, proj, rinv, iters, post_mult, sinkhorn_eps,
    )  # fmt: skip
    total = grad_x_next + d_xn
    d_y, d_x, d_hp, d_hr = reference.post_res_backward(total, layer_output, residual, h_post, h_res)
    return d_y, d_x, d_hp, d_hr, d_phi, d_alpha, d_bias
