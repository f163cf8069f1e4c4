"""Stability diagnostics of mHC (paper §3.1, Fig. 3, Fig. 7; ``docs/spec.md`` §8): Amax gains and Sinkhorn residuals.

Orientation: ``h_res`` is in the paper's orientation, ``x_next = h_res @ x`` (``x_next[i] = sum_j h_res[i, j] x[j]``;
``docs/design.md`` §1). Hence for a matrix ``P`` (one site's ``h_res`` or a composite):

* forward gain  = ``max_i |sum_j P[i, j]|``  (largest absolute row sum: worst-case amplification of the signal);
* backward gain = ``max_j |sum_i P[i, j]|``  (largest absolute column sum: the same for gradients);
* composite at depth ``l`` = ``h_res_l @ ... @ h_res_1 @ h_res_0`` per token (the map from the first residual to the
  residual after site ``l``, ignoring the sublayer branches).

Averaging order (the paper's captions leave it open): the gain is taken **per token first, then averaged over the
tokens** (``mean_t max_i |sum_j P_t[i, j]|``); ``average="matrix"`` takes the max of the token-averaged matrix
instead (``max_i |sum_j mean_t P_t[i, j]|``), a lower bound of the former.

Sinkhorn residuals: ``max_t max_i |sum_j h_res[i, j] - 1|`` (rows; 0 up to rounding, Sinkhorn ends with rows) and the
same for columns (the truncation error of the iteration: below 1e-3 with 20 iterations for logits of standard
deviation up to 1, a few percent at 3 to 6, and O(1) for sharper logits, where 20 iterations do not converge;
``docs/spec.md`` §3.3). A column error above ``col_tol`` (default :data:`COLUMN_TOL` = 0.05, i.e. one site's
backward gain more than 5% away from 1) is flagged: :func:`sinkhorn_report` returns ``converged=False`` and warns,
and :meth:`Recorder.summary` lists the sites in ``unconverged_sites`` and warns once.

Collecting during training without host syncs::

    with mhc.diagnostics.collect(model) as rec:      # hooks every mhc.MHC (and any module with an _h_res_hook slot)
        loss = model(batch).loss                     # each site stashes 0-dim device tensors; nothing syncs
    stats = rec.summary()                            # syncs here, once: dict of per-depth lists (averaged over passes)

Outside ``collect`` nothing is hooked and the layers run unchanged. A forward pass is recognised by the first hooked
site seeing a new call (a site seen twice starts a new pass); block recomputation (:class:`mhc.MHCStack`) does not
report its replays. In a compiled model, the hook is Python code with side effects: expect graph breaks while a
recorder is active.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "COLUMN_TOL",
    "Recorder",
    "amax_gains",
    "collect",
    "composite",
    "gains",
    "sinkhorn_report",
    "sinkhorn_residuals",
]

#: Largest column-sum error of ``h_res`` not flagged as an unconverged Sinkhorn projection (module docstring).
COLUMN_TOL = 0.05


def _unconverged_message(where: str, col: float, tol: float) -> str:
    return (
        f"{where}: the Sinkhorn projection did not converge: a column of h_res sums to 1 +- {col:.3g} (tolerance "
        f"{tol:g}), so the site's backward gain is off by that much and its gradient through H_res can vanish. "
        "The logits are too sharp for the iteration count (20 iterations converge for logits of standard deviation "
        "up to about 3, docs/spec.md §3.3): lower alpha_res or phi's scale, or raise sinkhorn_iters"
    )


_STATS = (
    "single_forward",
    "single_backward",
    "composite_forward",
    "composite_backward",
    "row_residual",
    "col_residual",
)


def _require_square(where: str, h: Tensor) -> int:
    if not isinstance(h, Tensor):
        raise TypeError(f"{where}: expected h_res to be a torch.Tensor, got {type(h).__name__}")
    if h.dim() < 2 or h.shape[-1] != h.shape[-2]:
        raise ValueError(f"{where}: expected h_res of shape [..., n, n], got {list(h.shape)}")
    if not h.is_floating_point():
        raise TypeError(f"{where}: expected a floating h_res, got {h.dtype}")
    return h.shape[-1]


def gains(h_res: Tensor, *, average: str = "token") -> tuple[Tensor, Tensor]:
    """Forward and backward Amax gain magnitudes of ``h_res [..., n, n]`` (0-dim tensors, no sync).

    ``average="token"``: per-token gain, then the mean over all leading dimensions; ``"matrix"``: gain of the mean
    matrix; ``"none"``: per-token gains of shape ``[...]``.
    """
    n = _require_square("mhc.diagnostics.gains", h_res)
    if average not in ("token", "matrix", "none"):
        raise ValueError(f"mhc.diagnostics.gains: expected average in ('token', 'matrix', 'none'), got {average!r}")
    h = h_res.reshape(-1, n, n)
    if average == "matrix":
        h = h.mean(0, keepdim=True)
    fwd = h.sum(-1).abs().amax(-1)
    bwd = h.sum(-2).abs().amax(-1)
    if average == "none":
        return fwd.reshape(h_res.shape[:-2]), bwd.reshape(h_res.shape[:-2])
    return fwd.mean(), bwd.mean()


def sinkhorn_residuals(h_res: Tensor) -> tuple[Tensor, Tensor]:
    """``(max |row sum - 1|, max |column sum - 1|)`` over all tokens of ``h_res [..., n, n]`` (0-dim, no sync)."""
    _require_square("mhc.diagnostics.sinkhorn_residuals", h_res)
    return (h_res.sum(-1) - 1).abs().amax(), (h_res.sum(-2) - 1).abs().amax()


def sinkhorn_report(h_res: Tensor, *, tol: float = COLUMN_TOL, warn: bool = True) -> dict:
    """Row and column errors of ``h_res [..., n, n]`` as Python floats (this syncs), and whether the projection
    converged: ``{"row_residual", "col_residual", "converged", "tol"}``. Warns (``RuntimeWarning``) when the column
    error exceeds ``tol``, unless ``warn=False``. E.g. ``mhc.sinkhorn(torch.randn(8, 4, 4) * 1e4)`` has columns
    summing to 0.5 .. 2 and is flagged."""
    row, col = (float(v) for v in sinkhorn_residuals(h_res))
    converged = col <= tol
    if not converged and warn:
        warnings.warn(_unconverged_message("mhc.diagnostics.sinkhorn_report", col, tol), RuntimeWarning, stacklevel=2)
    return {"row_residual": row, "col_residual": col, "converged": converged, "tol": tol}


def composite(h_res_per_layer: Sequence[Tensor]) -> list[Tensor]:
    """Per-token composites ``[h_res_0, h_res_1 @ h_res_0, ...]`` (paper orientation; each ``[..., n, n]``)."""
    out: list[Tensor] = []
    for i, h in enumerate(h_res_per_layer):
        _require_square("mhc.diagnostics.composite", h)
        if out and h.shape != out[-1].shape:
            raise ValueError(
                f"mhc.diagnostics.composite: expected h_res[{i}] of shape {list(out[-1].shape)}, got {list(h.shape)}"
            )
        out.append(h if not out else h @ out[-1])
    return out


def amax_gains(h_res_per_layer: Sequence[Tensor], *, average: str = "token") -> dict[str, Tensor]:
    """Single-site and composite forward/backward gains per depth for a list of per-site ``h_res`` of one batch.

    Returns 1-d tensors of length ``L`` (no sync): ``single_forward``, ``single_backward``, ``composite_forward``,
    ``composite_backward``, ``row_residual``, ``col_residual``.
    """
    if len(h_res_per_layer) == 0:
        raise ValueError("mhc.diagnostics.amax_gains: expected at least one h_res, got an empty sequence")
    rows = []
    for h, p in zip(h_res_per_layer, composite(h_res_per_layer), strict=True):
        rows.append(torch.stack([*gains(h, average=average), *gains(p, average=average), *sinkhorn_residuals(h)]))
    table = torch.stack(rows)
    return {name: table[:, i] for i, name in enumerate(_STATS)}


class Recorder:
    """Device-side accumulator of the diagnostics of each forward pass (see the module docstring). Created by
    :func:`collect`; ``summary()`` is the only method that syncs."""

    def __init__(self, average: str = "token", col_tol: float = COLUMN_TOL):
        if average not in ("token", "matrix"):
            raise ValueError(f"mhc.diagnostics.Recorder: expected average in ('token', 'matrix'), got {average!r}")
        self.average = average
        self.col_tol = float(col_tol)
        self.passes: list[list[Tensor]] = []
        self._seen: set[int] = set()
        self._product: Tensor | None = None

    def __call__(self, layer: nn.Module, h_res: Tensor) -> None:
        with torch.no_grad():
            n = h_res.shape[-1]
            h = h_res.detach().reshape(-1, n, n).float()
            if id(layer) in self._seen or self._product is None or self._product.shape != h.shape:
                self.passes.append([])
                self._seen = set()
                self._product = None
            self._seen.add(id(layer))
            self._product = h if self._product is None else h @ self._product
            stats = (*gains(h, average=self.average), *gains(self._product, average=self.average))
            self.passes[-1].append(torch.stack([*stats, *sinkhorn_residuals(h)]))

    def reset(self) -> None:
        self.passes, self._seen, self._product = [], set(), None

    def summary(self) -> dict:
        """Sync and return per-depth lists averaged over the recorded passes (``max`` over passes for the two
        Sinkhorn residuals), plus ``passes``, ``layers`` and ``unconverged_sites`` (the depths whose column error
        exceeds ``col_tol``; a ``RuntimeWarning`` names them). Passes of another depth than the first are skipped."""
        if not self.passes:
            raise RuntimeError("mhc.diagnostics.Recorder.summary: nothing recorded (no forward pass ran under collect)")
        depth = len(self.passes[0])
        table = torch.stack([torch.stack(p) for p in self.passes if len(p) == depth]).cpu().double()
        out: dict = {"passes": int(table.shape[0]), "layers": depth, "average": self.average}
        for i, name in enumerate(_STATS):
            col = table[:, :, i]
            out[name] = (col.amax(0) if name.endswith("residual") else col.mean(0)).tolist()
        bad = [i for i, e in enumerate(out["col_residual"]) if not e <= self.col_tol]
        out["unconverged_sites"] = bad
        if bad:
            worst = max(out["col_residual"][i] for i in bad)
            where = f"mhc.diagnostics: sites {bad}"
            warnings.warn(_unconverged_message(where, worst, self.col_tol), RuntimeWarning, stacklevel=2)
        return out


@contextlib.contextmanager
def collect(model: nn.Module, *, average: str = "token", col_tol: float = COLUMN_TOL) -> Iterator[Recorder]:
    """Hook every module of ``model`` that has an ``_h_res_hook`` slot (every :class:`mhc.MHC`) for the duration of
    the ``with`` block and yield the :class:`Recorder`; the hooks are removed on exit, even on error."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"mhc.diagnostics.collect: expected model to be an nn.Module, got {type(model).__name__}")
    rec = Recorder(average, col_tol)
    hooked = [m for m in model.modules() if hasattr(m, "_h_res_hook")]
    if not hooked:
        raise ValueError("mhc.diagnostics.collect: expected a model containing mhc.MHC layers, found none")
    try:
        for m in hooked:
            m._h_res_hook = rec
        yield rec
    finally:
        for m in hooked:
            m.__dict__.pop("_h_res_hook", None)
