"""mHC as a PyTorch layer: :class:`MHC` wraps any sublayer ``F: [..., C] -> [..., C]`` (attention or FFN with its own
pre-norm) into one residual site, ``x_next = H_res x + H_post^T F(H_pre x)`` (Eq. 3), on the fused ops of
:mod:`mhc.functional`. Also :func:`expand` (embedding -> n streams), :func:`collapse` and :class:`MHCHead` (n streams
-> one vector at the head), and :class:`Precision` (the mixed-precision policy).

A model::

    h = mhc.expand(embed(tokens), n)                      # [B, S, n, C]
    for attn, ffn in blocks:                              # MHC(attn_module, C, n, kind="attn", layer_index=2*i) ...
        h = ffn(attn(h))
    logits = lm_head(final_norm(mhc.collapse(h, n, head)))  # head: mhc.MHCHead(C, n), "sum" or "mean"

Initialisation (``init="identity"``, the default) follows the "A.6" static biases that PaddleFleet PR #1848
attributes to the paper (``docs/spec.md`` §5, where their provenance is discussed), so that a fresh layer is a plain
pre-norm residual around its home stream ``k = layer_index % n``:

* ``b_pre = -3`` except ``+3`` at stream ``k``: ``H_pre[k] = σ(3) = 0.9526``, the others ``σ(-3) = 0.0474``;
* ``b_post = 0``: ``H_post = 2σ(0) = 1`` on every stream (F's output is added to each stream once);
* ``b_res = 6I - 3``: ``exp(b_res)`` already has equal row and column sums, so Sinkhorn returns it normalised:
  diagonal ``1 / (1 + (n-1)e^-6) = 0.99262`` and off-diagonal ``0.00246`` at ``n = 4`` (0.99753 at n = 2,
  0.98294 at n = 8); rows sum to 1 exactly;
* ``phi = 0`` and ``alpha = 0.01`` (the paper's gating init, Table 5): the coefficients start as the bias values for
  every token. Zero ``phi`` is Hyper-Connections' own choice for its dynamic weights (``W = 0``, ``s = 0.01``,
  ``docs/spec.md`` §6): the start is then exactly the static map above, and learning still begins at step one because
  ``d phi = x^T (d logits * alpha / r)`` is non-zero (only ``d alpha``, proportional to ``phi``, starts at zero).

With streams that are equal (as :func:`expand` makes them), the site then computes on every stream
``x + F(1.0953 x)`` at ``n = 4`` (``H_pre`` sums to ``σ(3) + 3σ(-3)``): a plain residual, with an input gain that a
pre-normed sublayer does not see. With different streams the mix is ``0.9926 x_i + 0.0025 Σ_{j≠i} x_j``.
``init="uniform"`` (zero biases) starts every site as the uniform mix instead (``H_pre = 0.5``, ``H_post = 1``,
``H_res = 1/n``).

Mixed precision (:class:`Precision`): the residual stream is kept in one dtype (bf16, fp16 or fp32, or whatever
arrives); the coefficients (``phi``, ``alpha``, ``bias``, ``H_*``) are always computed in fp32. Parameters stored in
another dtype (an FSDP2 ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` casts them for the forward) are upcast
inside, and the gradient flows back through that cast. A sublayer output in another dtype than the residual (bf16 out
of ``torch.autocast`` next to an fp32 residual) is cast to the residual dtype. The mHC ops run with autocast disabled
(autocast would otherwise lower the ``x @ phi`` projection inside the op to bf16); the sublayer runs under the
caller's autocast. Without autocast, the sublayer is called in the dtype of its parameters: the layer input is cast
to the dtype of the sublayer's first floating-point parameter (so ``Precision.BF16`` around an fp32 ``nn.Linear``
keeps a bf16 residual and computes the sublayer in fp32; use ``torch.autocast`` to run it in bf16). The projection
runs in fp32; on CUDA it follows ``torch.backends.cuda.matmul.allow_tf32``
(the paper's TF32, opt-in; the layer never changes global settings).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from . import _checks, reference
from . import functional as F
from . import streams as _streams

__all__ = ["MHC", "MHCContext", "MHCHead", "Precision", "collapse", "deepseek_to_mhc", "expand"]

_RESIDUAL_DTYPES = _checks.ACTIVATION_DTYPES
_COEF_DTYPES = _checks.COEFFICIENT_DTYPES


def _dt(d: torch.dtype | None) -> str:
    return "None" if d is None else str(d).replace("torch.", "")


@dataclass(frozen=True)
class Precision:
    """The mixed-precision policy of :class:`MHC` and :class:`MHCHead` (frozen; share one instance freely).

    Attributes:
        residual: dtype the residual streams are kept in: the incoming residual is cast to it (a no-op when it
            already is) and the next residual comes out in it. ``None`` keeps whatever dtype arrives.
        coefficients: dtype of the coefficient math (``phi``, ``alpha``, ``bias`` are cast to it inside, so bf16
            parameters, e.g. under FSDP2's ``param_dtype=torch.bfloat16``, are upcast). float32, or float64 for tests.

    Presets: ``Precision.AUTO`` (the default: keep the residual's dtype), ``Precision.BF16``, ``Precision.FP16``,
    ``Precision.FP32``. Error of one site's next residual against the same site evaluated in float64 on the same
    (already rounded) input, max |error| / max |reference|, measured with this repository's CPU kernels (``n = 4``,
    ``C = 64``, 1024 tokens of unit-variance residuals, a linear sublayer computed in fp32, A.6 biases plus noise,
    ``phi ~ N(0, 0.1^2)``, worst of 5 seeds); ``tests/cpu/test_layer.py`` asserts 4x these:

    =========  ==========  ======================================================================
    policy     measured    where it comes from
    =========  ==========  ======================================================================
    ``FP32``   3.3e-7      fp32 rounding (a few ulps; the exp-domain Sinkhorn adds nothing visible)
    ``BF16``   5.3e-3      the layer input and the output are each rounded once to bf16 (2**-8)
    ``FP16``   5.9e-4      the same in fp16 (2**-11)
    =========  ==========  ======================================================================
    """

    residual: torch.dtype | None = None
    coefficients: torch.dtype = torch.float32

    AUTO: ClassVar[Precision]
    BF16: ClassVar[Precision]
    FP16: ClassVar[Precision]
    FP32: ClassVar[Precision]

    def __post_init__(self):
        if self.residual is not None and self.residual not in _RESIDUAL_DTYPES:
            raise TypeError(
                f"Precision: expected residual in (None, bfloat16, float16, float32, float64), got {self.residual!r}"
            )
        if self.coefficients not in _COEF_DTYPES:
            raise TypeError(f"Precision: expected coefficients in (float32, float64), got {self.coefficients!r}")

    def __repr__(self) -> str:
        return f"Precision(residual={_dt(self.residual)}, coefficients={_dt(self.coefficients)})"


Precision.AUTO = Precision()
Precision.BF16 = Precision(torch.bfloat16)
Precision.FP16 = Precision(torch.float16)
Precision.FP32 = Precision(torch.float32)


def _autocast_off(device: torch.device):
    """Disable autocast for the mHC ops (they choose their own dtypes); a no-op context elsewhere."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _require_int(where: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: expected {name} to be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{where}: expected {name} >= {minimum}, got {value}")
    return value


