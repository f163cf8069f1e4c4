"""mhc.MHC, expand/collapse/MHCHead and the Precision policy on CPU."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

import mhc
from mhc import reference as ref

C, N = 32, 4


def _ffn(C=C):
    return nn.Sequential(nn.RMSNorm(C), nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C))


def _randomise(layer, std=0.1):
    with torch.no_grad():
        layer.phi.normal_(0, std)
        layer.alpha.copy_(torch.tensor([0.5, 0.7, 1.0]))
        layer.bias.add_(torch.randn_like(layer.bias))
    return layer


# ---------------------------------------------------------------------------------------------------- init


@pytest.mark.parametrize("n,layer_index", [(1, 0), (2, 3), (4, 1), (4, 6)])
def test_identity_init_coefficients(n, layer_index):
    layer = mhc.MHC(None, C, n, layer_index=layer_index)
    x = torch.randn(5, n, C)
    _, ctx = layer.pre(x)
    home = layer_index % n
    h_pre = torch.sigmoid(layer.bias[:n]).detach()
    assert h_pre.argmax().item() == home
    torch.testing.assert_close(h_pre[home], torch.tensor(1 / (1 + math.exp(-3))))
    torch.testing.assert_close(ctx.h_post, torch.ones(5, n))
    diag = 1 / (1 + (n - 1) * math.exp(-6))  # exp(6I - 3) has equal row and column sums
    want = torch.full((n, n), (1 - diag) / max(n - 1, 1)).fill_diagonal_(diag)
    torch.testing.assert_close(ctx.h_res, want.expand(5, n, n), rtol=0, atol=1e-6)


def test_identity_init_is_a_plain_residual():
    ffn = _ffn()
    layer = mhc.MHC(ffn, C, N, kind="ffn", layer_index=1)
    x = torch.randn(3, 7, C)
    out = layer(mhc.expand(x, N))
    plain = x + ffn(x)  # the RMSNorm in F hides H_pre's input gain of sigma(3) + 3 sigma(-3) = 1.0953
    torch.testing.assert_close(out, plain.unsqueeze(-2).expand_as(out), rtol=1e-5, atol=1e-5)


def test_uniform_init():
    layer = mhc.MHC(None, C, N, init="uniform")
    _, ctx = layer.pre(torch.randn(4, N, C))
    torch.testing.assert_close(ctx.h_post, torch.ones(4, N))
    torch.testing.assert_close(ctx.h_res, torch.full((4, N, N), 1 / N))
    torch.testing.assert_close(layer.bias, torch.zeros_like(layer.bias), rtol=0, atol=0)


def test_reset_parameters_and_parameters_are_registered():
    layer = _randomise(mhc.MHC(_ffn(), C, N))
    names = {name for name, _ in layer.named_parameters() if not name.startswith("sublayer.")}
    assert names == {"phi", "alpha", "bias"}
    layer.reset_parameters()
    assert layer.phi.abs().max() == 0 and torch.equal(layer.alpha, torch.full((3,), 0.01))
    assert layer.bias[layer.home_stream] == 3.0


def test_learning_starts_at_zero_phi():
    layer = mhc.MHC(_ffn(), C, N)
    layer(torch.randn(4, 6, N, C)).square().sum().backward()
    assert layer.phi.grad.abs().max() > 0 and layer.bias.grad.abs().max() > 0
    assert layer.alpha.grad.abs().max() == 0  # d alpha is proportional to phi, zero at the start


# ---------------------------------------------------------------------------------------------------- math


def test_layer_matches_the_reference_site_with_gradients():
    layer = _randomise(mhc.MHC(_ffn(), C, N, kind="ffn")).double()
    layer.precision = mhc.Precision(torch.float64, torch.float64)
    x = torch.randn(2, 5, N, C, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    out.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    p2 = [t.detach().clone().requires_grad_(True) for t in (layer.phi, layer.alpha, layer.bias)]
    want = ref.site(x2, layer.sublayer, ref.SiteParams(*p2))
    want.square().sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    for a, b in [(x, x2), (layer.phi, p2[0]), (layer.alpha, p2[1]), (layer.bias, p2[2])]:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


def test_split_form_equals_forward():
    layer = _randomise(mhc.MHC(_ffn(), C, N))
    x = torch.randn(3, N, C)
    li, ctx = layer.pre(x)
    torch.testing.assert_close(layer.post(ctx, layer.sublayer(li)), layer(x), rtol=0, atol=0)


def test_post_stream_is_a_no_op_on_cpu():
    x = torch.randn(3, N, C)
    a = _randomise(mhc.MHC(_ffn(), C, N, kind="ffn", post_stream="high_priority"))
    b = copy.deepcopy(a)
    b.post_stream = None
    assert a.high_priority_post and not b.high_priority_post
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert not mhc.MHC(None, C, N, kind="attn").high_priority_post


def test_post_res_hp_op_passes_opcheck():
    from mhc import streams

    T, n, c = 3, 4, 8
    args = [
        torch.randn(T, c, requires_grad=True),
        torch.randn(T, n, c, requires_grad=True),
        torch.rand(T, n, requires_grad=True),
        ref.sinkhorn(torch.randn(T, n, n)).requires_grad_(True),
    ]
    torch.library.opcheck(streams.post_res_hp_fwd, args)
    torch.library.opcheck(streams.post_res_hp_bwd, [torch.randn(T, n, c), *[a.detach() for a in args]])


# ---------------------------------------------------------------------------------------------------- errors


def test_forgotten_expand_is_named():
    layer = mhc.MHC(_ffn(), 64, 4)
    with pytest.raises(ValueError, match=r"n_streams=4, C=64\], got \[2, 16, 64\]: did you forget mhc.expand"):
        layer(torch.randn(2, 16, 64))


def test_shape_errors_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = mhc.MHC(_ffn(64), 64, 4)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        bad = mode.from_tensor(torch.empty(2, 16, 64))
        with pytest.raises(ValueError, match="did you forget mhc.expand"):
            layer(bad)
        good = mode.from_tensor(torch.empty(2, 16, 4, 64))
        assert layer(good).shape == (2, 16, 4, 64)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: mhc.MHC(None, 0, 4), ValueError, "hidden_size >= 1, got 0"),
        (lambda: mhc.MHC(None, 8, 4.0), TypeError, "n_streams to be an int, got float"),
        (lambda: mhc.MHC(None, 8, kind="mlp"), ValueError, r"kind in \('attn', 'ffn'\), got 'mlp'"),
        (lambda: mhc.MHC(None, 8, init="zeros"), ValueError, "init in"),
        (lambda: mhc.MHC(None, 8, post_stream="low"), ValueError, "post_stream in"),
        (lambda: mhc.MHC(None, 8, precision=torch.bfloat16), TypeError, "mhc.Precision, got dtype"),
        (lambda: mhc.MHC(None, 8, post_mult=0.0), ValueError, "post_mult finite and > 0"),
        (lambda: mhc.MHC(3, 8), TypeError, "sublayer to be callable"),
        (lambda: mhc.Precision(torch.int8), TypeError, "residual in"),
        (lambda: mhc.Precision(coefficients=torch.bfloat16), TypeError, r"coefficients in \(float32, float64\)"),
        (lambda: mhc.expand(torch.randn(3), 0), ValueError, "n >= 1, got 0"),
        (lambda: mhc.collapse(torch.randn(2, 4, 8), 4, "max"), ValueError, "how in"),
        (lambda: mhc.collapse(torch.randn(2, 4, 8), "sum"), TypeError, r"expected n \(the stream count"),
        (lambda: mhc.collapse(torch.randn(2, 4, 8), 0), ValueError, "n >= 1, got 0"),
        (lambda: mhc.collapse(torch.randn(2, 4, 8), 4, mhc.MHCHead(8, 2)), ValueError, "n_streams=4, got n_streams=2"),
        (lambda: mhc.MHC(None, 8, 2)(torch.randn(1, 2, 8)), TypeError, "no sublayer"),
        (lambda: mhc.MHC(lambda t: (t,), 8, 2)(torch.randn(1, 2, 8)), TypeError, "return a torch.Tensor"),
    ],
)
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_wrong_layer_output_shape():
    layer = mhc.MHC(None, C, N)
    _, ctx = layer.pre(torch.randn(2, 3, N, C))
    with pytest.raises(ValueError, match=rf"layer_output of shape \[2, 3, {C}\].*got \[2, 3, {C + 1}\]"):
        layer.post(ctx, torch.randn(2, 3, C + 1))


def test_precision_is_frozen_and_printed():
    with pytest.raises(dataclasses.FrozenInstanceError):
        mhc.Precision.BF16.residual = torch.float32
    assert repr(mhc.Precision.BF16) == "Precision(residual=bfloat16, coefficients=float32)"
    text = repr(mhc.MHC(None, C, N, kind="ffn", layer_index=3))
    for part in (
        "hidden_size=32",
        "n_streams=4",
        "kind='ffn'",
        "layer_index=3",
        "sinkhorn_iters=20",
        "init='identity'",
    ):
        assert part in text


# ---------------------------------------------------------------------------------------------------- precision


class _Fp32Linear(nn.Module):
    """A sublayer computed in fp32 whatever its input, so only mHC's own rounding is measured."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(C, C)

    def forward(self, t):
        return self.lin(t.to(self.lin.weight.dtype))


