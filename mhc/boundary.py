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

Chains: :func:`run_sites` applies ``mhc.MHC`` sites in order with every boundary between :func:`fusable` sites as
one ``mhc::boundary_fwd`` (:func:`post_pre`); ``mhc.MHCStack`` uses it on its plain path (no recompute, or under
``torch.no_grad``) and inside eager recompute blocks. ``mhc::boundary_hp_fwd`` / ``boundary_hp_bwd`` are the same
ops forked to the high-priority stream and joined (CUDA; the plain ops elsewhere), for a boundary after an FFN site.

Ops (``T`` tokens, ``n`` streams, ``C`` hidden, ``m = n*n + 2n``):

* ``mhc::boundary_fwd(layer_output [T,C], residual [T,n,C], h_post [T,n], h_res [T,n,n], phi [nC,m], alpha [3],
  bias [m], iters, post_mult, rms_eps, sinkhorn_eps) -> (x_next [T,n,C], layer_input [T,C], h_post' [T,n],
  h_res' [T,n,n], h_pre' [T,n], proj [T,m], rinv [T])``; ``proj`` and ``rinv`` are non-differentiable statistics.
* ``mhc::boundary_bwd(grad_x_next, grad_layer_input, grad_h_post', grad_h_res', grad_h_pre', layer_output,
  residual, h_post, h_res, x_next, phi, alpha, bias, h_pre', h_post', proj, rinv, iters, post_mult, sinkhorn_eps)
  -> (d_layer_output, d_residual, d_h_post, d_h_res, d_phi, d_alpha, d_bias)``; ``grad_h_pre'`` may be None (zero:
  the undefined gradient of an unused ``h_pre'``, passed down instead of a zero-filled tensor).

