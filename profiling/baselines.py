"""Optional third-party baselines for the kernel benchmarks: DeepSeek's TileKernels (``tile_kernels`` 2.x, TileLang)
and Liger-Kernel's mHC ops (``liger_kernel.ops.mhc``, Triton). Neither is a dependency: each is used when it
imports and its adapter agrees with our reference on a small input, and skipped with a note otherwise.

The adapters are written from the packages' documented APIs (their READMEs and docstrings; the conventions are in
``docs/spec.md`` §7), which differ between releases, so each one looks a function up under a few module
paths and binds its parameters **by name** (``bind``): a parameter it does not know makes the baseline skip with
that name in the note, never a wrong call. Conventions bridged:

* TileKernels' ``comb`` is the transpose of our ``h_res`` (``out[o] = Σ_i comb[i, o] x[i]``), its Sinkhorn starts
  from a row softmax, ends with a column normalisation and adds ``eps`` to every denominator (default 1e-6, 10
  iterations). We pass 20 iterations and eps 0, transposed logits, and compare the transposed result.
* TileKernels' token tensors carry a leading sequence dimension (``[S, T, ...]``, S = 1 here) and
  ``post_layer_mix`` is ``[..., n, 1]``.
* Liger's Sinkhorn is fused with the pre/post split (``mhc_split_sinkhorn_fwd(mix, b, alpha_pre, alpha_post,
  alpha_res, *, tmax, pre_eps, sinkhorn_eps, post_mult)``): we feed ``mix`` whose res block is the logits, alpha_res
  = 1 and b = 0, so it computes the same Sinkhorn (plus 2n sigmoids per token); its post_res output is fp32 unless
  an ``out`` is given.

A baseline that imports but disagrees with the reference (max |diff| over a tolerance) is skipped and the note says
by how much: a timing of a different function would be worse than none.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mhc import reference as ref


class AdapterError(Exception):
    """The baseline cannot be called for this case (missing function, unknown parameter, wrong result)."""


@dataclass
class Baseline:
    """One third-party implementation: ``available`` when it imported; ``note`` says why not (or what was
    bridged); ``cases(op, mode, inputs)`` returns a zero-argument callable or raises :class:`AdapterError`."""

    name: str
    label: str
    available: bool
    note: str
    module: object = None
    notes: dict = field(default_factory=dict)  # (op, mode) -> why that case was skipped

    def case(self, op: str, mode: str, inputs: dict) -> Callable[[], object] | None:
        """A checked zero-argument callable for ``(op, mode)`` on ``inputs``, or ``None`` (reason in ``notes``)."""
        if not self.available:
            return None
        builder = ADAPTERS.get((self.name, op, mode))
        if builder is None:
            self.notes[(op, mode)] = f"{self.label} has no {op} {mode} adapter"
            return None
        try:
            fn, check = builder(self.module, inputs)
            check(fn())
            return fn
        except AdapterError as exc:
            self.notes[(op, mode)] = f"{self.label} {op} {mode}: {exc}"
        except Exception as exc:  # noqa: BLE001 - a failing third-party call is a skip with its reason
            self.notes[(op, mode)] = f"{self.label} {op} {mode} failed: {type(exc).__name__}: {str(exc)[:160]}"
        return None


# ---------------------------------------------------------------------------------------------------- loading


def _import(name: str):
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install raising anything at import
        return None, f"{type(exc).__name__}: {str(exc)[:160]}"


def load_tilekernels() -> Baseline:
    mod, err = _import("tile_kernels")
    label = "TileKernels"
    if mod is None:
        return Baseline("tilekernels", label, False, f"not importable ({err}); needs tile-kernels 2.x, Python >= 3.12")
    version = getattr(mod, "__version__", "?")
    return Baseline("tilekernels", label, True, f"tile_kernels {version}: comb = h_res^T, 20 iterations, eps 0", mod)


def load_liger() -> Baseline:
    mod, err = _import("liger_kernel.ops.mhc")
    label = "Liger"
    if mod is None:
        return Baseline("liger", label, False, f"not importable ({err})")
    try:
        from importlib.metadata import version

        v = version("liger-kernel")
    except Exception:  # noqa: BLE001
        v = "?"
    return Baseline("liger", label, True, f"liger-kernel {v} (Triton): sinkhorn fused with the pre/post split", mod)


def load_all(names=("tilekernels", "liger")) -> list[Baseline]:
    loaders = {"tilekernels": load_tilekernels, "liger": load_liger}
    return [loaders[n]() for n in names]


# ---------------------------------------------------------------------------------------------------- binding


def find(root, names: tuple[str, ...], submodules: tuple[str, ...]) -> Callable:
    """The first attribute in ``names`` found on ``root`` or on ``root.<sub>`` for each of ``submodules``."""
    tried = []
    for sub in ("", *submodules):
        mod = root
        if sub:
            mod, _ = _import(f"{root.__name__}.{sub}")
            if mod is None:
                continue
        for name in names:
            fn = getattr(mod, name, None)
            if callable(fn):
                return fn
            tried.append(f"{mod.__name__}.{name}")
    raise AdapterError(f"none of {', '.join(names)} found (tried {len(tried)} places)")


def bind(fn: Callable, values: dict[str, object]) -> Callable[[], object]:
    """``lambda: fn(**chosen)``: every parameter of ``fn`` without a default must be in ``values``; parameters
    with defaults are passed when ``values`` has them."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"cannot read the signature of {getattr(fn, '__name__', fn)}: {exc}") from exc
    args, kwargs = [], {}
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in values:
            if p.kind == p.POSITIONAL_ONLY:
                args.append(values[p.name])
            else:
                kwargs[p.name] = values[p.name]
        elif p.default is p.empty:
            raise AdapterError(f"{fn.__name__}: unknown required parameter {p.name!r}")
    return lambda: fn(*args, **kwargs)


