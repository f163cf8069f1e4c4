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
from dataclasses import dataclass
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


@dataclass
class Op:
    name: str  # "mhc::post_res_fwd" or an aten op name
    args: tuple
    kwargs: dict
    nbytes: int = 0
    phase: str = "fwd"
    mode: Any = None  # the FakeTensorMode the op's tensors belong to


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

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ns = getattr(func, "namespace", "")
        name = f"{ns}::{_short(func)}"
        if ns == "prim" or _short(func) in _NO_LAUNCH:
            return out
        self.ops.append(Op(name, args, kwargs, _tensor_bytes(args) + _tensor_bytes([out]), self.phase))
        return out


def site_ops(n: int, C: int, dtype: torch.dtype, T: int) -> list[Op]:
    """The ops one residual site runs, forward then backward (``Op.phase``), as :class:`mhc.MHCStack` runs them by
    default (see the module docstring)."""
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
    return log.ops


@contextlib.contextmanager
def _recording(num_sms: int):
    from mhc import _cuda

    launches: list[Launch] = []
    saved = (_cuda._launch, _cuda._num_sms)

    def record(device, kernel, *args):
        launches.append(Launch(kernel, args))

    _cuda._launch = record
    _cuda._num_sms = lambda device: num_sms
    try:
        yield launches
    finally:
        _cuda._launch, _cuda._num_sms = saved


def expand(op: Op, num_sms: int) -> list[Launch | Glue]:
    """The TileLang launches (in order) and then the torch glue ops of one ``mhc::*`` op, through :mod:`mhc._cuda`."""
    from mhc import _cuda

    name = op.name.split("::")[-1].split(".")[0]
    fn = getattr(_cuda, name, None)
    if fn is None:
        raise ValueError(f"{op.name}: mhc._cuda has no {name}() to replay (the model needs the op's CUDA wrapper)")
    log = _Log()
    with op.mode, _recording(num_sms) as launches, log:
        fn(*op.args, **op.kwargs)
    glue = [Glue(o.name, o.nbytes) for o in log.ops if o.name.startswith("aten::") and o.nbytes]
    return [*launches, *glue]


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
