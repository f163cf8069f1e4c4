"""What a site launches, found by running the package's own code on fake tensors (no GPU, no memory, no kernel).

Two levels, so that nothing is copied from ``mhc/``:

1. :func:`site_ops`: one :class:`mhc.MHC` site (identity sublayer) inside :class:`mhc.MHCStack` with its default
   ``recompute_block``, forward and backward, under ``FakeTensorMode`` with a dispatch-level log. It yields the ops
   in order: ``mhc::*`` custom ops (opaque at this level) and the aten ops autograd and the layer run between them
   (gradient sums, zero fills, casts). Views, allocations and metadata ops launch nothing and are dropped.
2. :func:`expand`: each ``mhc::*`` op is replayed through its CUDA implementation in :mod:`mhc._cuda` on the same
   fake tensors, with ``_cuda._launch`` replaced by a recorder and ``_cuda._num_sms`` by the modelled GPU's SM
   count. That yields the TileLang kernels with their arguments (so the dynamic sizes ``num_tokens``,
   ``num_splits``, ``num_slices`` come from the tensors ``_cuda`` allocates, via the same ``choose_splits`` /
   ``choose_slices`` calls) and the torch glue between them (``torch.cat``, the reductions of ``d_phi``, ...).

Each glued aten op counts as one launch moving its input and output tensors once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Glue", "Launch", "expand", "op_launches", "site_ops"]

_NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "detach", "alias", "expand", "slice", "select", "t", "transpose", "permute",
    "unsqueeze", "squeeze", "as_strided", "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided",
    "unbind", "split", "split_with_sizes", "lift_fresh", "_to_copy_noop", "is_same_size", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "size", "stride", "device", "dim",
}  # fmt: skip


@dataclass
class Glue:
    """A torch op that launches a kernel of its own."""

    name: str
    bytes: int


@dataclass
class Launch:
    """A TileLang kernel launch recorded from :mod:`mhc._cuda`."""

    kernel: Any  # the JITKernel
    args: tuple
    label: str = ""
    options: dict = field(default_factory=dict)  # keyword arguments of the _launch call


@dataclass
class Op:
    name: str  # "mhc::post_res_fwd" or an aten op name
    args: tuple
    kwargs: dict
    nbytes: int = 0
    phase: str = "fwd"  # "fwd", "bwd", or "recompute" (the block recompute's replay inside the backward)
    mode: Any = None  # the FakeTensorMode the op's tensors belong to
    unit: int | None = None  # chains: the unit the op belongs to (chain_ops)


def _tensor_bytes(values) -> int:
    total = 0
    for v in values:
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, (list, tuple)):
            total += _tensor_bytes(v)
    return total


def _short(func) -> str:
    return str(func.overloadpacket).split(".")[-1] if hasattr(func, "overloadpacket") else str(func)


class _Log(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[Op] = []
        self.phase = "fwd"
        self.unit = -1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ns = getattr(func, "namespace", "")
        name = f"{ns}::{_short(func)}"
        if ns == "prim" or _short(func) in _NO_LAUNCH:
            return out
        nbytes = _tensor_bytes(args) + _tensor_bytes([out])
        self.ops.append(Op(name, args, kwargs, nbytes, self.phase, unit=self.unit))
        return out


def site_ops(n: int, C: int, dtype: torch.dtype, T: int) -> list[Op]:
    """The ops of a stack of ONE residual site (identity sublayer), forward then backward, as :class:`mhc.MHCStack`
    runs it by default: ``Op.phase`` is ``fwd``, ``bwd``, or ``recompute`` for the block recompute's replay of the
    forward ops (Eq. 20), which runs inside the backward (see the module docstring). No boundary is fused: there is
    no next site. The ``"single"`` site records."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import mhc

    with FakeTensorMode() as mode:
        site = mhc.MHC(torch.nn.Identity(), C, n_streams=n, kind="attn", layer_index=0)
        stack = mhc.MHCStack([site])
        x = torch.empty(T, n, C, dtype=dtype).requires_grad_(True)
        grad = torch.empty(T, n, C, dtype=dtype)
        log = _Log()
        with log:
            y = stack(x)
            log.phase = "bwd"
            torch.autograd.backward(y, grad)
    for op in log.ops:
        op.mode = mode
        if op.phase == "bwd" and _is_forward_op(op):
            op.phase = "recompute"
    return log.ops


# ---------------------------------------------------------------------------------------------------- chains