def _first_tensor(result, fallback: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], torch.Tensor):
        return result[0]
    if result is None and fallback is not None:
        return fallback
    raise AdapterError(f"unexpected result type {type(result).__name__}")


def _close(got: torch.Tensor, want: torch.Tensor, atol: float, what: str) -> None:
    """``max |got - want| <= atol * (1 + max |want|)``."""
    got, want = got.detach().float().reshape(want.shape), want.detach().float()
    if not want.numel():
        return
    err, tol = float((got - want).abs().max()), atol * (1 + float(want.abs().max()))
    if not err <= tol:  # also catches NaN
        raise AdapterError(f"disagrees with the reference on {what}: max |diff| {err:.3g} > {tol:.3g}")


# ---------------------------------------------------------------------------------------------------- adapters
# inputs (from profiling.bench): y [T, C], x [T, n, C] (activation dtype), h_post [T, n], h_res [T, n, n], grad
# [T, n, C] for post_res; L [T, n, n] logits and gL for Sinkhorn; iters.


def _tk_post_fwd(mod, d):
    fn = find(mod, ("mhc_post_fwd",), ("mhc", "mhc.post", "mhc.post_kernel", "modeling.mhc.ops.post"))
    T, n, C = d["x"].shape
    out = torch.empty(1, T, n, C, dtype=d["x"].dtype, device=d["x"].device)
    comb = d["h_res"].transpose(-1, -2).contiguous().view(1, T, n, n)
    values = {"x": d["y"].view(1, T, C), "residual": d["x"].view(1, T, n, C),
              "post_layer_mix": d["h_post"].view(1, T, n, 1), "comb_res_mix": comb, "out": out}  # fmt: skip
    call = bind(fn, values)
    want = ref.post_res(d["y"], d["x"], d["h_post"], d["h_res"])
    return call, lambda r: _close(_first_tensor(r, out), want, 0.05, "the output")


def _tk_post_bwd(mod, d):
    fn = find(mod, ("mhc_post_bwd",), ("mhc", "mhc.post", "mhc.post_kernel", "modeling.mhc.ops.post"))
    T, n, C = d["x"].shape
    comb = d["h_res"].transpose(-1, -2).contiguous().view(1, T, n, n)
    g = d["grad"].view(1, T, n, C)
    values = {"x": d["y"].view(1, T, C), "residual": d["x"].view(1, T, n, C),
              "post_layer_mix": d["h_post"].view(1, T, n, 1), "comb_res_mix": comb, "d_o": g, "o_grad": g,
              "grad_output": g, "fuse_grad_acc": False}  # fmt: skip
    call = bind(fn, values)
    want = ref.post_res_backward(d["grad"], d["y"], d["x"], d["h_post"], d["h_res"])
    return call, lambda r: _close(_first_tensor(r), want[0], 0.05, "d_layer_output")


def _tk_sinkhorn_fwd(mod, d):
    fn = find(mod, ("mhc_sinkhorn_fwd", "sinkhorn_normalize"), ("mhc", "mhc.sinkhorn", "mhc.sinkhorn_kernel"))
    Lt = d["L"].transpose(-1, -2).contiguous()
    out = torch.empty_like(Lt)
    values = {"comb_res_mix": Lt, "x": Lt, "comb_res_mix_out": out, "out": out, "repeat": d["iters"], "eps": 0.0}
    call = bind(fn, values)
    want = ref.sinkhorn(d["L"], d["iters"])
    return call, lambda r: _close(_first_tensor(r, out).transpose(-1, -2), want, 1e-4, "h_res")


