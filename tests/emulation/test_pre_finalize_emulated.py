"""The generated CUDA source of the pre-mapping finalisation kernels (tl_kernels/pre_finalize.py), executed on the CPU
(see cuda_emu.py), against the float64 reference of the whole pre-mapping.

The forward is fed split-K partials computed here from the residual and phi (what ``pre_proj_fwd`` produces), so
its outputs are compared with ``mhc.reference.pre_mapping`` end to end: proj and rinv, h_pre, h_post, h_res (the
shared Sinkhorn device code) and layer_input, for several split counts, C-slices, a partial last block and
eps > 0. The backward's d_pp and res_logits are compared with the reference's chain rule.

Every test runs twice (the ``approx_mode`` fixture): each exp2f/expf/__log2f/rsqrtf/__fdividef result moved up, then
down, by its documented worst-case error (see cuda_emu.py). ``pre_proj`` (the tensor-core GEMMs) is emulated in
test_pre_proj_emulated.py; timing is for the GPU tests.
"""

from __future__ import annotations

import pytest
import torch

from mhc import reference as ref
from tl_kernels import post_res, pre_finalize

from .cuda_emu import EmulatedKernel

pytestmark = pytest.mark.usefixtures("approx_mode")

DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ULP = {"bfloat16": 2**-7, "float16": 2**-10, "float32": 2e-6}
# Measured max |err| against float64 over these cases: coefficients 3e-7 (h_res, 20 Sinkhorn iterations), proj
# and rinv 1e-7 relative; layer_input within half an output ulp. Asserted with a small margin.
COEF_ATOL = 2e-6
FWD_CASES = [  # (n, C, dtype, T, splits, slices, iters, eps)
    (4, 1280, "bfloat16", 33, 3, 1, 20, 0.0),  # two blocks, the second with one token
    (4, 7168, "float16", 5, 1, 3, 20, 0.0),  # three C-slices
    (2, 256, "float32", 7, 2, 2, 20, 0.3),  # eps large enough to change the result
    (8, 640, "bfloat16", 3, 4, 1, 20, 0.0),
    (1, 64, "float32", 2, 1, 1, 20, 0.0),
    (6, 192, "bfloat16", 4, 2, 1, 3, 1e-6),
    (4, 128, "bfloat16", 9, 56, 2, 20, 0.0),  # decode: 56 splits, 2 tokens a block (token_block), five blocks
    (8, 64, "float16", 3, 40, 1, 20, 0.0),  # 40 x 81 partials a token: one token a block, two staged batches
]


def _inputs(T, n, C, dtype, splits, seed=0):
    g = torch.Generator().manual_seed(seed)
    m, K = n * n + 2 * n, n * C
    x = torch.randn(T, n, C, generator=g).to(DT[dtype])
    phi = torch.randn(K, m, generator=g) * 0.5 / K**0.5
    alpha = torch.tensor([0.8, 0.6, 1.5])
    bias = torch.randn(m, generator=g)
    xv = x.double().reshape(T, K)
    bounds = torch.linspace(0, K, splits + 1).long().tolist()
    proj_part = torch.stack([xv[:, a:b] @ phi.double()[a:b] for a, b in zip(bounds, bounds[1:], strict=False)])
    sq_part = torch.stack([xv[:, a:b].square().sum(-1) for a, b in zip(bounds, bounds[1:], strict=False)])
    return x, phi, alpha, bias, proj_part.float().contiguous(), sq_part.float().contiguous()


