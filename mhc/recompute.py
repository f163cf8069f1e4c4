"""Block recomputation of the mHC activations (paper §4.3.2, Table 3, Eq. 20): :class:`MHCStack`.

A stack of ``L`` :class:`~mhc.MHC` sites is cut into blocks of ``L_r`` consecutive sites. During the forward pass
each block keeps only its first residual ``x_{l0}`` (``n*C`` per token) and each site's sublayer output ``F_l``
(``C`` per token); everything the mHC ops would save for backward (the residuals ``x_l`` of the other sites, the
coefficients ``H_pre``, ``H_post``, ``H_res`` and the projection statistics) is dropped. In the backward pass, the
first time the autograd engine needs one of those tensors, the block's mHC ops (only the mHC ops: pre-mapping and
post/res, never the sublayers) are replayed from ``x_{l0}`` and the stored ``F_l`` and the saved tensors are handed
out one by one (each is released as soon as its backward node has consumed it).

How: the mHC ops of a site run inside :func:`torch.autograd.graph.saved_tensors_hooks` whose pack hook stores an
index instead of the tensor; the unpack hook replays the block once (with the same ``requires_grad`` pattern, so the
ops save the same tensors in the same order) and returns the tensor with that index. The sublayers run outside the
hooks with their ordinary autograd graph, so their gradients, their own activation checkpointing
(``torch.utils.checkpoint(use_reentrant=False)`` inside a sublayer), DDP and FSDP hooks are untouched. The hooks and
the replay state live in one object per block and per forward call; nothing global is mutated.

Memory per token, in units of ``C`` elements of the residual dtype (coefficients excluded, as in Table 3)::

    without recompute : n*L (x_l saved by the mHC ops)            + L (F_l) + L (sublayer input, kept by F)
    with recompute    : n*ceil(L/L_r) (x_{l0})                    + L (F_l) + L (sublayer input, kept by F)
    transient peak    : + n*L_r while one block is replayed (x_l of its sites; the paper's (n+2)*L_r also counts
                        H_pre x and RMSNorm(H_pre x), which here belong to the sublayer and are not recomputed)

so the paper's optimum of Eq. 20, ``L_r* = sqrt(n*L/(n+2))``, is the default (:func:`optimal_block`).
``profiling/recompute_memory.py`` measures the saved bytes against ``L_r`` and this model.

Inside a block, boundaries between matching sites run fused (``mhc.boundary.run_sites``), in the forward and in the
replay alike; see docs/design.md section 7.

Under ``torch.compile`` the saved-tensor hooks would break the graph, so a compiled stack instead wraps each block in
``torch.utils.checkpoint`` with a selective policy (:func:`recompute_policy`): ``torch.ops.mhc.*`` ops and aliasing or
casting ops are recomputed, every other op's output is saved (the sublayers are not recomputed). The block runs
:func:`~mhc.boundary.run_sites` there too, so its boundaries are the fused ``mhc::boundary_*`` ops, recomputed like
the others. The compiler's partitioner then decides the saved set; it is not measured here.

Composition with FSDP2: the replay reads the ``phi``/``alpha``/``bias`` of every site of the block, so a block must
not span several FSDP units that reshard after forward (shard the stack, or groups of whole blocks, as one unit, or
pass ``reshard_after_forward=False``). DDP needs nothing special.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .boundary import run_sites
from .layer import MHC

__all__ = ["MHCStack", "optimal_block", "recompute_policy"]


def optimal_block(n_streams: int, num_layers: int) -> int:
    """Eq. 20: the ``L_r`` minimising ``n*ceil(L/L_r) + (n+2)*L_r`` (exact over integers; ~ ``sqrt(n*L/(n+2))``)."""
    for name, v in (("n_streams", n_streams), ("num_layers", num_layers)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"mhc.optimal_block: expected {name} to be an int, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"mhc.optimal_block: expected {name} >= 1, got {v}")
    n, L = n_streams, num_layers
    return min(range(1, L + 1), key=lambda r: (n * math.ceil(L / r) + (n + 2) * r, r))


_ALIASING = {
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten.expand.default,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten.squeeze.dim,
    torch.ops.aten.t.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.permute.default,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.select.int,
    torch.ops.aten.alias.default,
    torch.ops.aten.detach.default,
    torch.ops.aten.clone.default,
    torch.ops.aten._to_copy.default,
    torch.ops.prims.convert_element_type.default,
}


def recompute_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpoint policy of a compiled :class:`MHCStack` block: recompute the mHC ops (and views and
    casts, which would otherwise pin the residuals they alias), save everything else."""
    if getattr(op, "namespace", None) == "mhc" or op in _ALIASING:
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE


