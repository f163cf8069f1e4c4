"""The generated CUDA source of the post/res kernels, executed on the CPU (see cuda_emu.py), against the float64
reference: every output element written exactly where it should be (outputs and inputs past T are poisoned with NaN),
values within one output ulp, coefficient gradients within fp32 accumulation error. Covers one-token and
multi-token blocks, guarded chunk loops, partial last blocks, every dtype and n in {1, 2, 4, 6, 8}."""

from __future__ import annotations

import pytest
import torch

from mhc import reference as ref
from tl_kernels import post_res

from .cuda_emu import EmulatedKernel

DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ULP = {"bfloat16": 2**-7, "float16": 2**-10, "float32": 2e-6}
CASES = [  # (n, C, dtype, token counts)
    (4, 1280, "bfloat16", (1, 3)),  # one token per block, 160 threads
    (4, 64, "bfloat16", (1, 17)),  # 16 tokens per block, partial last block
    (4, 7168, "float16", (2,)),  # 4 serial chunk iterations
    (2, 1920, "bfloat16", (2,)),  # guarded last chunk (240 of 256 threads)
    (8, 2560, "float32", (1,)),
    (6, 192, "bfloat16", (5,)),
    (1, 64, "float32", (9,)),
]


def _rel_close(got, want, mag, tol, name):
    got = got.double()
    assert not got.isnan().any(), f"{name}: {int(got.isnan().sum())} elements never written"
    err = ((got - want).abs() / (mag + 1e-30)).max().item()
    assert err <= tol, f"{name}: max relative error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("n,C,dtype,tokens", CASES, ids=[f"n{c[0]}-C{c[1]}-{c[2]}" for c in CASES])
def test_post_res_generated_source_on_cpu(n, C, dtype, tokens):
    dt = DT[dtype]
    plan = post_res._plan(n, C, dtype)
    fwd = EmulatedKernel(post_res.post_res_fwd_kernel(n, C, dtype))
    bwd = EmulatedKernel(post_res.post_res_bwd_kernel(n, C, dtype))
    for T in tokens:
        Tp = T + plan.tpb + 1  # allocation past the tokens the kernel is told about: must stay untouched
        y, x, g = torch.randn(Tp, C).to(dt), torch.randn(Tp, n, C).to(dt), torch.randn(Tp, n, C).to(dt)
        h_post, h_res = torch.randn(Tp, n), torch.randn(Tp, n, n)
        for t in (y, x, g, h_post, h_res):
            t[T:] = float("nan")
        grid = -(-T // plan.tpb)

        out = torch.full((Tp, n, C), float("nan"), dtype=dt)
        fwd(layer_output=y, residual=x, h_post=h_post, h_res=h_res, out=out, num_tokens=T, grid=grid)
        assert out[T:].isnan().all(), "forward wrote past num_tokens"
        y64, x64, g64, p64, r64 = (t[:T].double() for t in (y, x, g, h_post, h_res))
        want = ref.post_res(y64, x64, p64, r64)
        mag = ref.post_res(y64.abs(), x64.abs(), p64.abs(), r64.abs())
        _rel_close(out[:T], want, mag, ULP[dtype], "out")

        grads = [torch.full_like(t, float("nan")) for t in (y, x, h_post, h_res)]
        names = ("d_layer_output", "d_residual", "d_h_post", "d_h_res")
        ins = dict(grad_out=g, layer_output=y, residual=x, h_post=h_post, h_res=h_res)
        bwd(**ins, **dict(zip(names, grads, strict=True)), num_tokens=T, grid=grid)
        want = ref.post_res_backward(g64, y64, x64, p64, r64)
        mags = ref.post_res_backward(g64.abs(), y64.abs(), x64.abs(), p64.abs(), r64.abs())
        for name, got, w, m, tol in zip(
            ("d_layer_output", "d_residual", "d_h_post", "d_h_res"),
            grads,
            want,
            mags,
            (ULP[dtype], ULP[dtype], 2e-6, 2e-6),
            strict=True,
        ):
            assert got[T:].isnan().all(), f"{name} written past num_tokens"
            _rel_close(got[:T], w, m, tol, name)


def test_emulation_catches_a_transposed_h_res():
    """The check can fail: the kernel against the transposed orientation (DeepSeek's comb^T) is rejected."""
    n, C, T = 4, 64, 3
    fwd = EmulatedKernel(post_res.post_res_fwd_kernel(n, C, "float32"))
    y, x, h_post, h_res = torch.randn(T, C), torch.randn(T, n, C), torch.randn(T, n), torch.randn(T, n, n)
    out = torch.empty(T, n, C)
    fwd(layer_output=y, residual=x, h_post=h_post, h_res=h_res, out=out, num_tokens=T, grid=1)
    torch.testing.assert_close(out, ref.post_res(y, x, h_post, h_res), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, ref.post_res(y, x, h_post, h_res.transpose(-1, -2)), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("n,C,dtype,T", [(4, 7168, "bfloat16", 3), (4, 64, "float32", 17), (8, 2560, "bfloat16", 2)])
def test_decode_variant_is_bitwise_the_training_kernel(n, C, dtype, T):
    """``pdl=True`` (taken at T <= 64) adds only the launch-ordering intrinsics: its outputs are the same bits."""
    dt, plan = DT[dtype], post_res._plan(n, C, dtype)
    y, x = torch.randn(T, C).to(dt), torch.randn(T, n, C).to(dt)
    h_post, h_res = torch.randn(T, n), torch.randn(T, n, n)
    outs = []
    for pdl in (False, True):
        out = torch.full((T, n, C), float("nan"), dtype=dt)
        EmulatedKernel(post_res.post_res_fwd_kernel(n, C, dtype, pdl))(
            layer_output=y, residual=x, h_post=h_post, h_res=h_res, out=out, num_tokens=T, grid=-(-T // plan.tpb)
        )
        outs.append(out)
    assert not outs[1].isnan().any()
    bits = torch.int16 if dt.itemsize == 2 else torch.int32
    assert torch.equal(outs[0].view(bits), outs[1].view(bits))