# measured max relative errors (mhc.Precision docstring): 3.3e-7, 5.3e-3, 5.9e-4; asserted with a factor 4
@pytest.mark.parametrize("policy,bound", [("FP32", 4 * 3.3e-7), ("BF16", 4 * 5.3e-3), ("FP16", 4 * 5.9e-4)])
def test_policy_error_bound_against_float64(policy, bound):
    pol = getattr(mhc.Precision, policy)
    layer = _randomise(mhc.MHC(_Fp32Linear(), C, N, precision=pol))
    x = torch.randn(512, N, C).to(pol.residual)
    with torch.no_grad():
        out = layer(x)
        exact = copy.deepcopy(layer).double()
        exact.precision = mhc.Precision(torch.float64, torch.float64)
        want = exact(x.double())
    assert out.dtype == pol.residual
    err = ((out.double() - want).abs().max() / want.abs().max()).item()
    assert err < bound, err
    assert err > bound / 400  # the bound is near what the policy gives, not vacuous


def test_autocast_sublayer_output_is_cast_to_the_residual_dtype():
    layer = _randomise(mhc.MHC(_ffn(), C, N))
    x = torch.randn(2, 5, N, C, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        li, ctx = layer.pre(x)
        y = layer.sublayer(li)
        assert y.dtype == torch.bfloat16
        out = layer.post(ctx, y)
    assert out.dtype == torch.float32
    _, plain_ctx = layer.pre(x)
    torch.testing.assert_close(ctx.h_res, plain_ctx.h_res, rtol=0, atol=0)  # the ops ignore autocast
    torch.testing.assert_close(out, layer(x), rtol=2e-2, atol=2e-2)  # F in bf16 versus fp32
    out.sum().backward()
    assert layer.phi.grad.dtype == torch.float32


def test_bf16_parameters_are_upcast_inside():
    """What FSDP2 with MixedPrecisionPolicy(param_dtype=bf16) hands the forward: every parameter in bf16."""
    layer = _randomise(mhc.MHC(_ffn(), C, N))
    low = copy.deepcopy(layer).to(torch.bfloat16)
    x = torch.randn(2, 5, N, C).to(torch.bfloat16)
    out = low(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert low.phi.grad.dtype == torch.bfloat16 and low.phi.grad.abs().max() > 0
    rounded = copy.deepcopy(low).float()  # same (bf16-rounded) values, fp32 storage
    torch.testing.assert_close(out.float(), rounded(x.float()), rtol=3e-2, atol=3e-2)


# ---------------------------------------------------------------------------------------------------- state, loading


def test_state_dict_round_trip():
    a = _randomise(mhc.MHC(_ffn(), C, N))
    b = mhc.MHC(_ffn(), C, N)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, N, C)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def _tk_site(x, F, fn, scale, base, n, iters):
    """DeepSeek TileKernels' convention, written from docs/spec.md §7 (eps = 0, pre_eps = 0, post_mult = 2): mixes from
    fn [m, nC]; comb ends with a column normalisation; out[o] = post[o] y + sum_i comb[i, o] x[i]."""
    flat = x.flatten(-2)
    mixes = (flat @ fn.T) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + 1e-6)
    mixes = mixes * torch.cat([scale[0].expand(n), scale[1].expand(n), scale[2].expand(n * n)]) + base
    pre = torch.sigmoid(mixes[..., :n])
    post = 2.0 * torch.sigmoid(mixes[..., n : 2 * n])
    comb = torch.softmax(mixes[..., 2 * n :].unflatten(-1, (n, n)), dim=-1)  # row-normalised exp
    comb = comb / comb.sum(-2, keepdim=True)
    for _ in range(iters - 1):
        comb = comb / comb.sum(-1, keepdim=True)
        comb = comb / comb.sum(-2, keepdim=True)
    y = F((pre[..., None] * x).sum(-2))
    return post[..., None] * y[..., None, :] + torch.einsum("...io,...ic->...oc", comb, x)