#: Sites of the captured chain: ``MHCStack``'s default ``recompute_block`` (Eq. 20, ``optimal_block``) is 3 for
#: 12 sites at n = 4, so the second block (sites 3, 4, 5) has an interior site (4) fused on both sides.
CHAIN_SITES = 12


def _is_forward_op(op: Op) -> bool:
    return op.name.startswith("mhc::") and op.name.split("::")[-1].split(".")[0].endswith("_fwd")


class _MarkFn(torch.autograd.Function):
    """Identity that tells the log which site's sublayer ran: forward ``unit = k`` (what follows, site k's post
    and site k+1's pre, is unit k), backward ``unit = k - 1`` (autograd reaches site k's sublayer after unit k's
    backward and before unit k - 1's)."""

    @staticmethod
    def forward(ctx, x, k, log):
        ctx.k, ctx.log = k, log
        log.unit = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.log.unit = ctx.k - 1
        return grad, None, None


class _Mark(torch.nn.Module):
    """The identity sublayer of chain site ``k`` (launches nothing; marks the log)."""

    def __init__(self, k: int, log: _Log):
        super().__init__()
        self.k, self.log = k, log

    def forward(self, x):
        return _MarkFn.apply(x, self.k, self.log)


@dataclass
class Chain:
    """The ops of a captured chain: every op has ``phase`` (``fwd``, ``bwd``, ``recompute``) and ``unit`` (see
    :func:`chain_ops`); ``site`` is the interior site the records use, ``blocks`` the recompute blocks (site
    indices)."""

    ops: list[Op]
    site: int | None  # None: no site is fused on both sides (recompute blocks shorter than 3 sites)
    blocks: list[list[int]]
    recompute_block: int

    def unit_ops(self, unit: int | None = None) -> list[Op]:
        if unit is None and self.site is None:
            raise ValueError(f"no interior site: recompute blocks of {self.recompute_block} sites (need >= 3)")
        unit = self.site if unit is None else unit
        return [op for op in self.ops if op.unit == unit]