def _tk_sinkhorn_bwd(mod, d):
    fn = find(mod, ("mhc_sinkhorn_bwd",), ("mhc", "mhc.sinkhorn", "mhc.sinkhorn_kernel"))
    Lt = d["L"].transpose(-1, -2).contiguous()
    gt = d["gL"].transpose(-1, -2).contiguous()
    grad_in = torch.empty_like(Lt)
    values = {"grad_output": gt, "x": Lt, "grad_input": grad_in, "repeat": d["iters"], "eps": 0.0}
    call = bind(fn, values)
    want = ref.sinkhorn_backward(d["gL"], d["L"], d["iters"])
    return call, lambda r: _close(_first_tensor(r, grad_in).transpose(-1, -2), want, 1e-3, "grad_logits")


def _liger_post_fwd(mod, d):
    fn = find(mod, ("mhc_post_res_fwd",), ())
    out = torch.empty_like(d["x"])
    values = {"x": d["x"], "f_out": d["y"], "h_post": d["h_post"], "h_res": d["h_res"], "out": out}
    call = bind(fn, values)
    want = ref.post_res(d["y"], d["x"], d["h_post"], d["h_res"])
    return call, lambda r: _close(_first_tensor(r, out), want, 0.05, "the output")


def _liger_post_bwd(mod, d):
    fn = find(mod, ("mhc_post_res_bwd",), ())
    values = {"x": d["x"], "f_out": d["y"], "h_post": d["h_post"], "h_res": d["h_res"], "grad_out": d["grad"],
              "go": d["grad"], "grad_output": d["grad"]}  # fmt: skip
    call = bind(fn, values)
    want = ref.post_res_backward(d["grad"], d["y"], d["x"], d["h_post"], d["h_res"])

    def check(r):
        if not isinstance(r, (tuple, list)):
            raise AdapterError(f"expected a tuple of gradients, got {type(r).__name__}")
        # the d_residual gradient is the one shaped like x; Liger orders its outputs its own way
        d_res = next((t for t in r if isinstance(t, torch.Tensor) and t.shape == d["x"].shape), None)
        if d_res is None:
            raise AdapterError("no gradient shaped like the residual in the result")
        _close(d_res, want[1], 0.05, "d_residual")

    return call, check


def _liger_mix(d):
    T, n, _ = d["L"].shape
    mix = torch.zeros(T, n * n + 2 * n, device=d["L"].device)
    mix[:, 2 * n :] = d["L"].transpose(-1, -2).reshape(T, n * n)
    one = torch.ones(1, device=d["L"].device)
    return mix, torch.zeros(n * n + 2 * n, device=d["L"].device), one


def _liger_sinkhorn_fwd(mod, d):
    fn = find(mod, ("mhc_split_sinkhorn_fwd",), ())
    mix, b, one = _liger_mix(d)
    values = {"mix": mix, "b": b, "alpha_pre": one, "alpha_post": one, "alpha_res": one, "tmax": d["iters"],
              "pre_eps": 0.0, "sinkhorn_eps": 0.0, "post_mult": 2.0}  # fmt: skip
    call = bind(fn, values)
    want = ref.sinkhorn(d["L"], d["iters"])

    def check(r):
        if not isinstance(r, (tuple, list)) or len(r) < 3:
            raise AdapterError("expected (h_pre, h_post, h_res, ...)")
        _close(r[2].transpose(-1, -2), want, 1e-4, "h_res")

    return call, check


def _liger_sinkhorn_bwd(mod, d):
    fn = find(mod, ("mhc_sinkhorn_bwd",), ())
    mix, b, one = _liger_mix(d)
    gt = d["gL"].transpose(-1, -2).contiguous()
    values = {"mix": mix, "b": b, "alpha_res": one, "grad_hres": gt, "tmax": d["iters"], "sinkhorn_eps": 0.0}
    call = bind(fn, values)
    want = ref.sinkhorn_backward(d["gL"], d["L"], d["iters"])
    return call, lambda r: _close(_first_tensor(r).transpose(-1, -2), want, 1e-3, "grad_logits")


ADAPTERS = {
    ("tilekernels", "post_res", "fwd"): _tk_post_fwd,
    ("tilekernels", "post_res", "bwd"): _tk_post_bwd,
    ("tilekernels", "sinkhorn", "fwd"): _tk_sinkhorn_fwd,
    ("tilekernels", "sinkhorn", "bwd"): _tk_sinkhorn_bwd,
    ("liger", "post_res", "fwd"): _liger_post_fwd,
    ("liger", "post_res", "bwd"): _liger_post_bwd,
    ("liger", "sinkhorn", "fwd"): _liger_sinkhorn_fwd,
    ("liger", "sinkhorn", "bwd"): _liger_sinkhorn_bwd,
}
# The fused pre-mapping has no like-for-like baseline: TileKernels 2.x moved its projection GEMM to DeepGEMM
# (tf32_hc_prenorm_gemm) and Liger splits it differently; comparing those needs their whole chains, not built yet.
