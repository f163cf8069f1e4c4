"""``torch.library`` custom ops for mHC, namespace ``mhc``: one functional op per kernel launch group, forward and
backward both ops.

=========================  ===============================================================================
op                         inputs -> outputs (``T`` tokens, ``n`` streams, ``C`` hidden, ``m = n*n + 2n``)
=========================  ===============================================================================
``mhc::sinkhorn_fwd``      ``logits [T,n,n], iters, eps -> h_res [T,n,n]``
``mhc::sinkhorn_bwd``      ``grad [T,n,n], logits, iters, eps -> grad_logits [T,n,n]``
``mhc::post_res_fwd``      ``layer_output [T,C], residual [T,n,C], h_post [T,n], h_res [T,n,n] -> [T,n,C]``
``mhc::post_res_bwd``      ``grad [T,n,C], layer_output, residual, h_post, h_res ->
                           (d_layer_output, d_residual, d_h_post, d_h_res)``
``mhc::pre_mapping_fwd``   ``residual, phi [nC,m], alpha [3], bias [m], iters, post_mult, rms_eps, sinkhorn_eps
                           -> (layer_input [T,C], h_post [T,n], h_res [T,n,n], h_pre [T,n], proj [T,m], rinv [T])``
``mhc::pre_mapping_bwd``   ``grads of (layer_input, h_post, h_res, h_pre), inputs, saved (h_pre, h_post, proj,
                           rinv), settings -> (d_residual, d_phi, d_alpha, d_bias)``
=========================  ===============================================================================

Every op has:

* a default kernel (all devices) that is the PyTorch reference of :mod:`mhc.reference`, so everything runs and is
  testable on a CPU. The CUDA kernels written in TileLang are registered over it by :mod:`mhc._cuda` for every
  family; float64 inputs and shapes without a kernel run the reference on CUDA tensors too;
* a fake implementation with the exact output shapes and dtypes, for ``torch.compile`` and ``FakeTensorMode``;
* the validation of :mod:`mhc._checks`, run by both, so bad input fails the same way everywhere;
* for the forward ops, ``register_autograd`` whose backward calls the matching ``*_bwd`` op. The Sinkhorn backward
  is the exact derivative of the truncated ``iters``-step iteration; the backward ops are not differentiable again.

Signatures are declared once, here: ``torch.library.custom_op`` infers each op's schema from the annotated signature
of its function in this module (``torch.ops.mhc.<op>.default._schema`` prints it), and the boundary ops of
:mod:`mhc.boundary_ops` likewise from their default kernels, their high-priority twins taking the same schema
(``torch.library.infer_schema``). The other kernels of an op (``register_fake`` here, ``register_kernel("cpu")`` in
:mod:`mhc._cpu`, ``register_kernel("cuda")`` in :mod:`mhc._cuda` and :mod:`mhc._boundary_cuda`) must still name the
parameters they receive: ``torch.library`` calls each with the schema's positional arguments and neither passes a
declaration down nor checks a kernel's parameter list, and Python has no way to inherit one. So they bind the same
names in the schema's order without annotations (the long ones take ``*args`` and unpack it in one statement), and
share the checks (:mod:`mhc._checks`, :func:`_check_pre_mapping_bwd`). :mod:`mhc.reference` restates them with
defaults as the public functions of the specification.

In ``mhc::pre_mapping_fwd`` the outputs ``proj`` and ``rinv`` are statistics saved for the backward and are marked
non-differentiable; ``h_pre`` is differentiable (it is returned for instrumentation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, reference

# ---------------------------------------------------------------------------------------------------- Sinkhorn


@torch.library.custom_op("mhc::sinkhorn_fwd", mutates_args=())
def sinkhorn_fwd(logits: Tensor, iters: int, eps: float) -> Tensor:
    """Eq. 9 (log domain, see :func:`mhc.reference.sinkhorn`). ``logits [T, n, n]`` -> ``h_res [T, n, n]``."""
    _checks.sinkhorn(logits, iters, eps, "mhc::sinkhorn_fwd")
    return reference.sinkhorn(logits, iters, eps)


@sinkhorn_fwd.register_fake
def _(logits, iters, eps):
    _checks.sinkhorn(logits, iters, eps, "mhc::sinkhorn_fwd")
    return logits.new_empty(logits.shape)


@torch.library.custom_op("mhc::sinkhorn_bwd", mutates_args=())
def sinkhorn_bwd(grad_out: Tensor, logits: Tensor, iters: int, eps: float) -> Tensor:
    """Exact VJP of the truncated iteration, recomputed from ``logits`` (:func:`mhc.reference.sinkhorn_backward`)."""
    _checks.sinkhorn_bwd(grad_out, logits, iters, eps, "mhc::sinkhorn_bwd")
    return reference.sinkhorn_backward(grad_out, logits, iters, eps)


@sinkhorn_bwd.register_fake
def _(grad_out, logits, iters, eps):
    _checks.sinkhorn_bwd(grad_out, logits, iters, eps, "mhc::sinkhorn_bwd")
    return logits.new_empty(logits.shape)


def _sinkhorn_setup(ctx, inputs, output):
    logits, iters, eps = inputs
    ctx.save_for_backward(logits)
    ctx.iters, ctx.eps = iters, eps


def _sinkhorn_backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return torch.ops.mhc.sinkhorn_bwd(_checks.aligned_contiguous(grad), logits, ctx.iters, ctx.eps), None, None


sinkhorn_fwd.register_autograd(_sinkhorn_backward, setup_context=_sinkhorn_setup)


# ---------------------------------------------------------------------------------------------------- post/res


@torch.library.custom_op("mhc::post_res_fwd", mutates_args=())
def post_res_fwd(layer_output: Tensor, residual: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """F_post,res (Eq. 3): ``x_next[i] = sum_j h_res[i, j] x[j] + h_post[i] layer_output``."""
    _checks.post_res(layer_output, residual, h_post, h_res, "mhc::post_res_fwd")
    return reference.post_res(layer_output, residual, h_post, h_res)


@post_res_fwd.register_fake
def _(layer_output, residual, h_post, h_res):
    _checks.post_res(layer_output, residual, h_post, h_res, "mhc::post_res_fwd")
    return residual.new_empty(residual.shape)


@torch.library.custom_op("mhc::post_res_bwd", mutates_args=())
def post_res_bwd(
    grad_out: Tensor, layer_output: Tensor, residual: Tensor, h_post: Tensor, h_res: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(d_layer_output, d_residual, d_h_post, d_h_res)`` (:func:`mhc.reference.post_res_backward`)."""
    _checks.post_res_bwd(grad_out, layer_output, residual, h_post, h_res, "mhc::post_res_bwd")
    return reference.post_res_backward(grad_out, layer_output, residual, h_post, h_res)