class _BlockReplay:
    """Pack/unpack hooks and replay state of one recompute block in one forward call."""

    def __init__(self, layers: list[MHC], x0: Tensor):
        self.layers = layers
        self.x0 = x0.detach().requires_grad_(x0.requires_grad)
        self.outputs: list[Tensor] = []
        self.count = 0
        self.cache: dict[int, Tensor] = {}
        self.in_sublayer = False

    def enter_sublayer(self, module: nn.Module, args) -> None:
        self.in_sublayer = True

    def exit_sublayer(self, module: nn.Module, args, output) -> None:
        self.in_sublayer = False
        self.outputs.append(output)

    def call_sublayer(self, args: tuple, kwargs: dict, layer: MHC, layer_input: Tensor) -> Tensor:
        """Run a sublayer outside the hooks (its graph keeps what it saves) and record its output."""
        self.in_sublayer = True
        try:
            y = layer.sublayer(layer_input, *args, **kwargs)
        finally:
            self.in_sublayer = False
        self.outputs.append(y)
        return y

    def call_site(self, args: tuple, kwargs: dict, layer: MHC, h: Tensor) -> Tensor:
        """A site with module hooks, whole: through its ``__call__`` (so the hooks, e.g. FSDP2's unshard and
        gradient reduction, run) with the sublayer's own saved tensors passed through and its output recorded."""
        if not isinstance(layer.sublayer, nn.Module):
            layer_input, ctx = layer.pre(h)
            return layer.post(ctx, self.call_sublayer(args, kwargs, layer, layer_input))
        handles = (
            layer.sublayer.register_forward_pre_hook(self.enter_sublayer),
            layer.sublayer.register_forward_hook(self.exit_sublayer),
        )
        try:
            return layer(h, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            self.in_sublayer = False

    def pack(self, t: Tensor) -> int | tuple[Tensor]:
        if self.in_sublayer:  # the sublayer's own graph keeps what it saves
            return (t,)
        k = self.count
        self.count += 1
        return k

    def unpack(self, k: int | tuple[Tensor]) -> Tensor:
        if isinstance(k, tuple):
            return k[0]
        if k not in self.cache:
            self._replay()
        return self.cache.pop(k)

    def _replay(self) -> None:
        saved: list[Tensor] = []
        hooks = [layer._h_res_hook for layer in self.layers]
        try:
            for layer in self.layers:  # diagnostics must not see the replay
                layer._h_res_hook = None
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_Recorder(saved), _identity):
                outputs = iter(self.outputs)

                def recorded(layer, layer_input):
                    y = next(outputs)
                    return y.detach().requires_grad_(y.requires_grad)

                def whole(layer, h):
                    _, ctx = layer.pre(h)
                    return layer.post(ctx, recorded(layer, None))

                run_sites(self.layers, self.x0, call_sublayer=recorded, call_site=whole)
        finally:
            for layer, hook in zip(self.layers, hooks, strict=True):
                layer._h_res_hook = hook
        if len(saved) != self.count:
            raise RuntimeError(
                f"mhc.MHCStack: the recompute of a block saved {len(saved)} tensors, expected {self.count} as in the "
                "forward pass (did a site's parameters or requires_grad change between forward and backward?)"
            )
        self.cache = dict(enumerate(saved))


class _Recorder:
    def __init__(self, out: list[Tensor]):
        self.out = out

    def __call__(self, t: Tensor) -> Tensor:
        self.out.append(t)
        return t


def _identity(t: Tensor) -> Tensor:
    return t