def chain_ops(n: int, C: int, dtype: torch.dtype, T: int, sites: int = CHAIN_SITES) -> Chain:
    """The ops of a stack of ``sites`` :class:`mhc.MHC` sites (identity sublayers, attention and FFN alternating)
    in :class:`mhc.MHCStack` with its default ``recompute_block``, forward and backward on fake tensors, each op
    attributed to a *unit*: unit ``k`` is everything between site k's sublayer and site k+1's, i.e. site k's
    F_post,res and site k+1's pre-mapping, one ``mhc::boundary_*`` op where the two are fused. In a long chain
    each site costs exactly one unit, so the unit of an interior site is the steady-state cost of a site. Unit -1 is
    the first site's pre-mapping (before any sublayer).

    Attribution: the sublayers mark the log (:class:`_MarkFn`) in forward and backward; the block recompute's
    replay (mhc forward ops that run inside the backward, ``phase = "recompute"``) is attributed by the site
    parameters it reads (``phi`` of site k+1 for unit k), and the replay's last ``post_res_fwd`` to the block's last
    site."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import mhc

    log = _Log()
    with FakeTensorMode() as mode:
        layers = [
            mhc.MHC(_Mark(k, log), C, n_streams=n, kind=("attn", "ffn")[k % 2], layer_index=k) for k in range(sites)
        ]
        stack = mhc.MHCStack(layers)
        x = torch.empty(T, n, C, dtype=dtype).requires_grad_(True)
        grad = torch.empty(T, n, C, dtype=dtype)
        with log:
            y = stack(x)
            log.phase = "bwd"
            log.unit = sites - 1
            torch.autograd.backward(y, grad)
    phis = {id(layer.phi): k for k, layer in enumerate(layers)}
    blocks = [[layers.index(s) for s in block] for block in stack.blocks()]
    last_of_block = {b[0]: b[-1] for b in blocks}
    replay_unit = None
    for op in log.ops:
        op.mode = mode
        if op.phase == "bwd" and _is_forward_op(op):
            op.phase = "recompute"
            k = next((phis[id(a)] for a in op.args if id(a) in phis), None)
            if k is not None:
                op.unit = k - 1
                replay_unit = last_of_block.get(k, replay_unit)
            else:  # post_res_fwd: the block's last site
                op.unit = replay_unit
    r = stack.recompute_block or sites
    # an interior site of the second block (of the first when there is one block); None when blocks are too short
    interior = (r + 1 if sites >= 2 * r else 1) if r >= 3 else None
    return Chain(log.ops, site=interior, blocks=blocks, recompute_block=r)


@contextlib.contextmanager
def _recording(num_sms: int, events: list):
    from mhc import _cuda

    saved = (_cuda._launch, _cuda._num_sms)

    def record(device, kernel, *args, **options):  # options: launch options a caller may add (e.g. PDL)
        events.append(Launch(kernel, args, options=options))

    _cuda._launch = record
    _cuda._num_sms = lambda device: num_sms
    try:
        yield events
    finally:
        _cuda._launch, _cuda._num_sms = saved


def cuda_impl(name: str):
    """The CUDA implementation of ``mhc::name``: ``mhc._cuda.<name>``, else ``mhc.boundary._<name>_cuda`` (the
    boundary ops keep theirs beside the op)."""
    from mhc import _cuda, boundary

    fn = getattr(_cuda, name, None) or getattr(boundary, f"_{name}_cuda", None)
    if fn is None:
        raise ValueError(f"mhc::{name}: no CUDA implementation to replay (mhc._cuda.{name}, mhc.boundary._{name}_cuda)")
    return fn


class _Expand(TorchDispatchMode):
    """Logs the torch glue of a CUDA implementation in order with its launches, and replays nested ``mhc::*`` ops
    (``mhc::pre_mapping_bwd`` inside ``mhc::boundary_bwd``) through their own CUDA implementations."""

    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns, short = getattr(func, "namespace", ""), _short(func)
        if ns == "mhc":
            with self:
                return cuda_impl(short)(*args, **kwargs)
        out = func(*args, **kwargs)
        if ns == "aten" and short not in _NO_LAUNCH:
            nbytes = _tensor_bytes(args) + _tensor_bytes([out])
            if nbytes:
                self.events.append(Glue(f"aten::{short}", nbytes))
        return out


def expand(op: Op, num_sms: int) -> list[Launch | Glue]:
    """The TileLang launches and the torch glue ops of one ``mhc::*`` op, in the order they run, through its CUDA
    implementation (:func:`cuda_impl`; nested ``mhc::*`` ops expanded alike)."""
    fn = cuda_impl(op.name.split("::")[-1].split(".")[0])
    events: list[Launch | Glue] = []
    with op.mode, _recording(num_sms, events), _Expand(events):
        fn(*op.args, **op.kwargs)
    return events


def launches_of(ops: list[Op], num_sms: int) -> list[Launch | Glue]:
    """The launches of a list of ops: each ``mhc::*`` op expanded, each aten op one glue launch."""
    out: list[Launch | Glue] = []
    for o in ops:
        if o.name.startswith("mhc::"):
            out += expand(o, num_sms)
        elif o.nbytes:
            out.append(Glue(o.name, o.nbytes))
    return out


def op_launches(op_name: str, n: int, C: int, dtype: torch.dtype, T: int, num_sms: int, phase: str):
    """Launches of one op (``post_res``, ``pre_mapping``, ``sinkhorn``; ``phase`` ``fwd`` or ``bwd``) as a site
    runs it: the op's call is taken from :func:`site_ops` (for the Sinkhorn, a direct ``mhc.sinkhorn`` call on the
    site's ``n x n`` logits), so its arguments are the ones the layer passes."""
    if op_name == "sinkhorn":
        return _sinkhorn_launches(n, T, num_sms, phase)
    wanted = f"mhc::{op_name}_{phase}"
    for op in site_ops(n, C, dtype, T):
        if op.name == wanted:
            return expand(op, num_sms)
    raise ValueError(f"{wanted} does not run in a site")


def _sinkhorn_launches(n: int, T: int, num_sms: int, phase: str):
    from torch._subclasses.fake_tensor import FakeTensorMode

    import mhc
    from tl_kernels import registry

    with FakeTensorMode() as mode:
        logits = torch.empty(T, n, n, dtype=torch.float32).requires_grad_(True)
        log = _Log()
        with log:
            out = mhc.sinkhorn(logits, registry.SINKHORN_ITERS)
            log.phase = "bwd"
            torch.autograd.backward(out, torch.empty(T, n, n))
    ops = [op for op in log.ops if op.name == f"mhc::sinkhorn_{phase}"]
    for op in ops:
        op.mode = mode
    if not ops:
        raise ValueError(f"mhc::sinkhorn_{phase} was not called")
    return expand(ops[0], num_sms)