Checks are those of ``mhc::post_res_fwd`` and ``mhc::pre_mapping_fwd`` (with ``x_next``'s shape and dtype), run
by the op, its fake and its CUDA kernel alike. The default kernel (every device) composes the unfused ops
(:func:`composed_fwd`, :func:`composed_bwd`), so on the CPU it is bit for bit the unfused path (the fast CPU kernels
of :mod:`mhc._cpu`; the reference for float64); :func:`boundary_reference` and
:func:`boundary_backward_reference` are the specification in plain PyTorch.

CUDA. The forward is two launches: ``tl_kernels.boundary`` (x_next and site l+1's projection partials, from the
registers that hold x_next: 18C bytes a token at n = 4, bf16) and the unchanged ``tl_kernels.pre_finalize``
(coefficients, Sinkhorn, H_pre x: 10C): 28C against 36C for post_res + pre_mapping. x_next is bit for bit
post_res's; proj and the sums of squares differ from pre_proj's only in the order of fp32 sums (the TF32 budget of
``tl_kernels.pre_proj``), so every coefficient differs from the unfused path by that rounding. The backward is four
launches (:func:`_boundary_bwd_cuda`): ``pre_finalize_bwd`` (reads x_next and g_li: 10C) and ``sinkhorn_bwd``,
then ``tl_kernels.boundary_bwd``'s fused backward, which recomputes x_next from ``x`` and ``y`` in registers, forms site
l+1's d x_next as ``pre_proj_bwd`` does, adds ``grad_x_next`` (rounded as autograd's accumulation) and applies
post_res(l)'s backward to the sum, writing none of the three (30C), then one reduction (d_phi, d_alpha, d_bias, d_h):
40C a token plus the d_h partials (1.25C written and read at C = 7168) instead of 64C
(:func:`_boundary_bwd_unfused_cuda`: ``mhc::pre_mapping_bwd`` then post_res's backward on the summed gradient) and
80C composed. d_layer_output, d_residual, d_alpha and d_bias are bit for bit the unfused CUDA path's; d_h_post,
d_h_res and d_phi differ by the order of fp32 sums (emulated: tests/emulation/test_boundary_op_emulated.py).
Where the fused kernels cannot serve a call (float64, shapes without a
kernel: :func:`fused_reason`), or ``boundary`` is in ``MHC_DISABLE_KERNELS``, the ops run the unfused ops, which
use their own CUDA kernels or fall back to the reference with one warning per configuration.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, reference

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

_FWD = "mhc::boundary_fwd"
_BWD = "mhc::boundary_bwd"


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


def composed_fwd(layer_output, residual, h_post, h_res, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps):
    """:func:`boundary_reference` through the unfused ops ``mhc::post_res_fwd`` and ``mhc::pre_mapping_fwd`` (so on
    every device it is bit for bit the unfused path: the fast CPU kernels on CPU, the reference for float64)."""
    x_next = torch.ops.mhc.post_res_fwd(layer_output, residual, h_post, h_res)
    rest = torch.ops.mhc.pre_mapping_fwd(x_next, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps)
    return (x_next, *rest)


def composed_bwd(g_xn, g_li, g_post, g_res, g_pre, y, x, h_post, h_res, x_next, phi, alpha, bias, h_pre_n,
                 h_post_n, proj, rinv, iters, post_mult, sinkhorn_eps):  # fmt: skip
    """:func:`boundary_backward_reference` through ``mhc::pre_mapping_bwd`` and ``mhc::post_res_bwd`` (``g_pre``
    None: zero)."""
    g_pre = torch.zeros_like(h_pre_n) if g_pre is None else g_pre
    d_xn, d_phi, d_alpha, d_bias = torch.ops.mhc.pre_mapping_bwd(
        g_li, g_post, g_res, g_pre, x_next, phi, alpha, bias, h_pre_n, h_post_n, proj, rinv, iters, post_mult,
        sinkhorn_eps,
    )  # fmt: skip
    d_y, d_x, d_hp, d_hr = torch.ops.mhc.post_res_bwd(g_xn + d_xn, y, x, h_post, h_res)
    return d_y, d_x, d_hp, d_hr, d_phi, d_alpha, d_bias


# ---------------------------------------------------------------------------------------------------- checks


def _check_fwd(layer_output, residual, h_post, h_res, phi, alpha, bias, iters, post_mult, rms_eps, s_eps, op=_FWD):
    _checks.post_res(layer_output, residual, h_post, h_res, op)
    _checks.pre_mapping(residual, phi, alpha, bias, iters, post_mult, rms_eps, s_eps, op)


def _check_bwd(args, op=_BWD):
    (g_xn, g_li, g_post, g_res, g_pre, y, x, h_post, h_res, x_next, phi, alpha, bias,
     h_pre_n, h_post_n, proj, rinv, iters, post_mult, s_eps) = args  # fmt: skip
    _checks.post_res_bwd(g_xn, y, x, h_post, h_res, op)
    _checks.require_tensor(op, "x_next", x_next)
    _checks.require_shape(op, "x_next", x_next, tuple(x.shape), "(the shape of residual)")
    _checks.require_same_dtype(op, residual=x, x_next=x_next)
    _checks.require_same_device(op, residual=x, x_next=x_next)
    _checks.require_contiguous(op, "x_next", x_next)
    _checks.require_aligned(op, "x_next", x_next)
    grads = {"grad_layer_input": g_li, "grad_h_post": g_post, "grad_h_res": g_res}
    if g_pre is not None:  # None: h_pre' has no gradient (autograd's undefined gradient, not materialised)
        grads["grad_h_pre"] = g_pre
    saved = {"h_pre": h_pre_n, "h_post": h_post_n, "proj": proj, "rinv": rinv}
    _checks.pre_mapping_bwd(grads, x_next, phi, alpha, bias, saved, iters, post_mult, s_eps, op)


# ---------------------------------------------------------------------------------------------------- ops


@torch.library.custom_op(_FWD, mutates_args=())
def boundary_fwd(
    layer_output: Tensor,
    residual: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    phi: Tensor,
    alpha: Tensor,
    bias: Tensor,
    iters: int,
    post_mult: float,
    rms_eps: float,
    sinkhorn_eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """F_post,res of site l and the pre-mapping of site l+1 (:func:`boundary_reference`)."""
    _check_fwd(layer_output, residual, h_post, h_res, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps)
    return composed_fwd(
        layer_output, residual, h_post, h_res, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps
    )


@boundary_fwd.register_fake
def _fwd_fake(layer_output, residual, h_post, h_res, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps):
    _check_fwd(layer_output, residual, h_post, h_res, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps)
    T, n, C = residual.shape
    m = n * n + 2 * n
    return (
        residual.new_empty((T, n, C)),
        residual.new_empty((T, C)),
        phi.new_empty((T, n)),
        phi.new_empty((T, n, n)),
        phi.new_empty((T, n)),
        phi.new_empty((T, m)),
        phi.new_empty((T,)),
    )


@torch.library.custom_op(_BWD, mutates_args=())
def boundary_bwd(
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
    iters: int,
    post_mult: float,
    sinkhorn_eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(d_layer_output, d_residual, d_h_post, d_h_res, d_phi, d_alpha, d_bias)``
    (:func:`boundary_backward_reference`)."""
    args = (
        grad_x_next, grad_layer_input, grad_h_post_next, grad_h_res_next, grad_h_pre_next, layer_output, residual,
        h_post, h_res, x_next, phi, alpha, bias, h_pre_next, h_post_next, proj, rinv, iters, post_mult, sinkhorn_eps,
    )  # fmt: skip
    _check_bwd(args)
    return composed_bwd(*args)


@boundary_bwd.register_fake
def _bwd_fake(*args):
    _check_bwd(args)
    layer_output, residual, h_post, h_res, _x_next, phi, alpha, bias = args[5:13]
    return (
        layer_output.new_empty(layer_output.shape),
        residual.new_empty(residual.shape),
        h_post.new_empty(h_post.shape),
        h_res.new_empty(h_res.shape),
        phi.new_empty(phi.shape),
        alpha.new_empty(alpha.shape),
        bias.new_empty(bias.shape),
    )


def _setup(ctx, inputs, output):
    layer_output, residual, h_post, h_res, phi, alpha, bias, iters, post_mult, _rms_eps, sinkhorn_eps = inputs
    x_next, _li, h_post_n, _h_res_n, h_pre_n, proj, rinv = output
    ctx.mark_non_differentiable(proj, rinv)
    ctx.save_for_backward(layer_output, residual, h_post, h_res, x_next, phi, alpha, bias, h_pre_n, h_post_n, proj,
                          rinv)  # fmt: skip
    ctx.iters, ctx.post_mult, ctx.sinkhorn_eps = iters, post_mult, sinkhorn_eps
    # an unused output's gradient arrives as None, not as a zero tensor (a fill launch each for proj, rinv and h_pre'
    # per site and step otherwise): _backward zero-fills only what the op needs as a tensor
    ctx.set_materialize_grads(False)


def _backward(ctx, g_xn, g_li, g_post, g_res, g_pre, _g_proj, _g_rinv, bwd_op=None):
    saved = ctx.saved_tensors
    layer_output, residual, h_post_n = saved[0], saved[1], saved[9]
    T, n, _C = residual.shape
    # an output nobody used gets a zero gradient (autograd passes None); h_pre' (applied inside the forward, rarely
    # used) is passed as None: the op's kernels then skip it (no zero-fill launch)
    g_xn = torch.zeros_like(residual) if g_xn is None else g_xn
    g_li = torch.zeros_like(layer_output) if g_li is None else g_li
    g_post = torch.zeros_like(h_post_n) if g_post is None else g_post
    g_res = h_post_n.new_zeros((T, n, n)) if g_res is None else g_res
    g_pre = None if g_pre is None else _checks.aligned_contiguous(g_pre)
    outs = (bwd_op or torch.ops.mhc.boundary_bwd)(
        *(_checks.aligned_contiguous(g) for g in (g_xn, g_li, g_post, g_res)), g_pre,
        *saved, ctx.iters, ctx.post_mult, ctx.sinkhorn_eps,
    )  # fmt: skip
    return (*outs, None, None, None, None)


boundary_fwd.register_autograd(_backward, setup_context=_setup)


# The same pair on the high-priority stream, for a boundary after an FFN site (paper section 4.3.3): the fork and
# join of mhc.streams inside opaque ops, as mhc::post_res_hp_fwd; the plain ops on every other device.


@torch.library.custom_op("mhc::boundary_hp_fwd", mutates_args=())
def boundary_hp_fwd(
    layer_output: Tensor,
    residual: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    phi: Tensor,
    alpha: Tensor,
    bias: Tensor,
    iters: int,
    post_mult: float,
    rms_eps: float,
    sinkhorn_eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``mhc::boundary_fwd`` on the high-priority stream (CUDA); the plain op elsewhere."""
    return torch.ops.mhc.boundary_fwd(
        layer_output, residual, h_post, h_res, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps
    )


@boundary_hp_fwd.register_kernel("cuda")
def _(layer_output, residual, h_post, h_res, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps):
    from .streams import _fork_join

    _check_fwd(layer_output, residual, h_post, h_res, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps)
    settings = (iters, post_mult, rms_eps, sinkhorn_eps)
    return _fork_join(
        lambda *t: torch.ops.mhc.boundary_fwd(*t, *settings), (layer_output, residual, h_post, h_res, phi, alpha, bias)
    )


boundary_hp_fwd.register_fake(_fwd_fake)


@torch.library.custom_op("mhc::boundary_hp_bwd", mutates_args=())
def boundary_hp_bwd(
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
    iters: int,
    post_mult: float,
    sinkhorn_eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``mhc::boundary_bwd`` on the high-priority stream (CUDA); the plain op elsewhere."""
    return torch.ops.mhc.boundary_bwd(
        grad_x_next, grad_layer_input, grad_h_post_next, grad_h_res_next, grad_h_pre_next, layer_output, residual,
        h_post, h_res, x_next, phi, alpha, bias, h_pre_next, h_post_next, proj, rinv, iters, post_mult, sinkhorn_eps,
    )  # fmt: skip


@boundary_hp_bwd.register_kernel("cuda")
def _(*args):
    from .streams import _fork_join

    _check_bwd(args)
    tensors, settings = args[:17], args[17:]
    present = [i for i, t in enumerate(tensors) if t is not None]  # grad_h_pre_next may be None

    def run(*ts):
        full = list(tensors)
        for i, t in zip(present, ts, strict=True):
            full[i] = t
        return torch.ops.mhc.boundary_bwd(*full, *settings)

    return _fork_join(run, tuple(tensors[i] for i in present))


boundary_hp_bwd.register_fake(_bwd_fake)


def _hp_backward(ctx, *grads):
    return _backward(ctx, *grads, bwd_op=torch.ops.mhc.boundary_hp_bwd)


boundary_hp_fwd.register_autograd(_hp_backward, setup_context=_setup)


def boundary(
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
    *,
    high_priority: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Differentiable boundary on ``[..., n, C]`` activations: ``(x_next, layer_input, h_post', h_res', h_pre')``
    with leading batch dimensions flattened to tokens for the op and restored on the outputs. ``high_priority``:
    forward and backward on the device's high-priority stream (``mhc::boundary_hp_*``; CUDA only, a no-op
    elsewhere)."""
    n, C = residual.shape[-2], residual.shape[-1]
    lead = residual.shape[:-2]
    aligned = _checks.aligned_contiguous
    flat = (
        aligned(layer_output.reshape(-1, C)), aligned(residual.reshape(-1, n, C)), aligned(h_post.reshape(-1, n)),
        aligned(h_res.reshape(-1, n, n)),
    )  # fmt: skip
    op = torch.ops.mhc.boundary_hp_fwd if high_priority else torch.ops.mhc.boundary_fwd
    x_next, li, hp, hr, hq, _proj, _rinv = op(*flat, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps)
    return (x_next.view(*lead, n, C), li.view(*lead, C), hp.view(*lead, n), hr.view(*lead, n, n), hq.view(*lead, n))


# ---------------------------------------------------------------------------------------------------- CUDA


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
    at n = 4, bf16, plus the d_h partials (``C / 64 x 80`` bytes written and read), against 64C for
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
    plan = tl_boundary_bwd.fused_plan(n, C, dt)
    splits = tl_boundary_bwd.fused_choose_splits(T, n, C, dt, _cuda._num_sms(dev))
    d_phi = torch.empty(K, m, **f32)
    d_phi_part = torch.empty(splits, K, m, **f32)  # summed (copied at S = 1) by the last launch, with d_h
    d_coef_part = torch.empty(-(-T // tl_boundary_bwd.COEF_BM), 2 * m, **f32)  # pre_proj_bwd's 64-token rows
    dh_part = torch.empty(plan.groups, T, nn + n, **f32)  # one d_h partial per thread block cluster
    _cuda._launch(
        dev, tl_boundary_bwd.boundary_bwd_fused_kernel(n, C, dt),
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


# ---------------------------------------------------------------------------------------------------- chains of sites


def _has_module_hooks(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def fusable(site, next_site, residual: Tensor) -> bool:
    """Whether the boundary between ``site`` (whose residual is ``residual``) and ``next_site`` (two
    :class:`mhc.MHC`) may run as one ``mhc::boundary_fwd``: same ``n`` and ``C``; the next site keeps the residual's
    dtype (``precision.residual`` None or equal); no module hooks on either site (a hook, e.g. FSDP2's unshard, must
    see each site's own call). A site whose post runs on the high-priority stream gets ``mhc::boundary_hp_fwd``."""
    if site.n_streams != next_site.n_streams or site.hidden_size != next_site.hidden_size:
        return False
    if next_site.precision.residual not in (None, residual.dtype):
        return False
    return not (_has_module_hooks(site) or _has_module_hooks(next_site))


def post_pre(site, ctx, layer_output: Tensor, next_site):
    """``site.post(ctx, layer_output)`` then ``next_site.pre(...)`` as one ``mhc::boundary_fwd``: returns
    ``(x_next, next_layer_input, next_ctx)``, the values (and on CPU the bits) of the unfused calls. The caller
    checks :func:`fusable` first."""
    from .layer import MHCContext, _autocast_off

    residual = ctx.residual
    if not isinstance(layer_output, Tensor):
        raise TypeError(f"MHC.post: expected layer_output to be a torch.Tensor, got {type(layer_output).__name__}")
    expected = (*residual.shape[:-2], site.hidden_size)
    if tuple(layer_output.shape) != expected:
        raise ValueError(
            f"MHC.post: expected layer_output of shape {list(expected)} (the residual's leading dims, C), "
            f"got {list(layer_output.shape)}"
        )
    y = layer_output.to(residual.dtype)
    b = next_site
    cd = b.precision.coefficients
    with _autocast_off(residual.device):
        x_next, layer_input, h_post, h_res, _h_pre = boundary(
            y, residual, ctx.h_post, ctx.h_res, b.phi.to(cd), b.alpha.to(cd), b.bias.to(cd),
            b.sinkhorn_iters, b.post_mult, b.rms_eps, b.sinkhorn_eps,
            high_priority=residual.device.type == "cuda" and site.high_priority_post,
        )  # fmt: skip
    if b._h_res_hook is not None:
        b._h_res_hook(b, h_res)
    return x_next, layer_input, MHCContext(x_next, h_post, h_res)


def run_sites(sites, residual: Tensor, args: tuple = (), kwargs: dict | None = None, *, call_sublayer=None,
              call_site=None) -> Tensor:  # fmt: skip
    """Apply :class:`mhc.MHC` sites in order, ``x <- site(x, *args, **kwargs)``, with every boundary between
    consecutive :func:`fusable` sites as one ``mhc::boundary_fwd`` (``post_pre``) instead of ``post`` then ``pre``.
    Equal to the plain loop (bit for bit on the CPU; on CUDA within the boundary kernel's TF32 budget,
    docs/design.md section 7).

    ``call_sublayer(site, layer_input) -> layer_output`` runs a sublayer (default: its ``__call__`` with ``args``,
    ``kwargs``, so its hooks run); ``call_site(site, residual) -> x_next`` runs a site that has module hooks as a
    whole (default: ``site(residual, *args, **kwargs)``). ``mhc.MHCStack``'s block recompute passes both, in the
    forward and in the replay, so the two walk a block with the same fusion decisions."""
    kwargs = kwargs or {}
    sites = list(sites)
    for i, site in enumerate(sites):
        if site.sublayer is None:
            raise TypeError(f"mhc.boundary.run_sites: sites[{i}] has no sublayer (sublayer=None)")
    if call_sublayer is None:

        def call_sublayer(site, layer_input):
            return site.sublayer(layer_input, *args, **kwargs)

    if call_site is None:

        def call_site(site, h):
            return site(h, *args, **kwargs)

    h = residual
    layer_input = ctx = None
    for i, site in enumerate(sites):
        if ctx is None:  # not entered through a fused boundary
            if _has_module_hooks(site):
                h = call_site(site, h)
                continue
            layer_input, ctx = site.pre(h)
        y = call_sublayer(site, site._sublayer_input(layer_input))  # the sublayer's dtype policy, as MHC.forward
        if not isinstance(y, Tensor):
            raise TypeError(
                f"MHC.forward: expected the sublayer to return a torch.Tensor [..., C], got {type(y).__name__}"
            )
        nxt = sites[i + 1] if i + 1 < len(sites) else None
        if nxt is not None and fusable(site, nxt, ctx.residual):
            h, layer_input, ctx = post_pre(site, ctx, y, nxt)
        else:
            h = site.post(ctx, y)
            layer_input = ctx = None
    return h
