"""post/res TileLang kernels on a GPU against the float64 reference (marked `gpu`, skipped without CUDA).

Tolerances: the kernels accumulate in fp32 and round once to the activation dtype, so activation outputs may differ
from the float64 reference rounded to that dtype by one unit in the last place: rtol 2**-7 for bf16, 2**-10 for
fp16, 1e-5 for fp32 (plus a small atol for values near zero). Coefficient gradients are fp32 sums over C products of
rounded inputs, compared with rtol 1e-4 and an atol of 1e-6 * sqrt(C) * the largest product magnitude.
"""

from __future__ import annotations

import math

import pytest
import torch

import mhc
from mhc import reference as ref

pytestmark = pytest.mark.gpu

DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 1e-5}
ATOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
STREAMS = (1, 2, 4, 6, 8)
HIDDEN = (1280, 2560, 4096, 7168)
TOKENS = (1, 7, 4096)


def _inputs(T, n, C, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    y = torch.randn(T, C, device="cuda", generator=g).to(dtype)
    x = torch.randn(T, n, C, device="cuda", generator=g).to(dtype)
    h_post = torch.rand(T, n, device="cuda", generator=g) * 2
    h_res = ref.sinkhorn(torch.randn(T, n, n, device="cuda", generator=g) * 2)
    return y, x, h_post, h_res


def _close(got, want, dtype):
    torch.testing.assert_close(got, want.to(got.dtype), rtol=RTOL[dtype], atol=ATOL[dtype])


def _coef_close(got, want, C, scale):
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-6 * math.sqrt(C) * scale)


def _run_fwd_kernel_poisoned(y, x, h_post, h_res):
    from tl_kernels.post_res import post_res_fwd_kernel

    T, n, C = x.shape
    out = torch.full_like(x, float("nan"))
    # as the runtime: the decode variant (programmatic dependent launch) at T <= 64, so T = 1 and 7 run it
    post_res_fwd_kernel(n, C, str(x.dtype).removeprefix("torch."), T <= 64)(y, x, h_post, h_res, out)
    return out


def _run_bwd_kernel_poisoned(g, y, x, h_post, h_res):
    from tl_kernels.post_res import post_res_bwd_kernel

    T, n, C = x.shape
    outs = [torch.full_like(t, float("nan")) for t in (y, x, h_post, h_res)]
    post_res_bwd_kernel(n, C, str(x.dtype).removeprefix("torch."))(g, y, x, h_post, h_res, *outs)
    return outs


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("C", HIDDEN)
@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize("T", TOKENS)
def test_forward_matches_reference(T, n, C, dtype):
    dt = DT[dtype]
    y, x, h_post, h_res = _inputs(T, n, C, dt)
    want = ref.post_res(y.double(), x.double(), h_post.double(), h_res.double())
    out = _run_fwd_kernel_poisoned(y, x, h_post, h_res)
    assert not out.isnan().any(), "some outputs were never written"
    _close(out, want, dt)
    _close(mhc.post_res(y, x, h_post, h_res), want, dt)


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("C", HIDDEN)
@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize("T", TOKENS)
def test_backward_matches_reference(T, n, C, dtype):
    dt = DT[dtype]
    y, x, h_post, h_res = _inputs(T, n, C, dt)
    g = torch.randn(T, n, C, device="cuda").to(dt)
    want = ref.post_res_backward(g.double(), y.double(), x.double(), h_post.double(), h_res.double())
    got = _run_bwd_kernel_poisoned(g, y, x, h_post, h_res)
    for t in got:
        assert not t.isnan().any(), "some gradients were never written"
    _close(got[0], want[0], dt)
    _close(got[1], want[1], dt)
    scale = float(g.abs().max()) * max(float(x.abs().max()), float(y.abs().max()))
    _coef_close(got[2], want[2], C, scale)
    _coef_close(got[3], want[3], C, scale)


