"""The mHC math in plain PyTorch: the specification of every op and its CPU implementation.

Paper: *mHC: Manifold-Constrained Hyper-Connections* (DeepSeek, arXiv 2512.24880); equation numbers below are the
paper's. One residual site, per token, with ``n`` streams of width ``C``::

    x        [n, C]                      the residual state (n streams)
    x_vec    [n*C]   = vec(x)            stream-major flattening (stream 0 first), as DeepSeek's kernels
    r        = sqrt(mean(x_vec^2) + rms_eps)                          Eq. 15 (the paper writes no eps)
    proj     [m]     = x_vec @ phi,  m = n*n + 2n                      Eq. 14, phi = [phi_pre | phi_post | phi_res]
    logits   [m]     = alpha_k * proj / r + bias                       Eq. 16, alpha_k per group (pre, post, res)
    h_pre    [n]     = sigmoid(logits[:n])                              Eq. 17
    h_post   [n]     = post_mult * sigmoid(logits[n:2n])                Eq. 18 (post_mult = 2 in the paper)
    h_res    [n, n]  = sinkhorn(logits[2n:].view(n, n))                 Eq. 19 / Eq. 9, row-major ``mat``
    layer_input [C]  = sum_i h_pre[i] * x[i]                            F_pre
    x_next   [n, C]  = h_res @ x + h_post[:, None] * F(layer_input)     Eq. 3 (F_post,res)

Orientation: ``x_next[i] = sum_j h_res[i, j] x[j]`` is the paper's Eq. 3. DeepSeek's TileKernels stores ``comb`` and
applies its transpose (``out[o] = sum_i comb[i, o] x[i]``); ``docs/design.md`` explains the mapping.

Sinkhorn-Knopp (Eq. 9) runs in the log domain::

    z = logits
    repeat iters times:
        z[:, j] -= log(sum_i exp(z[i, j]) + eps)     # columns
        z[i, :] -= log(sum_j exp(z[i, j]) + eps)     # rows
    h_res = exp(z)

With ``eps = 0`` (the default) this is exactly Eq. 9 (``M0 = exp(logits)``, then ``iters`` x (column, row)
normalisation), only evaluated without ever forming ``exp(logits)``: every log-sum-exp is shifted by its own maximum,
so no sum can overflow or underflow to zero, and logits of any finite magnitude (|logit| = 1e4 and beyond) give a
finite result whose rows sum to 1. The exp-domain form fails there: a column whose entries all underflow divides 0 by
0. With ``eps > 0`` every normalising sum becomes ``sum + eps`` (the guard DeepSeek's kernels use), computed as
``logaddexp(lse, log(eps))``; the result then differs from Eq. 9 by O(eps) per step. NaN logits propagate to NaN
in that token's matrix (and only there).

Every function is dtype generic: activations may be bf16/fp16/fp32/fp64, coefficients fp32/fp64, and the math runs
in ``promote_types(dtypes..., float32)`` (so float64 stays float64 for gradcheck). Activation outputs come back in the
residual's dtype, coefficient outputs in the coefficients' dtype. Leading batch dimensions are allowed everywhere
(``[..., n, C]``), the custom ops in ``mhc.ops`` flatten them to tokens ``[T, ...]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SiteParams",
    "coefficient_logits",
    "compute_dtype",
    "num_coefficients",
    "post_res",
    "post_res_backward",
    "pre_apply",
    "pre_mapping",
    "pre_mapping_backward",
    "projection",
    "rms_inv",
    "sinkhorn",
    "sinkhorn_backward",
    "site",
    "split_coefficients",
]


def num_coefficients(n: int) -> int:
    """``m = n*n + 2n``: the width of ``phi`` and ``bias`` (pre, post, res)."""
    return n * n + 2 * n


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: the promotion of the inputs' dtypes with float32 (at least float32)."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


# ---------------------------------------------------------------------------------------------------- projection


def projection(residual: Tensor, phi: Tensor) -> Tensor:
    """Eq. 14: ``proj = vec(x) @ phi``, the un-normalised projection.

    Args:
        residual: ``[..., n, C]``.
        phi: ``[n*C, m]``, columns ordered [pre (n) | post (n) | res (n*n, row-major)].
    Returns:
        ``[..., m]`` in the compute dtype.
    """
    cd = compute_dtype(residual.dtype, phi.dtype)
    x_vec = residual.to(cd).flatten(-2)
    return x_vec @ phi.to(cd)


def rms_inv(residual: Tensor, eps: float) -> Tensor:
    """Eq. 15 inverted: ``1 / r`` with ``r = sqrt(mean(vec(x)^2) + eps)`` over all ``n*C`` features.

    Returns ``[...]`` in ``compute_dtype(residual.dtype)``.
    """
    x_vec = residual.to(compute_dtype(residual.dtype)).flatten(-2)
    return torch.rsqrt(x_vec.square().mean(-1) + eps)


def _group_scale(alpha: Tensor, n: int) -> Tensor:
    """``alpha`` [3] expanded to one factor per coefficient column, ``[m]``."""
    return torch.cat([alpha[0:1].expand(n), alpha[1:2].expand(n), alpha[2:3].expand(n * n)])


def coefficient_logits(proj: Tensor, rinv: Tensor, alpha: Tensor, bias: Tensor, n: int) -> Tensor:
    """Eq. 16: ``logits = alpha_k * proj / r + bias``; ``proj [..., m]``, ``rinv [...]``, ``alpha [3]``, ``bias [m]``."""
    cd = compute_dtype(proj.dtype, alpha.dtype, bias.dtype)
    scale = _group_scale(alpha.to(cd), n)
    return proj.to(cd) * rinv.to(cd)[..., None] * scale + bias.to(cd)


def split_coefficients(logits: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """``[..., m]`` -> (pre ``[..., n]``, post ``[..., n]``, res ``[..., n, n]`` row-major)."""
    pre = logits[..., :n]
    post = logits[..., n : 2 * n]
    res = logits[..., 2 * n :].unflatten(-1, (n, n))
    return pre, post, res


# ---------------------------------------------------------------------------------------------------- Sinkhorn


def _log_norm(z: Tensor, dim: int, eps: float) -> Tensor:
    """``log(sum(exp(z), dim) + eps)``, keepdim, stable for any finite ``z``."""
    lse = torch.logsumexp(z, dim=dim, keepdim=True)
    if eps > 0.0:
        lse = torch.logaddexp(lse, torch.full_like(lse, math.log(eps)))
    return lse


def _sinkhorn_iterates(logits: Tensor, iters: int, eps: float) -> list[tuple[Tensor, int]]:
    """The 2*iters normalised iterates ``(z_k, dim_k)`` of the log-domain iteration, in order."""
    z = logits.to(compute_dtype(logits.dtype))
    steps = []
    for _ in range(iters):
        z = z - _log_norm(z, -2, eps)  # column normalisation: sum over rows i
        steps.append((z, -2))
        z = z - _log_norm(z, -1, eps)  # row normalisation: sum over columns j
        steps.append((z, -1))
    return steps


def sinkhorn(logits: Tensor, iters: int = 20, eps: float = 0.0) -> Tensor:
    """Eq. 9, Sinkhorn-Knopp projection of ``exp(logits)`` towards the doubly stochastic matrices.

    Args:
        logits: ``[..., n, n]`` (``H~_res``), float32 or float64.
        iters: ``t_max``, the number of (column, row) normalisation pairs; 20 in the paper.
        eps: guard added to every normalising sum; 0 reproduces Eq. 9 exactly (see the module docstring).
    Returns:
        ``[..., n, n]`` in ``logits.dtype``. Rows sum to 1 (the last step normalises rows); columns are within the
        truncation error of ``iters`` steps.

    Convergence: rows always sum to 1; the column error shrinks geometrically, at a rate per iteration that goes to
    1 as the logits sharpen (the Birkhoff contraction ratio ``tanh(D/4)^2``, ``D`` growing linearly with the spread
    of the logits; ``docs/spec.md`` §3.3). Measured for ``n = 4``, 20 iterations, 2000 matrices of i.i.d.
    ``N(0, std^2)`` logits (``python -m profiling.sinkhorn_convergence --n 4 --iters 20``), the worst column error is
    7.8e-4 at std 1, 4.4e-2 at std 3, 9.4e-2 at std 6, 0.22 at std 10 and 2.0 (columns summing to 0.5 .. 2) at std
    100 and beyond, where ``exp(logits)`` is a 0/1 pattern that 20 iterations cannot balance and the gradient
    vanishes (at std 1e4 its largest entry is 0 in float32, 4e-16 in float64). That regime is a property of the
    math, not an error: the result stays finite and its rows stochastic, and :func:`mhc.diagnostics.sinkhorn_report`
    flags it.
    """
    if iters < 1:
        raise ValueError(f"sinkhorn: expected iters >= 1, got {iters}")
    z = _sinkhorn_iterates(logits, iters, eps)[-1][0]
    return torch.exp(z).to(logits.dtype)


def sinkhorn_backward(grad_out: Tensor, logits: Tensor, iters: int = 20, eps: float = 0.0) -> Tensor:
    """Exact vector-Jacobian product of :func:`sinkhorn` (the truncated ``iters``-step iteration, Eq. 19's backward).

    Each half-step ``z' = z - log(sum_d exp(z) + eps)`` has the VJP ``g = g' - exp(z') * sum_d(g')``, and the final
    ``exp`` gives ``g = grad_out * h_res``. The iterates are recomputed from ``logits`` (the only saved tensor).
    """
    steps = _sinkhorn_iterates(logits, iters, eps)
    z_last = steps[-1][0]
    g = grad_out.to(z_last.dtype) * torch.exp(z_last)
    for z, dim in reversed(steps):
        g = g - torch.exp(z) * g.sum(dim, keepdim=True)
    return g.to(logits.dtype)


# ---------------------------------------------------------------------------------------------------- pre-mapping


def pre_apply(residual: Tensor, h_pre: Tensor) -> Tensor:
    """F_pre: ``layer_input = sum_i h_pre[i] * x[i]``; ``[..., n, C]``, ``[..., n]`` -> ``[..., C]`` (residual dtype)."""
    cd = compute_dtype(residual.dtype, h_pre.dtype)
    out = (h_pre.to(cd)[..., None] * residual.to(cd)).sum(-2)
    return out.to(residual.dtype)


def pre_mapping(
    residual: Tensor,
    phi: Tensor,
    alpha: Tensor,
    bias: Tensor,
    iters: int = 20,
    post_mult: float = 2.0,
    rms_eps: float = 1e-6,
    sinkhorn_eps: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fused pre-mapping: Eq. 14-19 and F_pre.

    Args:
        residual: ``[..., n, C]`` (bf16/fp16/fp32/fp64).
        phi: ``[n*C, m]``; alpha: ``[3]`` (pre, post, res); bias: ``[m]`` (coefficient dtype, fp32 or fp64).
    Returns:
        ``layer_input [..., C]`` (residual dtype), ``h_post [..., n]``, ``h_res [..., n, n]``, ``h_pre [..., n]``,
        ``proj [..., m]`` (Eq. 14) and ``rinv [...]`` (1/r, Eq. 15); the last two are the statistics the backward
        needs. Coefficients come back in ``phi.dtype``.
    """
    n = residual.shape[-2]
    proj = projection(residual, phi)
    rinv = rms_inv(residual, rms_eps).to(proj.dtype)
    logits = coefficient_logits(proj, rinv, alpha, bias, n)
    pre, post, res = split_coefficients(logits, n)
    h_pre = torch.sigmoid(pre)
    h_post = post_mult * torch.sigmoid(post)
    h_res = sinkhorn(res, iters, sinkhorn_eps)
    layer_input = pre_apply(residual, h_pre)
    cdt = phi.dtype
    return layer_input, h_post.to(cdt), h_res.to(cdt), h_pre.to(cdt), proj.to(cdt), rinv.to(cdt)


def pre_mapping_backward(
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
    iters: int = 20,
    post_mult: float = 2.0,
    sinkhorn_eps: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """VJP of :func:`pre_mapping` with respect to ``(residual, phi, alpha, bias)``.

    ``proj`` and ``rinv`` are treated as saved statistics (not differentiated through as outputs). The chain:
    ``d logits`` from sigmoid (pre, post) and :func:`sinkhorn_backward` (res); then Eq. 16 gives ``d bias``,
    ``d alpha`` and ``d proj = d logits * alpha_k / r``, ``d rinv = sum(d logits * alpha_k * proj)``; Eq. 15 gives
    ``d x_vec += -d rinv * rinv^3 * x_vec / (n*C)`` and Eq. 14 gives ``d x_vec += d proj @ phi^T``,
    ``d phi = x_vec^T @ d proj``; F_pre adds ``d x[i] += h_pre[i] * d layer_input``.
    Returns ``(d_residual, d_phi, d_alpha, d_bias)`` in the dtypes of ``(residual, phi, alpha, bias)``.
    """
    n, C = residual.shape[-2], residual.shape[-1]
    cd = compute_dtype(residual.dtype, phi.dtype, alpha.dtype, bias.dtype)
    x = residual.to(cd)
    g_li = grad_layer_input.to(cd)
    hp, hq, pr, ri = h_pre.to(cd), h_post.to(cd), proj.to(cd), rinv.to(cd)

    g_pre = (g_li[..., None, :] * x).sum(-1) + grad_h_pre.to(cd)
    d_pre = g_pre * hp * (1.0 - hp)
    d_post = grad_h_post.to(cd) * hq * (1.0 - hq / post_mult)
    res_logits = split_coefficients(coefficient_logits(pr, ri, alpha, bias, n), n)[2]
    d_res = sinkhorn_backward(grad_h_res.to(cd), res_logits, iters, sinkhorn_eps)
    d_logits = torch.cat([d_pre, d_post, d_res.flatten(-2)], dim=-1)  # [..., m]

    scale = _group_scale(alpha.to(cd), n)
    flat_dl = d_logits.reshape(-1, d_logits.shape[-1])
    flat_pr = pr.reshape(-1, pr.shape[-1])
    flat_ri = ri.reshape(-1, 1)
    d_bias = flat_dl.sum(0)
    d_scale = (flat_dl * flat_pr * flat_ri).sum(0)
    d_alpha = torch.stack([d_scale[:n].sum(), d_scale[n : 2 * n].sum(), d_scale[2 * n :].sum()])

    d_proj = d_logits * ri[..., None] * scale  # [..., m]
    d_rinv = (d_logits * scale * pr).sum(-1)  # [...]
    x_vec = x.flatten(-2)
    d_x_vec = d_proj @ phi.to(cd).T - (d_rinv * ri.pow(3) / (n * C))[..., None] * x_vec
    d_phi = x_vec.reshape(-1, n * C).T @ d_proj.reshape(-1, d_proj.shape[-1])
    d_residual = d_x_vec.unflatten(-1, (n, C)) + hp[..., None] * g_li[..., None, :]
    return d_residual.to(residual.dtype), d_phi.to(phi.dtype), d_alpha.to(alpha.dtype), d_bias.to(bias.dtype)


# ---------------------------------------------------------------------------------------------------- post/res


def post_res(layer_output: Tensor, residual: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """F_post,res (Eq. 3): ``x_next[i] = sum_j h_res[i, j] * x[j] + h_post[i] * layer_output``.

    Args:
        layer_output: ``[..., C]``; residual: ``[..., n, C]``; h_post: ``[..., n]``; h_res: ``[..., n, n]``.
    Returns:
        ``[..., n, C]`` in ``residual.dtype``, accumulated in the compute dtype and rounded once.
    """
    cd = compute_dtype(residual.dtype, layer_output.dtype, h_post.dtype, h_res.dtype)
    mixed = torch.einsum("...ij,...jc->...ic", h_res.to(cd), residual.to(cd))
    out = mixed + h_post.to(cd)[..., None] * layer_output.to(cd)[..., None, :]
    return out.to(residual.dtype)


def post_res_backward(
    grad_out: Tensor, layer_output: Tensor, residual: Tensor, h_post: Tensor, h_res: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """VJP of :func:`post_res`: ``(d_layer_output, d_residual, d_h_post, d_h_res)``.

    ``d_layer_output = sum_i h_post[i] g[i]``, ``d_residual[j] = sum_i h_res[i, j] g[i]``,
    ``d_h_post[i] = <g[i], layer_output>``, ``d_h_res[i, j] = <g[i], x[j]>`` (inner products over C).
    """
    cd = compute_dtype(residual.dtype, layer_output.dtype, h_post.dtype, h_res.dtype)
    g = grad_out.to(cd)
    y = layer_output.to(cd)
    x = residual.to(cd)
    d_y = (h_post.to(cd)[..., None] * g).sum(-2)
    d_x = torch.einsum("...ij,...ic->...jc", h_res.to(cd), g)
    d_h_post = (g * y[..., None, :]).sum(-1)
    d_h_res = torch.einsum("...ic,...jc->...ij", g, x)
    return d_y.to(layer_output.dtype), d_x.to(residual.dtype), d_h_post.to(h_post.dtype), d_h_res.to(h_res.dtype)


# ---------------------------------------------------------------------------------------------------- a whole site


@dataclass(frozen=True)
class SiteParams:
    """The learned parameters and settings of one residual site.

    ``phi [n*C, m]``, ``alpha [3]`` (pre, post, res gating factors, 0.01 at the paper's init), ``bias [m]``.
    """

    phi: Tensor
    alpha: Tensor
    bias: Tensor
    iters: int = 20
    post_mult: float = 2.0
    rms_eps: float = 1e-6
    sinkhorn_eps: float = 0.0


def site(residual: Tensor, sublayer: Callable[[Tensor], Tensor], params: SiteParams) -> Tensor:
    """One mHC residual site: ``x_next = H_res x + H_post^T F(H_pre x)`` with the coefficients of Eq. 14-19.

    ``residual [..., n, C]``; ``sublayer`` maps ``[..., C] -> [..., C]`` (attention or FFN with its own pre-norm).
    """
    layer_input, h_post, h_res, *_ = pre_mapping(
        residual,
        params.phi,
        params.alpha,
        params.bias,
        params.iters,
        params.post_mult,
        params.rms_eps,
        params.sinkhorn_eps,
    )
    return post_res(sublayer(layer_input), residual, h_post, h_res)
