"""The generated CUDA source of the pre-mapping projection kernels (tl_kernels/pre_proj.py), tensor-core GEMMs
included, executed on the CPU (see cuda_emu.py; ``shim.h`` emulates ``mma.sync.m16n8k8`` TF32 and ``ldmatrix``
with the PTX ISA's fragment layouts, and truncates MMA operands to TF32 as the hardware does).

Checks, against float64: every split's projection partial within the TF32 budget of the module docstring
(``2**-11 * sum_k |x_k phi_kj|``, asserted at 2**-10; fp32 activations 2**-9), sums of squares to fp32 rounding,
the backward's d_x (both matmul terms, the RMS term, F_pre's term, and the accumulate variant) and d_phi partials
within the same budget, rows past T read as zero (poisoned with NaN) and never written. Several split counts,
partial token tiles, every n.

Not covered: the real tensor cores' accumulation order and speed (GPU tests and benchmarks do that).
"""

from __future__ import annotations

import pytest
import torch

from tl_kernels import pre_proj

from .cuda_emu import EmulatedKernel

DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ULP = {"bfloat16": 2**-7, "float16": 2**-10, "float32": 2e-6}
BM, BK = pre_proj.BM, pre_proj.BK


def _budget(dtype: str) -> float:
    return 2**-9 if dtype == "float32" else 2**-10


def _max_rel(got, want, mag) -> float:
    return float(((got.double() - want).abs() / (mag + 1e-30)).max())


FWD_CASES = [(4, 256, "bfloat16", 70, 3), (1, 64, "float32", 5, 1), (8, 128, "float16", 3, 2), (6, 64, "bfloat16", 65, 1),
             (2, 192, "bfloat16", 1, 6)]  # fmt: skip


@pytest.mark.parametrize("n,C,dtype,T,splits", FWD_CASES, ids=[f"n{c[0]}-C{c[1]}-{c[2]}-S{c[4]}" for c in FWD_CASES])
def test_pre_proj_fwd_generated_source_on_cpu(n, C, dtype, T, splits):
    kernel = EmulatedKernel(pre_proj.pre_proj_fwd_kernel(n, C, dtype))
    m, K = n * n + 2 * n, n * C
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T + BM, K, generator=g).to(DT[dtype])
    x[T:] = float("nan")  # rows past T must not reach the outputs of rows below T
    phi = torch.randn(K, m, generator=g) / K**0.5
    proj_part = torch.full((splits, T, m), float("nan"))
    sq_part = torch.full((splits, T), float("nan"))
    kernel(x=x, phi=phi, proj_part=proj_part, sq_part=sq_part, num_tokens=T, num_splits=splits,
           grid=(pre_proj.fwd_tiles(T), splits))  # fmt: skip
    chunks = K // BK
    per = -(-chunks // splits)
    xv, pv = x[:T].double(), phi.double()
    for s in range(splits):
        lo, hi = s * per * BK, min((s + 1) * per, chunks) * BK
        want = xv[:, lo:hi] @ pv[lo:hi]
        mag = xv[:, lo:hi].abs() @ pv[lo:hi].abs()
        assert _max_rel(proj_part[s], want, mag) <= _budget(dtype), f"split {s}: projection outside the TF32 budget"
        torch.testing.assert_close(sq_part[s].double(), xv[:, lo:hi].square().sum(-1), rtol=2e-6, atol=0)


def test_pre_proj_fwd_empty_split_writes_zeros_and_reads_nothing():
    """An empty split (K = 2 chunks over 3 splits: the third has none) yields zero partials; the x tensor holds
    exactly T rows and K columns, so a read past the last chunk would land outside it (ASan covers the bounds)."""
    n, C, dtype, T = 2, 64, "bfloat16", 5
    kernel = EmulatedKernel(pre_proj.pre_proj_fwd_kernel(n, C, dtype))
    m, K = n * n + 2 * n, n * C
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, K, generator=g).to(DT[dtype])
    phi = torch.randn(K, m, generator=g) / K**0.5
    proj_part, sq_part = torch.full((3, T, m), float("nan")), torch.full((3, T), float("nan"))
    kernel(x=x, phi=phi, proj_part=proj_part, sq_part=sq_part, num_tokens=T, num_splits=3,
           grid=(pre_proj.fwd_tiles(T), 3))  # fmt: skip
    assert torch.equal(proj_part[2], torch.zeros(T, m)) and torch.equal(sq_part[2], torch.zeros(T))
    xv, pv = x.double(), phi.double()
    for s in range(2):  # one chunk each
        lo, hi = s * BK, (s + 1) * BK
        mag = xv[:, lo:hi].abs() @ pv[lo:hi].abs()
        assert _max_rel(proj_part[s], xv[:, lo:hi] @ pv[lo:hi], mag) <= _budget(dtype)


BWD_CASES = [(4, 256, "bfloat16", 70, 2, False), (4, 256, "bfloat16", 3, 1, True), (8, 64, "float16", 130, 3, False),
             (1, 64, "float32", 2, 1, False), (2, 128, "bfloat16", 65, 2, False)]  # fmt: skip


