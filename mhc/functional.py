"""The functional public API: shapes with leading batch dimensions in, custom ops underneath.

All three take tensors with any leading dimensions (``[B, S, n, C]``, ``[T, n, C]``, or a single token ``[n, C]``),
check that those dimensions agree, flatten them to tokens for the ``mhc::*`` ops and restore them on the way out.
Inputs are made contiguous and 16-byte aligned if they are not (a copy; the ops themselves refuse a view whose data
does not start on a 16-byte boundary, see :func:`mhc._checks.require_aligned`). Dtypes are not converted: activations may be bf16, fp16, fp32
or fp64, coefficients fp32 or fp64 (see :mod:`mhc._checks` for the full rules); a wrong one raises ``TypeError``.
"""

from __future__ import annotations

from torch import Tensor

from . import _checks
from . import ops as _ops  # noqa: F401  (registers the mhc:: ops)


def _leading(op: str, name: str, t: Tensor, trailing: int, layout: str) -> tuple:
    _checks.require_tensor(op, name, t)
    if t.dim() < trailing:
        raise ValueError(f"{op}: expected {name} of shape {layout}, got {tuple(t.shape)}")
    return tuple(t.shape[: t.dim() - trailing])


def _require_lead(op: str, name: str, t: Tensor, expected: tuple, layout: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{op}: expected {name} of shape {expected} {layout}, got {tuple(t.shape)}")


def sinkhorn(logits: Tensor, iters: int = 20, *, eps: float = 0.0) -> Tensor:
    """Sinkhorn-Knopp projection (Eq. 9) of ``exp(logits)``, differentiable (exact unrolled backward).

    Args:
        logits: ``[..., n, n]``, float32 or float64.
        iters: number of (column, row) normalisation pairs, 20 in the paper.
        eps: guard added to each normalising sum; 0 (default) is exactly Eq. 9.
    Returns:
        ``[..., n, n]``: rows sum to 1, columns to within the truncation error.
    Raises:
        ValueError: the last two dims differ, ``iters < 1`` or ``eps < 0``. (On CUDA, ``n > 16`` runs the PyTorch
            reference, with a warning.)
        TypeError: logits not float32/float64.
    """
    op = "mhc.sinkhorn"
    lead = _leading(op, "logits", logits, 2, "[..., n, n]")
    n = logits.shape[-1]
    if logits.shape[-2] != n:
        raise ValueError(f"{op}: expected logits of shape [..., n, n], got {tuple(logits.shape)}")
    _checks.require_int(op, "iters", iters, 1)
    _checks.require_float(op, "eps", eps)
    flat = _checks.aligned_contiguous(logits.reshape(-1, n, n))
    return _ops.sinkhorn_fwd(flat, iters, float(eps)).reshape(*lead, n, n)


def pre_mapping(
    residual: Tensor,
    phi: Tensor,
    alpha: Tensor,
    bias: Tensor,
    *,
    iters: int = 20,
    post_mult: float = 2.0,
    rms_eps: float = 1e-6,
    sinkhorn_eps: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The fused pre-mapping of one residual site (Eq. 14-19 and F_pre).

    Args:
        residual: ``[..., n, C]`` residual streams (bf16, fp16, fp32 or fp64).
        phi: ``[n*C, n*n + 2n]`` projection, columns [pre | post | res (row-major)], RMSNorm weight absorbed.
        alpha: ``[3]`` gating factors (pre, post, res). bias: ``[n*n + 2n]``. Same dtype as phi (fp32 or fp64).
        iters: Sinkhorn iterations (paper: 20). post_mult: ``H_post = post_mult * sigmoid`` (paper: 2).
        rms_eps: added to the mean square in Eq. 15. sinkhorn_eps: see :func:`sinkhorn`.
    Returns:
        ``layer_input [..., C]`` (residual dtype), ``h_post [..., n]`` and ``h_res [..., n, n]`` (phi's dtype).
    Raises:
        ValueError / TypeError with the expected and received shape, dtype or device.
    """
    op = "mhc.pre_mapping"
    lead = _leading(op, "residual", residual, 2, "[..., n, C]")
    n, C = residual.shape[-2], residual.shape[-1]
    _checks.require_int(op, "iters", iters, 1)
    _checks.require_float(op, "post_mult", post_mult, positive=True)
    _checks.require_float(op, "rms_eps", rms_eps)
    _checks.require_float(op, "sinkhorn_eps", sinkhorn_eps)
    for name, t in (("phi", phi), ("alpha", alpha), ("bias", bias)):
        _checks.require_tensor(op, name, t)
    flat = _checks.aligned_contiguous(residual.reshape(-1, n, C))
    phi, alpha, bias = (_checks.aligned_contiguous(t) for t in (phi, alpha, bias))
    layer_input, h_post, h_res, *_ = _ops.pre_mapping_fwd(
        flat, phi, alpha, bias, iters, float(post_mult), float(rms_eps), float(sinkhorn_eps)
    )
    return layer_input.reshape(*lead, C), h_post.reshape(*lead, n), h_res.reshape(*lead, n, n)


def post_res(layer_output: Tensor, residual: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """F_post,res (Eq. 3): ``x_next[..., i, :] = sum_j h_res[..., i, j] x[..., j, :] + h_post[..., i] y[..., :]``.

    Args:
        layer_output: ``[..., C]`` (``y = F(layer_input)``), same dtype as residual.
        residual: ``[..., n, C]`` (bf16, fp16, fp32 or fp64).
        h_post: ``[..., n]``; h_res: ``[..., n, n]`` (fp32 or fp64, as returned by :func:`pre_mapping`).
    Returns:
        ``[..., n, C]`` in the residual's dtype.
    Raises:
        ValueError / TypeError with the expected and received shape, dtype or device.
    """
    op = "mhc.post_res"
    lead = _leading(op, "residual", residual, 2, "[..., n, C]")
    n, C = residual.shape[-2], residual.shape[-1]
    _checks.require_tensor(op, "layer_output", layer_output)
    _checks.require_tensor(op, "h_post", h_post)
    _checks.require_tensor(op, "h_res", h_res)
    _require_lead(op, "layer_output", layer_output, (*lead, C), "[..., C]")
    _require_lead(op, "h_post", h_post, (*lead, n), "[..., n]")
    _require_lead(op, "h_res", h_res, (*lead, n, n), "[..., n, n]")
    aligned = _checks.aligned_contiguous
    out = _ops.post_res_fwd(
        aligned(layer_output.reshape(-1, C)),
        aligned(residual.reshape(-1, n, C)),
        aligned(h_post.reshape(-1, n)),
        aligned(h_res.reshape(-1, n, n)),
    )
    return out.reshape(*lead, n, C)