@pytest.mark.parametrize("T", [0, 65537])
def test_token_edge_counts(T):
    n, C, dt = 4, 4096, torch.bfloat16
    y, x, h_post, h_res = _inputs(T, n, C, dt)
    want = ref.post_res(y.float(), x.float(), h_post, h_res)
    out = mhc.post_res(y, x, h_post, h_res)
    assert out.shape == (T, n, C)
    _close(out, want, dt)
    g = torch.randn(T, n, C, device="cuda").to(dt)
    got = torch.ops.mhc.post_res_bwd(g, y, x, h_post, h_res)
    want_b = ref.post_res_backward(g.float(), y.float(), x.float(), h_post, h_res)
    _close(got[1], want_b[1], dt)


def test_bitwise_deterministic():
    y, x, h_post, h_res = _inputs(4099, 4, 7168, torch.bfloat16)
    g = torch.randn_like(x)
    a = [mhc.post_res(y, x, h_post, h_res), *torch.ops.mhc.post_res_bwd(g, y, x, h_post, h_res)]
    b = [mhc.post_res(y, x, h_post, h_res), *torch.ops.mhc.post_res_bwd(g, y, x, h_post, h_res)]
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_opcheck_on_cuda(dtype):
    y, x, h_post, h_res = _inputs(9, 4, 1280, dtype)
    args = [t.requires_grad_(dtype == torch.float32) for t in (y, x, h_post, h_res)]
    torch.library.opcheck(torch.ops.mhc.post_res_fwd.default, args)
    g = torch.randn_like(x)
    torch.library.opcheck(torch.ops.mhc.post_res_bwd.default, [g, *[a.detach() for a in args]])


def test_autograd_through_kernels_matches_reference():
    y, x, h_post, h_res = (t.requires_grad_(True) for t in _inputs(33, 4, 2560, torch.float32))
    out = mhc.post_res(y, x, h_post, h_res)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (y, x, h_post, h_res), g)
    want = ref.post_res_backward(g.double(), y.double(), x.double(), h_post.double(), h_res.double())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-3)


def test_torch_compile_and_cuda_graph():
    y, x, h_post, h_res = _inputs(257, 4, 2560, torch.bfloat16)
    eager = mhc.post_res(y, x, h_post, h_res)
    compiled = torch.compile(mhc.post_res, fullgraph=True)
    assert torch.equal(compiled(y, x, h_post, h_res), eager)
    graph = torch.cuda.CUDAGraph()
    static = [t.clone() for t in (y, x, h_post, h_res)]
    mhc.post_res(*static)  # compile and load before capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = mhc.post_res(*static)
    y2, x2, p2, r2 = _inputs(257, 4, 2560, torch.bfloat16, seed=1)
    for s, new in zip(static, (y2, x2, p2, r2), strict=True):
        s.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, mhc.post_res(y2, x2, p2, r2))


def test_more_than_2_31_elements_is_refused_or_correct(allow_fallback):
    """[T, n, C] with n*C*T >= 2**31 (bf16, about 4.3 GB): either refused with a clear error or exactly right (the
    kernels index with 32-bit offsets, so today this is the reference fallback: strict mode off)."""
    n, C = 4, 7168
    T = 2**31 // (n * C) + 1
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * T * n * C * 2:
        pytest.skip("not enough GPU memory for the >2**31-element case")
    y = torch.randn(T, C, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(T, n, C, device="cuda", dtype=torch.bfloat16)
    h_post = torch.rand(T, n, device="cuda")
    h_res = torch.full((T, n, n), 1.0 / n, device="cuda")
    try:
        out = mhc.post_res(y, x, h_post, h_res)
    except ValueError as exc:
        assert "2**31" in str(exc)
        return
    tail = slice(T - 3, T)
    want = ref.post_res(y[tail].float(), x[tail].float(), h_post[tail], h_res[tail])
    _close(out[tail], want, torch.bfloat16)
