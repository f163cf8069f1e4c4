"""The CUDA kernels behind the ``mhc::`` ops: TileLang programs from :mod:`tl_kernels`, registered with
``register_kernel("cuda")`` over the reference.

Each wrapper validates (the same :mod:`mhc._checks` function as the fake), allocates every output with torch on the
current stream (so the ops stay allocation-transparent for ``torch.compile`` and CUDA graphs), skips the launch when
there are no tokens, and launches on PyTorch's current CUDA stream (TileLang's tvm-ffi adapter uses it) inside a
``torch.cuda.device`` guard for the tensors' device: TileLang's host stub calls ``cudaSetDevice`` and does not
restore it, the guard puts the caller's current device back. The kernel for a configuration is compiled on first
use, then served from TileLang's disk cache and an in-memory cache; compile and load before capturing a CUDA graph
(call the op once, or :func:`warmup`).

Fallback to the PyTorch reference, with one ``warnings.warn`` per configuration (a correct answer, never a crash):

* where the kernel cannot serve the call (:func:`mhc._checks.cuda_kernel_unsupported`: float64, ``n`` or ``C``
  outside what it was built for, 2**31 elements or more);
* for a *disabled* family: ``MHC_DISABLE_KERNELS=post_res,sinkhorn`` in the environment (read at import), or
  :func:`disable_kernels` / :func:`enable_kernels` at run time; for a kernel that misbehaves on some GPU until fixed.

Strict mode, ``MHC_STRICT_KERNELS=1`` (the GPU tests and every stage of the GPU run set it): every call that would
take one of these fallbacks, float64 included, raises a ``RuntimeError`` naming the op, the reason and the
configuration instead, so that a check on a GPU cannot pass on the reference. It is read from ``os.environ`` on
each fallback decision (a dict lookup and a cached parse, no device work: the wrappers run outside the traced
graph under ``torch.compile``, and a CUDA graph replays only the kernels captured), so a test can set it with
``monkeypatch.setenv``.

Opt-in variant: ``MHC_BOUNDARY_CLUSTERS=1`` (read at import, or :func:`boundary_clusters` / the context manager
:func:`use_boundary_clusters` at run time) makes the fused boundary backward run its thread block cluster variant
(``tl_kernels.boundary_bwd``, ``clusters=True``: fewer d_h partial bytes, predicted slower by the performance model;
docs/design.md section 7). Read by the op's CUDA wrapper on each call, outside any traced graph: a CUDA graph replays
the variant that was current when it was captured.

Nothing here runs at import beyond the registration and reading ``MHC_DISABLE_KERNELS`` and
``MHC_BOUNDARY_CLUSTERS``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
from torch import Tensor

from tl_kernels import _common as _tl_common  # standard library only: imports neither TileLang nor CUDA

from . import _checks, ops, reference

#: the kernels' activation dtypes (``tl_kernels._common.ACTIVATION_DTYPES``) by TileLang name, and the reverse map:
#: the one place a torch dtype meets a kernel's dtype name
TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in _tl_common.ACTIVATION_DTYPES}
_TL_DTYPES: dict[torch.dtype, str] = {dt: name for name, dt in TORCH_DTYPES.items()}
#: families with a CUDA kernel here (``pre_mapping`` covers tl_kernels.pre_proj, pre_finalize and pre_reduce;
#: ``boundary``, registered by mhc._boundary_cuda, is tl_kernels.boundary; ``pre_decode`` is tl_kernels.pre_decode, the
#: one-launch forward for T <= 64: disabled, those calls take pre_mapping's two-launch forward)
KERNEL_FAMILIES = ("post_res", "sinkhorn", "pre_mapping", "boundary", "pre_decode")
DISABLE_ENV = "MHC_DISABLE_KERNELS"
STRICT_ENV = "MHC_STRICT_KERNELS"
_STRICT_VALUES = {"1": True, "true": True, "yes": True, "on": True, "": False, "0": False, "false": False,
                  "no": False, "off": False}  # fmt: skip


def _parse_disabled(value: str) -> set[str]:
    names = {v.strip() for v in value.split(",") if v.strip()}
    unknown = names - set(KERNEL_FAMILIES)
    if unknown:
        warnings.warn(
            f"{DISABLE_ENV}: unknown kernel families {sorted(unknown)} ignored; expected names from {KERNEL_FAMILIES}",
            stacklevel=2,
        )
    return names & set(KERNEL_FAMILIES)


#: kernel families whose CUDA kernel is turned off (the ops run the reference on CUDA tensors instead)
DISABLED: set[str] = _parse_disabled(os.environ.get(DISABLE_ENV, ""))
_WARNED: set[tuple] = set()


def disable_kernels(*families: str) -> None:
    """Turn the CUDA kernels of ``families`` off: their ops run the PyTorch reference (warning once each)."""
    for f in families:
        if f not in KERNEL_FAMILIES:
            raise ValueError(f"disable_kernels: expected a family in {KERNEL_FAMILIES}, got {f!r}")
    DISABLED.update(families)


def enable_kernels(*families: str) -> None:
    """Undo :func:`disable_kernels` (all families when none is named)."""
    DISABLED.difference_update(families or KERNEL_FAMILIES)


CLUSTERS_ENV = "MHC_BOUNDARY_CLUSTERS"


def _parse_clusters(value: str) -> bool:
    """``MHC_BOUNDARY_CLUSTERS``: 1/true/yes/on or 0/false/no/off/empty (case-insensitive); anything else warns and
    leaves the variant off (read at import, where an error would make the package unimportable)."""
    key = value.strip().lower()
    if key not in _STRICT_VALUES:
        warnings.warn(f"{CLUSTERS_ENV}={value!r} ignored (off); expected one of {sorted(_STRICT_VALUES)}", stacklevel=2)
        return False
    return _STRICT_VALUES[key]


#: whether the fused boundary backward runs its thread block cluster variant (off by default; see the docstring)
BOUNDARY_CLUSTERS: bool = _parse_clusters(os.environ.get(CLUSTERS_ENV, ""))


def boundary_clusters(on: bool) -> bool:
    """Turn the fused boundary backward's thread block cluster variant on or off (``MHC_BOUNDARY_CLUSTERS`` at run
    time); returns the previous setting. Takes effect at the next call of the op (a captured CUDA graph keeps the
    variant it captured)."""
    global BOUNDARY_CLUSTERS
    if not isinstance(on, bool):
        raise TypeError(f"boundary_clusters: expected a bool, got {type(on).__name__}")
    previous, BOUNDARY_CLUSTERS = BOUNDARY_CLUSTERS, on
    return previous


@contextlib.contextmanager
def use_boundary_clusters(on: bool = True):
    """:func:`boundary_clusters` for the ``with`` block only (benchmarks: the two variants side by side)."""
    previous = boundary_clusters(on)
    try:
        yield
    finally:
        boundary_clusters(previous)


def fallback_reason(family: str, **shape) -> str | None:
    """Why ``family``'s CUDA kernel is not used for this call (``None``: it is); see the module docstring."""
    if family in DISABLED:
        return f"the {family} kernels are disabled ({DISABLE_ENV} or mhc._cuda.disable_kernels)"
    return _checks.cuda_kernel_unsupported(family, **shape)


