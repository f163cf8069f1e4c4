"""The generated CUDA source of the pre-mapping backward's reduction kernel (tl_kernels/pre_reduce.py) executed on
the CPU (see cuda_emu.py), with tensors of exactly their size.

Checks: d_phi is the fp32 sum of the split partials in split order, bit for bit; d_bias and d_alpha are the fp32
sums of the coefficient partials in the kernel's documented order (parts of rows in row order, then the parts in
part order), bit for bit, and within the documented bound of float64; the one-split variant (no d_phi) alike.
Several n (column padding 32, 64, 128), row counts that do not divide into the parts, one and several splits.
"""

from __future__ import annotations

import pytest
import torch

from tl_kernels import pre_reduce

from .cuda_emu import EmulatedKernel


def _coef_in_kernel_order(part: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """d_bias | d_alpha from ``part [R, 2m]`` in fp32, in the kernel's order (see the module docstring)."""
    w = 2 * m
    parts = pre_reduce.THREADS // w
    rows = part.shape[0]
    per = -(-rows // parts)
    sums = []
    for p in range(parts):
        acc = torch.zeros(w, dtype=torch.float32)
        for r in range(p * per, min(rows, (p + 1) * per)):
            acc = acc + part[r]
        sums.append(acc)
    total = sums[0].clone()
    for p in range(1, parts):
        total = total + sums[p]
    alpha = []
    for lo, size in ((m, n), (m + n, n), (m + 2 * n, n * n)):
        a = total[lo].clone()
        for j in range(1, size):
            a = a + total[lo + j]
        alpha.append(a)
    return torch.cat([total[:m], torch.stack(alpha)])


CASES = [(4, 128, 2, 70), (4, 64, 1, 3000), (1, 64, 3, 1), (6, 64, 2, 650), (8, 128, 1, 1300), (2, 192, 5, 64)]


@pytest.mark.parametrize("n,C,splits,T", CASES, ids=[f"n{c[0]}-C{c[1]}-S{c[2]}-T{c[3]}" for c in CASES])
def test_pre_reduce_bwd_generated_source_on_cpu(n, C, splits, T):
    m, K = n * n + 2 * n, n * C
    rows = -(-T // 64)  # token tiles
    g = torch.Generator().manual_seed(n * 100 + C + splits)
    d_phi_part = torch.randn(splits, K, m, generator=g)
    coef = torch.randn(rows, 2 * m, generator=g) * torch.rand(1, 2 * m, generator=g) * 10
    d_alpha, d_bias = torch.full((3,), float("nan")), torch.full((m,), float("nan"))
    if splits > 1:
        kernel = EmulatedKernel(pre_reduce.pre_reduce_bwd_kernel(n, True))
        d_phi = torch.full((K, m), float("nan"))
        kq = K * m // pre_reduce.VEC
        kernel(d_phi_part=d_phi_part.view(splits, kq, pre_reduce.VEC), d_coef_part=coef,
               d_phi=d_phi.view(kq, pre_reduce.VEC), d_alpha=d_alpha, d_bias=d_bias, kq=kq, num_splits=splits,
               rows=rows, grid=pre_reduce.phi_blocks(K * m) + 1)  # fmt: skip
        want = d_phi_part[0].clone()
        for s in range(1, splits):
            want = want + d_phi_part[s]
        assert torch.equal(d_phi, want), "d_phi is not the split-order fp32 sum"
    else:
        kernel = EmulatedKernel(pre_reduce.pre_reduce_bwd_kernel(n, False))
        kernel(d_coef_part=coef, d_alpha=d_alpha, d_bias=d_bias, rows=rows, grid=1)
    got = torch.cat([d_bias, d_alpha])
    assert torch.equal(got, _coef_in_kernel_order(coef, n, m)), "d_bias / d_alpha not in the documented order"
    c64 = coef.double()
    groups = [slice(m, m + n), slice(m + n, m + 2 * n), slice(m + 2 * n, 2 * m)]
    exact = torch.cat([c64[:, :m].sum(0), torch.stack([c64[:, gr].sum() for gr in groups])])
    mag = torch.cat([c64[:, :m].abs().sum(0), torch.stack([c64[:, gr].abs().sum() for gr in groups])])
    parts = pre_reduce.THREADS // (2 * m)
    bound = (-(-rows // parts) + parts + n * n) * 2**-24
    assert float(((got.double() - exact).abs() / mag).max()) <= bound


def test_pre_reduce_rejects_an_unbuilt_stream_count():
    with pytest.raises(ValueError, match="n must be one of"):
        pre_reduce.pre_reduce_bwd_program(3)
