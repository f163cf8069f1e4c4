"""The F_post,res kernel of FFN sites on a high-priority CUDA stream (paper §4.3.3: in DualPipe the FFN post kernels
run on a dedicated high-priority compute stream, so overlapped communication never blocks them).

The fork and join live *inside* an opaque custom op, ``mhc::post_res_hp_fwd`` (and its backward
``mhc::post_res_hp_bwd``), so ``torch.compile`` sees one node and CUDA-graph capture sees a fork from and a join to
the capturing stream (a recipe checked on an H100 outside this repository's tests: the kernel ran on the
high-priority stream, and a captured graph replayed correctly with the node at priority -3). On CUDA::

    hp = high_priority_stream(device)        # created once per device, on first use (never at import)
    hp.wait_stream(cur)                      # fork: hp sees everything cur has queued (the inputs)
    with torch.cuda.stream(hp): out = mhc::post_res_fwd(...)
    inputs.record_stream(hp)                 # allocated on cur, read on hp: the caching allocator must know
    out.record_stream(cur)                   # allocated on hp, read on cur
    cur.wait_stream(hp)                      # join before anything on cur can read out

On every other device the op is :func:`mhc.post_res` itself (no streams). The stream is the only state: one
``torch.cuda.Stream`` per device index in a cache, created lazily at the greatest priority
``torch.cuda.Stream.priority_range()`` reports (-3 on H100 at the time of writing, -5 on newer drivers).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import _checks
from . import ops as _ops  # noqa: F401  (registers mhc::post_res_*)


@functools.cache
def high_priority_stream(device_index: int) -> torch.cuda.Stream:
    """The high-priority stream of a CUDA device: created once, on first use, at the greatest priority allowed."""
    _least, greatest = torch.cuda.Stream.priority_range()
    return torch.cuda.Stream(device=device_index, priority=greatest)


def _fork_join(fn, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Run ``fn(*inputs)`` on the device's high-priority stream, forked from and joined to the current stream."""
    device = inputs[0].device
    cur = torch.cuda.current_stream(device)
    hp = high_priority_stream(device.index if device.index is not None else torch.cuda.current_device())
    hp.wait_stream(cur)
    with torch.cuda.stream(hp):
        outs = fn(*inputs)
    for t in inputs:
        t.record_stream(hp)
    for t in outs:
        t.record_stream(cur)
    cur.wait_stream(hp)
    return outs


# The two ops are declared with the schemas of mhc::post_res_fwd / post_res_bwd (mhc/ops.py), so their arguments are
# the plain ops' by construction; their fakes check under their own names, then defer to the plain ops' fakes.


def _schema_of(op) -> str:
    """The arguments and returns of a registered op's schema: ``"(Tensor layer_output, ...) -> Tensor"``."""
    text = str(op.default._schema)
    return text[text.index("(") :]


def _hp_fwd_default(*args):
    """``mhc::post_res_fwd`` on the high-priority stream (CUDA); the plain op elsewhere."""
    return torch.ops.mhc.post_res_fwd(*args)


def _hp_bwd_default(*args):
    """``mhc::post_res_bwd`` on the high-priority stream (CUDA); the plain op elsewhere."""
    return torch.ops.mhc.post_res_bwd(*args)


post_res_hp_fwd = torch.library.custom_op(
    "mhc::post_res_hp_fwd", _hp_fwd_default, mutates_args=(), schema=_schema_of(torch.ops.mhc.post_res_fwd)
)
post_res_hp_bwd = torch.library.custom_op(
    "mhc::post_res_hp_bwd", _hp_bwd_default, mutates_args=(), schema=_schema_of(torch.ops.mhc.post_res_bwd)
)


@post_res_hp_fwd.register_kernel("cuda")
def _(*args):
    _checks.post_res(*args, "mhc::post_res_hp_fwd")
    (out,) = _fork_join(lambda *a: (torch.ops.mhc.post_res_fwd(*a),), args)
    return out


@post_res_hp_fwd.register_fake
def _(*args):
    _checks.post_res(*args, "mhc::post_res_hp_fwd")
    return torch.ops.mhc.post_res_fwd(*args)


@post_res_hp_bwd.register_kernel("cuda")
def _(*args):
    _checks.post_res_bwd(*args, "mhc::post_res_hp_bwd")
    return _fork_join(torch.ops.mhc.post_res_bwd, args)


@post_res_hp_bwd.register_fake
def _(*args):
    _checks.post_res_bwd(*args, "mhc::post_res_hp_bwd")
    return torch.ops.mhc.post_res_bwd(*args)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    return torch.ops.mhc.post_res_hp_bwd(grad.contiguous(), *ctx.saved_tensors)


post_res_hp_fwd.register_autograd(_backward, setup_context=_setup)