@functools.lru_cache(maxsize=16)
def _parse_strict(value: str) -> bool:
    """``MHC_STRICT_KERNELS``: 1/true/yes/on or 0/false/no/off/empty (case-insensitive); anything else is an error
    (a typo must not silently turn the check off). Cached per value."""
    key = value.strip().lower()
    if key not in _STRICT_VALUES:
        raise ValueError(f"{STRICT_ENV}: expected one of 1, true, yes, on, 0, false, no, off or empty, got {value!r}")
    return _STRICT_VALUES[key]


def strict_kernels() -> bool:
    """Whether ``MHC_STRICT_KERNELS`` is on now (read at call time; see the module docstring)."""
    return _parse_strict(os.environ.get(STRICT_ENV, ""))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _warn_fallback(op: str, reason: str, config: str, quiet: bool = False) -> None:
    """Record that ``op`` runs the reference for ``config`` because of ``reason``: raises in strict mode, else warns
    once per (op, reason, config) unless ``quiet`` (float64, a documented reference path)."""
    if strict_kernels():
        raise RuntimeError(
            f"{op}: no CUDA kernel serves this call ({reason}; configuration {config}) and {STRICT_ENV} is set, "
            "so the PyTorch reference fallback is refused"
        )
    if quiet:
        return
    key = (op, reason, config)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"{op}: running the PyTorch reference on CUDA: {reason}", stacklevel=3)


