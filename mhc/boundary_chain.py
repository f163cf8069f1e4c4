"""Chains of ``mhc.MHC`` sites with fused boundaries: :func:`run_sites` applies sites in order with every boundary
between :func:`fusable` sites as one ``mhc::boundary_fwd`` (:func:`post_pre`, site l's ``post`` and site l+1's
``pre`` in one call of :func:`mhc.boundary_ops.boundary`). ``mhc.MHCStack`` uses it on its plain path (no recompute,
or under ``torch.no_grad``) and inside eager recompute blocks; a boundary after a site whose post runs on the
high-priority stream (an FFN site) takes ``mhc::boundary_hp_fwd``.
"""

from __future__ import annotations

from torch import Tensor

from .boundary_ops import boundary


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
