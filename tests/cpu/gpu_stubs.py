"""Run the GPU tests' bodies on a CPU: what `tests/cpu/test_gpu_tests_on_cpu.py` uses to catch API slips (a wrong
expected value, a kernel called with the wrong arguments, a wrong shape) before device time is spent on them.

:func:`cpu_as_cuda` is a context in which

* ``device="cuda"`` (any torch function's ``device`` argument, ``Tensor.to``, ``Tensor.cuda``, ``torch.Generator``)
  means the CPU (a ``TorchFunctionMode``);
* every ``torch.ops.mhc.*`` call goes to its CUDA wrapper in :mod:`mhc._cuda` (a ``TorchDispatchMode``), so the
  fallback decisions, the split and slice choices and the kernel calls are the GPU's; except calls on float64
  tensors, which run the CPU ops (on a GPU they are the tests' float64 references on ``.cpu()`` copies: CPU and
  CUDA tensors are not told apart here);
* every TileLang kernel builder in ``tl_kernels`` returns a :class:`FakeKernel`: it builds the kernel's TIR program
  (no compilation) and checks each call against its parameters **by position**, as TileLang's tvm-ffi adapter binds
  them: count, dtype, rank, the static dims, the dynamic dims bound consistently (``num_tokens``, ``num_splits``)
  and non-zero (a grid of zero blocks is a launch error), scalars of the right kind, contiguity; then it writes the
  outputs from the float64 reference (the kernels' documented math, so the test's assertions see correct values);
* ``torch.cuda`` is stubbed (one device of 132 SMs, streams, ``synchronize``); a ``torch.cuda.graph`` capture
  records every op dispatched inside it and ``replay()`` re-runs them into the captured outputs.

It finds what a test passes to the kernels and ops and what it asserts about their results; it cannot find a
kernel's numerical error or a launch fault (those need the GPU)."""

from __future__ import annotations

import contextlib
import functools
import types

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mhc import _cuda
from mhc import reference as ref
from tl_kernels import _common

SMS = _common.H100_SMS  # the split and slice choices depend on it


def _cpu(device):
    if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


class _CudaAsCpu(TorchFunctionMode):
    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_cpu(a) for a in args)
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return func(*args, **kwargs)


def _cuda_impl(func):
    """The function an ``mhc::*`` custom op runs for CUDA tensors (its ``register_kernel("cuda")``), which the
    dispatcher would pick on a GPU: the wrappers live in mhc._cuda and mhc.boundary."""
    return torch._library.custom_ops.OPDEFS[f"{func.namespace}::{func._opname}"]._backend_fns["cuda"]