def _reference(fn, *args):
    """The PyTorch reference on CUDA tensors, with autocast off: the ops keep the dtypes they are given (autocast
    would otherwise run the reference's ``x @ phi`` projection in bf16)."""
    with torch.autocast("cuda", enabled=False):
        return fn(*args)


def _launch(device: torch.device, kernel, *args) -> None:
    """Launch under a device guard that restores the caller's current device (TileLang's stub changes it)."""
    with torch.cuda.device(device):
        kernel(*args)


# ---------------------------------------------------------------------------------------------------- Sinkhorn


def _sinkhorn_reason(logits: Tensor) -> str | None:
    n = logits.shape[-1]
    return fallback_reason("sinkhorn", n=n, numel=logits.numel(), dtypes=(logits.dtype,))


def sinkhorn_fwd(logits: Tensor, iters: int, eps: float) -> Tensor:
    op = "mhc::sinkhorn_fwd"
    _checks.sinkhorn(logits, iters, eps, op)
    reason = _sinkhorn_reason(logits)
    if reason:
        config = f"n={logits.shape[-1]}, iters={iters}, eps={eps}, dtype={_name(logits.dtype)}"
        _warn_fallback(op, reason, config, quiet=logits.dtype == torch.float64)
        return _reference(reference.sinkhorn, logits, iters, eps)
    out = torch.empty_like(logits)
    if logits.shape[0] > 0:
        from tl_kernels.sinkhorn import sinkhorn_fwd_kernel

        _launch(logits.device, sinkhorn_fwd_kernel(logits.shape[-1], iters, float(eps)), logits, out)
    return out


def sinkhorn_bwd(grad_out: Tensor, logits: Tensor, iters: int, eps: float) -> Tensor:
    op = "mhc::sinkhorn_bwd"
    _checks.sinkhorn_bwd(grad_out, logits, iters, eps, op)
    reason = _sinkhorn_reason(logits)
    if reason:
        config = f"n={logits.shape[-1]}, iters={iters}, eps={eps}, dtype={_name(logits.dtype)}"
        _warn_fallback(op, reason, config, quiet=logits.dtype == torch.float64)
        return _reference(reference.sinkhorn_backward, grad_out, logits, iters, eps)
    grad_logits = torch.empty_like(logits)
    if logits.shape[0] > 0:
        from tl_kernels.sinkhorn import sinkhorn_bwd_kernel

        kernel = sinkhorn_bwd_kernel(logits.shape[-1], iters, float(eps))
        _launch(logits.device, kernel, grad_out, logits, grad_logits)
    return grad_logits


# ---------------------------------------------------------------------------------------------------- post/res


def _post_res_reason(residual: Tensor, h_post: Tensor, h_res: Tensor) -> str | None:
    _, n, C = residual.shape
    dtypes = (residual.dtype, h_post.dtype, h_res.dtype)
    return fallback_reason("post_res", n=n, C=C, numel=residual.numel(), dtypes=dtypes)


def _quiet_float64(op: str, reason: str, residual: Tensor, h_res: Tensor) -> None:
    """float64 is a documented reference path (testing): no warning for it (strict mode still refuses it)."""
    _, n, C = residual.shape
    config = f"n={n}, C={C}, dtypes=({_name(residual.dtype)}, {_name(h_res.dtype)})"
    _warn_fallback(op, reason, config, quiet=torch.float64 in (residual.dtype, h_res.dtype))


