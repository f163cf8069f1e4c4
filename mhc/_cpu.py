"""Fast CPU kernels for the Sinkhorn and pre-mapping ops, registered with ``register_kernel("cpu")`` over the
reference (which stays the specification, :mod:`mhc.reference`).

Why: the reference Sinkhorn runs ``2 * iters`` log-sum-exps, each five or six tiny tensor ops; at ``n = 4`` the
per-op overhead dominates, and its backward replays all of that. Here the iteration runs in the exp domain, where a
half-step is one reduction and one division::

    P_0 = exp(L - colmax(L))                               per-column shift: no overflow, every column sum in [1, n]
    P   = P / (sum_i P + eps * exp(-colmax))               first column step (the shift folded into eps)
    P   = P / (sum_j P + eps),  P = P / (sum_i P + eps)   the other half-steps: entries stay in [0, 1]

which is the log-domain iteration of the reference exactly (``P_k = exp(z_k)``), only rounded differently. Every
iterate is kept (``2 * iters`` tensors of ``[T, n, n]``, in chunks of tokens), and a token is recomputed with the
log-domain reference when any entry of any iterate is below ``2**26 * finfo.tiny`` (``2**-100`` in fp32) or not
finite: above that every entry is a normal float, every operation is a relative-error operation on positive numbers,
and the two evaluations agree to a few ulps per step. Below it (logits spread by more than about 60, such as
``|logit| = 1e4``), entries could underflow, which the reference's log domain handles, so those tokens take it.
NaN logits also take the reference, so NaN propagation per token is the reference's.

The backward replays the same forward keeping the iterates and walks them in reverse with the exact VJP of each
half-step, ``g = g - P_k * sum_d(g)`` (two ops per half-step), after ``g = grad * h_res``.

Accuracy against the reference, as ``tests/cpu/test_cpu_kernels.py`` asserts it (n in {1, 2, 4, 16}, logits std up
to 8, 20 iterations): float32 forward within 2e-6 absolute, backward within 5e-6 of max |grad|; float64 within 1e-13
and 1e-12.
These kernels change nothing but speed: no host syncs matter on the CPU, and the fakes and checks are the ops'.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, ops, reference

_CHUNK = 16384  # tokens per block of iterates: 2 * 20 * 16384 * 16 * 4 bytes = 42 MB at n = 4, fp32


def _tiny(dtype: torch.dtype) -> float:
    """Smallest entry an iterate may hold for the exp-domain result to be trusted (2**26 above the normal range)."""
    return torch.finfo(dtype).tiny * 2.0**26


def _exp_iterates(Lt: Tensor, iters: int, eps: float) -> tuple[Tensor, Tensor]:
    """All ``2 * iters`` exp-domain iterates of token-last logits ``Lt [n, n, T]`` as ``P [2*iters, n, n, T]``, and
    a ``[T]`` mask of the tokens to recompute with the reference. Tokens last: every reduction and division is a
    vectorised pass over ``T`` contiguous values (four times faster than reducing over the last dim at ``n = 4``)."""
    n, _, T = Lt.shape
    P = Lt.new_empty((2 * iters, n, n, T))
    colmax = Lt.amax(dim=0, keepdim=True)
    e = torch.exp(Lt - colmax)
    s = e.sum(dim=0, keepdim=True)
    if eps > 0.0:
        s = s + eps * torch.exp(-colmax)  # (sum_i exp(L) + eps) / exp(colmax)
    torch.div(e, s, out=P[0])
    row = Lt.new_empty((n, 1, T))
    col = Lt.new_empty((1, n, T))
    for k in range(1, 2 * iters):
        s = row if k % 2 == 1 else col  # odd: row step (sum over columns j), even: column step (sum over rows i)
        torch.sum(P[k - 1], dim=1 if k % 2 == 1 else 0, keepdim=True, out=s)
        if eps > 0.0:
            s.add_(eps)
        torch.div(P[k - 1], s, out=P[k])
    low = P.view(-1, T).amin(dim=0)
    redo = ~(low >= _tiny(Lt.dtype))  # NaN counts as "redo"
    redo |= ~torch.isfinite(Lt).view(-1, T).all(dim=0)
    return P, redo


def _redo_indices(redo: Tensor) -> Tensor | None:
    idx = redo.nonzero().flatten()
    return idx if idx.numel() > 0 else None


def _chunks(T: int):
    for start in range(0, T, _CHUNK):
        yield start, min(T, start + _CHUNK)


def _token_last(t: Tensor) -> Tensor:
    return t.permute(1, 2, 0).contiguous()


def sinkhorn_forward(logits: Tensor, iters: int, eps: float) -> Tensor:
    """Eq. 9, as :func:`mhc.reference.sinkhorn` (same math, exp domain where it is exact to rounding)."""
    L = logits.to(reference.compute_dtype(logits.dtype))
    out = torch.empty_like(L)
    for a, b in _chunks(L.shape[0]):
        P, redo = _exp_iterates(_token_last(L[a:b]), iters, eps)
        out[a:b] = P[-1].permute(2, 0, 1)
        idx = _redo_indices(redo)
        if idx is not None:
            out[a:b].index_copy_(0, idx, reference.sinkhorn(L[a:b].index_select(0, idx), iters, eps))
    return out.to(logits.dtype)


def sinkhorn_backward(grad_out: Tensor, logits: Tensor, iters: int, eps: float) -> Tensor:
    """Exact VJP of the truncated iteration, as :func:`mhc.reference.sinkhorn_backward`."""
    cd = reference.compute_dtype(logits.dtype, grad_out.dtype)
    L = logits.to(cd)
    G = grad_out.to(cd)
    out = torch.empty_like(L)
    for a, b in _chunks(L.shape[0]):
        P, redo = _exp_iterates(_token_last(L[a:b]), iters, eps)
        g = _token_last(G[a:b]) * P[-1]  # a new tensor: the gradient is updated in place below
        n, T = g.shape[0], g.shape[-1]
        row = g.new_empty((n, 1, T))
        col = g.new_empty((1, n, T))
        for k in range(2 * iters - 1, -1, -1):
            s = row if k % 2 == 1 else col
            torch.sum(g, dim=1 if k % 2 == 1 else 0, keepdim=True, out=s)
            g.addcmul_(P[k], s, value=-1.0)
        out[a:b] = g.permute(2, 0, 1)
        idx = _redo_indices(redo)
        if idx is not None:
            sub = reference.sinkhorn_backward(G[a:b].index_select(0, idx), L[a:b].index_select(0, idx), iters, eps)
            out[a:b].index_copy_(0, idx, sub)
    return out.to(logits.dtype)


# ---------------------------------------------------------------------------------------------------- the ops


def _no_autocast():
    # the ops run in the dtypes they are given: autocast must not lower the projection inside them
    return torch.autocast("cpu", enabled=False)


def sinkhorn_fwd(logits: Tensor, iters: int, eps: float) -> Tensor:
    _checks.sinkhorn(logits, iters, eps, "mhc::sinkhorn_fwd")
    with _no_autocast():
        return sinkhorn_forward(logits, iters, eps)


def sinkhorn_bwd(grad_out: Tensor, logits: Tensor, iters: int, eps: float) -> Tensor:
    _checks.sinkhorn_bwd(grad_out, logits, iters, eps, "mhc::sinkhorn_bwd")
    with _no_autocast():
        return sinkhorn_backward(grad_out, logits, iters, eps)


def pre_mapping_fwd(residual, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps):
    """:func:`mhc.reference.pre_mapping` with the exp-domain Sinkhorn (the schema: :func:`mhc.ops.pre_mapping_fwd`)."""
    _checks.pre_mapping(residual, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps, "mhc::pre_mapping_fwd")
    with _no_autocast():
        T, n, C = residual.shape
        cd = reference.compute_dtype(residual.dtype, phi.dtype)
        x_vec = residual.reshape(T, n * C).to(cd)
        proj = x_vec @ phi.to(cd)
        rinv = reference.rms_inv(residual, rms_eps).to(cd)
        logits = reference.coefficient_logits(proj, rinv, alpha, bias, n)
        h_pre = torch.sigmoid(logits[:, :n])
        h_post = torch.sigmoid(logits[:, n : 2 * n]).mul_(post_mult)
        h_res = sinkhorn_forward(logits[:, 2 * n :].reshape(T, n, n), iters, sinkhorn_eps)
        layer_input = torch.bmm(h_pre.unsqueeze(1), residual.to(cd)).squeeze(1)
        cdt = phi.dtype
        return layer_input.to(residual.dtype), h_post.to(cdt), h_res.to(cdt), h_pre.to(cdt), proj.to(cdt), rinv.to(cdt)


def pre_mapping_bwd(*args):
    """:func:`mhc.reference.pre_mapping_backward` (same chain, see there) with the exp-domain Sinkhorn backward (the
    schema: :func:`mhc.ops.pre_mapping_bwd`)."""
    ops._check_pre_mapping_bwd(*args)
    (grad_layer_input, grad_h_post, grad_h_res, grad_h_pre, residual, phi, alpha, bias,
     h_pre, h_post, proj, rinv, iters, post_mult, sinkhorn_eps) = args  # fmt: skip
    with _no_autocast():
        T, n, C = residual.shape
        cd = reference.compute_dtype(residual.dtype, phi.dtype, alpha.dtype, bias.dtype)
        x = residual.to(cd)
        g_li = grad_layer_input.to(cd)
        hp, hq, pr, ri = h_pre.to(cd), h_post.to(cd), proj.to(cd), rinv.to(cd)
        scale = torch.cat([alpha[0:1].expand(n), alpha[1:2].expand(n), alpha[2:3].expand(n * n)]).to(cd)

        g_pre = torch.bmm(x, g_li.unsqueeze(-1)).squeeze(-1) + grad_h_pre.to(cd)
        d_logits = torch.empty(T, n * n + 2 * n, dtype=cd)
        torch.mul(g_pre, hp * (1.0 - hp), out=d_logits[:, :n])
        torch.mul(grad_h_post.to(cd), hq * (1.0 - hq / post_mult), out=d_logits[:, n : 2 * n])
        res_logits = pr[:, 2 * n :] * ri[:, None] * scale[2 * n :] + bias[2 * n :].to(cd)
        d_res = sinkhorn_backward(grad_h_res.to(cd), res_logits.reshape(T, n, n), iters, sinkhorn_eps)
        d_logits[:, 2 * n :] = d_res.reshape(T, n * n)

        d_bias = d_logits.sum(0)
        d_scale = (d_logits * pr * ri[:, None]).sum(0)
        d_alpha = torch.stack([d_scale[:n].sum(), d_scale[n : 2 * n].sum(), d_scale[2 * n :].sum()])
        d_proj = d_logits * ri[:, None] * scale
        d_rinv = (d_logits * scale * pr).sum(-1)
        x_vec = x.reshape(T, n * C)
        d_x_vec = d_proj @ phi.to(cd).T
        d_x_vec.addcmul_(x_vec, (d_rinv * ri.pow(3) / (n * C))[:, None], value=-1.0)
        d_phi = x_vec.T @ d_proj
        d_residual = d_x_vec.reshape(T, n, C).addcmul_(hp[:, :, None], g_li[:, None, :])
        return d_residual.to(residual.dtype), d_phi.to(phi.dtype), d_alpha.to(alpha.dtype), d_bias.to(bias.dtype)


ops.sinkhorn_fwd.register_kernel("cpu")(sinkhorn_fwd)
ops.sinkhorn_bwd.register_kernel("cpu")(sinkhorn_bwd)
ops.pre_mapping_fwd.register_kernel("cpu")(pre_mapping_fwd)
ops.pre_mapping_bwd.register_kernel("cpu")(pre_mapping_bwd)

__all__ = ["sinkhorn_backward", "sinkhorn_forward"]
