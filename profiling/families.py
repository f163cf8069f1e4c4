"""Per-family correctness cases for the GPU run (stage 2) and the compute-sanitizer cases (stage 4).

Every kernel configuration in :data:`tl_kernels.registry.ALL_CONFIGS` belongs to a family (``post_res``,
``sinkhorn``, ``pre_proj`` and ``pre_finalize``, checked through the fused pre-mapping op, ``pre_reduce``,
the sums of the pre-mapping backward's partials, checked directly, ``boundary`` and ``pre_decode``, the one-launch
decode forward). A family is checked by **one function**
registered in :data:`CHECKS`::

    def check_<family>(cfg: KernelConfig, T: int, device: str, gen: torch.Generator) -> dict[str, Err]

It builds random inputs for ``T`` tokens matching ``cfg`` (``cfg.kwargs``: n, C, dtype, iters, eps, ...) on
``device`` with ``gen`` (a generator on that device), calls the ``torch.ops.mhc.*`` op of ``cfg.direction``
(on CUDA that is the TileLang kernel of exactly this configuration; on a CPU, the reference, which is what the dry
run exercises) and returns one :class:`Err` per output: the largest ``|got - want|`` against a float64 reference
and the tolerance for it (``atol + rtol * |want|``, elementwise). A configuration passes when every output's
``ratio`` (max of ``|got - want| / (atol + rtol |want|)``) is at most 1 and nothing is NaN where the reference is
finite.

Every check runs in strict mode (``MHC_STRICT_KERNELS=1``, :func:`strict`): on CUDA a configuration that no
kernel serves raises instead of passing on the PyTorch reference.

To add a family: write its function here, add it to :data:`CHECKS`, and the stage-2 driver
(:mod:`profiling.check_configs`) and :mod:`profiling.sanitize_cases` pick up its registry configurations. A family
whose module ``tl_kernels.<family>`` does not exist yet is skipped with a note; one whose module exists but has no
function here fails stage 2, so it cannot go unchecked.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mhc import reference as ref
from mhc._cuda import TORCH_DTYPES as DTYPES

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


# ---------------------------------------------------------------------------------------------------- pre-mapping

#: The TF32 budget of tl_kernels/pre_proj.py (2**-11 of sum |x phi| for bf16/fp16 activations, 2**-10 + 2**-11 for
#: fp32), asserted with a factor-2 margin, relative to the magnitude of the product.
PRE_TF32 = {torch.bfloat16: 2**-10, torch.float16: 2**-10, torch.float32: 2**-9}
#: Coefficients recomputed in fp64 from the kernel's own proj and rinv: sigmoid (expf) and 40 Sinkhorn half-steps of
#: ex2/lg2.approx (the Sinkhorn family's bound, doubled for the fp32 rounding of the logits).
PRE_COEF_ATOL = 2 * SINKHORN_FWD_ATOL


def budget(got: torch.Tensor, want: torch.Tensor, mag: torch.Tensor, frac: float) -> Err:
    """``|got - want| <= frac * mag`` elementwise (``mag``: the sum of |terms| behind each element)."""
    if got.numel() == 0:
        return Err(0.0, 0.0, frac, 0.0)
    # want and mag are finite here (float64 math on finite inputs); a NaN or Inf in got makes diff NaN or Inf, and
    # torch's max propagates NaN: the Err is then not ok.
    diff = (got.detach().double() - want.detach().double()).abs()
    return Err(float(diff.max()), float((diff / (frac * mag.detach().double() + 1e-30)).max()), frac, 0.0)


def pre_site(n: int, C: int, dt: torch.dtype, T: int, gen: torch.Generator):
    """Random inputs of one site: ``residual [T, n, C]`` (dt), ``phi [nC, m]`` ~ N(0, 1/nC), alpha, bias (fp32)."""
    m, K = n * n + 2 * n, n * C
    x = torch.randn(T, n, C, generator=gen, device=gen.device).to(dt)
    phi = torch.randn(K, m, generator=gen, device=gen.device) / math.sqrt(K)
    alpha = torch.tensor([0.7, 0.5, 1.2], device=gen.device)
    bias = torch.randn(m, generator=gen, device=gen.device) * 0.5
    return x, phi, alpha, bias


def backward_magnitudes(grads, x, phi, alpha, bias, saved, iters=20, eps=0.0, post_mult=2.0):
    """Per-element magnitudes of the sums behind d_residual and d_phi (the backward chain with absolute values):
    the scale of their TF32 rounding errors. ``saved`` = (h_pre, h_post, proj, rinv) of the forward."""
    T, n, C = x.shape
    h_pre, h_post, proj, rinv = (t.double() for t in saved)
    g_li, g_post, g_res, g_pre_in = (t.double() for t in grads)
    x64 = x.double()
    g_pre = (g_li[:, None, :] * x64).sum(-1) + g_pre_in
    d_pre = g_pre * h_pre * (1 - h_pre)
    d_post = g_post * h_post * (1 - h_post / post_mult)
    logits = ref.coefficient_logits(proj, rinv, alpha.double(), bias.double(), n)
    d_res = ref.sinkhorn_backward(g_res, ref.split_coefficients(logits, n)[2], iters, eps)
    d_logits = torch.cat([d_pre, d_post, d_res.flatten(1)], 1).abs()
    a = alpha.double().abs()
    scale = torch.cat([a[:1].expand(n), a[1:2].expand(n), a[2:].expand(n * n)])
    d_proj = d_logits * scale * rinv[:, None]
    rms_term = rinv**3 / (n * C) * (d_logits * scale * proj.abs()).sum(-1)
    mag_x = (d_proj @ phi.double().abs().T).view(T, n, C) + rms_term[:, None, None] * x64.abs()
    mag_x = mag_x + h_pre[..., None] * g_li.abs()[:, None, :]
    return mag_x, x64.flatten(1).abs().T @ d_proj


def pre_mapping_fwd_errs(x, phi, alpha, bias, out, iters, post_mult, rms_eps, eps) -> dict[str, Err]:
    """The pre-mapping forward ``out = (layer_input, h_post, h_res, h_pre, proj, rinv)`` of ``x [T, n, C]`` stage
    by stage against float64: proj within the TF32 budget, rinv, the coefficients recomputed from the kernel's own
    proj and rinv, layer_input within an ulp."""
    n, dt = x.shape[1], x.dtype
    li, hq, hr, hp, proj, rinv = out
    x64, phi64 = x.double(), phi.double()
    xv = x64.flatten(1)
    pre, post, res = ref.split_coefficients(
        ref.coefficient_logits(proj.double(), rinv.double(), alpha.double(), bias.double(), n), n
    )
    return {
        "proj": budget(proj, xv @ phi64, xv.abs() @ phi64.abs(), PRE_TF32[dt]),
        "rinv": compare(rinv, ref.rms_inv(x64, rms_eps), atol=0.0, rtol=1e-5),
        "h_pre": compare(hp, torch.sigmoid(pre), atol=PRE_COEF_ATOL),
        "h_post": compare(hq, post_mult * torch.sigmoid(post), atol=2 * PRE_COEF_ATOL),
        "h_res": compare(hr, ref.sinkhorn(res, iters, eps), atol=PRE_COEF_ATOL),
        "layer_input": compare(li, ref.pre_apply(x64, hp.double()).to(dt), atol=ACT_ATOL[dt], rtol=ACT_RTOL[dt]),
    }


def check_pre_mapping(cfg, T: int, device: str, gen: torch.Generator) -> dict[str, Err]:
    """``pre_proj`` and ``pre_finalize`` configurations through the fused op (fwd: ``mhc::pre_mapping_fwd``, which
    runs both kernels; bwd: ``mhc::pre_mapping_bwd``), stage by stage against float64: proj within the TF32 budget,
    rinv, the coefficients recomputed from the kernel's own proj and rinv, layer_input within an ulp, and the
    backward within the TF32 budget of its products. ``pre_proj`` bwd with ``accumulate`` also runs that kernel
    variant directly (CUDA) against the plain one plus the accumulated gradient; ``pre_finalize`` bwd with
    ``grad_pre=False`` runs that variant directly (CUDA) against the plain kernel given a zero ``grad_h_pre``."""
    kw = cfg.kwargs
    n, C, dt = kw["n"], kw["C"], DTYPES[kw["dtype"]]
    iters, eps, post_mult, rms_eps = kw.get("iters", 20), float(kw.get("eps", 0.0)), 2.0, 1e-6
    x, phi, alpha, bias = pre_site(n, C, dt, T, gen)
    out = torch.ops.mhc.pre_mapping_fwd(x, phi, alpha, bias, iters, post_mult, rms_eps, eps)
    li, hq, hr, hp, proj, rinv = out
    errs = pre_mapping_fwd_errs(x, phi, alpha, bias, out, iters, post_mult, rms_eps, eps)
    if cfg.direction == "fwd":
        return errs
    grads = (_randn(gen, T, C).to(dt), _randn(gen, T, n).float(), _randn(gen, T, n, n).float(),
             _randn(gen, T, n).float())  # fmt: skip
    saved = (hp, hq, proj, rinv)
    if kw.get("grad_pre") is False:  # the variant alone: the op's backward is the plain config's check
        if device != "cpu" and T > 0:
            errs.update(_check_no_grad_pre(n, C, dt, T, gen, x, grads, alpha, bias, saved, post_mult))
        return errs
    got = torch.ops.mhc.pre_mapping_bwd(*grads, x, phi, alpha, bias, *saved, iters, post_mult, eps)
    d64 = [t.double() for t in (*grads, x, phi, alpha, bias, *saved)]
    want = ref.pre_mapping_backward(*d64, iters, post_mult, eps)
    mag_x, mag_phi = backward_magnitudes(grads, x, phi, alpha, bias, saved, iters, eps, post_mult)
    small = {"rtol": 1e-4}
    errs.update(
        d_residual=budget(got[0], want[0], mag_x, PRE_TF32[torch.bfloat16] + ACT_RTOL[dt]),
        d_phi=budget(got[1], want[1], mag_phi, PRE_TF32[dt]),
        d_alpha=compare(got[2], want[2], atol=1e-4 * float(want[2].abs().max()) + 1e-30, **small),
        d_bias=compare(got[3], want[3], atol=1e-4 * float(want[3].abs().max()) + 1e-30, **small),
    )
    if kw.get("accumulate") and device != "cpu" and T > 0:
        errs["d_x_accumulate"] = _check_accumulate(n, C, dt, T, gen, x, phi, alpha, saved)
    return errs


def _check_no_grad_pre(n, C, dt, T, gen, x, grads, alpha, bias, saved, post_mult) -> dict[str, Err]:
    """``pre_finalize_bwd`` with ``grad_pre=False`` (grad_h_pre taken as zero, its buffer never read: filled with
    NaN here) against the plain kernel given zeros: the same arithmetic but for adding a zero, so equal to an ulp or two
    of fp32 (res_logits do not depend on it at all)."""
    from tl_kernels import pre_finalize

    g_li, g_post = grads[0], grads[1]
    h_pre, h_post, proj, rinv = saved
    outs = []
    for grad_pre, g_pre in ((True, torch.zeros_like(h_pre)), (False, torch.full_like(h_pre, float("nan")))):
        d_pp = torch.empty(T, 2 * n, device=x.device)
        res_logits = torch.empty(T, n, n, device=x.device)
        kernel = pre_finalize.pre_finalize_bwd_kernel(n, C, kw_dtype(dt), grad_pre)
        kernel(g_li, x, g_pre, g_post, h_pre, h_post, proj, rinv, alpha, bias, d_pp, res_logits, float(post_mult))
        outs.append((d_pp, res_logits))
    exact = {"atol": 1e-30, "rtol": 2**-22}
    return {
        "d_pp_no_grad_pre": compare(outs[1][0], outs[0][0], **exact),
        "res_logits_no_grad_pre": compare(outs[1][1], outs[0][1], **exact),
    }


def _check_accumulate(n, C, dt, T, gen, x, phi, alpha, saved) -> Err:
    from tl_kernels import pre_proj

    h_pre, _h_post, proj, rinv = saved
    m, K = n * n + 2 * n, n * C
    d_pp, d_res = _randn(gen, T, 2 * n).float(), _randn(gen, T, n * n).float()
    g_li = _randn(gen, T, C).to(dt)
    d_x_in = _randn(gen, T, K).to(dt)
    outs = []
    for acc in (False, True):
        d_x = torch.empty(T, K, dtype=dt, device=x.device)
        part = torch.empty(1, K, m, device=x.device)
        coef = torch.empty(-(-T // pre_proj.BM), 2 * m, device=x.device)
        args = [x.view(T, K), phi, d_pp, d_res, proj, rinv, alpha, h_pre, g_li] + ([d_x_in] if acc else [])
        pre_proj.pre_proj_bwd_kernel(n, C, kw_dtype(dt), acc)(*args, d_x, part, coef)
        outs.append(d_x)
    want = outs[0].double() + d_x_in.double()
    return compare(outs[1], want, atol=ACT_ATOL[dt], rtol=2 * ACT_RTOL[dt])


# ---------------------------------------------------------------------------------------------------- boundary


def check_boundary(cfg, T: int, device: str, gen: torch.Generator) -> dict[str, Err]:
    """``boundary_{fwd,bwd}[n, C, dtype]`` through ``mhc::boundary_fwd`` (the fused kernel, then pre_finalize) and
    ``mhc::boundary_bwd`` against float64 (:mod:`mhc.boundary`'s references): x_next as post_res, the next site's
    pre-mapping from the kernel's x_next as :func:`check_pre_mapping` checks it, and the backward within the TF32
    budget of the pre-mapping's products carried through post_res's backward."""
    from mhc import boundary as mb

    kw = cfg.kwargs
    if kw.get("reduce_dh"):
        return _check_boundary_dh_reduce(kw["n"], T, device, gen)
    n, C, dt = kw["n"], kw["C"], DTYPES[kw["dtype"]]
    iters, eps, post_mult, rms_eps = 20, 0.0, 2.0, 1e-6
    x, phi, alpha, bias = pre_site(n, C, dt, T, gen)
    y = _randn(gen, T, C).to(dt)
    h_post = (_rand(gen, T, n) * 2).float()
    h_res = ref.sinkhorn(_randn(gen, T, n, n, scale=2.0)).float()
    out = torch.ops.mhc.boundary_fwd(y, x, h_post, h_res, phi, alpha, bias, iters, post_mult, rms_eps, eps)
    x_next, rest = out[0], out[1:]
    act = {"atol": ACT_ATOL[dt], "rtol": ACT_RTOL[dt]}
    want_xn = ref.post_res(y.double(), x.double(), h_post.double(), h_res.double())
    errs = {"x_next": compare(x_next, want_xn.to(dt), **act)}
    errs.update(pre_mapping_fwd_errs(x_next, phi, alpha, bias, rest, iters, post_mult, rms_eps, eps))
    if cfg.direction == "fwd":
        return errs
    _li, hq, _hr, hp, proj, rinv = rest
    g_xn = _randn(gen, T, n, C).to(dt)
    grads = (_randn(gen, T, C).to(dt), _randn(gen, T, n).float(), _randn(gen, T, n, n).float(),
             _randn(gen, T, n).float())  # fmt: skip
    args = (g_xn, *grads, y, x, h_post, h_res, x_next, phi, alpha, bias, hp, hq, proj, rinv)
    plain = None
    if device == "cuda":  # the op runs the fully fused backward; the previous (unfused) CUDA path for comparison
        plain = mb._boundary_bwd_unfused_cuda(*args, iters, post_mult, eps)
    from mhc import _cuda

    with _cuda.use_boundary_clusters(bool(kw.get("clusters"))):  # the configuration's variant of the fused backward
        got = torch.ops.mhc.boundary_bwd(*args, iters, post_mult, eps) if kw.get("fused") or plain is None else plain
    want = mb.boundary_backward_reference(*(t.double() for t in args), iters, post_mult, eps)
    mag_xn, mag_phi = backward_magnitudes(grads, x_next, phi, alpha, bias, (hp, hq, proj, rinv), iters, eps, post_mult)
    mag = g_xn.double().abs() + mag_xn  # |terms| behind the gradient reaching x_next: [T, n, C]
    # the summed gradient of x_next is rounded to dt once (as autograd's accumulation), the activation gradients
    # once more on store; the coefficient gradients are fp32 sums of the rounded sum
    act_frac = PRE_TF32[torch.bfloat16] + 2 * ACT_RTOL[dt]
    coef_frac = PRE_TF32[torch.bfloat16] + ACT_RTOL[dt] + 2**-16
    hq64, hr64 = h_post.double().abs(), h_res.double().abs()
    small = {"rtol": 1e-4}
    errs.update(
        d_layer_output=budget(got[0], want[0], (hq64[..., None] * mag).sum(1), act_frac),
        d_residual=budget(got[1], want[1], torch.einsum("tij,tic->tjc", hr64, mag), act_frac),
        d_h_post=budget(got[2], want[2], (mag * y.double().abs()[:, None, :]).sum(-1), coef_frac),
        d_h_res=budget(got[3], want[3], torch.einsum("tic,tjc->tij", mag, x.double().abs()), coef_frac),
        d_phi=budget(got[4], want[4], mag_phi, PRE_TF32[dt]),
        d_alpha=compare(got[5], want[5], atol=1e-4 * float(want[5].abs().max()) + 1e-30, **small),
        d_bias=compare(got[6], want[6], atol=1e-4 * float(want[6].abs().max()) + 1e-30, **small),
    )
    if kw.get("fused") and plain is not None:
        # the fused backward against the unfused CUDA path: the same roundings in the same order (bit for bit in
        # the CPU emulation, tests/emulation/test_boundary_op_emulated.py); one output rounding of room for nvcc
        # contracting the two kernels' multiply-adds differently
        errs.update(
            d_layer_output_vs_unfused=compare(got[0], plain[0], atol=1e-30, rtol=ACT_RTOL[dt]),
            d_residual_vs_unfused=compare(got[1], plain[1], atol=1e-30, rtol=ACT_RTOL[dt]),
            d_bias_vs_unfused=compare(got[6], plain[6], atol=1e-30, rtol=1e-6),
        )
    return errs


def _check_boundary_dh_reduce(n: int, T: int, device: str, gen: torch.Generator) -> dict[str, Err]:
    """``boundary_bwd[n, reduce_dh=True]`` (``boundary_reduce_bwd``, the fused backward's last launch): its fixed-order
    sum of the d_h partials over 1 + T % 7 channel blocks against float64, within ``(blocks + 1) * 2**-24`` of the
    sum of magnitudes (its d_phi / d_alpha / d_bias blocks run on zeros here). On a CPU the fp32 torch sum stands
    in."""
    q, blocks = n * n + n, 1 + T % 7
    part = _randn(gen, blocks, T, q).float()
    d_hr, d_hp = torch.empty(T, n, n, device=device), torch.empty(T, n, device=device)
    if device == "cuda" and T > 0:
        from tl_kernels import boundary_bwd

        # the backward's reduction: one split of zeros and one row of coefficient partials alongside the d_h sum
        m = n * n + 2 * n
        zeros = torch.zeros(1, m, 4, device=device)  # a d_phi of m x 4 floats
        out = (torch.empty(m, 4, device=device), torch.empty(3, device=device), torch.empty(m, device=device))
        coef = torch.zeros(1, 2 * m, device=device)
        boundary_bwd.boundary_reduce_bwd_kernel(n)(zeros, coef, part, out[0], out[1], out[2], d_hr, d_hp)
    else:
        total = part.sum(0)
        d_hr.copy_(total[:, : n * n].reshape(T, n, n))
        d_hp.copy_(total[:, n * n :])
    want, mag = part.double().sum(0), part.double().abs().sum(0)
    frac = (blocks + 1) * 2**-24
    return {
        "d_h_res": budget(d_hr.reshape(T, n * n), want[:, : n * n], mag[:, : n * n], frac),
        "d_h_post": budget(d_hp, want[:, n * n :], mag[:, n * n :], frac),
    }


def check_pre_reduce(cfg, T: int, device: str, gen: torch.Generator) -> dict[str, Err]:
    """``pre_reduce_bwd[n, reduce_phi]``: the sums of pre_proj_bwd's partials (d_phi over 3 splits, d_bias and
    d_alpha over the token tiles) against float64, within ``(terms + 8) * 2**-24`` of the sum of magnitudes. ``T``
    tokens make ``ceil(T / 64)`` tiles (at least one); K = 64 n (1 + T % 5). On a CPU the fp32 torch sums stand
    in."""
    n, reduce_phi = cfg.kwargs["n"], cfg.kwargs["reduce_phi"]
    m, K = n * n + 2 * n, n * 64 * (1 + T % 5)
    S = 3 if reduce_phi else 1
    rows = max(1, -(-T // 64))
    d_phi_part, coef = _randn(gen, S, K, m).float(), _randn(gen, rows, 2 * m).float()
    d_alpha = torch.empty(3, device=device)
    d_bias = torch.empty(m, device=device)
    d_phi = torch.empty(K, m, device=device)
    if device == "cuda":
        from tl_kernels import pre_reduce

        kernel = pre_reduce.pre_reduce_bwd_kernel(n, reduce_phi)
        if reduce_phi:
            kq = K * m // pre_reduce.VEC
            kernel(d_phi_part.view(S, kq, pre_reduce.VEC), coef, d_phi.view(kq, pre_reduce.VEC), d_alpha, d_bias)
        else:
            kernel(coef, d_alpha, d_bias)
    else:
        d_phi.copy_(d_phi_part.sum(0))
        sums = coef.sum(0)
        d_bias.copy_(sums[:m])
        d_alpha.copy_(torch.stack([sums[m : m + n].sum(), sums[m + n : m + 2 * n].sum(), sums[m + 2 * n :].sum()]))
    sums, mags = coef.double().sum(0), coef.double().abs().sum(0)
    groups = [slice(m, m + n), slice(m + n, m + 2 * n), slice(m + 2 * n, 2 * m)]
    want_a, mag_a = torch.stack([sums[g].sum() for g in groups]), torch.stack([mags[g].sum() for g in groups])
    errs = {
        "d_bias": budget(d_bias, sums[:m], mags[:m], (rows + 8) * 2**-24),
        "d_alpha": budget(d_alpha, want_a, mag_a, (rows + n * n + 8) * 2**-24),
    }
    if reduce_phi:
        errs["d_phi"] = budget(d_phi, d_phi_part.double().sum(0), d_phi_part.double().abs().sum(0), (S + 1) * 2**-24)
    return errs


# ---------------------------------------------------------------------------------------------------- decode


def check_pre_decode(cfg, T: int, device: str, gen: torch.Generator) -> dict[str, Err]:
    """``pre_decode_fwd[n, C, dtype, iters, eps]`` (the one-launch pre-mapping for T <= 64) as
    :func:`check_pre_mapping` checks the forward. On CUDA the decode kernel is launched through
    ``mhc._cuda._pre_decode_fwd``, which must serve the call (a silent fall back to the two-launch forward fails the
    check, as a reference fallback fails strict mode), twice, with bitwise equal results (fixed-order reduction and
    the self-resetting tickets); ``T`` = 0, T > 64 (the compute-sanitizer cases' fixed token counts; the op then
    runs the two-launch forward) and the CPU dry run go through ``mhc::pre_mapping_fwd``."""
    from mhc import _cuda
    from tl_kernels.pre_decode import MAX_TOKENS

    kw = cfg.kwargs
    n, C, dt = kw["n"], kw["C"], DTYPES[kw["dtype"]]
    iters, eps, post_mult, rms_eps = kw["iters"], float(kw["eps"]), 2.0, 1e-6
    x, phi, alpha, bias = pre_site(n, C, dt, T, gen)
    if device != "cuda" or not 1 <= T <= MAX_TOKENS:
        out = torch.ops.mhc.pre_mapping_fwd(x, phi, alpha, bias, iters, post_mult, rms_eps, eps)
        return pre_mapping_fwd_errs(x, phi, alpha, bias, out, iters, post_mult, rms_eps, eps)
    m = n * n + 2 * n
    f32 = dict(device=x.device, dtype=torch.float32)
    runs = []
    for _ in range(2):
        out = (x.new_empty(T, C), torch.empty(T, n, **f32), torch.empty(T, n, n, **f32), torch.empty(T, n, **f32),
               torch.empty(T, m, **f32), torch.empty(T, **f32))  # fmt: skip
        if not _cuda._pre_decode_fwd(x, phi, alpha, bias, iters, post_mult, rms_eps, eps, out):
            raise RuntimeError(f"{cfg.name}: the decode kernel did not serve T={T} (disabled or T > 64?)")
        runs.append(out)
    errs = pre_mapping_fwd_errs(x, phi, alpha, bias, runs[0], iters, post_mult, rms_eps, eps)
    same = all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    errs["bitwise_rerun"] = Err(0.0 if same else math.inf, 0.0 if same else math.inf, 0.0, 0.0)
    return errs


def kw_dtype(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def strict(check: Callable[..., dict[str, Err]]) -> Callable[..., dict[str, Err]]:
    """``check`` with ``MHC_STRICT_KERNELS=1`` for the duration of each call (mhc/_cuda.py reads it per call): a
    fallback to the reference raises, so a configuration cannot pass stage 2 without its kernel. The previous value
    is restored afterwards (importing this module changes nothing)."""

    @functools.wraps(check)
    def run(*args, **kwargs):
        from mhc._cuda import STRICT_ENV

        before = os.environ.get(STRICT_ENV)
        os.environ[STRICT_ENV] = "1"
        try:
            return check(*args, **kwargs)
        finally:
            if before is None:
                os.environ.pop(STRICT_ENV, None)
            else:
                os.environ[STRICT_ENV] = before

    return run


#: family name -> check function (see the module docstring), each in strict mode.
CHECKS: dict[str, Callable[..., dict[str, Err]]] = {
    "post_res": strict(check_post_res),
    "sinkhorn": strict(check_sinkhorn),
    "pre_proj": strict(check_pre_mapping),
    "pre_finalize": strict(check_pre_mapping),
    "pre_reduce": strict(check_pre_reduce),
    "boundary": strict(check_boundary),
    "pre_decode": strict(check_pre_decode),
}

#: Token counts checked for every configuration: none (no launch), one, and partial last blocks (Sinkhorn runs 128
#: tokens per block, post_res 1-4), then a multi-block count. A family may override with its own tuple here.
DEFAULT_TOKENS: tuple[int, ...] = (0, 1, 7, 129, 1000)
TOKENS: dict[str, tuple[int, ...]] = {"pre_decode": (0, 1, 9, 64)}  # the decode kernel serves T <= 64


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
