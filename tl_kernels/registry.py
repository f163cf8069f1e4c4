"""Every kernel configuration the package ships, in one list.

``ALL_CONFIGS`` is the single source for ``python -m tl_kernels.build`` (``make kernels``), the CI codegen sweep
(``tests/kernels/test_codegen.py``) and runtime warm-up. A configuration is a :class:`KernelConfig`: a kernel family
(the module ``tl_kernels.<family>``), a direction (``fwd`` or ``bwd``) and the keyword arguments of that module's
``<family>_<direction>_program`` / ``<family>_<direction>_kernel`` functions, in call order.

Shipped today (525 configurations):

* ``post_res`` fwd + bwd: ``n`` in :data:`STREAMS` x ``C`` in :data:`HIDDEN_SIZES` x ``dtype`` in :data:`DTYPES`
  (4 x 5 x 3 x 2 = 120), and the decode forward (``pdl=True``, programmatic dependent launch, taken at T <= 64) at
  the pre-mapping's shapes with n in :data:`STREAMS` (30): 150;
* ``sinkhorn`` fwd + bwd: ``n`` in :data:`SINKHORN_STREAMS`, ``iters`` = :data:`SINKHORN_ITERS`,
  ``eps`` = :data:`SINKHORN_EPS` (5 x 2 = 10). ``iters`` and ``eps`` are baked into the binary, so keep this set small;
* the fused pre-mapping, families ``pre_proj`` (projection GEMM fwd, dual GEMM bwd, plus the bwd variant that
  accumulates into a given gradient for n=4 bf16) and ``pre_finalize`` (coefficients + Sinkhorn + F_pre fwd,
  coefficient bwd, plus its ``grad_pre=False`` variant that the fused boundary backward launches when ``h_pre'`` has
  no gradient): n = 4 x :data:`HIDDEN_SIZES` x :data:`DTYPES`, and n in {1, 2, 6, 8} x :data:`HIDDEN_SIZES` in
  bfloat16 (35 shapes x 5 + 5 = 180), and ``pre_reduce`` bwd (the fixed-order sums of the backward's partials; one
  binary per n, with and without the d_phi split sum: 5 x 2 = 10);
* ``boundary`` fwd (site l's post_res fused with site l+1's projection) + bwd (post_res(l)'s backward on the sum of
  x_{l+1}'s two gradients): the pre-mapping's 35 shapes (70); the fully fused backward (``fused=True``) at the same
  shapes (35), its opt-in thread block cluster variant (``fused=True, clusters=True``, ``MHC_BOUNDARY_CLUSTERS=1``)
  at those shapes where it has a cluster (``boundary_bwd.fused_plan(..., clusters=True).cs > 1``: all but n = 2,
  30) and its reduction (``reduce_dh=True``: ``boundary_reduce_bwd``, d_phi, d_alpha, d_bias and d_h) per
  n (5): 140.
* ``pre_decode`` fwd (the one-launch decode pre-mapping for T <= 64): the pre-mapping's 35 shapes at
  :data:`SINKHORN_ITERS`, :data:`SINKHORN_EPS` (35).

Importing this module imports no kernel module, TileLang or torch: the family module is imported on the first call
to :meth:`KernelConfig.program` or :meth:`KernelConfig.kernel`, so the registry is usable while a family module
is still being written (:meth:`KernelConfig.module_exists` tells whether it is there).
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import _common, boundary_bwd  # boundary_bwd: its fused_plan only (imports no TileLang, torch or family)

__all__ = [
    "ALL_CONFIGS",
    "DIRECTIONS",
    "DTYPES",
    "FAMILIES",
    "HIDDEN_SIZES",
    "PRE_MAPPING_FULL_STREAMS",
    "PRE_MAPPING_STREAMS",
    "SINKHORN_EPS",
    "SINKHORN_ITERS",
    "SINKHORN_STREAMS",
    "STREAMS",
    "KernelConfig",
    "by_name",
    "configs",
]

#: Number of residual streams ``n`` the post/res mapping kernels are built for.
STREAMS: tuple[int, ...] = (2, 4, 6, 8)
#: Model hidden sizes ``C`` (multiples of 64) the post/res mapping kernels are built for.
HIDDEN_SIZES: tuple[int, ...] = (1280, 1920, 2560, 4096, 7168)
#: Activation dtypes of the post/res mapping kernels (TileLang dtype names).
DTYPES: tuple[str, ...] = _common.ACTIVATION_DTYPES
#: Stream counts the Sinkhorn-Knopp kernels are built for (the n x n mixing matrix is tiny; 16 is the stress case).
SINKHORN_STREAMS: tuple[int, ...] = (2, 4, 6, 8, 16)
#: Sinkhorn-Knopp iterations baked into the binary (the mHC paper's t_max).
SINKHORN_ITERS: int = 20
#: Sinkhorn epsilon baked into the binary.
SINKHORN_EPS: float = 0.0

#: Stream counts the fused pre-mapping kernels (pre_proj, pre_finalize) are built for: n = 4 (the paper's) at every
#: hidden size and activation dtype, the other n in bf16 only.
PRE_MAPPING_STREAMS: tuple[int, ...] = _common.ACTIVATION_STREAMS
PRE_MAPPING_FULL_STREAMS: tuple[int, ...] = (4,)

FAMILIES: tuple[str, ...] = ("post_res", "sinkhorn", "pre_proj", "pre_finalize", "pre_reduce", "boundary", "pre_decode")
DIRECTIONS: tuple[str, ...] = ("fwd", "bwd")

_PACKAGE = __name__.rpartition(".")[0] or "tl_kernels"


@dataclass(frozen=True)
class KernelConfig:
    """One compiled kernel: ``tl_kernels.<family>.<family>_<direction>_kernel(**kwargs)``.

    ``params`` is a tuple of ``(name, value)`` pairs in the order of the builder's signature, so the object is
    hashable and its :attr:`name` is stable.
    """

    family: str
    direction: str
    params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if not self.family.isidentifier():
            raise ValueError(f"family must be a module name, got {self.family!r}")
        params = tuple(tuple(item) for item in self.params)
        if any(len(item) != 2 or not isinstance(item[0], str) for item in params):
            raise ValueError(f"params must be (name, value) pairs, got {self.params!r}")
        object.__setattr__(self, "params", params)

    @classmethod
    def make(cls, family: str, direction: str, **params: Any) -> KernelConfig:
        """``KernelConfig.make("post_res", "fwd", n=4, C=7168, dtype="bfloat16")``."""
        return cls(family, direction, tuple(params.items()))

    @property
    def op(self) -> str:
        """``<family>_<direction>``, the stem of the builder functions and of the torch op name."""
        return f"{self.family}_{self.direction}"

    @property
    def config_str(self) -> str:
        """``n=4,C=7168,dtype=bfloat16``."""
        return ",".join(f"{key}={value}" for key, value in self.params)

    @property
    def name(self) -> str:
        """``post_res_fwd[n=4,C=7168,dtype=bfloat16]``; unique within :data:`ALL_CONFIGS`."""
        return f"{self.op}[{self.config_str}]"

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def module_name(self) -> str:
        return f"{_PACKAGE}.{self.family}"

    def module_exists(self) -> bool:
        """Whether ``tl_kernels.<family>`` exists, without importing it."""
        return importlib.util.find_spec(self.module_name) is not None

    def _builder(self, suffix: str):
        module = importlib.import_module(self.module_name)
        return getattr(module, f"{self.op}_{suffix}")

    def program(self):
        """The TileLang ``PrimFunc`` (no compilation)."""
        return self._builder("program")(**self.kwargs)

    def kernel(self):
        """The compiled TileLang ``JITKernel`` for the pinned target (memoised by the family module)."""
        return self._builder("kernel")(**self.kwargs)

    def __str__(self) -> str:
        return self.name


def _post_res_configs() -> list[KernelConfig]:
    """Every shape in both directions; then the decode forward (programmatic dependent launch, T <= 64) at the
    shapes the decode pre-mapping serves."""
    return [
        KernelConfig.make("post_res", direction, n=n, C=c, dtype=dtype)
        for n, c, dtype in itertools.product(STREAMS, HIDDEN_SIZES, DTYPES)
        for direction in DIRECTIONS
    ] + [
        KernelConfig.make("post_res", "fwd", n=n, C=c, dtype=dtype, pdl=True)
        for n, c, dtype in _pre_mapping_shapes()
        if n in STREAMS
    ]


def _sinkhorn_configs() -> list[KernelConfig]:
    return [
        KernelConfig.make("sinkhorn", direction, n=n, iters=SINKHORN_ITERS, eps=SINKHORN_EPS)
        for n in SINKHORN_STREAMS
        for direction in DIRECTIONS
    ]


def _pre_mapping_shapes() -> list[tuple[int, int, str]]:
    return [
        (n, c, dtype)
        for n in PRE_MAPPING_STREAMS
        for c in HIDDEN_SIZES
        for dtype in (DTYPES if n in PRE_MAPPING_FULL_STREAMS else ("bfloat16",))
    ]


def _pre_mapping_configs() -> list[KernelConfig]:
    out = []
    for n, c, dtype in _pre_mapping_shapes():
        out.append(KernelConfig.make("pre_proj", "fwd", n=n, C=c, dtype=dtype))
        out.append(KernelConfig.make("pre_proj", "bwd", n=n, C=c, dtype=dtype, accumulate=False))
        if n in PRE_MAPPING_FULL_STREAMS and dtype == "bfloat16":
            out.append(KernelConfig.make("pre_proj", "bwd", n=n, C=c, dtype=dtype, accumulate=True))
        out.append(
            KernelConfig.make("pre_finalize", "fwd", n=n, C=c, dtype=dtype, iters=SINKHORN_ITERS, eps=SINKHORN_EPS)
        )
        out.append(KernelConfig.make("pre_finalize", "bwd", n=n, C=c, dtype=dtype))
        # the variant without grad_h_pre (taken as zero, never read): the fused boundary backward's first launch
        out.append(KernelConfig.make("pre_finalize", "bwd", n=n, C=c, dtype=dtype, grad_pre=False))
    for n in PRE_MAPPING_STREAMS:  # no C or dtype: the partials are fp32 with dynamic sizes
        for reduce_phi in (True, False):
            out.append(KernelConfig.make("pre_reduce", "bwd", n=n, reduce_phi=reduce_phi))
    return out


def _boundary_configs() -> list[KernelConfig]:
    """The fused boundary feeds the next site's pre_finalize: the same shapes as the pre-mapping; then the fully
    fused backward (``fused=True``) at those shapes and its reduction (``reduce_dh=True``) per n."""
    out = [
        KernelConfig.make("boundary", direction, n=n, C=c, dtype=dtype)
        for n, c, dtype in _pre_mapping_shapes()
        for direction in DIRECTIONS
    ]
    out += [
        KernelConfig.make("boundary", "bwd", n=n, C=c, dtype=dtype, fused=True) for n, c, dtype in _pre_mapping_shapes()
    ]
    # the fused backward's opt-in thread block cluster variant (MHC_BOUNDARY_CLUSTERS=1), where it has a cluster
    out += [
        KernelConfig.make("boundary", "bwd", n=n, C=c, dtype=dtype, fused=True, clusters=True)
        for n, c, dtype in _pre_mapping_shapes()
        if boundary_bwd.fused_plan(n, c, dtype, clusters=True).cs > 1
    ]
    out += [KernelConfig.make("boundary", "bwd", n=n, reduce_dh=True) for n in PRE_MAPPING_STREAMS]
    return out


def _pre_decode_configs() -> list[KernelConfig]:
    """The decode forward serves the pre-mapping's shapes at T <= 64."""
    return [
        KernelConfig.make("pre_decode", "fwd", n=n, C=c, dtype=dtype, iters=SINKHORN_ITERS, eps=SINKHORN_EPS)
        for n, c, dtype in _pre_mapping_shapes()
    ]


