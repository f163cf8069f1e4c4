"""The fused residual boundary ops (mhc::boundary_fwd / boundary_bwd, mhc/boundary.py) on CPU: outputs and gradients
bit for bit those of the unfused path (mhc.post_res then mhc.pre_mapping, autograd summing the two gradients of
x_next), the reference functions against autograd through mhc.reference in float64, gradcheck, opcheck (schema,
fakes, autograd registration), unused outputs, and bad input rejected before any work."""

from __future__ import annotations

import pytest
import torch

import mhc
from mhc import boundary as B
from mhc import reference as ref

SETTINGS = (6, 2.0, 1e-6, 0.0)  # iters, post_mult, rms_eps, sinkhorn_eps


def _inputs(T, n, C, act, coef=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = n * n + 2 * n
    y = torch.randn(T, C, generator=g).to(act)
    x = torch.randn(T, n, C, generator=g).to(act)
    h_post = (torch.rand(T, n, generator=g) * 2).to(coef)
    h_res = ref.sinkhorn(torch.randn(T, n, n, generator=g), 20).to(coef)
    phi = (torch.randn(n * C, m, generator=g) / (n * C) ** 0.5).to(coef)
    alpha = torch.tensor([0.8, 0.6, 1.1]).to(coef)
    bias = (torch.randn(m, generator=g) * 0.5).to(coef)
    return y, x, h_post, h_res, phi, alpha, bias


def _unfused(y, x, h_post, h_res, phi, alpha, bias):
    x_next = mhc.post_res(y, x, h_post, h_res)
    out = torch.ops.mhc.pre_mapping_fwd(x_next, phi, alpha, bias, *SETTINGS)
    return (x_next, *out)


def _fused(y, x, h_post, h_res, phi, alpha, bias):
    return torch.ops.mhc.boundary_fwd(y, x, h_post, h_res, phi, alpha, bias, *SETTINGS)


def _loss(outs, seed=1):
    """A weighted sum of every differentiable output (x_next, layer_input, h_post', h_res', h_pre')."""
    g = torch.Generator().manual_seed(seed)
    total = 0
    for o in outs[:5]:
        w = torch.randn(o.shape, generator=g).to(o.dtype)
        total = total + (o.float() * w.float()).sum()
    return total


@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,n,C", [(5, 4, 64), (3, 1, 32), (2, 6, 16)])
def test_fused_equals_unfused_bitwise(T, n, C, act):
    fused_in = [t.requires_grad_(True) for t in _inputs(T, n, C, act)]
    plain_in = [t.detach().clone().requires_grad_(True) for t in fused_in]
    fused, plain = _fused(*fused_in), _unfused(*plain_in)
    for a, b in zip(fused, plain, strict=True):
        assert torch.equal(a, b)
    _loss(fused).backward()
    _loss(plain).backward()
    for a, b in zip(fused_in, plain_in, strict=True):
        assert torch.equal(a.grad, b.grad)


def test_reference_against_autograd_float64():
    """boundary_reference is post_res then pre_mapping; its backward matches autograd through the reference."""
    T, n, C = 4, 4, 32
    inputs = [t.double().requires_grad_(True) for t in _inputs(T, n, C, torch.float64, torch.float64)]
    outs = B.boundary_reference(*inputs, *SETTINGS)
    grads = [torch.randn_like(o) for o in outs[:5]]
    autograd = torch.autograd.grad(outs[:5], inputs, grads)
    y, x, h_post, h_res, phi, alpha, bias = (t.detach() for t in inputs)
    x_next, _li, h_post_n, _hr, h_pre_n, proj, rinv = (o.detach() for o in outs)
    mine = B.boundary_backward_reference(
        *grads, y, x, h_post, h_res, x_next, phi, alpha, bias, h_pre_n, h_post_n, proj, rinv, 6, 2.0, 0.0
    )
    for a, b in zip(mine, autograd, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    inputs = [t.double().requires_grad_(True) for t in _inputs(2, 2, 4, torch.float64, torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: B.boundary(*a, *SETTINGS), inputs)


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
def test_opcheck(act):
    T, n, C = 3, 2, 32
    y, x, h_post, h_res, phi, alpha, bias = _inputs(T, n, C, act)
    if act != torch.bfloat16:  # autograd registration checks need float inputs that can require grad
        y.requires_grad_(True)
        x.requires_grad_(True)
    phi.requires_grad_(True)
    torch.library.opcheck(B.boundary_fwd, [y, x, h_post, h_res, phi, alpha, bias, *SETTINGS])
    outs = B.boundary_reference(y.detach(), x.detach(), h_post, h_res, phi.detach(), alpha, bias, *SETTINGS)
    grads = [torch.randn_like(o) for o in outs[:5]]
    x_next, _li, h_post_n, _hr, h_pre_n, proj, rinv = outs
    bwd = [*grads, y.detach(), x.detach(), h_post, h_res, x_next, phi.detach(), alpha, bias, h_pre_n, h_post_n,
           proj, rinv, 6, 2.0, 0.0]  # fmt: skip
    torch.library.opcheck(B.boundary_bwd, bwd)


def test_unused_outputs_get_zero_gradients():
    """Only layer_input used: the gradient of x_next and of the coefficients is zero, as in the unfused path."""
    fused_in = [t.requires_grad_(True) for t in _inputs(3, 4, 32, torch.float32)]
    plain_in = [t.detach().clone().requires_grad_(True) for t in fused_in]
    _fused(*fused_in)[1].sum().backward()
    _unfused(*plain_in)[1].sum().backward()
    for a, b in zip(fused_in, plain_in, strict=True):
        assert torch.equal(a.grad, b.grad)


def test_batched_wrapper_keeps_leading_dims():
    y, x, h_post, h_res, phi, alpha, bias = _inputs(6, 4, 32, torch.float32)
    outs = B.boundary(y.view(2, 3, 32), x.view(2, 3, 4, 32), h_post.view(2, 3, 4), h_res.view(2, 3, 4, 4), phi, alpha,
                      bias, *SETTINGS)  # fmt: skip
    flat = _fused(y, x, h_post, h_res, phi, alpha, bias)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 4, 32), (2, 3, 32), (2, 3, 4), (2, 3, 4, 4), (2, 3, 4)]
    for a, b in zip(outs, flat[:5], strict=True):
        assert torch.equal(a.reshape(b.shape), b)


def test_zero_tokens():
    outs = _fused(*_inputs(0, 4, 32, torch.float32))
    assert [tuple(o.shape) for o in outs] == [(0, 4, 32), (0, 32), (0, 4), (0, 4, 4), (0, 4), (0, 24), (0,)]


@pytest.mark.parametrize(
    "index,bad,error,match",
    [
        (0, torch.randn(3, 16), ValueError, "layer_output"),  # wrong C
        (4, torch.randn(10, 24), ValueError, "phi"),  # wrong K
        (1, torch.randn(3, 4, 32).to(torch.int32), TypeError, "residual"),
        (4, torch.randn(128, 24).to(torch.float16), TypeError, "phi"),
    ],
)
def test_bad_input_is_rejected(index, bad, error, match):
    args = list(_inputs(3, 4, 32, torch.float32))
    args[index] = bad
    with pytest.raises(error, match=match):
        _fused(*args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, pytest.raises(error, match=match):
        _fused(*(mode.from_tensor(a) for a in args))


def test_bad_settings_are_rejected():
    args = _inputs(3, 4, 32, torch.float32)
    with pytest.raises(ValueError, match="iters"):
        torch.ops.mhc.boundary_fwd(*args, 0, 2.0, 1e-6, 0.0)
    with pytest.raises(ValueError, match="post_mult"):
        torch.ops.mhc.boundary_fwd(*args, 6, 0.0, 1e-6, 0.0)


def test_backward_rejects_a_mismatched_x_next():
    y, x, h_post, h_res, phi, alpha, bias = _inputs(3, 4, 32, torch.float32)
    outs = B.boundary_reference(y, x, h_post, h_res, phi, alpha, bias, *SETTINGS)
    grads = [torch.zeros_like(o) for o in outs[:5]]
    x_next, _li, h_post_n, _hr, h_pre_n, proj, rinv = outs
    with pytest.raises(ValueError, match="x_next"):
        torch.ops.mhc.boundary_bwd(*grads, y, x, h_post, h_res, x_next[:, :2].contiguous(), phi, alpha, bias,
                                   h_pre_n, h_post_n, proj, rinv, 6, 2.0, 0.0)  # fmt: skip


def test_torch_compile_fullgraph_matches_eager():
    fused_in = [t.requires_grad_(True) for t in _inputs(4, 2, 32, torch.float32)]
    eager_in = [t.detach().clone().requires_grad_(True) for t in fused_in]

    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(s, generator=g) for s in [(4, 2, 32), (4, 32), (4, 2), (4, 2, 2), (4, 2)]]

    def step(*a):
        return sum((o * w).sum() for o, w in zip(B.boundary(*a, *SETTINGS), weights, strict=True))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(*fused_in).backward()
    step(*eager_in).backward()
    for a, b in zip(fused_in, eager_in, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_opcheck_high_priority_variants():
    """mhc::boundary_hp_fwd / bwd (the fork/join of mhc.streams on CUDA): on the CPU the plain ops, same schema,
    fakes and autograd; equal outputs."""
    T, n, C = 3, 2, 32
    y, x, h_post, h_res, phi, alpha, bias = _inputs(T, n, C, torch.float32)
    y.requires_grad_(True)
    phi.requires_grad_(True)
    args = [y, x, h_post, h_res, phi, alpha, bias, *SETTINGS]
    torch.library.opcheck(B.boundary_hp_fwd, args)
    outs = B.boundary_reference(y.detach(), x, h_post, h_res, phi.detach(), alpha, bias, *SETTINGS)
    grads = [torch.randn_like(o) for o in outs[:5]]
    x_next, _li, h_post_n, _hr, h_pre_n, proj, rinv = outs
    bwd = [*grads, y.detach(), x, h_post, h_res, x_next, phi.detach(), alpha, bias, h_pre_n, h_post_n, proj, rinv,
           6, 2.0, 0.0]  # fmt: skip
    torch.library.opcheck(B.boundary_hp_bwd, bwd)
    for a, b in zip(torch.ops.mhc.boundary_hp_fwd(*args), torch.ops.mhc.boundary_fwd(*args), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(torch.ops.mhc.boundary_hp_bwd(*bwd), torch.ops.mhc.boundary_bwd(*bwd), strict=True):
        assert torch.equal(a, b)