@post_res_bwd.register_fake
def _(grad_out, layer_output, residual, h_post, h_res):
    _checks.post_res_bwd(grad_out, layer_output, residual, h_post, h_res, "mhc::post_res_bwd")
    return (
        layer_output.new_empty(layer_output.shape),
        residual.new_empty(residual.shape),
        h_post.new_empty(h_post.shape),
        h_res.new_empty(h_res.shape),
    )


def _post_res_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _post_res_backward(ctx, grad):
    layer_output, residual, h_post, h_res = ctx.saved_tensors
    return torch.ops.mhc.post_res_bwd(_checks.aligned_contiguous(grad), layer_output, residual, h_post, h_res)


post_res_fwd.register_autograd(_post_res_backward, setup_context=_post_res_setup)


# ---------------------------------------------------------------------------------------------------- pre-mapping


@torch.library.custom_op("mhc::pre_mapping_fwd", mutates_args=())
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
    """Eq. 14-19 and F_pre in one op: ``(layer_input, h_post, h_res, h_pre, proj, rinv)``
    (:func:`mhc.reference.pre_mapping`). On CUDA: the TileLang kernels of ``tl_kernels.pre_proj`` and
    ``tl_kernels.pre_finalize`` (two launches)."""
    _checks.pre_mapping(residual, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps, "mhc::pre_mapping_fwd")
    return reference.pre_mapping(residual, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps)