@pytest.mark.parametrize(
    "n,C,dtype,T,splits,slices,iters,eps", FWD_CASES, ids=[f"n{c[0]}-C{c[1]}-{c[2]}-eps{c[7]}" for c in FWD_CASES]
)
def test_pre_finalize_fwd_generated_source_on_cpu(n, C, dtype, T, splits, slices, iters, eps):
    kernel = EmulatedKernel(pre_finalize.pre_finalize_fwd_kernel(n, C, dtype, iters, eps))
    m, rms_eps, post_mult = n * n + 2 * n, 1e-6, 2.0
    x, phi, alpha, bias, proj_part, sq_part = _inputs(T, n, C, dtype, splits)
    pad = pre_finalize.TOKENS + 1  # rows past T must stay untouched
    outs = {
        "layer_input": torch.full((T + pad, C), float("nan"), dtype=DT[dtype]),
        "h_post": torch.full((T + pad, n), float("nan")),
        "h_res": torch.full((T + pad, n, n), float("nan")),
        "h_pre": torch.full((T + pad, n), float("nan")),
        "proj": torch.full((T + pad, m), float("nan")),
        "rinv": torch.full((T + pad,), float("nan")),
    }
    xp = torch.cat([x, torch.full((pad, n, C), float("nan")).to(x.dtype)])
    kernel(
        proj_part=proj_part, sq_part=sq_part, alpha=alpha, bias=bias, x=xp, **outs,
        rms_eps=rms_eps, post_mult=post_mult, num_slices=slices, num_tokens=T, num_splits=splits,
        grid=(-(-T // pre_finalize.token_block(splits, n)), slices),
    )  # fmt: skip
    for name, t in outs.items():
        assert t[T:].isnan().all(), f"{name} written past num_tokens"
        assert not t[:T].isnan().any(), f"{name}: some outputs never written"
    want = ref.pre_mapping(x.double(), phi.double(), alpha.double(), bias.double(), iters, post_mult, rms_eps, eps)
    li, hq, hr, hp, pr, ri = want
    # proj is the fp32 sum of the partials from 0 in split order (one rounding per add, as torch adds here):
    # bit for bit, whatever the staging and the number of batches
    in_order = torch.zeros(T, m)
    for s in range(splits):
        in_order = in_order + proj_part[s]
    assert torch.equal(outs["proj"][:T], in_order), "proj is not the split-order fp32 sum of the partials"
    torch.testing.assert_close(outs["proj"][:T].double(), pr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs["rinv"][:T].double(), ri, rtol=1e-6, atol=0)
    for name, w in (("h_pre", hp), ("h_post", hq), ("h_res", hr)):
        torch.testing.assert_close(outs[name][:T].double(), w, rtol=0, atol=COEF_ATOL, msg=name)
    mag = ref.pre_apply(x.double().abs(), hp)
    err = ((outs["layer_input"][:T].double() - li).abs() / (mag + 1e-30)).max().item()
    assert err <= ULP[dtype], f"layer_input: max relative error {err:.3g} > {ULP[dtype]:.3g}"
    if eps >= 0.01:  # the test can tell eps from no eps: the eps = 0 answer is far outside the tolerance
        logits = ref.coefficient_logits(pr, ri, alpha.double(), bias.double(), n)
        no_eps = ref.sinkhorn(ref.split_coefficients(logits, n)[2], iters, 0.0)
        assert (no_eps - outs["h_res"][:T].double()).abs().max() > 100 * COEF_ATOL


BWD_CASES = [(4, 1280, "bfloat16", 3), (4, 64, "float32", 19), (8, 7168, "float16", 2), (2, 1920, "bfloat16", 2)]


@pytest.mark.parametrize("n,C,dtype,T", BWD_CASES, ids=[f"n{c[0]}-C{c[1]}-{c[2]}" for c in BWD_CASES])
def test_pre_finalize_bwd_generated_source_on_cpu(n, C, dtype, T):
    kernel = EmulatedKernel(pre_finalize.pre_finalize_bwd_kernel(n, C, dtype))
    plan = post_res._plan(n, C, dtype)
    m, post_mult = n * n + 2 * n, 2.0
    g = torch.Generator().manual_seed(1)
    Tp = T + plan.tpb + 1
    g_li = torch.randn(Tp, C, generator=g).to(DT[dtype])
    x = torch.randn(Tp, n, C, generator=g).to(DT[dtype])
    grad_h_pre, grad_h_post = torch.randn(Tp, n, generator=g), torch.randn(Tp, n, generator=g)
    h_pre, h_post = torch.rand(Tp, n, generator=g), torch.rand(Tp, n, generator=g) * post_mult
    proj, rinv = torch.randn(Tp, m, generator=g), torch.rand(Tp, generator=g) + 0.5
    alpha, bias = torch.tensor([0.8, 0.6, 1.5]), torch.randn(m, generator=g)
    ins = dict(g_li=g_li, x=x, grad_h_pre=grad_h_pre, grad_h_post=grad_h_post, h_pre=h_pre, h_post=h_post,
               proj=proj, rinv=rinv)  # fmt: skip
    for t in ins.values():
        t[T:] = float("nan")
    d_pp = torch.full((Tp, 2 * n), float("nan"))
    res_logits = torch.full((Tp, n, n), float("nan"))
    kernel(**ins, alpha=alpha, bias=bias, d_pp=d_pp, res_logits=res_logits, post_mult=post_mult, num_tokens=T,
           grid=-(-T // plan.tpb))  # fmt: skip
    assert d_pp[T:].isnan().all() and res_logits[T:].isnan().all(), "written past num_tokens"
    d = {k: v[:T].double() for k, v in ins.items()}
    g_pre = (d["g_li"][:, None, :] * d["x"]).sum(-1) + d["grad_h_pre"]
    want_pre = g_pre * d["h_pre"] * (1 - d["h_pre"])
    want_post = d["grad_h_post"] * d["h_post"] * (1 - d["h_post"] / post_mult)
    mag = ((d["g_li"][:, None, :] * d["x"]).abs().sum(-1) + d["grad_h_pre"].abs()) * 0.25
    err = ((d_pp[:T, :n].double() - want_pre).abs() / (mag + 1e-30)).max().item()
    assert err <= 2e-6, f"d_pre: relative error {err:.3g}"  # fp32 sum over C in a fixed tree order
    torch.testing.assert_close(d_pp[:T, n:].double(), want_post, rtol=1e-6, atol=1e-7)
    want_logits = ref.split_coefficients(ref.coefficient_logits(d["proj"], d["rinv"], alpha.double(),
                                                                bias.double(), n), n)[2]  # fmt: skip
    torch.testing.assert_close(res_logits[:T].double(), want_logits, rtol=1e-6, atol=1e-6)
