"""Runtime behaviour of the CUDA ops on a GPU (marked `gpu`): 16-byte alignment, the reference fallback, the
current device left as found, and a CUDA graph captured straight after mhc.warmup() with no eager call between."""

from __future__ import annotations

import warnings

import pytest
import torch

import mhc
from mhc import _cuda
from mhc import reference as ref

pytestmark = pytest.mark.gpu


def _misaligned(shape, dtype, elems=1):
    base = torch.randn(torch.Size(shape).numel() + elems, device="cuda").to(dtype)
    return base[elems:].view(shape)


def test_misaligned_view_refused_by_op_and_copied_by_public_function():
    T, n, C = 33, 4, 1280
    x = _misaligned((T, n, C), torch.bfloat16, elems=3)  # 6 bytes in: a 128-bit load there would fault
    y = torch.randn(T, C, device="cuda").bfloat16()
    h_post, h_res = torch.rand(T, n, device="cuda"), ref.sinkhorn(torch.randn(T, n, n, device="cuda"))
    with pytest.raises(ValueError, match="residual to start on a 16-byte boundary, got a view at byte offset 6"):
        torch.ops.mhc.post_res_fwd(y, x, h_post, h_res)
    out = mhc.post_res(y, x, h_post, h_res)
    want = ref.post_res(y.double(), x.double(), h_post.double(), h_res.double())
    torch.testing.assert_close(out, want.to(out.dtype), rtol=2**-7, atol=1e-2)
    L = _misaligned((129, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="logits.*byte offset 4"):
        torch.ops.mhc.sinkhorn_fwd(L, 20, 0.0)
    torch.testing.assert_close(mhc.sinkhorn(L), ref.sinkhorn(L.double()).float(), rtol=0, atol=2e-6)
    torch.cuda.synchronize()  # a fault would surface here


def test_unsupported_shape_falls_back_to_the_reference_with_a_warning(monkeypatch, allow_fallback):
    monkeypatch.setattr(_cuda, "_WARNED", set())
    T, n, C = 9, 3, 96  # neither n nor C has a kernel
    y, x = torch.randn(T, C, device="cuda"), torch.randn(T, n, C, device="cuda")
    h_post, h_res = torch.rand(T, n, device="cuda"), torch.rand(T, n, n, device="cuda")
    with pytest.warns(UserWarning, match="running the PyTorch reference on CUDA"):
        out = mhc.post_res(y, x, h_post, h_res)
    torch.testing.assert_close(out, ref.post_res(y, x, h_post, h_res))


def test_disabled_family_falls_back(monkeypatch, allow_fallback):
    monkeypatch.setattr(_cuda, "_WARNED", set())
    monkeypatch.setattr(_cuda, "DISABLED", {"sinkhorn"})
    L = torch.randn(7, 4, 4, device="cuda")
    with pytest.warns(UserWarning, match="disabled"):
        torch.testing.assert_close(mhc.sinkhorn(L), ref.sinkhorn(L))


def test_current_device_is_left_as_found():
    before = torch.cuda.current_device()
    L = torch.randn(5, 4, 4, device=f"cuda:{torch.cuda.device_count() - 1}")
    mhc.sinkhorn(L)
    assert torch.cuda.current_device() == before


def test_graph_captured_straight_after_warmup():
    """No eager call between warmup() and capture: warmup must have compiled *and* loaded every kernel."""
    n, C, T = 4, 2560, 257
    with warnings.catch_warnings():
        # a fallback would be an error (strict mode raises anyway); TileLang's own deprecation notices are not
        warnings.filterwarnings("error", message=".*running the PyTorch reference")
        # sinkhorn fwd + bwd, post_res fwd + bwd, pre_proj fwd + bwd and pre_finalize fwd + bwd (mhc/_cuda.py)
        assert mhc.warmup(hidden_sizes=(C,), streams=(n,), dtypes=(torch.bfloat16,)) == 16
    g = torch.Generator(device="cuda").manual_seed(0)
    y = torch.randn(T, C, device="cuda", generator=g).bfloat16()
    x = torch.randn(T, n, C, device="cuda", generator=g).bfloat16()
    L = torch.randn(T, n, n, device="cuda", generator=g)
    h_post = torch.rand(T, n, device="cuda", generator=g)
    grad = torch.randn(T, n, C, device="cuda", generator=g).bfloat16()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        h_res = torch.ops.mhc.sinkhorn_fwd(L, 20, 0.0)
        d_L = torch.ops.mhc.sinkhorn_bwd(h_res, L, 20, 0.0)
        out = torch.ops.mhc.post_res_fwd(y, x, h_post, h_res)
        grads = torch.ops.mhc.post_res_bwd(grad, y, x, h_post, h_res)
    for t in (y, x, L, h_post, grad):
        t.copy_(torch.randn(t.shape, device="cuda", generator=g).to(t.dtype))
    graph.replay()
    torch.cuda.synchronize()
    want_h = ref.sinkhorn(L.double())
    torch.testing.assert_close(h_res, want_h.float(), rtol=0, atol=2e-6)
    torch.testing.assert_close(d_L, ref.sinkhorn_backward(h_res.double(), L.double()).float(), rtol=0,
                               atol=1e-6 * float(h_res.abs().max()))  # fmt: skip
    want = ref.post_res(y.double(), x.double(), h_post.double(), h_res.double())
    torch.testing.assert_close(out, want.to(out.dtype), rtol=2**-7, atol=1e-2)
    want_b = ref.post_res_backward(grad.double(), y.double(), x.double(), h_post.double(), h_res.double())
    torch.testing.assert_close(grads[1], want_b[1].to(grads[1].dtype), rtol=2**-7, atol=1e-2)
