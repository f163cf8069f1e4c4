"""Chains of mhc.MHC sites with fused boundaries (mhc.boundary.run_sites, MHCStack's plain path): outputs and every
gradient bit for bit those of the site-by-site loop on the CPU, the fused op used at every boundary between
matching sites, and not used where it must not be (a module hook on a site, a precision change between sites)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mhc
from mhc import boundary as B
from mhc import boundary_chain

C, N = 32, 4


def _sites(L, seed=0):
    torch.manual_seed(seed)
    sites = []
    for i in range(L):
        sub = nn.Sequential(nn.RMSNorm(C), nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C))
        sites.append(mhc.MHC(sub, C, N, kind="attn" if i % 2 == 0 else "ffn", layer_index=i))
    with torch.no_grad():
        for site in sites:  # away from the identity init, so every coefficient path carries gradient
            site.phi.normal_(0, 0.1)
            site.alpha.copy_(torch.tensor([0.5, 0.7, 1.0]))
            site.bias.add_(torch.randn_like(site.bias))
    return sites


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    real = boundary_chain.boundary

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(boundary_chain, "boundary", counting)  # the function post_pre calls
    return calls


def _run(fn, params, x, w):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    (out.float() * w).sum().backward()
    return out.detach(), x.grad, [p.grad.clone() for p in params]


def _assert_bitwise(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for ga, gb in zip(a[2], b[2], strict=True):
        assert torch.equal(ga, gb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stack_plain_path_fuses_and_equals_the_loop(dtype, fused_calls):
    sites = _sites(5)
    for site in sites:
        site.sublayer.to(dtype)
    loop_sites = copy.deepcopy(sites)
    stack = mhc.MHCStack(sites, recompute_block=None)
    x = torch.randn(3, 2, N, C).to(dtype)
    w = torch.randn(3, 2, N, C)

    def loop(h):
        for site in loop_sites:
            h = site(h)
        return h

    fused = _run(stack, list(stack.parameters()), x, w)
    assert len(fused_calls) == 4, "every boundary of 5 matching sites runs fused"
    plain = _run(loop, [p for s in loop_sites for p in s.parameters()], x, w)
    _assert_bitwise(fused, plain)


def test_no_grad_path_of_the_default_stack_fuses(fused_calls):
    sites = _sites(4)
    stack = mhc.MHCStack(copy.deepcopy(sites))  # recompute "auto": the plain path under no_grad
    x = torch.randn(5, N, C)
    with torch.no_grad():
        out = stack(x)
        h = x
        for site in sites:
            h = site(h)
    assert len(fused_calls) == 3
    assert torch.equal(out, h)


def test_a_site_with_a_module_hook_is_not_fused(fused_calls):
    sites = _sites(4)
    seen = []
    sites[2].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    out = B.run_sites(sites, torch.randn(2, N, C))
    assert seen == [out.shape], "the hooked site ran through its own __call__, once"
    assert len(fused_calls) == 1, "only the boundary 0 -> 1 (the hooked site 2 runs whole, 1 -> 2 and 2 -> 3 unfused)"


def test_a_precision_change_is_not_fused(fused_calls):
    sites = _sites(3)
    sites[1].precision = mhc.Precision(residual=torch.float64)
    for site in sites[1:]:  # sites 1 and 2 see float64 activations
        site.sublayer.double()
    B.run_sites(sites, torch.randn(2, N, C))
    assert len(fused_calls) == 1, "0 -> 1 changes the residual dtype: unfused; 1 -> 2 stays float64: fused"


def test_run_sites_rejects_a_site_without_sublayer():
    sites = _sites(2)
    sites.append(mhc.MHC(None, C, N))
    with pytest.raises(TypeError, match="sublayer"):
        B.run_sites(sites, torch.randn(2, N, C))


def test_fused_stack_under_torch_compile_fullgraph():
    sites = _sites(3)
    stack = mhc.MHCStack(sites, recompute_block=None)
    x = torch.randn(4, N, C)
    compiled = torch.compile(stack, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), stack(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("r", [1, 2, "auto"])
def test_recompute_blocks_fuse_inside_and_equal_the_loop(r, fused_calls):
    """Block recompute (Eq. 20): boundaries inside a block are fused in the forward and alike in the replay (the
    replay saves the same tensors in the same order, else MHCStack raises); the result and every gradient are bit
    for bit the site-by-site loop's."""
    sites = _sites(5)
    loop_sites = copy.deepcopy(sites)
    stack = mhc.MHCStack(sites, recompute_block=r)
    x, w = torch.randn(3, N, C), torch.randn(3, N, C)

    def loop(h):
        for site in loop_sites:
            h = site(h)
        return h

    fused = _run(stack, list(stack.parameters()), x, w)
    blocks = stack.blocks()
    inside = sum(len(b) - 1 for b in blocks)
    assert len(fused_calls) == 2 * inside, "each inner boundary fused once in the forward and once in the replay"
    plain = _run(loop, [p for s in loop_sites for p in s.parameters()], x, w)
    _assert_bitwise(fused, plain)
