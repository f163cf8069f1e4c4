"""The fused residual boundary (mhc::boundary_fwd: tl_kernels/boundary.py + pre_finalize) on a GPU, against the
unfused CUDA path (mhc::post_res_fwd then mhc::pre_mapping_fwd) and float64 (marked `gpu`, skipped without CUDA).

* ``x_next`` bit for bit the unfused post_res kernel's (same arithmetic);
* ``proj`` within the TF32 budget of tl_kernels/pre_proj.py against float64 on the kernel's own x_next
  (``2**-10 * sum_k |x_k phi_kj|``, 2**-9 for fp32), ``rinv`` rtol 1e-5;
* the coefficients and the layer input within the unfused kernels' distance of each other: both paths round the
  same x_next, only the order of the fp32 partial sums differs (atol 2e-5 on coefficients, as the pre-mapping GPU
  test's bound; one output ulp on the layer input);
* the gradients (the fully fused backward: pre_finalize_bwd, sinkhorn_bwd, boundary_bwd_fused, pre_reduce_bwd, the
  d_h reduction) equal to autograd through the unfused ops within one ulp of the largest gradient element, plus
  2**-16 of the sums of magnitudes for d_h_post, d_h_res and d_phi (fp32 sums in another order); the forward
  deterministic: two runs bitwise equal;
* under CUDA-graph capture and replay.
"""

from __future__ import annotations

import pytest
import torch

import mhc  # noqa: F401  (registers the ops)
from mhc import boundary as B
from mhc import reference as ref

pytestmark = pytest.mark.gpu

DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ULP = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2e-6}
SETTINGS = (20, 2.0, 1e-6, 0.0)
SHAPES = [(4, 7168, "bfloat16"), (4, 1280, "float32"), (4, 2560, "float16"), (1, 1280, "bfloat16"),
          (2, 4096, "bfloat16"), (6, 1920, "bfloat16"), (8, 7168, "bfloat16")]  # fmt: skip