@pre_mapping_fwd.register_fake
def _(residual, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps):
    _checks.pre_mapping(residual, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps, "mhc::pre_mapping_fwd")
    T, n, C = residual.shape
    m = n * n + 2 * n
    return (
        residual.new_empty((T, C)),
        phi.new_empty((T, n)),
        phi.new_empty((T, n, n)),
        phi.new_empty((T, n)),
        phi.new_empty((T, m)),
        phi.new_empty((T,)),
    )


@torch.library.custom_op("mhc::pre_mapping_bwd", mutates_args=())
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
    """``(d_residual, d_phi, d_alpha, d_bias)`` (:func:`mhc.reference.pre_mapping_backward`)."""
    _check_pre_mapping_bwd(
        grad_layer_input, grad_h_post, grad_h_res, grad_h_pre, residual, phi, alpha, bias,
        h_pre, h_post, proj, rinv, iters, post_mult, sinkhorn_eps,
    )  # fmt: skip
    return reference.pre_mapping_backward(
        grad_layer_input, grad_h_post, grad_h_res, grad_h_pre, residual, phi, alpha, bias,
        h_pre, h_post, proj, rinv, iters, post_mult, sinkhorn_eps,
    )  # fmt: skip


def _check_pre_mapping_bwd(
    g_li, g_post, g_res, g_pre, residual, phi, alpha, bias, h_pre, h_post, proj, rinv, iters, post_mult, sinkhorn_eps
):
    grads = {"grad_layer_input": g_li, "grad_h_post": g_post, "grad_h_res": g_res, "grad_h_pre": g_pre}
    saved = {"h_pre": h_pre, "h_post": h_post, "proj": proj, "rinv": rinv}
    _checks.pre_mapping_bwd(
        grads, residual, phi, alpha, bias, saved, iters, post_mult, sinkhorn_eps, "mhc::pre_mapping_bwd"
    )


@pre_mapping_bwd.register_fake
def _(g_li, g_post, g_res, g_pre, residual, phi, alpha, bias, h_pre, h_post, proj, rinv, iters, post_mult, s_eps):
    _check_pre_mapping_bwd(
        g_li, g_post, g_res, g_pre, residual, phi, alpha, bias, h_pre, h_post, proj, rinv, iters, post_mult, s_eps
    )
    return (
        residual.new_empty(residual.shape),
        phi.new_empty(phi.shape),
        alpha.new_empty((3,)),
        bias.new_empty(bias.shape),
    )


def _pre_mapping_setup(ctx, inputs, output):
    residual, phi, alpha, bias, iters, post_mult, _rms_eps, sinkhorn_eps = inputs
    _layer_input, h_post, _h_res, h_pre, proj, rinv = output
    ctx.mark_non_differentiable(proj, rinv)
    ctx.save_for_backward(residual, phi, alpha, bias, h_pre, h_post, proj, rinv)
    ctx.iters, ctx.post_mult, ctx.sinkhorn_eps = iters, post_mult, sinkhorn_eps


def _pre_mapping_backward(ctx, g_li, g_post, g_res, g_pre, _g_proj, _g_rinv):
    residual, phi, alpha, bias, h_pre, h_post, proj, rinv = ctx.saved_tensors
    d_residual, d_phi, d_alpha, d_bias = torch.ops.mhc.pre_mapping_bwd(
        *(_checks.aligned_contiguous(g) for g in (g_li, g_post, g_res, g_pre)),
        residual, phi, alpha, bias, h_pre, h_post, proj, rinv, ctx.iters, ctx.post_mult, ctx.sinkhorn_eps,
    )  # fmt: skip
    return d_residual, d_phi, d_alpha, d_bias, None, None, None, None


pre_mapping_fwd.register_autograd(_pre_mapping_backward, setup_context=_pre_mapping_setup)