def _require_residual(where: str, residual, n: int, C: int) -> None:
    if not isinstance(residual, Tensor):
        raise TypeError(f"{where}: expected residual to be a torch.Tensor, got {type(residual).__name__}")
    if residual.dim() >= 2 and tuple(residual.shape[-2:]) == (n, C):
        return
    msg = f"{where}: expected residual of shape [..., n_streams={n}, C={C}], got {list(residual.shape)}"
    if residual.dim() >= 1 and residual.shape[-1] == C:
        msg += f": did you forget mhc.expand(x, {n})?"
    raise ValueError(msg)


# ---------------------------------------------------------------------------------------------------- expand/collapse


def expand(x: Tensor, n: int) -> Tensor:
    """Embedding ``[..., C]`` -> ``n`` identical residual streams ``[..., n, C]`` (a copy; the gradient sums over the
    streams). Hyper-Connections' and TileKernels' ``expand_from_embedding``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"mhc.expand: expected x to be a torch.Tensor, got {type(x).__name__}")
    _require_int("mhc.expand", "n", n, 1)
    if x.dim() < 1:
        raise ValueError(f"mhc.expand: expected x of shape [..., C], got {list(x.shape)}")
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]).contiguous()


def collapse(residual: Tensor, n: int | MHCHead, how: str | MHCHead = "sum") -> Tensor:
    """``n`` residual streams ``[..., n, C]`` -> ``[..., C]`` for the final norm and unembedding.

    ``n`` is the stream count, as in :func:`expand` (``collapse(h, 4)``, ``collapse(h, 4, "mean")``); the
    residual's stream dimension must equal it, so an un-expanded ``[B, S, C]`` is refused instead of being summed
    over ``S``. ``how``: ``"sum"`` (Hyper-Connections' choice: sum, then the final norm), ``"mean"``, or an
    :class:`MHCHead` (DeepSeek's learned per-token weights, ``docs/spec.md`` §1.3). An :class:`MHCHead` knows its
    ``n`` and may be passed in ``n``'s place: ``collapse(h, head)``.
    """
    if isinstance(n, MHCHead):
        how, n = n, n.n_streams
    if isinstance(n, str):
        raise TypeError(
            f"mhc.collapse: expected n (the stream count, as in mhc.expand(x, n)) before how, got {n!r}: "
            f"write mhc.collapse(h, n, {n!r})"
        )
    _require_int("mhc.collapse", "n", n, 1)
    if not isinstance(residual, Tensor):
        raise TypeError(f"mhc.collapse: expected residual to be a torch.Tensor, got {type(residual).__name__}")
    if residual.dim() < 2 or residual.shape[-2] != n:
        raise ValueError(
            f"mhc.collapse: expected residual of shape [..., n={n}, C], got {list(residual.shape)}"
            + f": did you forget mhc.expand(x, {n})?"
        )
    if isinstance(how, MHCHead):
        if how.n_streams != n:
            raise ValueError(f"mhc.collapse: expected an MHCHead with n_streams={n}, got n_streams={how.n_streams}")
        return how(residual)
    if how == "sum":
        return residual.sum(-2)
    if how == "mean":
        return residual.mean(-2)
    raise ValueError(f"mhc.collapse: expected how in ('sum', 'mean') or an mhc.MHCHead, got {how!r}")


class MHCHead(nn.Module):
    """DeepSeek's learned collapse at the head (``docs/spec.md`` §1.3, TileKernels' ``mhc_head``): per token,

        x~ = vec(x) / sqrt(mean(vec(x)^2) + rms_eps)          (RMS-normalised flattened residual, [n*C])
        w  = sigmoid(alpha * (x~ @ phi) + bias) + eps          ([n]; phi [n*C, n], alpha [1], bias [n])
        out = sum_i w[i] x[i]                                  ([C], in the residual's dtype)

    Init: ``phi = 0``, ``alpha = 0.01``, ``bias = -log(n - 1)`` so that ``sigmoid(bias) = 1/n`` and the head starts as
    the mean of the streams (plus ``eps``); ``bias = 0`` for ``n = 1``. Computed in fp32 (``precision.coefficients``)
    with autocast disabled; plain PyTorch (one small GEMM), differentiable.
    """

    def __init__(
        self,
        hidden_size: int,
        n_streams: int = 4,
        *,
        eps: float = 1e-6,
        rms_eps: float = 1e-6,
        precision: Precision = Precision.AUTO,
        device=None,
        dtype=None,
    ):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.hidden_size = _require_int("MHCHead", "hidden_size", hidden_size, 1)
        self.n_streams = _require_int("MHCHead", "n_streams", n_streams, 1)
        if not isinstance(precision, Precision):
            raise TypeError(f"MHCHead: expected precision to be an mhc.Precision, got {type(precision).__name__}")
        self.eps, self.rms_eps, self.precision = float(eps), float(rms_eps), precision
        n, C = n_streams, hidden_size
        self.phi = nn.Parameter(torch.empty(n * C, n, **factory_kwargs))
        self.alpha = nn.Parameter(torch.empty(1, **factory_kwargs))
        self.bias = nn.Parameter(torch.empty(n, **factory_kwargs))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        n = self.n_streams
        with torch.no_grad():
            self.phi.zero_()
            self.alpha.fill_(0.01)
            self.bias.fill_(-math.log(n - 1) if n > 1 else 0.0)

    def forward(self, residual: Tensor) -> Tensor:
        n, C = self.n_streams, self.hidden_size
        _require_residual("MHCHead", residual, n, C)
        residual = residual if self.precision.residual is None else residual.to(self.precision.residual)
        cd = reference.compute_dtype(residual.dtype, self.precision.coefficients)
        with _autocast_off(residual.device):
            x = residual.to(cd)
            flat = x.flatten(-2)
            rinv = torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.rms_eps)
            logits = (flat @ self.phi.to(cd)) * rinv * self.alpha.to(cd) + self.bias.to(cd)
            w = torch.sigmoid(logits) + self.eps
            out = (w.unsqueeze(-1) * x).sum(-2)
        return out.to(residual.dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, n_streams={self.n_streams}, eps={self.eps}, precision={self.precision}"


# ---------------------------------------------------------------------------------------------------- the layer


class MHCContext(NamedTuple):
    """What :meth:`MHC.post` needs from :meth:`MHC.pre`: the (policy-cast) residual and the per-token coefficients."""

    residual: Tensor
    h_post: Tensor
    h_res: Tensor


def deepseek_to_mhc(fn: Tensor, scale: Tensor, base: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """TileKernels' ``(fn [m, n*C], scale [3], base [m])`` -> this package's ``(phi [n*C, m], alpha [3], bias [m])``.

    TileKernels applies ``comb^T`` to the streams where the paper (and this package) applies ``H_res``
    (``docs/design.md`` §1), so ``h_res = comb^T``: the res columns are permuted, ``2n + i*n + j <-> 2n + j*n + i``
    (pre and post columns are unchanged), and ``fn`` is transposed to our ``[n*C, m]`` layout. Exact for TileKernels
    run with ``sinkhorn_eps = 0``, ``pre_eps = 0`` and the same iteration count and ``post_mult``; TileKernels'
    defaults (10 iterations, ``post_mult = 1``, eps 1e-6) must be passed to :class:`MHC` explicitly if wanted.
    """
    m = reference.num_coefficients(n)
    for name, t, shape in (("fn", fn, None), ("scale", scale, (3,)), ("base", base, (m,))):
        if not isinstance(t, Tensor):
            raise TypeError(f"mhc.deepseek_to_mhc: expected {name} to be a torch.Tensor, got {type(t).__name__}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"mhc.deepseek_to_mhc: expected {name} of shape {list(shape)}, got {list(t.shape)}")
    if fn.dim() != 2 or fn.shape[0] != m or fn.shape[1] % n != 0:
        raise ValueError(f"mhc.deepseek_to_mhc: expected fn of shape [{m}, n*C] (n={n}), got {list(fn.shape)}")
    res = 2 * n + torch.arange(n * n, device=fn.device).view(n, n).T.reshape(-1)
    perm = torch.cat([torch.arange(2 * n, device=fn.device), res])
    return fn.T[:, perm].contiguous(), scale.clone(), base[perm].contiguous()


class MHC(nn.Module):
    """One mHC residual site around ``sublayer`` (Eq. 3 with the coefficients of Eq. 14-19).

    Args:
        sublayer: ``F: [..., C] -> [..., C]`` (attention or FFN, keeping its own pre-norm); an ``nn.Module`` (then
            registered as a child) or any callable; ``None`` for the split form only.
        hidden_size: ``C``. n_streams: ``n`` (the paper uses 4).
        kind: ``"attn"`` or ``"ffn"``: with ``post_stream="auto"`` FFN sites run F_post,res on the high-priority
            stream (paper §4.3.3).
        layer_index: picks the home stream ``layer_index % n`` of ``init="identity"``; count sites (attention and FFN
            separately, as Hyper-Connections does), e.g. ``2*block`` and ``2*block + 1``. ``None`` (default): unset;
            the layer starts on stream 0 and an :class:`mhc.MHCStack` assigns the site's position in the stack
            (re-initialising the biases, if they are still the fresh ones, for the new home stream).
        sinkhorn_iters, post_mult, rms_eps, sinkhorn_eps: as :func:`mhc.pre_mapping` (paper: 20, 2.0).
        init: ``"identity"`` (plain residual at start, the A.6 biases; see the module docstring) or ``"uniform"``.
        precision: an :class:`mhc.Precision`.
        post_stream: ``"auto"`` (high priority for ``kind="ffn"``), ``"high_priority"`` or ``None`` (current stream).
            Only CUDA tensors use it; elsewhere it changes nothing.
        device, dtype: of the parameters (``phi [n*C, n*n + 2n]``, ``alpha [3]``, ``bias [n*n + 2n]``).

    ``forward(residual, *args, **kwargs)`` returns the next residual ``[..., n, C]``; extra arguments go to the
    sublayer. The split form is ``layer_input, ctx = pre(residual)`` then ``post(ctx, layer_output)``.
    """

    def __init__(
        self,
        sublayer: Callable[..., Tensor] | None,
        hidden_size: int,
        n_streams: int = 4,
        *,
        kind: str = "attn",
        layer_index: int | None = None,
        sinkhorn_iters: int = 20,
        post_mult: float = 2.0,
        rms_eps: float = 1e-6,
        sinkhorn_eps: float = 0.0,
        init: str = "identity",
        precision: Precision = Precision.AUTO,
        post_stream: str | None = "auto",
        device=None,
        dtype=None,
    ):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if sublayer is not None and not callable(sublayer):
            raise TypeError(f"MHC: expected sublayer to be callable or None, got {type(sublayer).__name__}")
        self.sublayer = sublayer
        self.hidden_size = _require_int("MHC", "hidden_size", hidden_size, 1)
        self.n_streams = _require_int("MHC", "n_streams", n_streams, 1)
        self.layer_index = None if layer_index is None else _require_int("MHC", "layer_index", layer_index, 0)
        self.sinkhorn_iters = _require_int("MHC", "sinkhorn_iters", sinkhorn_iters, 1)
        for name, v in (("post_mult", post_mult), ("rms_eps", rms_eps), ("sinkhorn_eps", sinkhorn_eps)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"MHC: expected {name} to be a float, got {type(v).__name__}")
            if not (0 <= v < math.inf) or (name == "post_mult" and v == 0):
                raise ValueError(f"MHC: expected {name} finite and {'> 0' if name == 'post_mult' else '>= 0'}, got {v}")
        self.post_mult, self.rms_eps, self.sinkhorn_eps = float(post_mult), float(rms_eps), float(sinkhorn_eps)
        if kind not in ("attn", "ffn"):
            raise ValueError(f"MHC: expected kind in ('attn', 'ffn'), got {kind!r}")
        if init not in ("identity", "uniform"):
            raise ValueError(f"MHC: expected init in ('identity', 'uniform'), got {init!r}")
        if post_stream not in ("auto", "high_priority", None):
            raise ValueError(f"MHC: expected post_stream in ('auto', 'high_priority', None), got {post_stream!r}")
        if not isinstance(precision, Precision):
            raise TypeError(f"MHC: expected precision to be an mhc.Precision, got {type(precision).__name__}")
        self.kind, self.init, self.post_stream, self.precision = kind, init, post_stream, precision
        n, C = self.n_streams, self.hidden_size
        m = reference.num_coefficients(n)
        self.phi = nn.Parameter(torch.empty(n * C, m, **factory_kwargs))
        self.alpha = nn.Parameter(torch.empty(3, **factory_kwargs))
        self.bias = nn.Parameter(torch.empty(m, **factory_kwargs))
        self.reset_parameters()

    # Diagnostics hook point: ``None`` except while an ``mhc.diagnostics.collect`` recorder is active, which sets it
    # on the instance to a callable ``hook(layer, h_res)`` (it must not sync; it stashes a detached device tensor).
    _h_res_hook: Callable[[MHC, Tensor], None] | None = None

    # -------------------------------------------------------------------------------------------- parameters

    @property
    def home_stream(self) -> int:
        """The stream ``init="identity"`` reads from: ``layer_index % n_streams`` (0 while ``layer_index`` is unset)."""
        return (self.layer_index or 0) % self.n_streams

    def assign_layer_index_(self, index: int) -> MHC:
        """Set an unset ``layer_index`` (what :class:`mhc.MHCStack` does with each site's position). If the biases
        are still the fresh ``init`` values for the old home stream, they are re-initialised for the new one;
        trained or loaded biases are kept (``layer_index`` only chooses the initialisation). Returns ``self``."""
        _require_int("MHC.assign_layer_index_", "index", index, 0)
        if self.layer_index is not None:
            raise ValueError(f"MHC.assign_layer_index_: layer_index is already set ({self.layer_index})")
        fresh = self.init == "identity" and self.bias.device.type != "meta" and self._pre_bias_is_fresh()
        self.layer_index = index
        if fresh:
            with torch.no_grad():
                self.bias[: self.n_streams].copy_(self._fresh_pre_bias())
        return self

    def _fresh_pre_bias(self) -> Tensor:
        n = self.n_streams
        b = torch.full((n,), -3.0, device=self.bias.device, dtype=self.bias.dtype)
        b[self.home_stream] = 3.0
        return b

    def _pre_bias_is_fresh(self) -> bool:
        with torch.no_grad():
            return bool(torch.equal(self.bias[: self.n_streams], self._fresh_pre_bias()))

    @property
    def high_priority_post(self) -> bool:
        """Whether F_post,res runs on the high-priority stream (for CUDA tensors)."""
        return self.post_stream == "high_priority" or (self.post_stream == "auto" and self.kind == "ffn")

    def reset_parameters(self) -> None:
        """``phi = 0``, ``alpha = 0.01`` and the biases of ``self.init`` (module docstring)."""
        n = self.n_streams
        with torch.no_grad():
            self.phi.zero_()
            self.alpha.fill_(0.01)
            self.bias.zero_()
            if self.init == "identity":
                self.bias[:n].copy_(self._fresh_pre_bias())
                eye = torch.eye(n, device=self.bias.device, dtype=self.bias.dtype)
                self.bias[2 * n :].copy_((6.0 * eye - 3.0).flatten())

    def load_deepseek_(self, fn: Tensor, scale: Tensor, base: Tensor) -> MHC:
        """Load TileKernels-convention weights (``fn [m, n*C]``, ``scale [3]``, ``base [m]``) in place; see
        :func:`deepseek_to_mhc` for the conversion and what must match. Returns ``self``."""
        phi, alpha, bias = deepseek_to_mhc(fn, scale, base, self.n_streams)
        if tuple(phi.shape) != tuple(self.phi.shape):
            raise ValueError(
                f"MHC.load_deepseek_: expected fn of shape {[self.phi.shape[1], self.phi.shape[0]]}, got {list(fn.shape)}"
            )
        with torch.no_grad():
            self.phi.copy_(phi)
            self.alpha.copy_(alpha)
            self.bias.copy_(bias)
        return self

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, n_streams={self.n_streams}, kind={self.kind!r}, "
            f"layer_index={self.layer_index}, sinkhorn_iters={self.sinkhorn_iters}, post_mult={self.post_mult}, "
            f"init={self.init!r}, precision={self.precision}, post_stream={self.post_stream!r}"
        )

    # -------------------------------------------------------------------------------------------- forward

    def pre(self, residual: Tensor) -> tuple[Tensor, MHCContext]:
        """Eq. 14-19 and F_pre: ``residual [..., n, C]`` -> ``(layer_input [..., C], ctx)``."""
        _require_residual("MHC.pre", residual, self.n_streams, self.hidden_size)
        if self.precision.residual is not None:
            residual = residual.to(self.precision.residual)
        cd = self.precision.coefficients
        with _autocast_off(residual.device):
            layer_input, h_post, h_res = F.pre_mapping(
                residual,
                self.phi.to(cd),
                self.alpha.to(cd),
                self.bias.to(cd),
                iters=self.sinkhorn_iters,
                post_mult=self.post_mult,
                rms_eps=self.rms_eps,
                sinkhorn_eps=self.sinkhorn_eps,
            )
        if self._h_res_hook is not None:
            self._h_res_hook(self, h_res)
        return layer_input, MHCContext(residual, h_post, h_res)

    def post(self, ctx: MHCContext, layer_output: Tensor) -> Tensor:
        """F_post,res (Eq. 3): ``x_next = H_res x + H_post^T layer_output``, in the residual's dtype."""
        residual = ctx.residual
        if not isinstance(layer_output, Tensor):
            raise TypeError(f"MHC.post: expected layer_output to be a torch.Tensor, got {type(layer_output).__name__}")
        expected = (*residual.shape[:-2], self.hidden_size)
        if tuple(layer_output.shape) != expected:
            raise ValueError(
                f"MHC.post: expected layer_output of shape {list(expected)} (the residual's leading dims, C), "
                f"got {list(layer_output.shape)}"
            )
        y = layer_output.to(residual.dtype)
        with _autocast_off(residual.device):
            if residual.device.type == "cuda" and self.high_priority_post:
                n, C = self.n_streams, self.hidden_size
                out = _streams.post_res_hp_fwd(
                    y.reshape(-1, C).contiguous(),
                    residual.reshape(-1, n, C).contiguous(),
                    ctx.h_post.reshape(-1, n).contiguous(),
                    ctx.h_res.reshape(-1, n, n).contiguous(),
                ).reshape(residual.shape)
            else:
                out = F.post_res(y, residual, ctx.h_post, ctx.h_res)
        return out

    def _sublayer_input(self, layer_input: Tensor) -> Tensor:
        """The layer input in the dtype the sublayer computes in: unchanged under autocast (autocast picks the
        dtypes) or when the sublayer has no floating-point parameter; else cast to its first floating-point
        parameter's dtype (a bf16 residual policy around an fp32 sublayer computes the sublayer in fp32)."""
        dev = layer_input.device.type
        if not isinstance(self.sublayer, nn.Module) or (dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev)):
            return layer_input
        for p in self.sublayer.parameters():
            if p.is_floating_point():
                return layer_input.to(p.dtype)
        return layer_input

    def forward(self, residual: Tensor, *args, **kwargs) -> Tensor:
        if self.sublayer is None:
            raise TypeError("MHC.forward: this layer has no sublayer (sublayer=None); use pre() and post()")
        layer_input, ctx = self.pre(residual)
        layer_output = self.sublayer(self._sublayer_input(layer_input), *args, **kwargs)
        if not isinstance(layer_output, Tensor):
            raise TypeError(
                f"MHC.forward: expected the sublayer to return a torch.Tensor [..., C], got {type(layer_output).__name__}"
            )
        return self.post(ctx, layer_output)