@pytest.mark.parametrize(
    "n,C,dtype,T,splits,accumulate", BWD_CASES, ids=[f"n{c[0]}-C{c[1]}-{c[2]}-T{c[3]}-acc{c[5]}" for c in BWD_CASES]
)
def test_pre_proj_bwd_generated_source_on_cpu(n, C, dtype, T, splits, accumulate):
    kernel = EmulatedKernel(pre_proj.pre_proj_bwd_kernel(n, C, dtype, accumulate))
    m, K, dt = n * n + 2 * n, n * C, DT[dtype]
    g = torch.Generator().manual_seed(1)
    Tp = T + BM
    x = torch.randn(Tp, K, generator=g).to(dt)
    phi = torch.randn(K, m, generator=g) / K**0.5
    d_pp, d_res = torch.randn(Tp, 2 * n, generator=g), torch.randn(Tp, n * n, generator=g)
    proj, rinv = torch.randn(Tp, m, generator=g), torch.rand(Tp, generator=g) + 0.5
    alpha = torch.tensor([0.7, 0.5, 1.3])
    h_pre, g_li = torch.rand(Tp, n, generator=g), torch.randn(Tp, C, generator=g).to(dt)
    d_x_in = torch.randn(Tp, K, generator=g).to(dt)
    for t in (x, d_pp, d_res, proj, rinv, h_pre, g_li, d_x_in):
        t[T:] = float("nan")  # a row past T that leaked into the d_phi reduction would make it NaN
    d_x = torch.full((Tp, K), float("nan"), dtype=dt)
    d_phi_part = torch.full((splits, K, m), float("nan"))
    d_coef_part = torch.full((-(-T // BM), 2 * m), float("nan"))
    args = dict(x=x, phi=phi, d_pp=d_pp, d_res=d_res, proj=proj, rinv=rinv, alpha=alpha, h_pre=h_pre, g_li=g_li,
                d_x=d_x, d_phi_part=d_phi_part, d_coef_part=d_coef_part)  # fmt: skip
    if accumulate:
        args["d_x_in"] = d_x_in
    kernel(**args, num_tokens=T, num_splits=splits, grid=(K // BK, splits))
    assert d_x[T:].isnan().all(), "d_x written past num_tokens"

    a = alpha.double()
    scale = torch.cat([a[:1].expand(n), a[1:2].expand(n), a[2:].expand(n * n)])
    d_logits = torch.cat([d_pp, d_res], 1)[:T].double()
    ri, pr, xv, pv = rinv[:T].double(), proj[:T].double(), x[:T].double(), phi.double()
    d_proj = d_logits * scale * ri[:, None]
    cx = -(d_logits * scale * pr).sum(-1) * ri**3 / K
    extra = h_pre[:T].double()[..., None] * g_li[:T].double()[:, None, :]
    want_x = d_proj @ pv.T + cx[:, None] * xv + extra.flatten(1)
    mag_x = d_proj.abs() @ pv.abs().T + (cx[:, None] * xv).abs() + extra.abs().flatten(1)
    if accumulate:
        want_x = want_x + d_x_in[:T].double()
        mag_x = mag_x + d_x_in[:T].double().abs()
    assert _max_rel(d_x[:T], want_x, mag_x) <= _budget("bfloat16") + ULP[dtype], "d_x"
    tiles = -(-T // BM)
    per = -(-tiles // splits)
    for s in range(splits):
        rows = slice(s * per * BM, min((s + 1) * per * BM, T))
        want = xv[rows].T @ d_proj[rows]
        mag = xv[rows].abs().T @ d_proj[rows].abs()
        assert _max_rel(d_phi_part[s], want, mag) <= _budget(dtype), f"d_phi partial {s}"
    # d_bias / d_scale partials, one row per token tile (written by one block of the tile's split), fp32 (no TF32).
    d_scale = d_logits * pr * ri[:, None]
    for tt in range(tiles):
        rows = slice(tt * BM, min(tt * BM + BM, T))
        got = d_coef_part[tt].double()
        bound = (BM + 3) * 2**-24  # fp32 summation (sequential) and the products' roundings
        assert _max_rel(got[:m], d_logits[rows].sum(0), d_logits[rows].abs().sum(0)) <= bound, f"d_bias, tile {tt}"
        assert _max_rel(got[m:], d_scale[rows].sum(0), d_scale[rows].abs().sum(0)) <= bound, f"d_scale, tile {tt}"


def test_pre_proj_bwd_coefficient_partials_do_not_depend_on_the_split_count():
    """A tile's d_bias / d_scale partial is summed by one thread per column in token order, whichever block of
    whichever split owns the tile: the partials are bitwise equal for 1, 2 and 3 splits, and every row is written
    (the values against float64: test_pre_proj_bwd_generated_source_on_cpu)."""
    n, C, dtype, T = 2, 64, "bfloat16", 300  # 5 tiles, 2 K-slices: blocks with one, two and three tiles
    kernel = EmulatedKernel(pre_proj.pre_proj_bwd_kernel(n, C, dtype, False))
    m, K = n * n + 2 * n, n * C
    g = torch.Generator().manual_seed(3)
    ins = dict(x=torch.randn(T, K, generator=g).to(DT[dtype]), phi=torch.randn(K, m, generator=g) / K**0.5,
               d_pp=torch.randn(T, 2 * n, generator=g), d_res=torch.randn(T, n * n, generator=g),
               proj=torch.randn(T, m, generator=g), rinv=torch.rand(T, generator=g) + 0.5,
               alpha=torch.tensor([0.7, 0.5, 1.3]), h_pre=torch.rand(T, n, generator=g),
               g_li=torch.randn(T, C, generator=g).to(DT[dtype]))  # fmt: skip
    tiles = -(-T // BM)
    outs = []
    for splits in (1, 2, 3):
        part = torch.full((tiles, 2 * m), float("nan"))
        kernel(**ins, d_x=torch.empty(T, K, dtype=DT[dtype]), d_phi_part=torch.empty(splits, K, m),
               d_coef_part=part, num_tokens=T, num_splits=splits, grid=(K // BK, splits))  # fmt: skip
        outs.append(part)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert not outs[0].isnan().any(), "a tile's partial row was not written"
