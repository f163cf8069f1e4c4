"""mhc.MHCStack block recomputation (paper §4.3.2, Eq. 20): gradients, saved memory, checkpoint and compile."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import mhc
from profiling.recompute_memory import make_stack, measure

C, N = 32, 4


def _ffn(c=C):
    return nn.Sequential(nn.RMSNorm(c), nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))


class _CheckpointedFFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.ffn = _ffn()

    def forward(self, x):
        return checkpoint(self.ffn, x, use_reentrant=False)


def _layers(L, sub=_ffn):
    layers = [mhc.MHC(sub(), C, N, kind="ffn", layer_index=i) for i in range(L)]
    with torch.no_grad():
        for layer in layers:  # away from the identity init, so every coefficient path carries gradient
            layer.phi.normal_(0, 0.1)
            layer.alpha.copy_(torch.tensor([0.5, 0.7, 1.0]))
            layer.bias.add_(torch.randn_like(layer.bias))
    return layers


def _run(stack, x, w):
    x = x.detach().clone().requires_grad_()
    out = stack(x)
    (out * w).sum().backward()
    return out.detach(), x.grad, [p.grad.clone() for p in stack.parameters()]


def _assert_same(a, b, **tol):
    tol = tol or {"rtol": 0, "atol": 0}
    torch.testing.assert_close(a[0], b[0], **tol)
    torch.testing.assert_close(a[1], b[1], **tol)
    assert len(a[2]) == len(b[2])
    for ga, gb in zip(a[2], b[2], strict=True):
        torch.testing.assert_close(ga, gb, **tol)


@pytest.mark.parametrize("r", [1, 3, "auto", 7])
def test_gradients_equal_plain_path(r):
    layers = _layers(7)
    x, w = torch.randn(2, 5, N, C), torch.randn(2, 5, N, C)
    plain = _run(mhc.MHCStack(copy.deepcopy(layers), recompute_block=None), x, w)
    # the replay runs the same ops on the same inputs in the same order: bitwise equal
    _assert_same(_run(mhc.MHCStack(copy.deepcopy(layers), recompute_block=r), x, w), plain)


def test_bf16_residual_and_autocast():
    layers = _layers(4)
    for layer in layers:
        layer.precision = mhc.Precision.BF16
    x, w = torch.randn(3, 4, N, C), torch.randn(3, 4, N, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _run(mhc.MHCStack(copy.deepcopy(layers), recompute_block=None), x, w)
        rec = _run(mhc.MHCStack(copy.deepcopy(layers), recompute_block=2), x, w)
    _assert_same(rec, plain)


def test_checkpointed_sublayers():
    layers = _layers(5, sub=_CheckpointedFFN)
    x, w = torch.randn(2, 3, N, C), torch.randn(2, 3, N, C)
    plain = _run(mhc.MHCStack(copy.deepcopy(layers), recompute_block=None), x, w)
    _assert_same(_run(mhc.MHCStack(copy.deepcopy(layers), recompute_block=2), x, w), plain)


def test_torch_compile():
    layers = _layers(4)
    x, w = torch.randn(2, 3, N, C), torch.randn(2, 3, N, C)
    plain = _run(mhc.MHCStack(copy.deepcopy(layers), recompute_block=None), x, w)
    stack = mhc.MHCStack(copy.deepcopy(layers), recompute_block=2)
    compiled = torch.compile(stack, backend="aot_eager", fullgraph=True)
    _assert_same(_run(compiled, x, w), plain, rtol=1e-5, atol=1e-5)


def test_torch_compile_fuses_the_boundaries_inside_a_block():
    """A compiled stack's checkpointed blocks take the fused boundary ops, as the eager blocks do: 4 sites in blocks
    of 2 give one fused boundary a block and two unfused block edges. The forward graph runs each block's
    pre-mapping, boundary and post_res once; the backward graph replays the block's pre-mapping and boundary (the
    selective policy recomputes mhc ops) and runs every backward."""
    from collections import Counter

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    calls = {"fw": Counter(), "bw": Counter()}

    def counter(key):
        def compiler(gm, example_inputs):
            for mod in gm.modules():
                if isinstance(mod, torch.fx.GraphModule):
                    calls[key].update(str(nd.target) for nd in mod.graph.nodes if nd.op == "call_function")
            return make_boxed_func(gm.forward)

        return compiler

    stack = mhc.MHCStack(_layers(4), recompute_block=2)
    backend = aot_autograd(fw_compiler=counter("fw"), bw_compiler=counter("bw"))
    x, w = torch.randn(2, 3, N, C), torch.randn(2, 3, N, C)
    _run(torch.compile(stack, backend=backend, fullgraph=True), x, w)
    ops = {key: {k[4:-8]: v for k, v in c.items() if k.startswith("mhc.")} for key, c in calls.items()}
    assert ops["fw"] == {"pre_mapping_fwd": 2, "boundary_fwd": 2, "post_res_fwd": 2}
    assert ops["bw"] == {
        "pre_mapping_fwd": 2, "boundary_fwd": 2, "pre_mapping_bwd": 2, "boundary_bwd": 2, "post_res_bwd": 2,
    }  # fmt: skip


def test_saved_memory_matches_the_model():
    """Resident bytes after forward: each extra block keeps exactly one n*C residual per token; the plain path keeps
    n*C per site plus the coefficients (h_pre n, h_post n, proj n*n+2n, rinv 1, h_res n*n floats per token)."""
    L, T = 6, 16
    x = torch.randn(T, N, C, requires_grad=True)
    base = make_stack(L, N, C, None)
    resident = {}
    for r in (None, 1, 2, 4, L):
        stack = make_stack(L, N, C, r)
        stack.load_state_dict(base.state_dict())
        resident[r] = measure(stack, x)[0]
    unit = N * C * T * 4
    for r in (1, 2, 4):
        assert resident[r] - resident[L] == unit * (math.ceil(L / r) - 1)
    coef = (N + N + (N * N + 2 * N) + 1 + N * N) * T * 4
    assert resident[None] - resident[L] == unit * (L - 1) + coef * L


@pytest.mark.parametrize("n,L,want", [(4, 24, 4), (4, 36, 4), (4, 60, 6), (4, 1, 1), (1, 10, 2)])
def test_optimal_block(n, L, want):
    assert mhc.optimal_block(n, L) == want
    cost = [n * math.ceil(L / r) + (n + 2) * r for r in range(1, L + 1)]
    assert cost[want - 1] == min(cost)


def test_defaults_and_no_grad():
    stack = mhc.MHCStack(_layers(24))
    assert stack.recompute_block == 4 and len(stack.blocks()) == 6
    x = torch.randn(2, N, C)
    with torch.no_grad():
        out = stack(x)
    torch.testing.assert_close(out, mhc.MHCStack(stack.layers, recompute_block=None)(x), rtol=0, atol=0)


def test_errors():
    with pytest.raises(TypeError, match=r"expected layers\[1\] to be an mhc.MHC, got Linear"):
        mhc.MHCStack([mhc.MHC(_ffn(), C, N), nn.Linear(C, C)])
    with pytest.raises(ValueError, match="expected layers\\[0\\] to have a sublayer"):
        mhc.MHCStack([mhc.MHC(None, C, N)])
    with pytest.raises(ValueError, match="expected at least one"):
        mhc.MHCStack([])
    with pytest.raises(TypeError, match="expected recompute_block to be 'auto', None or an int, got float"):
        mhc.MHCStack(_layers(2), recompute_block=2.0)
    with pytest.raises(ValueError, match="expected recompute_block >= 0, got -1"):
        mhc.MHCStack(_layers(2), recompute_block=-1)
    with pytest.raises(ValueError, match="expected num_layers >= 1, got 0"):
        mhc.optimal_block(4, 0)


@pytest.mark.parametrize("recompute_block", [None, 2])
def test_checkpoint_keys_are_a_plain_module_lists(recompute_block):
    """A stack keeps nn.ModuleList's keys (sites.0.phi, not sites.layers.0.phi), so checkpoints move both ways."""

    class Model(nn.Module):
        def __init__(self, sites):
            super().__init__()
            self.sites = sites

    torch.manual_seed(0)
    layers = _layers(3)
    plain = Model(nn.ModuleList(copy.deepcopy(layers)))
    stacked = Model(mhc.MHCStack(copy.deepcopy(layers), recompute_block=recompute_block))
    assert list(stacked.state_dict()) == list(plain.state_dict())
    assert "sites.0.phi" in stacked.state_dict()
    fresh = Model(mhc.MHCStack(_layers(3), recompute_block=recompute_block))
    fresh.load_state_dict(plain.state_dict())
    for a, b in zip(fresh.state_dict().values(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    old_layout = {k.replace("sites.", "sites.layers.", 1): v for k, v in plain.state_dict().items()}
    fresh = Model(mhc.MHCStack(_layers(3), recompute_block=recompute_block))
    fresh.load_state_dict(old_layout)  # checkpoints of the earlier layout still load
    torch.testing.assert_close(fresh.sites[2].phi, plain.sites[2].phi, rtol=0, atol=0)
    assert len(stacked.sites) == 3 and stacked.sites[1] is stacked.sites.layers[1]


def test_stack_assigns_unset_layer_indices():
    sites = [mhc.MHC(_ffn(), C, N, kind="ffn") for _ in range(6)]
    assert all(s.layer_index is None and s.home_stream == 0 for s in sites)
    stack = mhc.MHCStack(sites)
    assert [s.layer_index for s in stack] == list(range(6))
    for i, s in enumerate(stack):  # the identity init follows the new home stream
        assert torch.sigmoid(s.bias[:N]).argmax().item() == i % N
        want = mhc.MHC(None, C, N, kind="ffn", layer_index=i)
        torch.testing.assert_close(s.bias, want.bias, rtol=0, atol=0)
    kept = mhc.MHC(_ffn(), C, N, layer_index=7)
    trained = mhc.MHC(_ffn(), C, N)
    with torch.no_grad():
        trained.bias.add_(0.5)
    before = trained.bias.detach().clone()
    stack = mhc.MHCStack([kept, trained])
    assert kept.layer_index == 7 and trained.layer_index == 1
    torch.testing.assert_close(trained.bias, before, rtol=0, atol=0)  # not fresh: parameters are left alone