def test_load_deepseek_weights_matches_a_tilekernels_convention_site():
    n, m = N, ref.num_coefficients(N)
    ffn = _ffn().double()
    fn = torch.randn(m, n * C, dtype=torch.float64) * 0.1
    scale = torch.tensor([0.6, 0.9, 1.4], dtype=torch.float64)
    base = torch.randn(m, dtype=torch.float64)
    layer = mhc.MHC(ffn, C, n, precision=mhc.Precision(torch.float64, torch.float64), dtype=torch.float64)
    layer.load_deepseek_(fn, scale, base)
    x = torch.randn(6, n, C, dtype=torch.float64)
    want = _tk_site(x, ffn, fn, scale, base, n, 20)
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="fn of shape"):
        layer.load_deepseek_(fn[:, :-1], scale, base)


# ---------------------------------------------------------------------------------------------------- expand, collapse


def test_expand_and_collapse():
    x = torch.randn(2, 3, C, requires_grad=True)
    h = mhc.expand(x, N)
    assert h.shape == (2, 3, N, C) and h.is_contiguous()
    torch.testing.assert_close(mhc.collapse(h, N, "mean"), x)
    torch.testing.assert_close(mhc.collapse(h, N), N * x)
    mhc.collapse(h * torch.arange(1.0, N + 1)[:, None], N, "sum").sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, N * (N + 1) / 2))