def post_res_fwd(layer_output: Tensor, residual: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    op = "mhc::post_res_fwd"
    _checks.post_res(layer_output, residual, h_post, h_res, op)
    reason = _post_res_reason(residual, h_post, h_res)
    if reason:
        _quiet_float64(op, reason, residual, h_res)
        return _reference(reference.post_res, layer_output, residual, h_post, h_res)
    out = torch.empty_like(residual)
    T, n, C = residual.shape
    if T > 0:
        from tl_kernels.post_res import post_res_fwd_kernel
        from tl_kernels.pre_decode import MAX_TOKENS

        # decode sizes take the variant with programmatic dependent launch (a static shape: the same choice eagerly,
        # under torch.compile and in a captured graph; docs/design.md section 8)
        kernel = post_res_fwd_kernel(n, C, _TL_DTYPES[residual.dtype], T <= MAX_TOKENS)
        _launch(residual.device, kernel, layer_output, residual, h_post, h_res, out)
    return out


def post_res_bwd(
    grad_out: Tensor, layer_output: Tensor, residual: Tensor, h_post: Tensor, h_res: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    op = "mhc::post_res_bwd"
    _checks.post_res_bwd(grad_out, layer_output, residual, h_post, h_res, op)
    reason = _post_res_reason(residual, h_post, h_res)
    if reason:
        _quiet_float64(op, reason, residual, h_res)
        return _reference(reference.post_res_backward, grad_out, layer_output, residual, h_post, h_res)
    d_layer_output = torch.empty_like(layer_output)
    d_residual = torch.empty_like(residual)
    d_h_post = torch.empty_like(h_post)
    d_h_res = torch.empty_like(h_res)
    T, n, C = residual.shape
    if T > 0:
        from tl_kernels.post_res import post_res_bwd_kernel

        kernel = post_res_bwd_kernel(n, C, _TL_DTYPES[residual.dtype])
        outs = (d_layer_output, d_residual, d_h_post, d_h_res)
        _launch(residual.device, kernel, grad_out, layer_output, residual, h_post, h_res, *outs)
    return d_layer_output, d_residual, d_h_post, d_h_res


# ---------------------------------------------------------------------------------------------------- pre-mapping

# The fused pre-mapping runs four TileLang kernels (tl_kernels/pre_proj.py, tl_kernels/pre_finalize.py) and, in the
# backward, the Sinkhorn backward kernel of tl_kernels/sinkhorn.py:
#   fwd: pre_proj_fwd (x @ phi and sum x^2, split-K partials) -> pre_finalize_fwd (coefficients, Sinkhorn, H_pre x)
#   bwd: pre_finalize_bwd (<g_li, x_i>, d logits of pre/post, res logits) -> sinkhorn_bwd -> pre_proj_bwd (d_x, d_phi
#        partials, per-token-tile d_bias / d_scale partials; the pre/post and res logit gradients as separate
#        inputs) -> pre_reduce_bwd (d_phi over the splits when there are several, d_bias and d_alpha over the tiles,
#        fixed orders). Four launches, no torch op between them.


def _num_sms(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pre_mapping_reason(residual: Tensor, phi: Tensor, iters: int) -> str | None:
    _, n, C = residual.shape
    dtypes = (residual.dtype, phi.dtype)
    reason = fallback_reason("pre_mapping", n=n, C=C, numel=residual.numel(), dtypes=dtypes)
    if reason is None:
        from tl_kernels import sinkhorn

        try:
            sinkhorn._bwd_plan(n, iters, 0.0)  # the Sinkhorn backward's shared-memory budget limits iters
        except ValueError as exc:
            reason = str(exc)
    return reason


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
    op = "mhc::pre_mapping_fwd"
    _checks.pre_mapping(residual, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps, op)
    reason = _pre_mapping_reason(residual, phi, iters)
    if reason:
        _quiet_float64(op, reason, residual, phi)
        return _reference(reference.pre_mapping, residual, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps)
    T, n, C = residual.shape
    m = n * n + 2 * n
    f32 = dict(device=residual.device, dtype=torch.float32)
    layer_input = residual.new_empty((T, C))
    h_post, h_pre = torch.empty(T, n, **f32), torch.empty(T, n, **f32)
    h_res = torch.empty(T, n, n, **f32)
    proj, rinv = torch.empty(T, m, **f32), torch.empty(T, **f32)
    outs = (layer_input, h_post, h_res, h_pre, proj, rinv)
    one_launch = T <= _DECODE_ONE_LAUNCH_TOKENS
    if T > 0 and not (one_launch and _pre_decode_fwd(residual, phi, alpha, bias, iters, post_mult, rms_eps,
                                                     sinkhorn_eps, outs)):  # fmt: skip
        _pre_mapping_fwd_two_launches(residual, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps, outs)
    return layer_input, h_post, h_res, h_pre, proj, rinv


# Which pre-mapping serves a lone site at 1 <= T <= 64, by the performance model (docs/design.md section 8; n = 4,
# bf16, H100, graph + PDL latency of the site, estimates): the one-launch decode kernel against pre_proj +
# pre_finalize is 14.7 / 21.3 us at T = 1, 20.3 / 21.3 at T = 8, 21.4 / 21.3 at T = 16, 25.2 / 21.3 at T = 32 and
# 33.3 / 21.3 at T = 64 (C = 7168; C = 2560: 14.3 / 18.7, 16.7 / 18.7, 16.7 / 18.7, 17.8 / 18.7, 20.5 / 18.7): one
# block a token group applies H_pre to its 8 tokens, which costs more with every group. So the decode kernel serves
# T <= 16; an MHCStack interior site (boundary_fwd + pre_finalize_fwd) never takes it.
_DECODE_ONE_LAUNCH_TOKENS = 16

# The decode forward (tl_kernels/pre_decode.py): one launch for 1 <= T <= pre_decode.MAX_TOKENS. Its blocks find the
# last one of each token group with a self-resetting ticket counter: zero before a launch, zero again after it. The
# counters live in one zeroed int32 buffer per device, [_DECODE_SLOTS, MAX_GROUPS], made by the first eager call on
# that device (or mhc.warmup); each stream gets its own row the first time it launches the kernel (host bookkeeping
# only, so also under capture; rows are reused round-robin past _DECODE_SLOTS streams), so launches on different
# streams do not share counters, and a CUDA graph bakes in the row of its capture stream. Launches in one stream are
# ordered, so one row serves any number of them and of graph replays. A call under graph capture before the buffer
# exists takes the two-launch path (no allocation or fill is captured). Not served: two graphs captured on one
# stream and replayed concurrently on two streams (they share a row).
_DECODE_SLOTS = 64
_DECODE_TICKETS: dict[int, Tensor] = {}
_DECODE_ROWS: dict[int, dict[int, int]] = {}  # device index -> {stream id: row}


def _decode_tickets(device: torch.device) -> Tensor | None:
    """This launch's row of ticket counters (``None``: not available, take the two-launch path)."""
    from tl_kernels import pre_decode

    if device.type != "cuda":  # fake tensors of the performance model's capture (profiling/model/capture.py)
        return torch.empty(pre_decode.MAX_GROUPS, dtype=torch.int32, device=device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    table = _DECODE_TICKETS.get(index)
    if table is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        with torch.cuda.device(index):
            table = torch.zeros(_DECODE_SLOTS, pre_decode.MAX_GROUPS, dtype=torch.int32, device=device)
        _DECODE_TICKETS[index] = table
    rows = _DECODE_ROWS.setdefault(index, {})
    row = rows.setdefault(torch.cuda.current_stream(index).stream_id, len(rows) % _DECODE_SLOTS)
    return table[row]


def _pre_decode_fwd(residual, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps, outs) -> bool:
    """The one-launch decode forward into ``outs``; False when it does not serve the call (T too large, the family
    disabled, no ticket buffer under capture)."""
    from tl_kernels import pre_decode

    T, n, C = residual.shape
    if T > pre_decode.MAX_TOKENS or "pre_decode" in DISABLED:
        return False
    tickets = _decode_tickets(residual.device)
    if tickets is None:
        return False
    m = n * n + 2 * n
    splits = pre_decode.choose_splits(T, n, C, _num_sms(residual.device))
    f32 = dict(device=residual.device, dtype=torch.float32)
    proj_part, sq_part = torch.empty(splits, T, m, **f32), torch.empty(splits, T, **f32)
    kernel = pre_decode.pre_decode_fwd_kernel(n, C, _TL_DTYPES[residual.dtype], iters, float(sinkhorn_eps))
    _launch(
        residual.device, kernel, residual.view(T, n * C), phi, alpha, bias, *outs, proj_part, sq_part, tickets,
        float(rms_eps), float(post_mult),
    )  # fmt: skip
    return True


def _pre_mapping_fwd_two_launches(residual, phi, alpha, bias, iters, post_mult, rms_eps, sinkhorn_eps, outs) -> None:
    """pre_proj_fwd then pre_finalize_fwd into ``outs`` (T >= 1)."""
    from tl_kernels import pre_finalize, pre_proj

    layer_input, h_post, h_res, h_pre, proj, rinv = outs
    T, n, C = residual.shape
    m = n * n + 2 * n
    f32 = dict(device=residual.device, dtype=torch.float32)
    dt = _TL_DTYPES[residual.dtype]
    sms = _num_sms(residual.device)
    splits = pre_proj.choose_splits(T, n, C, sms, "fwd")
    proj_part = torch.empty(splits, T, m, **f32)
    sq_part = torch.empty(splits, T, **f32)
    dev = residual.device
    _launch(dev, pre_proj.pre_proj_fwd_kernel(n, C, dt), residual.view(T, n * C), phi, proj_part, sq_part)
    slices = pre_finalize.choose_slices(T, C, dt, sms)
    _launch(
        dev, pre_finalize.pre_finalize_fwd_kernel(n, C, dt, iters, float(sinkhorn_eps)),
        proj_part, sq_part, alpha, bias, residual, layer_input, h_post, h_res, h_pre, proj, rinv,
        float(rms_eps), float(post_mult), slices,
    )  # fmt: skip


def pre_mapping_bwd(*args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The schema: :func:`mhc.ops.pre_mapping_bwd`."""
    (grad_layer_input, grad_h_post, grad_h_res, grad_h_pre, residual, phi, alpha, bias,
     h_pre, h_post, proj, rinv, iters, post_mult, sinkhorn_eps) = args  # fmt: skip
    op = "mhc::pre_mapping_bwd"
    ops._check_pre_mapping_bwd(*args)
    reason = _pre_mapping_reason(residual, phi, iters)
    if reason:
        _quiet_float64(op, reason, residual, phi)
        return _reference(reference.pre_mapping_backward, *args)
    T, n, C = residual.shape
    m, K = n * n + 2 * n, n * C
    f32 = dict(device=residual.device, dtype=torch.float32)
    d_residual = torch.empty_like(residual)
    if T == 0:
        return d_residual, torch.zeros(K, m, **f32), torch.zeros(3, **f32), torch.zeros(m, **f32)
    from tl_kernels import pre_finalize, pre_proj, pre_reduce, sinkhorn

    dt, dev = _TL_DTYPES[residual.dtype], residual.device
    d_pp = torch.empty(T, 2 * n, **f32)
    res_logits = torch.empty(T, n, n, **f32)
    _launch(
        dev, pre_finalize.pre_finalize_bwd_kernel(n, C, dt),
        grad_layer_input, residual, grad_h_pre, grad_h_post, h_pre, h_post, proj, rinv, alpha, bias,
        d_pp, res_logits, float(post_mult),
    )  # fmt: skip
    d_res = torch.empty(T, n, n, **f32)
    _launch(dev, sinkhorn.sinkhorn_bwd_kernel(n, iters, float(sinkhorn_eps)), grad_h_res, res_logits, d_res)
    splits = pre_proj.choose_splits(T, n, C, _num_sms(dev), "bwd")
    d_phi = torch.empty(K, m, **f32)
    # One split (C = 7168 at T = 16384, n = 4): the kernel's partial is d_phi itself, no reduction launch.
    d_phi_part = d_phi.view(1, K, m) if splits == 1 else torch.empty(splits, K, m, **f32)
    d_coef_part = torch.empty(-(-T // pre_proj.BM), 2 * m, **f32)  # per token tile: d_bias | d_scale partials
    _launch(
        dev, pre_proj.pre_proj_bwd_kernel(n, C, dt, False),
        residual.view(T, K), phi, d_pp, d_res.view(T, n * n), proj, rinv, alpha, h_pre, grad_layer_input,
        d_residual.view(T, K), d_phi_part, d_coef_part,
    )  # fmt: skip
    # The last launch: d_phi over the splits (with more than one), d_bias and d_alpha over the tiles, fixed orders.
    d_alpha, d_bias = torch.empty(3, **f32), torch.empty(m, **f32)
    coef = d_coef_part
    if splits > 1:
        kq = K * m // pre_reduce.VEC
        _launch(
            dev, pre_reduce.pre_reduce_bwd_kernel(n, True), d_phi_part.view(splits, kq, pre_reduce.VEC), coef,
            d_phi.view(kq, pre_reduce.VEC), d_alpha, d_bias,
        )  # fmt: skip
    else:
        _launch(dev, pre_reduce.pre_reduce_bwd_kernel(n, False), coef, d_alpha, d_bias)
    return d_residual, d_phi, d_alpha, d_bias


def warmup(
    *,
    hidden_sizes=(),
    streams=(4,),
    dtypes=(torch.bfloat16,),
    sinkhorn_iters: int = 20,
    sinkhorn_eps: float = 0.0,
    device=None,
) -> int:
    """Make every kernel these settings will use ready to launch, before CUDA-graph capture.

    Compiles (or loads from TileLang's disk cache) each kernel; then, when CUDA is available, launches each once on
    a one-token input on ``device`` (default: the current CUDA device) and synchronises, so the module is loaded
    and a graph can be captured right after this call. Without CUDA it only compiles (for the pinned target).
    Kernels that would not be used (a shape outside a kernel's limits, a disabled family) are skipped.
    Returns the number of kernels made ready.
    """
    from tl_kernels import post_res, pre_finalize, pre_proj, pre_reduce, sinkhorn

    launch = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if launch and device is None else device
    count = 0
    reducers: set[int] = set()
    for n in streams:
        if fallback_reason("sinkhorn", n=n) is None:
            sinkhorn.sinkhorn_fwd_kernel(n, sinkhorn_iters, float(sinkhorn_eps))
            sinkhorn.sinkhorn_bwd_kernel(n, sinkhorn_iters, float(sinkhorn_eps))
            count += 2
            if launch:
                L = torch.zeros(1, n, n, device=dev)
                sinkhorn_fwd(L, sinkhorn_iters, float(sinkhorn_eps))
                sinkhorn_bwd(torch.ones_like(L), L, sinkhorn_iters, float(sinkhorn_eps))
        for C in hidden_sizes:
            for dt in dtypes:
                if fallback_reason("post_res", n=n, C=C, dtypes=(dt,)) is not None:
                    continue
                post_res.post_res_fwd_kernel(n, C, _TL_DTYPES[dt])
                post_res.post_res_fwd_kernel(n, C, _TL_DTYPES[dt], True)  # the decode variant (T <= 64)
                post_res.post_res_bwd_kernel(n, C, _TL_DTYPES[dt])
                count += 3
                if launch:
                    from tl_kernels.pre_decode import MAX_TOKENS

                    for tokens in (MAX_TOKENS + 1, 1):  # both variants; the one-token tensors serve below
                        y = torch.zeros(tokens, C, device=dev, dtype=dt)
                        x = torch.zeros(tokens, n, C, device=dev, dtype=dt)
                        h_post, h_res = torch.zeros(tokens, n, device=dev), torch.zeros(tokens, n, n, device=dev)
                        post_res_fwd(y, x, h_post, h_res)
                    post_res_bwd(x, y, x, h_post, h_res)
                if fallback_reason("pre_mapping", n=n, C=C, dtypes=(dt,)) is not None:
                    continue
                pre_proj.pre_proj_fwd_kernel(n, C, _TL_DTYPES[dt])
                pre_proj.pre_proj_bwd_kernel(n, C, _TL_DTYPES[dt], False)
                pre_finalize.pre_finalize_fwd_kernel(n, C, _TL_DTYPES[dt], sinkhorn_iters, float(sinkhorn_eps))
                pre_finalize.pre_finalize_bwd_kernel(n, C, _TL_DTYPES[dt])
                count += 4
                if "pre_decode" not in DISABLED:
                    from tl_kernels.pre_decode import pre_decode_fwd_kernel

                    pre_decode_fwd_kernel(n, C, _TL_DTYPES[dt], sinkhorn_iters, float(sinkhorn_eps))
                    count += 1
                if n not in reducers:  # one pair of binaries per n (one split or several: either may serve)
                    reducers.add(n)
                    pre_reduce.pre_reduce_bwd_kernel(n, True)
                    pre_reduce.pre_reduce_bwd_kernel(n, False)
                    count += 2
                    if launch:  # the one-token backward below takes the one-split variant: load the other here
                        m = n * n + 2 * n
                        f32 = dict(device=dev, dtype=torch.float32)
                        _launch(
                            dev, pre_reduce.pre_reduce_bwd_kernel(n, True), torch.zeros(2, 1, pre_reduce.VEC, **f32),
                            torch.zeros(1, 2 * m, **f32), torch.empty(1, pre_reduce.VEC, **f32),
                            torch.empty(3, **f32), torch.empty(m, **f32),
                        )  # fmt: skip
                if launch:
                    m = n * n + 2 * n
                    phi, alpha, bias = (
                        torch.zeros(n * C, m, device=dev),
                        torch.ones(3, device=dev),
                        torch.zeros(m, device=dev),
                    )
                    out = pre_mapping_fwd(x, phi, alpha, bias, sinkhorn_iters, 2.0, 1e-6, float(sinkhorn_eps))
                    # A one-token call takes the decode kernel (and makes its ticket buffer): load the two-launch
                    # forward that T > 64 takes as well.
                    settings = (sinkhorn_iters, 2.0, 1e-6, float(sinkhorn_eps))
                    _pre_mapping_fwd_two_launches(x, phi, alpha, bias, *settings, tuple(o.clone() for o in out))
                    grads = (y, h_post, h_res, h_post)
                    pre_mapping_bwd(*grads, x, phi, alpha, bias, out[3], out[1], out[4], out[5], sinkhorn_iters, 2.0,
                                    float(sinkhorn_eps))  # fmt: skip
                if "boundary" not in DISABLED:  # the fused boundary kernels (mhc/_boundary_cuda.py)
                    from tl_kernels import boundary as tl_boundary
                    from tl_kernels import boundary_bwd as tl_boundary_bwd

                    tl_boundary.boundary_fwd_kernel(n, C, _TL_DTYPES[dt])
                    # the op's backward (fully fused), the thread block cluster variant when that is on
                    tl_boundary_bwd.boundary_bwd_fused_kernel(n, C, _TL_DTYPES[dt], BOUNDARY_CLUSTERS)
                    tl_boundary_bwd.boundary_reduce_bwd_kernel(n)
                    pre_finalize.pre_finalize_bwd_kernel(n, C, _TL_DTYPES[dt], False)  # grad_h_pre' None (unused)
                    count += 4
                    if launch:
                        settings = (sinkhorn_iters, 2.0, 1e-6, float(sinkhorn_eps))
                        b = torch.ops.mhc.boundary_fwd(y, x, h_post, h_res, phi, alpha, bias, *settings)
                        torch.ops.mhc.boundary_bwd(
                            x, y, h_post, h_res, h_post, y, x, h_post, h_res, b[0], phi, alpha, bias, b[4], b[2],
                            b[5], b[6], sinkhorn_iters, 2.0, float(sinkhorn_eps),
                        )  # fmt: skip
    if launch:
        torch.cuda.synchronize(dev)
    return count


ops.sinkhorn_fwd.register_kernel("cuda")(sinkhorn_fwd)
ops.sinkhorn_bwd.register_kernel("cuda")(sinkhorn_bwd)
ops.post_res_fwd.register_kernel("cuda")(post_res_fwd)
ops.post_res_bwd.register_kernel("cuda")(post_res_bwd)
ops.pre_mapping_fwd.register_kernel("cuda")(pre_mapping_fwd)
ops.pre_mapping_bwd.register_kernel("cuda")(pre_mapping_bwd)
