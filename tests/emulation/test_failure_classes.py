"""Failure classes seen in other projects' mHC kernels, checked here without a GPU.

* Split-K partial buffers at small T (tokenspeed #661: partials sized for T rather than splits x T, silent small-M
  corruption then an illegal address): the host's split choice never leaves a split empty, and the emulated
  ``pre_proj`` kernels fill every element of exact-size ``[S, T, m]`` / ``[S, K, m]`` partials (poisoned with NaN)
  at T = 1, 2, 7 with the split counts the host picks, summing to the reference.
* A configuration compiled for one hidden size used for another (TensorRT-LLM #13710): every kernel's host code
  refuses a tensor whose hidden-size dimension differs from the compiled one (TileLang's packed-ABI shape checks,
  read from the generated host source).
* T < 128 and not a power of two in every backward: covered by the emulation tests of each family (post_res bwd
  T = 5, 9, 17; Sinkhorn bwd T = 1 and tpb + 3; pre_proj bwd T = 3, 65, 70, 130; pre_finalize bwd T = 2, 3, 19).
* Low-precision accumulators: test_accumulator_types.py. Sinkhorn logits spanning >= 160:
  test_sinkhorn_emulated.py.
"""

from __future__ import annotations

import re

import pytest
import torch

from tl_kernels import post_res, pre_finalize, pre_proj

from .cuda_emu import EmulatedKernel


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_choose_splits_never_leaves_a_split_empty(direction):
    for n, C in ((4, 7168), (4, 256), (1, 64), (8, 4096)):
        chunks = n * C // pre_proj.BK
        for T in [*range(1, 300), 1000, 4096, 16384]:
            work = chunks if direction == "fwd" else -(-T // pre_proj.BM)
            for sms in (1, 78, 132):
                S = pre_proj.choose_splits(T, n, C, sms, direction)
                per = -(-work // S)
                assert 1 <= S <= min(work, pre_proj.MAX_SPLITS), (n, C, T, sms, S)
                assert per * (S - 1) < work, f"split {S - 1} empty: n={n} C={C} T={T} sms={sms}"


@pytest.mark.parametrize("T", [1, 2, 7])
def test_pre_proj_fwd_partials_at_small_T(T):
    n, C, m = 4, 256, 24
    K = n * C
    S = pre_proj.choose_splits(T, n, C, 132, "fwd")
    assert S > 1  # small T: the host splits K (the case the failure class is about)
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, K, generator=g).to(torch.bfloat16)
    phi = torch.randn(K, m, generator=g) / K**0.5
    proj_part, sq_part = torch.full((S, T, m), float("nan")), torch.full((S, T), float("nan"))
    kernel = EmulatedKernel(pre_proj.pre_proj_fwd_kernel(n, C, "bfloat16"))
    kernel(x=x, phi=phi, proj_part=proj_part, sq_part=sq_part, num_tokens=T, num_splits=S,
           grid=(-(-T // pre_proj.BM), S))  # fmt: skip
    assert not proj_part.isnan().any() and not sq_part.isnan().any(), "a partial was never written"
    xv, pv = x.double(), phi.double()
    err = (proj_part.double().sum(0) - xv @ pv).abs() / (xv.abs() @ pv.abs())
    assert err.max() <= 2**-10  # the TF32 budget of test_pre_proj_emulated.py
    torch.testing.assert_close(sq_part.double().sum(0), xv.square().sum(-1), rtol=2e-6, atol=0)


@pytest.mark.parametrize("T", [1, 65, 130])
def test_pre_proj_bwd_partials_at_small_T(T):
    n, C, m = 4, 256, 24
    K, dt = n * C, torch.bfloat16
    S = pre_proj.choose_splits(T, n, C, 132, "bwd")
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, K, generator=g).to(dt)
    phi = torch.randn(K, m, generator=g) / K**0.5
    d_logits, proj = torch.randn(T, m, generator=g), torch.randn(T, m, generator=g)
    rinv, alpha = torch.rand(T, generator=g) + 0.5, torch.tensor([0.7, 0.5, 1.3])
    d_phi_part = torch.full((S, K, m), float("nan"))
    d_coef_part = torch.full((-(-T // pre_proj.BM), 2 * m), float("nan"))
    kernel = EmulatedKernel(pre_proj.pre_proj_bwd_kernel(n, C, "bfloat16", False))
    kernel(x=x, phi=phi, d_pp=d_logits[:, : 2 * n].contiguous(), d_res=d_logits[:, 2 * n :].contiguous(), proj=proj,
           rinv=rinv, alpha=alpha, h_pre=torch.rand(T, n, generator=g), g_li=torch.randn(T, C, generator=g).to(dt),
           d_x=torch.empty(T, K, dtype=dt), d_phi_part=d_phi_part, d_coef_part=d_coef_part, num_tokens=T,
           num_splits=S, grid=(K // pre_proj.BK, S))  # fmt: skip
    assert not d_phi_part.isnan().any(), "a d_phi partial was never written"
    assert not d_coef_part.isnan().any(), "a d_bias | d_scale partial was never written"
    a = alpha.double()
    scale = torch.cat([a[:1].expand(n), a[1:2].expand(n), a[2:].expand(n * n)])
    d_proj = d_logits.double() * scale * rinv.double()[:, None]
    want, mag = x.double().T @ d_proj, x.double().abs().T @ d_proj.abs()
    assert ((d_phi_part.double().sum(0) - want).abs() / (mag + 1e-30)).max() <= 2**-10


_HOST_CASES = {  # kernel, {parameter: (dimension, size that depends on the hidden size)}
    "pre_proj_fwd": (lambda: pre_proj.pre_proj_fwd_kernel(4, 256, "bfloat16"), {"x": (1, 1024), "phi": (0, 1024)}),
    "pre_proj_bwd": (lambda: pre_proj.pre_proj_bwd_kernel(4, 256, "bfloat16", False),
                     {"x": (1, 1024), "phi": (0, 1024), "d_x": (1, 1024), "g_li": (1, 256)}),
    "post_res_fwd": (lambda: post_res.post_res_fwd_kernel(4, 1280, "bfloat16"),
                     {"layer_output": (1, 1280), "residual": (2, 1280), "out": (2, 1280)}),
    "post_res_bwd": (lambda: post_res.post_res_bwd_kernel(4, 1280, "bfloat16"),
                     {"grad_out": (2, 1280), "residual": (2, 1280), "d_layer_output": (1, 1280)}),
    "pre_finalize_fwd": (lambda: pre_finalize.pre_finalize_fwd_kernel(4, 1280, "bfloat16", 20, 0.0),
                         {"x": (2, 1280), "layer_input": (1, 1280)}),
    "pre_finalize_bwd": (lambda: pre_finalize.pre_finalize_bwd_kernel(4, 1280, "bfloat16"),
                         {"g_li": (1, 1280), "x": (2, 1280)}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_HOST_CASES))
def test_a_kernel_refuses_another_hidden_size(case):
    build, dims = _HOST_CASES[case]
    kernel = build()
    host = kernel.get_host_source()
    for param, (dim, size) in dims.items():
        check = rf"\(\(int64_t\*\)\w*_{param}_shape\)\[{dim}\]\) == {size}\)"
        assert re.search(check, host), f"{case}: no check that {param}.shape[{dim}] == {size}"
