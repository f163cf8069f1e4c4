"""mhc.diagnostics: Amax gain magnitudes (paper orientation), Sinkhorn residuals, the no-sync recorder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mhc
from mhc import diagnostics as D

C, N = 16, 4


def test_gains_of_known_matrices():
    h = torch.tensor([[[2.0, 0.0], [1.0, 1.0]], [[0.5, -1.5], [0.0, 1.0]]])
    fwd, bwd = D.gains(h, average="none")
    torch.testing.assert_close(fwd, torch.tensor([2.0, 1.0]))  # row sums (2, 2) and (-1, 1)
    torch.testing.assert_close(bwd, torch.tensor([3.0, 0.5]))  # column sums (3, 1) and (0.5, -0.5)
    torch.testing.assert_close(torch.stack(D.gains(h)), torch.tensor([1.5, 1.75]))
    # the gain of the mean matrix ((1.25, -0.75), (0.5, 1)): rows 0.5, 1.5; columns 1.75, 0.25
    torch.testing.assert_close(torch.stack(D.gains(h, average="matrix")), torch.tensor([1.5, 1.75]))


def test_composite_order_and_amax_gains():
    a, b = torch.randn(5, 3, 3), torch.randn(5, 3, 3)
    p = D.composite([a, b])
    torch.testing.assert_close(p[1], b @ a)  # x_2 = h_1 (h_0 x)
    stats = D.amax_gains([a, b])
    torch.testing.assert_close(stats["composite_forward"][1], (b @ a).sum(-1).abs().amax(-1).mean())
    torch.testing.assert_close(stats["single_backward"][0], a.sum(-2).abs().amax(-1).mean())


def test_sinkhorn_residuals():
    h = mhc.sinkhorn(torch.randn(64, N, N), iters=20)
    rows, cols = D.sinkhorn_residuals(h)
    assert rows < 1e-6 and 1e-6 < cols < 1e-2
    _, cols_more = D.sinkhorn_residuals(mhc.sinkhorn(torch.randn(64, N, N), iters=200))
    assert cols_more < 1e-5


def _model(L=5):
    layers = []
    for i in range(L):
        layer = mhc.MHC(nn.Sequential(nn.RMSNorm(C), nn.Linear(C, C)), C, N, layer_index=i)
        with torch.no_grad():
            layer.phi.normal_(0, 0.2)
            layer.bias.add_(torch.randn_like(layer.bias))
        layers.append(layer)
    return mhc.MHCStack(layers, recompute_block=2)


def test_collect_matches_amax_gains_and_ignores_replay():
    model = _model()
    x = torch.randn(3, 7, N, C, requires_grad=True)
    with D.collect(model) as rec:
        model(x).sum().backward()  # the backward replays the blocks: must not be recorded
        model(x).sum().backward()
        assert all(isinstance(t, torch.Tensor) for t in rec.passes[0])  # device tensors until summary()
    stats = rec.summary()
    assert stats["passes"] == 2 and stats["layers"] == 5
    h, hs = x.detach(), []
    with torch.no_grad():
        for layer in model.layers:
            li, ctx = layer.pre(h)
            hs.append(ctx.h_res)
            h = layer.post(ctx, layer.sublayer(li))
    want = D.amax_gains(hs)
    for key in ("single_forward", "single_backward", "composite_forward", "composite_backward"):
        torch.testing.assert_close(
            torch.tensor(stats[key], dtype=torch.float64), want[key].double(), rtol=1e-6, atol=1e-6
        )
    assert max(stats["single_backward"]) > 1.0 + 1e-4  # not a tautology: the truncated Sinkhorn's columns are off
    # hooks are gone after the block
    assert all("_h_res_hook" not in m.__dict__ for m in model.modules())


def test_collect_errors():
    with pytest.raises(TypeError, match="expected model to be an nn.Module, got int"), D.collect(3):
        pass
    with pytest.raises(ValueError, match="expected a model containing mhc.MHC layers"), D.collect(nn.Linear(2, 2)):
        pass
    with pytest.raises(ValueError, match=r"expected h_res of shape \[..., n, n\], got \[2, 3\]"):
        D.gains(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="expected average in"):
        D.gains(torch.zeros(2, 2), average="max")
    with D.collect(_model()) as rec, pytest.raises(RuntimeError, match="nothing recorded"):
        rec.summary()


def test_unconverged_sinkhorn_is_reported_and_flagged():
    """Extreme logits: finite rows-stochastic output whose columns are far from 1; the diagnostics say so."""
    torch.manual_seed(0)
    h = mhc.sinkhorn(torch.randn(8, N, N) * 1e4)
    with pytest.warns(RuntimeWarning, match="did not converge: a column of h_res sums to 1 \\+- 1"):
        rep = D.sinkhorn_report(h)
    assert rep["converged"] is False and rep["col_residual"] > 0.4 and rep["row_residual"] < 1e-5
    ok = D.sinkhorn_report(mhc.sinkhorn(torch.randn(8, N, N)), warn=True)
    assert ok["converged"] is True and ok["col_residual"] < 1e-2


def test_recorder_flags_unconverged_sites():
    model = _model(3)
    with torch.no_grad():
        model[1].alpha[2] = 1e4  # sharp res logits at site 1 only
        model[1].phi.normal_(0, 1.0)
    with D.collect(model) as rec:
        model(torch.randn(2, 5, N, C))
    with pytest.warns(RuntimeWarning, match=r"sites \[1\]"):
        stats = rec.summary()
    assert stats["unconverged_sites"] == [1] and stats["col_residual"][1] > D.COLUMN_TOL
    calm = _model(3)
    with D.collect(calm) as rec:
        calm(torch.randn(2, 5, N, C))
    assert rec.summary()["unconverged_sites"] == []