#: Every configuration the package ships: post_res, sinkhorn, the pre-mapping families, the boundary, then the
#: decode pre-mapping; fwd before bwd.
ALL_CONFIGS: tuple[KernelConfig, ...] = (
    *_post_res_configs(),
    *_sinkhorn_configs(),
    *_pre_mapping_configs(),
    *_boundary_configs(),
    *_pre_decode_configs(),
)


def _matches(value: Any, wanted: Any) -> bool:
    if isinstance(wanted, (list, tuple, set, frozenset)):
        return value in wanted
    return value == wanted


def configs(
    family: str | Iterable[str] | None = None,
    direction: str | Iterable[str] | None = None,
    **filters: Any,
) -> list[KernelConfig]:
    """Select from :data:`ALL_CONFIGS`.

    ``family`` and ``direction`` take a name or a collection of names; every other keyword filters on a parameter,
    by equality or, for a list/tuple/set, by membership: ``configs("post_res", n=4, C=(4096, 7168))``. A config
    without the filtered parameter is left out.
    """
    families = {family} if isinstance(family, str) else None if family is None else set(family)
    directions = {direction} if isinstance(direction, str) else None if direction is None else set(direction)
    missing = object()
    selected = []
    for cfg in ALL_CONFIGS:
        if families is not None and cfg.family not in families:
            continue
        if directions is not None and cfg.direction not in directions:
            continue
        kwargs = cfg.kwargs
        if all(
            (value := kwargs.get(key, missing)) is not missing and _matches(value, wanted)
            for key, wanted in filters.items()
        ):
            selected.append(cfg)
    return selected


def by_name(name: str) -> KernelConfig:
    """The config whose :attr:`KernelConfig.name` is ``name``."""
    for cfg in ALL_CONFIGS:
        if cfg.name == name:
            return cfg
    raise KeyError(name)