class MHCStack(nn.ModuleList):
    """A sequence of :class:`~mhc.MHC` sites applied in order, with optional block recomputation (module docstring).

    Args:
        layers: the sites (each with a sublayer), e.g. ``[attn_0, ffn_0, attn_1, ffn_1, ...]``.
        recompute_block: ``L_r``. ``"auto"`` (default): Eq. 20's optimum :func:`optimal_block`; an int ``>= 1``;
            ``None`` or ``0``: no recomputation (the plain path).

    ``forward(residual, *args, **kwargs)``: ``[..., n, C] -> [..., n, C]``; extra arguments go to every sublayer.
    Recomputation only happens when gradients are being recorded; under ``torch.no_grad`` the plain path runs.

    The stack *is* an ``nn.ModuleList`` of its sites: ``stack[i]``, ``len(stack)``, iteration, and the state-dict keys
    of a plain ``nn.ModuleList`` (``sites.0.phi`` for ``self.sites = MHCStack(...)``), with or without recomputation,
    so a checkpoint moves between a ModuleList of sites and a stack. Checkpoints written by the earlier layout
    (``sites.layers.0.phi``) still load. Sites built without a ``layer_index`` get their position in the stack
    (:meth:`mhc.MHC.assign_layer_index_`), so that ``init="identity"`` rotates the home stream as Hyper-Connections
    does; sites with one keep it.
    """

    def __init__(self, layers: Iterable[MHC], recompute_block: int | str | None = "auto"):
        layers = list(layers)
        if not layers:
            raise ValueError("MHCStack: expected at least one mhc.MHC layer, got none")
        for i, layer in enumerate(layers):
            if not isinstance(layer, MHC):
                raise TypeError(f"MHCStack: expected layers[{i}] to be an mhc.MHC, got {type(layer).__name__}")
            if layer.sublayer is None:
                raise ValueError(f"MHCStack: expected layers[{i}] to have a sublayer, got sublayer=None")
        if recompute_block == "auto":
            recompute_block = optimal_block(layers[0].n_streams, len(layers))
        elif recompute_block is None:
            recompute_block = 0
        elif isinstance(recompute_block, bool) or not isinstance(recompute_block, int):
            raise TypeError(
                f"MHCStack: expected recompute_block to be 'auto', None or an int, got {type(recompute_block).__name__}"
            )
        elif recompute_block < 0:
            raise ValueError(f"MHCStack: expected recompute_block >= 0, got {recompute_block}")
        super().__init__(layers)
        for i, layer in enumerate(layers):
            if layer.layer_index is None:
                layer.assign_layer_index_(i)
        self.recompute_block = recompute_block
        self._register_load_state_dict_pre_hook(_accept_old_keys)

    @property
    def layers(self) -> list[MHC]:
        """The sites, in order (the stack itself is the ``nn.ModuleList``)."""
        return list(self)

    def extra_repr(self) -> str:
        return f"recompute_block={self.recompute_block}"

    def blocks(self) -> list[list[MHC]]:
        """The sites grouped into recompute blocks (one block of all sites when recomputation is off)."""
        layers = list(self)
        r = self.recompute_block or len(layers)
        return [layers[i : i + r] for i in range(0, len(layers), r)]

    def forward(self, residual: Tensor, *args, **kwargs) -> Tensor:
        h = residual
        if not self.recompute_block or not torch.is_grad_enabled():
            return run_sites(list(self), h, args, kwargs)  # fused boundaries between matching sites (mhc.boundary)
        compiling = torch.compiler.is_compiling()
        for block in self.blocks():
            if compiling:
                h = checkpoint(
                    _run_block,
                    block,
                    h,
                    args,
                    kwargs,
                    use_reentrant=False,
                    context_fn=functools.partial(create_selective_checkpoint_contexts, recompute_policy),
                )
            else:
                h = _run_block_eager(block, h, args, kwargs)
        return h


def _accept_old_keys(state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: rename ``{prefix}layers.<i>.*`` (the layout before the stack became a ModuleList)
    to ``{prefix}<i>.*``."""
    old = prefix + "layers."
    for key in [k for k in state_dict if k.startswith(old) and k[len(old) :].split(".", 1)[0].isdigit()]:
        state_dict[prefix + key[len(old) :]] = state_dict.pop(key)


def _run_block(block: list[MHC], h: Tensor, args: tuple, kwargs: dict) -> Tensor:
    """A compiled stack's block, run under ``checkpoint``: fused boundaries between matching sites, as eagerly; the
    selective policy recomputes the ``mhc::boundary_*`` ops like every other ``mhc`` op."""
    return run_sites(block, h, args, kwargs)


def _run_block_eager(block: list[MHC], h: Tensor, args: tuple, kwargs: dict) -> Tensor:
    replay = _BlockReplay(block, h)
    with torch.autograd.graph.saved_tensors_hooks(replay.pack, replay.unpack):
        # fused boundaries between matching sites (mhc.boundary.run_sites); the replay walks the block alike
        return run_sites(
            block, h, args, kwargs,
            call_sublayer=functools.partial(replay.call_sublayer, args, kwargs),
            call_site=functools.partial(replay.call_site, args, kwargs),
        )  # fmt: skip
