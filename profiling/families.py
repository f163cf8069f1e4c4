"""Per-family correctness cases for the GPU run (stage 2) and the compute-sanitizer cases (stage 4).

Every kernel configuration in :data:`tl_kernels.registry.ALL_CONFIGS` belongs to a family (``post_res``,
``sinkhorn``, and soon ``pre_mapping``). A family is checked by **one function** registered in :data:`CHECKS`::

    def check_<family>(cfg: KernelConfig, T: int, device: str, gen: torch.Generator) -> dict[str, Err]

It builds random inputs for ``T`` tokens matching ``cfg`` (``cfg.kwargs``: n, C, dtype, iters, eps, ...) on
``device`` with ``gen`` (a generator on that device), calls the ``torch.ops.mhc.*`` op of ``cfg.direction``
(on CUDA that is the TileLang kernel of exactly this configuration; on a CPU, the reference, which is what the dry
run exercises) and returns one :class:`Err` per output: the largest ``|got - want|`` against a float64 reference
and the tolerance for it (``atol + rtol * |want|``, elementwise). A configuration passes when every output's
``ratio`` (max of ``|got - want| / (atol + rtol |want|)``) is at most 1 and nothing is NaN where the reference is
finite.

To add a family: write its function here, add it to :data:`CHECKS`, and the stage-2 driver
(:mod:`profiling.check_configs`) and :mod:`profiling.sanitize_cases` pick up its registry configurations. A family
whose module ``tl_kernels.<family>`` does not exist yet is skipped with a note; one whose module exists but has no
function here fails stage 2, so it cannot go unchecked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mhc import reference as ref

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Activation outputs: fp32 accumulation, rounded once to the activation dtype (one unit in the last place).
ACT_RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 1e-5}
ACT_ATOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
#: Sinkhorn forward, absolute (tl_kernels/sinkhorn.py: 2-4e-7 measured in emulation; the GPU's ex2/lg2 add ~2**-22).
SINKHORN_FWD_ATOL = 2e-6
#: Sinkhorn backward, absolute, times max |grad_out| (emulation: <= 1.3e-7; see tests/gpu/test_sinkhorn_gpu.py).
SINKHORN_BWD_ATOL = 1e-6


@dataclass(frozen=True)
class Err:
    """``max_abs``: largest |got - want|; ``ratio``: largest |got - want| / (atol + rtol |want|) (pass: <= 1)."""

    max_abs: float
    ratio: float
    atol: float
    rtol: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.ratio) and self.ratio <= 1.0


def compare(got: torch.Tensor, want: torch.Tensor, *, atol: float, rtol: float = 0.0) -> Err:
    """Elementwise comparison in float64; NaN in ``got`` where ``want`` is finite gives an infinite ratio."""
    got, want = got.detach().double(), want.detach().double().to(got.device)
    if got.shape != want.shape:
        raise AssertionError(f"shape {tuple(got.shape)} != reference {tuple(want.shape)}")
    if got.numel() == 0:
        return Err(0.0, 0.0, atol, rtol)
    diff = (got - want).abs()
    diff = torch.where(torch.isfinite(want) & ~torch.isfinite(got), torch.full_like(diff, math.inf), diff)
    ratio = diff / (atol + rtol * want.abs())
    return Err(float(diff.max()), float(ratio.max()), atol, rtol)


def _randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64, device=gen.device) * scale


def _rand(gen, *shape):
    return torch.rand(*shape, generator=gen, dtype=torch.float64, device=gen.device)


# ---------------------------------------------------------------------------------------------------- post_res


def check_post_res(cfg, T: int, device: str, gen: torch.Generator) -> dict[str, Err]:
    """``post_res_{fwd,bwd}[n, C, dtype]`` against :func:`mhc.reference.post_res` / ``post_res_backward`` in fp64."""
    n, C, dt = cfg.kwargs["n"], cfg.kwargs["C"], DTYPES[cfg.kwargs["dtype"]]
    y = _randn(gen, T, C).to(dt)
    x = _randn(gen, T, n, C).to(dt)
    h_post = _rand(gen, T, n) * 2
    h_res = ref.sinkhorn(_randn(gen, T, n, n, scale=2.0)).float()
    args64 = (y.double(), x.double(), h_post, h_res.double())
    dev = [y, x, h_post.float(), h_res]
    act = {"atol": ACT_ATOL[dt], "rtol": ACT_RTOL[dt]}
    if cfg.direction == "fwd":
        got = torch.ops.mhc.post_res_fwd(*dev)
        return {"out": compare(got, ref.post_res(*args64).to(dt), **act)}
    g = _randn(gen, T, n, C).to(dt)
    got = torch.ops.mhc.post_res_bwd(g, *dev)
    want = ref.post_res_backward(g.double(), *args64)
    # coefficient gradients: fp32 sums over C products of rounded inputs
    scale = float(g.abs().max()) * max(float(x.abs().max()), float(y.abs().max())) if T else 0.0
    coef = {"atol": 1e-6 * math.sqrt(C) * scale + 1e-30, "rtol": 1e-4}
    return {
        "d_layer_output": compare(got[0], want[0].to(dt), **act),
        "d_residual": compare(got[1], want[1].to(dt), **act),
        "d_h_post": compare(got[2], want[2], **coef),
        "d_h_res": compare(got[3], want[3], **coef),
    }


# ---------------------------------------------------------------------------------------------------- sinkhorn


def check_sinkhorn(cfg, T: int, device: str, gen: torch.Generator) -> dict[str, Err]:
    """``sinkhorn_{fwd,bwd}[n, iters, eps]`` against :func:`mhc.reference.sinkhorn` / ``sinkhorn_backward`` in fp64,
    logits N(0, 4)."""
    n, iters, eps = cfg.kwargs["n"], cfg.kwargs["iters"], float(cfg.kwargs["eps"])
    L = _randn(gen, T, n, n, scale=2.0).float()
    if cfg.direction == "fwd":
        got = torch.ops.mhc.sinkhorn_fwd(L, iters, eps)
        return {"h_res": compare(got, ref.sinkhorn(L.double(), iters, eps), atol=SINKHORN_FWD_ATOL)}
    g = _randn(gen, T, n, n).float()
    got = torch.ops.mhc.sinkhorn_bwd(g, L, iters, eps)
    want = ref.sinkhorn_backward(g.double(), L.double(), iters, eps)
    gmax = float(g.abs().max()) if T else 1.0
    return {"grad_logits": compare(got, want, atol=SINKHORN_BWD_ATOL * gmax)}


#: family name -> check function (see the module docstring). Add ``"pre_mapping": check_pre_mapping`` here.
CHECKS: dict[str, Callable[..., dict[str, Err]]] = {
    "post_res": check_post_res,
    "sinkhorn": check_sinkhorn,
}

#: Token counts checked for every configuration: none (no launch), one, and partial last blocks (Sinkhorn runs 128
#: tokens per block, post_res 1-4), then a multi-block count. A family may override with its own tuple here.
DEFAULT_TOKENS: tuple[int, ...] = (0, 1, 7, 129, 1000)
TOKENS: dict[str, tuple[int, ...]] = {}


def tokens_for(family: str) -> tuple[int, ...]:
    return TOKENS.get(family, DEFAULT_TOKENS)


def family_status(family: str, configs) -> str | None:
    """``None`` when the family can be checked; otherwise why not: ``"skip: ..."`` (module not written yet) or
    ``"fail: ..."`` (a module without a check function)."""
    if not configs:
        return "skip: no configurations in the registry"
    if not configs[0].module_exists():
        return f"skip: module {configs[0].module_name} does not exist yet"
    if family not in CHECKS:
        return f"fail: no check function for family {family!r} in profiling/families.py (CHECKS)"
    return None