class _RouteToCudaWrappers(TorchDispatchMode):
    """mhc ops -> mhc._cuda wrappers; inside a graph capture, records every op for replay."""

    def __init__(self):
        super().__init__()
        self.recording: list | None = None

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if func.namespace == "mhc" and not any(t.dtype == torch.float64 for t in tensors):
            out = _cuda_impl(func)(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if self.recording is not None:
            self.recording.append((func, args, kwargs, out))
        return out


class _Graph:
    """``torch.cuda.CUDAGraph`` stand-in: the ops dispatched during capture, re-run in order by ``replay``, each
    result copied into the tensor the capture returned (the static output a real graph writes)."""

    def __init__(self, *args, **kwargs):
        self.ops = []

    def replay(self):
        for func, args, kwargs, out in self.ops:
            new = func(*args, **kwargs)
            for o, v in zip(tree_flatten(out)[0], tree_flatten(new)[0], strict=True):
                if isinstance(o, torch.Tensor) and o is not v:
                    o.copy_(v)


class _Stream:
    def __init__(self, *args, priority=0, **kwargs):
        self.priority = priority

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    @staticmethod
    def priority_range():
        return (0, -5)


class _Generator(torch.Generator):
    def __new__(cls, device=None):
        return super().__new__(cls, "cpu")


# ---------------------------------------------------------------------------------------------------- kernels


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


class FakeKernel:
    """A kernel built from its TIR program; ``__call__`` binds positionally and checks, then runs ``impl``."""

    calls: list

    def __init__(self, name: str, config: tuple, program, impl):
        self.name, self.config, self.program, self.impl = name, config, program, impl

    def __call__(self, *args):
        params = list(self.program.params)
        if len(args) != len(params):
            names = [p.name.removesuffix("_handle") for p in params]
            raise TypeError(f"{self.name}{self.config}: expected {len(params)} arguments {names}, got {len(args)}")
        dyn: dict[str, int] = {}
        for i, (p, a) in enumerate(zip(params, args, strict=True)):
            pname = p.name.removesuffix("_handle")
            buf = self.program.buffer_map.get(p)
            where = f"{self.name}{self.config} argument {i} ({pname})"
            if buf is None:  # a scalar
                kind = str(p.dtype)
                ok = (
                    isinstance(a, float) if kind.startswith("float") else isinstance(a, int) and not isinstance(a, bool)
                )
                if not ok:
                    raise TypeError(f"{where}: expected a Python {kind} scalar, got {type(a).__name__}")
                continue
            if not isinstance(a, torch.Tensor):
                raise TypeError(f"{where}: expected a tensor, got {type(a).__name__}")
            if _dtype_name(a) != str(buf.dtype):
                raise TypeError(f"{where}: expected {buf.dtype}, got {_dtype_name(a)}")
            if a.dim() != len(buf.shape):
                raise ValueError(f"{where}: expected rank {len(buf.shape)}, got shape {tuple(a.shape)}")
            if not a.is_contiguous():
                raise ValueError(f"{where}: not contiguous")
            for d, (want, got) in enumerate(zip(buf.shape, a.shape, strict=True)):
                if hasattr(want, "value"):  # a static dim
                    if int(want.value) != got:
                        raise ValueError(f"{where}: dim {d} must be {int(want.value)}, got shape {tuple(a.shape)}")
                elif dyn.setdefault(want.name, got) != got:
                    raise ValueError(f"{where}: {want.name} = {got} here but {dyn[want.name]} earlier")
        for var, value in dyn.items():
            if value < 1:
                raise ValueError(f"{self.name}{self.config}: {var} = {value}: a launch with an empty grid")
        FakeKernel.calls.append((self.name, self.config, dict(dyn)))
        with torch.no_grad():
            self.impl(*args)


FakeKernel.calls = []


def _put(out: torch.Tensor, value: torch.Tensor) -> None:
    out.copy_(value.to(out.dtype))


def _sinkhorn_fwd(n, iters, eps, exp_domain=True):
    from tl_kernels import sinkhorn

    def impl(L, out):
        _put(out, ref.sinkhorn(L.double(), iters, eps))

    return FakeKernel("sinkhorn_fwd", (n, iters, eps, exp_domain), sinkhorn.sinkhorn_fwd_program(n, iters, eps,
                      exp_domain), impl)  # fmt: skip


def _sinkhorn_bwd(n, iters, eps, exp_domain=True):
    from tl_kernels import sinkhorn

    def impl(g, L, out):
        _put(out, ref.sinkhorn_backward(g.double(), L.double(), iters, eps))

    return FakeKernel("sinkhorn_bwd", (n, iters, eps, exp_domain), sinkhorn.sinkhorn_bwd_program(n, iters, eps,
                      exp_domain), impl)  # fmt: skip


def _post_res_fwd(n, C, dtype, pdl=False):
    from tl_kernels import post_res

    def impl(y, x, h_post, h_res, out):
        _put(out, ref.post_res(y.double(), x.double(), h_post.double(), h_res.double()))

    return FakeKernel("post_res_fwd", (n, C, dtype, pdl), post_res.post_res_fwd_program(n, C, dtype, pdl), impl)


def _post_res_bwd(n, C, dtype):
    from tl_kernels import post_res

    def impl(g, y, x, h_post, h_res, *outs):
        want = ref.post_res_backward(g.double(), y.double(), x.double(), h_post.double(), h_res.double())
        for o, w in zip(outs, want, strict=True):
            _put(o, w)

    return FakeKernel("post_res_bwd", (n, C, dtype), post_res.post_res_bwd_program(n, C, dtype), impl)


def _pre_proj_fwd(n, C, dtype):
    from tl_kernels import pre_proj

    chunks = n * C // pre_proj.BK

    def impl(x, phi, proj_part, sq_part):
        S = proj_part.shape[0]
        per = -(-chunks // S)
        if (S - 1) * per >= chunks:
            raise ValueError(f"pre_proj_fwd: split {S - 1} of {S} has no K-chunk ({chunks} chunks): the contract needs "
                             "every split non-empty")  # fmt: skip
        for s in range(S):
            k = slice(s * per * pre_proj.BK, min((s + 1) * per, chunks) * pre_proj.BK)
            xs = x[:, k].double()
            _put(proj_part[s], xs @ phi[k].double())
            _put(sq_part[s], xs.square().sum(1))

    return FakeKernel("pre_proj_fwd", (n, C, dtype), pre_proj.pre_proj_fwd_program(n, C, dtype), impl)


def _pre_proj_bwd(n, C, dtype, accumulate=False):
    from tl_kernels import pre_proj

    K = n * C

    def impl(x, phi, d_pp, d_res, proj, rinv, alpha, h_pre, g_li, *rest):
        d_x_in, d_x, part, coef = rest if accumulate else (None, *rest)
        T = x.shape[0]
        S, tiles = part.shape[0], -(-T // pre_proj.BM)
        if coef.shape[0] != tiles:
            raise ValueError(f"pre_proj_bwd: d_coef_part has {coef.shape[0]} rows, the contract needs {tiles}")
        d_logits = torch.cat([d_pp.double(), d_res.double()], 1)
        scale = ref._group_scale(alpha.double(), n)
        d_proj = d_logits * scale * rinv.double()[:, None]
        cx = -(rinv.double() ** 3) / K * (d_logits * scale * proj.double()).sum(1)
        v = d_proj @ phi.double().T + cx[:, None] * x.double()
        v = v + (h_pre.double()[..., None] * g_li.double()[:, None, :]).reshape(T, K)
        if d_x_in is not None:
            v = v + d_x_in.double()
        _put(d_x, v)
        per = -(-tiles // S)
        for s in range(S):
            t = slice(min(s * per * pre_proj.BM, T), min((s + 1) * per * pre_proj.BM, T))
            _put(part[s], x[t].double().T @ d_proj[t])
        rs = d_logits * proj.double() * rinv.double()[:, None]
        for r in range(tiles):
            t = slice(r * pre_proj.BM, min((r + 1) * pre_proj.BM, T))
            _put(coef[r], torch.cat([d_logits[t].sum(0), rs[t].sum(0)]))

    prog = pre_proj.pre_proj_bwd_program(n, C, dtype, accumulate)
    return FakeKernel("pre_proj_bwd", (n, C, dtype, accumulate), prog, impl)


def _pre_reduce_bwd(n, reduce_phi=True):
    from tl_kernels import pre_reduce

    m = n * n + 2 * n
    groups = [slice(0, n), slice(n, 2 * n), slice(2 * n, m)]

    def coefs(coef, d_alpha, d_bias):
        sums = coef.double().sum(0)
        _put(d_bias, sums[:m])
        _put(d_alpha, torch.stack([sums[m:][g].sum() for g in groups]))

    if reduce_phi:

        def impl(d_phi_part, coef, d_phi, d_alpha, d_bias):
            _put(d_phi, d_phi_part.double().sum(0))
            coefs(coef, d_alpha, d_bias)

    else:
        impl = coefs
    prog = pre_reduce.pre_reduce_bwd_program(n, reduce_phi)
    return FakeKernel("pre_reduce_bwd", (n, reduce_phi), prog, impl)


def _pre_finalize_fwd(n, C, dtype, iters, eps):
    from tl_kernels import pre_finalize

    vec = 16 // (4 if dtype == "float32" else 2)
    chunks = C // vec

    def impl(proj_part, sq_part, alpha, bias, x, li, h_post, h_res, h_pre, proj, rinv, rms_eps, post_mult, slices):
        per = -(-chunks // slices) if slices >= 1 else 0
        if not 1 <= slices <= chunks or (slices - 1) * per >= chunks:
            raise ValueError(f"pre_finalize_fwd: num_slices={slices} with {chunks} chunks of C: the contract needs "
                             "1 <= num_slices <= C / VEC and every slice non-empty")  # fmt: skip
        p, r = proj_part[0].clone(), sq_part[0].clone()
        for s in range(1, proj_part.shape[0]):
            p, r = p + proj_part[s], r + sq_part[s]
        ri = torch.rsqrt(r.double() / (n * C) + rms_eps)
        logits = ref.coefficient_logits(p.double(), ri, alpha.double(), bias.double(), n)
        pre, post, res = ref.split_coefficients(logits, n)
        _put(proj, p)
        _put(rinv, ri)
        _put(h_pre, torch.sigmoid(pre))
        _put(h_post, post_mult * torch.sigmoid(post))
        _put(h_res, ref.sinkhorn(res, iters, eps))
        _put(li, ref.pre_apply(x.double(), h_pre.double()))

    prog = pre_finalize.pre_finalize_fwd_program(n, C, dtype, iters, eps)
    return FakeKernel("pre_finalize_fwd", (n, C, dtype, iters, eps), prog, impl)


def _pre_finalize_bwd(n, C, dtype, grad_pre=True):
    from tl_kernels import pre_finalize

    def impl(g_li, x, g_pre, g_post, h_pre, h_post, proj, rinv, alpha, bias, d_pp, res_logits, post_mult):
        hp, hq = h_pre.double(), h_post.double()
        inner = (g_li.double()[:, None, :] * x.double()).sum(-1)
        _put(d_pp[:, :n], (inner + g_pre.double() if grad_pre else inner) * hp * (1 - hp))
        _put(d_pp[:, n:], g_post.double() * hq * (1 - hq / post_mult))
        logits = ref.coefficient_logits(proj.double(), rinv.double(), alpha.double(), bias.double(), n)
        _put(res_logits, ref.split_coefficients(logits, n)[2])

    program = pre_finalize.pre_finalize_bwd_program(n, C, dtype, grad_pre)
    return FakeKernel("pre_finalize_bwd", (n, C, dtype, grad_pre), program, impl)


def _pre_decode_fwd(n, C, dtype, iters, eps):
    from tl_kernels import pre_decode

    chunks = n * C // pre_decode.BK

    def impl(x, phi, alpha, bias, li, h_post, h_res, h_pre, proj, rinv, proj_part, sq_part, ticket, rms_eps,
             post_mult):  # fmt: skip
        T, S = x.shape[0], proj_part.shape[0]
        per = -(-chunks // S)
        if T > pre_decode.MAX_TOKENS or (S - 1) * per >= chunks:
            raise ValueError(f"pre_decode_fwd: T={T}, num_splits={S} with {chunks} chunks: the contract needs "
                             f"T <= {pre_decode.MAX_TOKENS} and every split non-empty")  # fmt: skip
        xv = x.double()
        for s in range(S):  # the partials the kernel leaves in its scratch
            k = slice(s * per * pre_decode.BK, min((s + 1) * per, chunks) * pre_decode.BK)
            _put(proj_part[s], xv[:, k] @ phi.double()[k])
            _put(sq_part[s], xv[:, k].square().sum(-1))
        want = ref.pre_mapping(xv.view(T, n, C), phi.double(), alpha.double(), bias.double(), iters, post_mult,
                               rms_eps, eps)  # fmt: skip
        for out, w in zip((li, h_post, h_res, h_pre, proj, rinv), want, strict=True):
            _put(out, w)

    prog = pre_decode.pre_decode_fwd_program(n, C, dtype, iters, eps)
    return FakeKernel("pre_decode_fwd", (n, C, dtype, iters, eps), prog, impl)


def _boundary_fwd(n, C, dtype):
    from tl_kernels import boundary

    p = boundary.plan(n, C, dtype)

    def impl(y, x, h_post, h_res, phi, out, proj_part, sq_part):
        x_next = ref.post_res(y.double(), x.double(), h_post.double(), h_res.double())
        _put(out, x_next)
        xr = out.double()  # the partials use the rounded x_next, as the kernel does
        S = proj_part.shape[0]
        per = -(-p.blocks // S)
        if (S - 1) * per >= p.blocks:
            raise ValueError(f"boundary_fwd: split {S - 1} of {S} has no channel block ({p.blocks} blocks): the "
                             "contract needs every split non-empty")  # fmt: skip
        for s in range(S):
            c = slice(s * per * p.bc, min((s + 1) * per, p.blocks) * p.bc)
            xs = xr[:, :, c]
            rows = phi.double().view(n, C, -1)[:, c]
            _put(proj_part[s], torch.einsum("tic,icm->tm", xs, rows))
            _put(sq_part[s], xs.square().sum((1, 2)))

    return FakeKernel("boundary_fwd", (n, C, dtype), boundary.boundary_fwd_program(n, C, dtype), impl)


def _boundary_bwd(n, C, dtype):
    from tl_kernels import boundary

    def impl(g, d, y, x, h_post, h_res, *outs):
        total = (g + d).double()  # the kernel rounds the sum to the activation dtype once, as autograd does
        want = ref.post_res_backward(total.to(g.dtype).double(), y.double(), x.double(), h_post.double(),
                                     h_res.double())  # fmt: skip
        for o, w in zip(outs, want, strict=True):
            _put(o, w)

    return FakeKernel("boundary_bwd", (n, C, dtype), boundary.boundary_bwd_program(n, C, dtype), impl)


def _boundary_bwd_fused(n, C, dtype, clusters=False):
    from tl_kernels import boundary_bwd

    p = boundary_bwd.fused_plan(n, C, dtype, clusters)
    K, nn = n * C, n * n

    def impl(g_xn, y, x, h_post, h_res, phi, d_pp, d_res, proj, rinv, alpha, h_pre, g_li, d_y, d_x, dh_part, part,
             coef):  # fmt: skip
        T, dt = x.shape[0], x.dtype
        S, tiles, rows = part.shape[0], -(-T // boundary_bwd.FUSED_BM), -(-T // boundary_bwd.COEF_BM)
        if coef.shape[0] != rows or dh_part.shape[0] != p.groups:
            raise ValueError(f"boundary_bwd_fused: d_coef_part has {coef.shape[0]} rows (contract: {rows}), dh_part "
                             f"{dh_part.shape[0]} (contract: {p.groups}: {p.blocks} channel blocks / cluster "
                             f"size {p.cs})")  # fmt: skip
        per = -(-tiles // S)
        if (S - 1) * per >= tiles:
            raise ValueError(f"boundary_bwd_fused: split {S - 1} of {S} has no token tile ({tiles} tiles): the "
                             "contract needs every split non-empty")  # fmt: skip
        # x_next as post_res rounds it, site l+1's d x_next as pre_proj_bwd (rounded), the sum rounded once
        x_next = ref.post_res(y.double(), x.double(), h_post.double(), h_res.double()).to(dt).double()
        d_logits = torch.cat([d_pp.double(), d_res.double()], 1)
        scale = ref._group_scale(alpha.double(), n)
        d_proj = d_logits * scale * rinv.double()[:, None]
        cx = -(rinv.double() ** 3) / K * (d_logits * scale * proj.double()).sum(1)
        v = (d_proj @ phi.double().T).view(T, n, C) + cx[:, None, None] * x_next
        v = v + h_pre.double()[..., None] * g_li.double()[:, None, :]
        g = (g_xn.double() + v.to(dt).double()).to(dt).double()
        dy, dx, _dhp, _dhr = ref.post_res_backward(g, y.double(), x.double(), h_post.double(), h_res.double())
        _put(d_y, dy)
        _put(d_x, dx)
        # one d_h partial per thread block cluster (per channel block at cs = 1): its cs g channels of every stream
        gb, yb, xb = (
            g.view(T, n, p.groups, p.cs * p.g),
            y.double().view(T, p.groups, p.cs * p.g),
            x.double().view(T, n, p.groups, p.cs * p.g),
        )
        dhr = torch.einsum("tibc,tjbc->btij", gb, xb).reshape(p.groups, T, nn)
        dhp = torch.einsum("tibc,tbc->bti", gb, yb)
        _put(dh_part, torch.cat([dhr, dhp], 2))
        xv = x_next.reshape(T, K)
        for s in range(S):
            t = slice(min(s * per * boundary_bwd.FUSED_BM, T), min((s + 1) * per * boundary_bwd.FUSED_BM, T))
            _put(part[s], xv[t].T @ d_proj[t])
        rs = d_logits * proj.double() * rinv.double()[:, None]
        for r in range(rows):
            t = slice(r * boundary_bwd.COEF_BM, min((r + 1) * boundary_bwd.COEF_BM, T))
            _put(coef[r], torch.cat([d_logits[t].sum(0), rs[t].sum(0)]))

    prog = boundary_bwd.boundary_bwd_fused_program(n, C, dtype, clusters)
    return FakeKernel("boundary_bwd_fused", (n, C, dtype, clusters), prog, impl)


def _boundary_reduce_bwd(n):
    from tl_kernels import boundary_bwd

    m = n * n + 2 * n

    def impl(d_phi_part, d_coef_part, dh_part, d_phi, d_alpha, d_bias, d_h_res, d_h_post):
        _put(d_phi, d_phi_part.double().sum(0))
        cols = d_coef_part.double().sum(0)
        _put(d_bias, cols[:m])
        scale = cols[m:]
        _put(d_alpha, torch.stack([scale[:n].sum(), scale[n : 2 * n].sum(), scale[2 * n :].sum()]))
        total = dh_part.double().sum(0)
        _put(d_h_res, total[:, : n * n].reshape(-1, n, n))
        _put(d_h_post, total[:, n * n :])

    return FakeKernel("boundary_reduce_bwd", (n,), boundary_bwd.boundary_reduce_bwd_program(n), impl)


BUILDERS = {
    ("sinkhorn", "sinkhorn_fwd_kernel"): _sinkhorn_fwd,
    ("sinkhorn", "sinkhorn_bwd_kernel"): _sinkhorn_bwd,
    ("post_res", "post_res_fwd_kernel"): _post_res_fwd,
    ("post_res", "post_res_bwd_kernel"): _post_res_bwd,
    ("pre_proj", "pre_proj_fwd_kernel"): _pre_proj_fwd,
    ("pre_proj", "pre_proj_bwd_kernel"): _pre_proj_bwd,
    ("pre_finalize", "pre_finalize_fwd_kernel"): _pre_finalize_fwd,
    ("pre_finalize", "pre_finalize_bwd_kernel"): _pre_finalize_bwd,
    ("pre_reduce", "pre_reduce_bwd_kernel"): _pre_reduce_bwd,
    ("pre_decode", "pre_decode_fwd_kernel"): _pre_decode_fwd,
    ("boundary", "boundary_fwd_kernel"): _boundary_fwd,
    ("boundary", "boundary_bwd_kernel"): _boundary_bwd,
    ("boundary_bwd", "boundary_bwd_fused_kernel"): _boundary_bwd_fused,
    ("boundary_bwd", "boundary_reduce_bwd_kernel"): _boundary_reduce_bwd,
}


# ---------------------------------------------------------------------------------------------------- the context


@contextlib.contextmanager
def cpu_as_cuda(monkeypatch):
    """See the module docstring. Strict mode is on (a fallback raises), as in tests/gpu."""
    import importlib

    monkeypatch.setenv(_cuda.STRICT_ENV, "1")
    monkeypatch.setattr(_cuda, "_WARNED", set())
    for (module, name), builder in BUILDERS.items():
        monkeypatch.setattr(importlib.import_module(f"tl_kernels.{module}"), name, functools.cache(builder))
    route = _RouteToCudaWrappers()

    @contextlib.contextmanager
    def graph(g, *args, **kwargs):
        route.recording = g.ops
        try:
            yield
        finally:
            route.recording = None

    stream = _Stream()
    cuda = {
        "is_available": lambda: True,
        "synchronize": lambda *a, **k: None,
        "device": lambda *a, **k: contextlib.nullcontext(),
        "current_device": lambda: 0,
        "device_count": lambda: 1,
        "get_device_properties": lambda *a: types.SimpleNamespace(multi_processor_count=SMS, name="CPU stand-in"),
        "Stream": _Stream,
        "current_stream": lambda *a, **k: stream,
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "CUDAGraph": _Graph,
        "graph": graph,
    }
    for name, value in cuda.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch, "Generator", _Generator)
    _cuda._sm_count.cache_clear()
    FakeKernel.calls = []
    try:
        with _CudaAsCpu(), route:
            yield FakeKernel.calls
    finally:
        _cuda._sm_count.cache_clear()
