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


def _streams_of(phi) -> int | None:
    """The ``n`` with ``n*n + 2n == phi.shape[-1]``, or ``None``."""
    if not isinstance(phi, Tensor) or phi.dim() != 2:
        return None
    m = phi.shape[-1]
    n = int(round((m + 1) ** 0.5)) - 1  # n*n + 2n = (n + 1)^2 - 1
    return n if n >= 1 and n * n + 2 * n == m else None


def _require_expanded(op: str, residual: Tensor, phi) -> None:
    """Name a forgotten :func:`mhc.expand`: ``phi [n*C, m]`` fixes ``n`` and ``C``; a residual ``[..., S, C]`` whose
    stream dimension is not that ``n`` is an embedding that was never expanded (else the op would blame ``phi``)."""
    n = _streams_of(phi)
    if n is None or phi.shape[0] % n != 0:
        return
    C = phi.shape[0] // n
    if residual.shape[-1] == C and residual.shape[-2] != n:
        raise ValueError(
            f"{op}: expected residual of shape [..., n={n}, C={C}] (phi is {tuple(phi.shape)} = [n*C, n*n + 2n]), "
            f"got {tuple(residual.shape)}: did you forget mhc.expand(x, {n})?"
        )


def sinkhorn(logits: Tensor, iters: int = 20, *, eps: float = 0.0) -> Tensor:
    """Sinkhorn-Knopp projection (Eq. 9) of ``exp(logits)``, differentiable (exact unrolled backward).

    Args:
        logits: ``[..., n, n]``, float32 or float64.
        iters: number of (column, row) normalisation pairs, 20 in the paper.
        eps: guard added to each normalising sum; 0 (default) is exactly Eq. 9.
    Returns:
        ``[..., n, n]``: rows sum to 1, columns to within the truncation error.

    Convergence: rows always sum to 1; the column error shrinks geometrically, at a rate per iteration that goes to
    1 as the logits sharpen (the Birkhoff contraction ratio ``tanh(D/4)^2``, ``D`` growing linearly with the spread
    of the logits; ``docs/spec.md`` §3.3). Measured for ``n = 4``, 20 iterations, 2000 matrices of i.i.d.
    ``N(0, std^2)`` logits (``python -m profiling.sinkhorn_convergence --n 4 --iters 20``), the worst column error is
    7.8e-4 at std 1, 4.4e-2 at std 3, 9.4e-2 at std 6, 0.22 at std 10 and 2.0 (columns summing to 0.5 .. 2) at std
    100 and beyond, where ``exp(logits)`` is a 0/1 pattern that 20 iterations cannot balance and the gradient
    vanishes (at std 1e4 its largest entry is 0 in float32, 4e-16 in float64). That regime is a property of the
    math, not an error: the result stays finite and its rows stochastic, and :func:`mhc.diagnostics.sinkhorn_report`
    flags it.

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
    _require_expanded(op, residual, phi)
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
    if h_res.dim() >= 2 and h_res.shape[-1] != n and layer_output.dim() == residual.dim():
        raise ValueError(
            f"{op}: expected residual of shape [..., n={h_res.shape[-1]}, C] (from h_res {tuple(h_res.shape)}), "
            f"got {tuple(residual.shape)}, the rank of layer_output: did you forget mhc.expand(x, {h_res.shape[-1]})?"
        )
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