TOKENS = (1, 13, 137, 4096)


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _inputs(T, n, C, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    m, dt = n * n + 2 * n, DT[dtype]
    y = torch.randn(T, C, device="cuda", generator=g).to(dt)
    x = torch.randn(T, n, C, device="cuda", generator=g).to(dt)
    h_post = torch.rand(T, n, device="cuda", generator=g) * 2
    h_res = ref.sinkhorn(torch.randn(T, n, n, device="cuda", generator=g), 20)
    phi = torch.randn(n * C, m, device="cuda", generator=g) / (n * C) ** 0.5
    alpha = torch.tensor([0.7, 0.5, 1.2], device="cuda")
    bias = torch.randn(m, device="cuda", generator=g) * 0.5
    return y, x, h_post, h_res, phi, alpha, bias


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("n,C,dtype", SHAPES, ids=[f"n{s[0]}-C{s[1]}-{s[2]}" for s in SHAPES])
def test_boundary_fwd_matches_unfused(T, n, C, dtype):
    args = _inputs(T, n, C, dtype)
    assert B.fused_reason(args[1], args[2], args[3], args[4], SETTINGS[0]) is None
    fused = torch.ops.mhc.boundary_fwd(*args, *SETTINGS)
    x_next = torch.ops.mhc.post_res_fwd(*args[:4])
    plain = torch.ops.mhc.pre_mapping_fwd(x_next, *args[4:], *SETTINGS)
    assert torch.equal(fused[0], x_next), "x_next differs from the post_res kernel's"
    xv, phi64 = x_next.double().flatten(1), args[4].double()
    tf32 = 2**-9 if dtype == "float32" else 2**-10
    err = ((fused[5].double() - xv @ phi64).abs() / (xv.abs() @ phi64.abs() + 1e-30)).max().item()
    assert err <= tf32, f"proj outside the TF32 budget: {err:.3g}"
    torch.testing.assert_close(fused[6].double(), ref.rms_inv(x_next.double(), 1e-6), rtol=1e-5, atol=0)
    for k in (2, 3, 4):
        torch.testing.assert_close(fused[k], plain[k], rtol=0, atol=2e-5)
    li, li_plain = fused[1].double(), plain[1].double()
    assert ((li - li_plain).abs() <= ULP[fused[1].dtype] * li_plain.abs() + 1e-3).all()
    again = torch.ops.mhc.boundary_fwd(*args, *SETTINGS)
    for a, b in zip(fused, again, strict=True):
        assert torch.equal(a, b), "not deterministic"


@pytest.mark.parametrize("clusters", [False, True], ids=["default", "clusters"])  # MHC_BOUNDARY_CLUSTERS
@pytest.mark.parametrize("n,C,dtype", [(4, 2560, "bfloat16"), (2, 1280, "float32")])
def test_boundary_gradients_match_unfused(n, C, dtype, clusters):
    from mhc import _cuda as mhc_cuda

    with mhc_cuda.use_boundary_clusters(clusters):  # the fused backward's opt-in thread block cluster variant
        _gradients_match_unfused(n, C, dtype)


def _gradients_match_unfused(n, C, dtype):
    T = 300
    fused_in = [t.requires_grad_(True) for t in _inputs(T, n, C, dtype, seed=1)]
    plain_in = [t.detach().clone().requires_grad_(True) for t in fused_in]
    from profiling import families

    fused = torch.ops.mhc.boundary_fwd(*fused_in, *SETTINGS)
    x_next = torch.ops.mhc.post_res_fwd(*plain_in[:4])
    x_next.retain_grad()  # the summed gradient of x_next: the scale of d_h_post's and d_h_res's sums
    plain = (x_next, *torch.ops.mhc.pre_mapping_fwd(x_next, *plain_in[4:], *SETTINGS))
    g = torch.Generator(device="cuda").manual_seed(2)
    weights = [torch.randn(o.shape, device="cuda", generator=g).to(o.dtype) for o in fused[:5]]
    sum((o.float() * w.float()).sum() for o, w in zip(fused[:5], weights, strict=True)).backward()
    sum((o.float() * w.float()).sum() for o, w in zip(plain[:5], weights, strict=True)).backward()
    # The fully fused backward sums d_h_post, d_h_res over channel blocks and d_phi over its own token splits: fp32
    # sums in another order than post_res's and pre_proj's kernels, so those three get 2**-16 of their sums of
    # magnitudes on top (docs/design.md section 7; bit for bit elsewhere in the CPU emulation)
    y64, x64, gx = (t.detach().double().abs() for t in (plain_in[0], plain_in[1], x_next.grad))
    saved = (plain[4].detach(), plain[2].detach(), plain[5], plain[6])
    _mag_x, mag_phi = families.backward_magnitudes(weights[1:5], x_next.detach(), *(t.detach() for t in plain_in[4:]),
                                                   saved, *SETTINGS[:1], SETTINGS[3], SETTINGS[1])  # fmt: skip
    order = {2: (gx * y64[:, None, :]).sum(-1), 3: torch.einsum("tic,tjc->tij", gx, x64), 4: mag_phi}
    for k, (a, b) in enumerate(zip(fused_in, plain_in, strict=True)):
        # the forward's coefficients differ by fp32 summation order (~1e-7): a gradient element may round to the
        # neighbouring value of its dtype, so one ulp of the largest element (2e-6 relative for fp32)
        scale = b.grad.double().abs().max().item()
        diff = (a.grad.double() - b.grad.double()).abs()
        tol = ULP[a.grad.dtype] * scale + 1e-7 + (2**-16 * order[k] if k in order else 0.0)
        assert (diff <= tol).all(), (k, (diff - tol).max().item())


def test_boundary_under_cuda_graph():
    args = _inputs(64, 4, 1280, "bfloat16", seed=3)
    eager = torch.ops.mhc.boundary_fwd(*args, *SETTINGS)  # compiles and loads before capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.mhc.boundary_fwd(*args, *SETTINGS)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.mhc.boundary_fwd(*args, *SETTINGS)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured, strict=True):
        assert torch.equal(a, b)


def test_ffn_boundaries_fuse_on_the_high_priority_stream():
    """An [attn, ffn, attn, ffn] chain: every boundary fused (the one after the FFN site through
    mhc::boundary_hp_fwd, forked to the high-priority stream and joined); the output equals the site-by-site loop."""
    import copy

    from torch import nn

    n, C = 4, 1280
    torch.manual_seed(0)
    sites = [
        mhc.MHC(nn.Linear(C, C).cuda().bfloat16(), C, n, kind=k, layer_index=i).cuda()
        for i, k in enumerate(("attn", "ffn", "attn", "ffn"))
    ]
    with torch.no_grad():
        for s in sites:
            s.phi.normal_(0, 0.02)
    loop_sites = copy.deepcopy(sites)
    x = torch.randn(257, n, C, device="cuda").bfloat16()
    out = B.run_sites(sites, x)
    h = x
    for s in loop_sites:
        h = s(h)
    assert sites[1].high_priority_post and B.fusable(sites[1], sites[2], x)
    # the fused coefficients differ by fp32 summation order (~1e-7), which can flip bf16 roundings of each site's
    # output: a few bf16 ulps after four sites (an estimate, not measured on a GPU)
    torch.testing.assert_close(out.float(), h.float(), rtol=2**-6, atol=2e-2)
