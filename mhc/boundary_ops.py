"""The boundary's ``torch.library`` ops: ``mhc::boundary_fwd`` / ``mhc::boundary_bwd``, their high-priority-stream
twins ``mhc::boundary_hp_fwd`` / ``mhc::boundary_hp_bwd``, the fakes, the checks, the autograd registration and the
differentiable entry point :func:`boundary`. The math and the op signatures are in :mod:`mhc.boundary`; the CUDA
launches in :mod:`mhc._boundary_cuda`.

Each signature is declared once: the annotated default kernel of the plain op defines its schema, and the ``hp``
twin is declared with that schema (``torch.library.infer_schema`` of the same function), its default kernel the plain
op and its CUDA kernel the plain op forked to the high-priority stream and joined (:func:`mhc.streams._fork_join`).
The two ops of a pair share the fake, the checks and the autograd formula; only the backward op called differs.

The default kernel of the plain ops (every device) composes the unfused ops (:func:`composed_fwd`,
:func:`composed_bwd`), so on the CPU it is bit for bit the unfused path (the fast CPU kernels of :mod:`mhc._cpu`; the
reference for float64). Checks are those of ``mhc::post_res_fwd`` and ``mhc::pre_mapping_fwd`` (with ``x_next``'s
shape and dtype), run by the op, its fake and its CUDA kernel alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks

_FWD = "mhc::boundary_fwd"
_BWD = "mhc::boundary_bwd"

_Outputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


# ---------------------------------------------------------------------------------------------------- composed


def composed_fwd(layer_output, residual, h_post, h_res, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps):
    """:func:`mhc.boundary.boundary_reference` through the unfused ops ``mhc::post_res_fwd`` and
    ``mhc::pre_mapping_fwd`` (so on every device it is bit for bit the unfused path: the fast CPU kernels on CPU, the
    reference for float64)."""
    x_next = torch.ops.mhc.post_res_fwd(layer_output, residual, h_post, h_res)
    rest = torch.ops.mhc.pre_mapping_fwd(x_next, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps)
    return (x_next, *rest)


def composed_bwd(g_xn, g_li, g_post, g_res, g_pre, y, x, h_post, h_res, x_next, phi, alpha, bias, h_pre_n,
                 h_post_n, proj, rinv, iters, post_mult, sinkhorn_eps):  # fmt: skip
    """:func:`mhc.boundary.boundary_backward_reference` through ``mhc::pre_mapping_bwd`` and ``mhc::post_res_bwd``
    (``g_pre`` None: zero)."""
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


def _boundary_fwd(
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
) -> _Outputs:
    """F_post,res of site l and the pre-mapping of site l+1 (:func:`mhc.boundary.boundary_reference`)."""
    _check_fwd(layer_output, residual, h_post, h_res, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps)
    return composed_fwd(
        layer_output, residual, h_post, h_res, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps
    )


def _boundary_bwd(
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
) -> _Outputs:
    """``(d_layer_output, d_residual, d_h_post, d_h_res, d_phi, d_alpha, d_bias)``
    (:func:`mhc.boundary.boundary_backward_reference`)."""
    args = (
        grad_x_next, grad_layer_input, grad_h_post_next, grad_h_res_next, grad_h_pre_next, layer_output, residual,
        h_post, h_res, x_next, phi, alpha, bias, h_pre_next, h_post_next, proj, rinv, iters, post_mult, sinkhorn_eps,
    )  # fmt: skip
    _check_bwd(args)
    return composed_bwd(*args)


boundary_fwd = torch.library.custom_op(_FWD, _boundary_fwd, mutates_args=())
boundary_bwd = torch.library.custom_op(_BWD, _boundary_bwd, mutates_args=())


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


# ---------------------------------------------------------------------------------------------------- high priority

# The same pair on the high-priority stream, for a boundary after an FFN site (paper section 4.3.3): the fork and
# join of mhc.streams inside opaque ops, as mhc::post_res_hp_fwd; the plain ops on every other device. Declared with
# the plain ops' schemas (the signatures above), so the arguments are the plain ops' by construction.


def _on_high_priority(plain_op, check):
    """The CUDA kernel of an ``hp`` op: ``check(args)``, then ``plain_op(*args)`` forked to the high-priority stream
    and joined; the tensor arguments (a None gradient left out) are the ones recorded on the two streams."""

    def kernel(*args):
        from .streams import _fork_join

        check(args)
        present = [i for i, a in enumerate(args) if isinstance(a, Tensor)]

        def run(*tensors):
            full = list(args)
            for i, t in zip(present, tensors, strict=True):
                full[i] = t
            return plain_op(*full)

        return _fork_join(run, tuple(args[i] for i in present))

    return kernel


def _hp_fwd_default(*args):
    """``mhc::boundary_fwd`` on the high-priority stream (CUDA); the plain op elsewhere."""
    return torch.ops.mhc.boundary_fwd(*args)


def _hp_bwd_default(*args):
    """``mhc::boundary_bwd`` on the high-priority stream (CUDA); the plain op elsewhere."""
    return torch.ops.mhc.boundary_bwd(*args)


_schema = torch.library.infer_schema
boundary_hp_fwd = torch.library.custom_op(
    "mhc::boundary_hp_fwd", _hp_fwd_default, mutates_args=(), schema=_schema(_boundary_fwd, mutates_args=())
)
boundary_hp_bwd = torch.library.custom_op(
    "mhc::boundary_hp_bwd", _hp_bwd_default, mutates_args=(), schema=_schema(_boundary_bwd, mutates_args=())
)
boundary_hp_fwd.register_kernel("cuda")(_on_high_priority(torch.ops.mhc.boundary_fwd, lambda a: _check_fwd(*a)))
boundary_hp_bwd.register_kernel("cuda")(_on_high_priority(torch.ops.mhc.boundary_bwd, _check_bwd))
boundary_hp_fwd.register_fake(_fwd_fake)
boundary_hp_bwd.register_fake(_bwd_fake)


def _hp_backward(ctx, *grads):
    return _backward(ctx, *grads, bwd_op=torch.ops.mhc.boundary_hp_bwd)


boundary_hp_fwd.register_autograd(_hp_backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------------------- entry point


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
