"""mhc.MHC on a GPU (marked `gpu`, skipped without CUDA): correctness against CPU float64, the FFN post kernel on
the high-priority stream (profiler stream id), and CUDA-graph capture and replay with the fork/join inside."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mhc

pytestmark = pytest.mark.gpu

C, N = 1280, 4


def _layer(kind, post_stream="auto"):
    torch.manual_seed(0)
    # the sublayer in bf16, as the layer input it gets (fp32 weights would make F.linear refuse the bf16 input);
    # phi, alpha and bias stay fp32 (the coefficients)
    ffn = nn.Sequential(nn.RMSNorm(C), nn.Linear(C, C)).to(torch.bfloat16)
    layer = mhc.MHC(ffn, C, N, kind=kind, post_stream=post_stream)
    with torch.no_grad():
        layer.phi.normal_(0, 0.02)
        layer.bias.add_(torch.randn_like(layer.bias) * 0.5)
    return layer


@pytest.mark.parametrize("kind", ["attn", "ffn"])
def test_layer_matches_float64_on_cpu(kind):
    layer = _layer(kind).cuda()
    x = torch.randn(4, 256, N, C, device="cuda").to(torch.bfloat16)
    out = layer(x)
    out.float().square().mean().backward()
    exact = copy.deepcopy(layer).cpu().double()
    exact.precision = mhc.Precision(torch.float64, torch.float64)
    xd = x.detach().cpu().double().requires_grad_(True)
    want = exact(xd)
    err = (out.double().cpu() - want).abs().max() / want.abs().max()
    assert err < 2e-2  # bf16 residual, layer input and FFN (mhc.Precision docstring: 5.3e-3 measured on CPU)
    want.square().mean().backward()
    g = layer.phi.grad.double().cpu()
    assert (g - exact.phi.grad).abs().max() / exact.phi.grad.abs().max() < 5e-2


def test_ffn_post_kernel_runs_on_the_high_priority_stream():
    layer = _layer("ffn").cuda()
    x = torch.randn(2, 512, N, C, device="cuda", dtype=torch.bfloat16)
    layer(x)  # compile and warm up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        layer(x)
        torch.cuda.synchronize()
    hp = mhc.streams.high_priority_stream(torch.cuda.current_device())
    assert hp.priority == torch.cuda.Stream.priority_range()[1]
    post = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "post_res" in e.name]
    other = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "post_res" not in e.name]
    assert post, [e.name for e in prof.events()][:50]
    # a device event's stream is its device_resource_id (FunctionEvent has no ``stream`` attribute)
    post_streams = {e.device_resource_id for e in post} - {None}
    other_streams = {e.device_resource_id for e in other} - {None}
    assert post_streams and not (post_streams & other_streams), (post_streams, other_streams)


def test_attn_and_disabled_post_stay_on_the_current_stream():
    for layer in (_layer("attn"), _layer("ffn", post_stream=None)):
        assert not layer.high_priority_post


def test_cuda_graph_replay():
    layer = _layer("ffn").cuda()
    static_x = torch.randn(2, 128, N, C, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(3):
            layer(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = layer(static_x)
    for _ in range(3):
        new = torch.randn_like(static_x)
        static_x.copy_(new)
        graph.replay()
        with torch.no_grad():
            want = layer(new)
        torch.testing.assert_close(static_out, want, rtol=0, atol=0)


def test_compile_reduce_overhead_matches_eager():
    layer = _layer("ffn").cuda()
    x = torch.randn(2, 128, N, C, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            got = compiled(x)
        torch.testing.assert_close(got, layer(x), rtol=2**-7, atol=1e-2)