def test_collapse_refuses_an_unexpanded_residual():
    """[B, S, C] without mhc.expand used to be summed over S, a silent [B, C]."""
    x = torch.randn(2, 16, C)
    for how in ("sum", "mean", mhc.MHCHead(C, N)):
        with pytest.raises(ValueError, match=rf"n={N}, C\], got \[2, 16, {C}\]: did you forget mhc.expand"):
            mhc.collapse(x, N, how)
    with pytest.raises(ValueError, match="did you forget mhc.expand"):
        mhc.collapse(x, mhc.MHCHead(C, N))


def test_head_formula_init_and_gradients():
    head = mhc.MHCHead(C, N)
    x = torch.randn(5, N, C)
    torch.testing.assert_close(head(x), x.mean(-2) + 1e-6 * x.sum(-2), rtol=1e-5, atol=1e-6)  # init: the mean
    head = mhc.MHCHead(3, 2, dtype=torch.float64, precision=mhc.Precision(torch.float64, torch.float64))
    with torch.no_grad():
        head.phi.normal_()
        head.alpha.fill_(0.7)
        head.bias.normal_()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    flat = x.flatten(-2)
    w = torch.sigmoid(0.7 * (flat @ head.phi) / flat.square().mean(-1, keepdim=True).add(1e-6).sqrt() + head.bias)
    torch.testing.assert_close(mhc.collapse(x, head), ((w + 1e-6)[..., None] * x).sum(-2))
    assert torch.autograd.gradcheck(lambda t, p: (head.phi.data.copy_(p), head(t))[1], (x, head.phi.detach().clone()))
    with pytest.raises(ValueError, match="did you forget mhc.expand"):
        head(torch.randn(4, 3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------- compile


class _Block(nn.Module):
    def __init__(self, n, c, i):
        super().__init__()
        self.attn = mhc.MHC(_ffn(c), c, n, kind="attn", layer_index=2 * i)
        self.ffn = mhc.MHC(_ffn(c), c, n, kind="ffn", layer_index=2 * i + 1)

    def forward(self, h):
        return self.ffn(self.attn(h))


class _Tiny(nn.Module):
    def __init__(self, n=N, c=C):
        super().__init__()
        self.n = n
        self.blocks = nn.ModuleList([_Block(n, c, i) for i in range(2)])
        self.head = mhc.MHCHead(c, n)

    def forward(self, x):
        h = mhc.expand(x, self.n)
        for block in self.blocks:
            h = block(h)
        return mhc.collapse(h, self.head)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = _Tiny()
    for p in model.modules():
        if isinstance(p, mhc.MHC):
            _randomise(p)
    x = torch.randn(2, 6, C)

    def run(f):
        model.zero_grad()
        xx = x.clone().requires_grad_(True)
        out = f(xx)
        out.square().mean().backward()
        return out.detach(), [xx.grad] + [p.grad.clone() for p in model.parameters()]

    want = run(model)
    got = run(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- sublayer dtype


def test_bf16_policy_runs_an_fp32_sublayer_without_autocast():
    """Precision.BF16 around an fp32 nn.Linear, no autocast: the sublayer runs in its parameters' dtype (it used to
    raise 'mat1 and mat2 must have the same dtype' from inside the user's Linear)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    layer = mhc.MHC(lin, 64, 4, precision=mhc.Precision.BF16)
    x = mhc.expand(torch.randn(2, 3, 64), 4)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    seen = []
    handle = lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    layer(x)
    handle.remove()
    assert seen == [torch.float32]
    layer_input, ctx = layer.pre(x)  # the same computation by hand: the sublayer in fp32 on the bf16 layer input
    torch.testing.assert_close(out, layer.post(ctx, lin(layer_input.float())), rtol=0, atol=0)
    out.float().sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.dtype == torch.float32


def test_autocast_still_chooses_the_sublayer_dtype():
    lin = nn.Linear(64, 64)
    layer = mhc.MHC(lin, 64, 4, precision=mhc.Precision.FP32)
    seen = []
    lin.register_forward_hook(lambda m, a, o: seen.append((a[0].dtype, o.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(mhc.expand(torch.randn(2, 64), 4))
    assert seen == [(torch.float32, torch.bfloat16)] and out.dtype == torch.float32
