"""The mhc:: custom ops on CPU: opcheck (schema, fake, autograd registration, aot dispatch), gradcheck in float64,
and torch.compile(fullgraph=True) of a small block, forward and backward, against eager."""

from __future__ import annotations

import pytest
import torch

import mhc
from mhc import ops
from mhc import reference as ref

F64 = torch.float64


def _pre_inputs(T, n, C, act_dtype, coef_dtype, requires_grad=False):
    m = ref.num_coefficients(n)
    x = torch.randn(T, n, C, dtype=act_dtype)
    phi = torch.randn(n * C, m, dtype=coef_dtype) * 0.2
    alpha = torch.tensor([0.8, 1.1, 1.3], dtype=coef_dtype)
    bias = torch.randn(m, dtype=coef_dtype) * 0.5
    ts = [x, phi, alpha, bias]
    if requires_grad:
        ts = [t.requires_grad_(True) for t in ts]
    return ts


def _post_inputs(T, n, C, act_dtype, coef_dtype, requires_grad=False):
    ts = [
        torch.randn(T, C, dtype=act_dtype),
        torch.randn(T, n, C, dtype=act_dtype),
        torch.rand(T, n, dtype=coef_dtype) * 2,
        ref.sinkhorn(torch.randn(T, n, n, dtype=coef_dtype)),
    ]
    if requires_grad:
        ts = [t.requires_grad_(True) for t in ts]
    return ts


SHAPES = [(0, 4, 8), (1, 1, 8), (5, 4, 16), (3, 2, 24)]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (F64, F64)]


# ---------------------------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("act,coef", DTYPES)
@pytest.mark.parametrize("T,n,C", SHAPES)
def test_opcheck_post_res(T, n, C, act, coef):
    args = _post_inputs(T, n, C, act, coef, requires_grad=act.is_floating_point and act != torch.bfloat16)
    torch.library.opcheck(ops.post_res_fwd, args)
    g = torch.randn(T, n, C, dtype=act)
    torch.library.opcheck(ops.post_res_bwd, [g, *[a.detach() for a in args]])


@pytest.mark.parametrize("act,coef", DTYPES)
@pytest.mark.parametrize("T,n,C", SHAPES)
def test_opcheck_pre_mapping(T, n, C, act, coef):
    x, phi, alpha, bias = _pre_inputs(T, n, C, act, coef)
    settings = (20, 2.0, 1e-6, 0.0)
    if act != torch.bfloat16:  # autograd registration checks need float inputs that can require grad
        x.requires_grad_(True)
    phi.requires_grad_(True)
    torch.library.opcheck(ops.pre_mapping_fwd, [x, phi, alpha, bias, *settings])
    outs = ref.pre_mapping(x.detach(), phi.detach(), alpha, bias, *settings)
    grads = [torch.randn_like(o) for o in outs[:4]]
    _, h_post, _, h_pre, proj, rinv = outs
    bwd_args = [*grads, x.detach(), phi.detach(), alpha, bias, h_pre, h_post, proj, rinv, 20, 2.0, 0.0]
    torch.library.opcheck(ops.pre_mapping_bwd, bwd_args)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("T,n", [(0, 4), (1, 1), (7, 4), (3, 16)])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_opcheck_sinkhorn(T, n, dtype, eps):
    L = (torch.randn(T, n, n, dtype=dtype) * 2).requires_grad_(True)
    torch.library.opcheck(ops.sinkhorn_fwd, [L, 20, eps])
    torch.library.opcheck(ops.sinkhorn_bwd, [torch.randn(T, n, n, dtype=dtype), L.detach(), 20, eps])


# ---------------------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("n,iters,eps", [(1, 3, 0.0), (3, 20, 0.0), (4, 20, 1e-3), (5, 6, 0.0)])
def test_gradcheck_sinkhorn(n, iters, eps):
    L = (torch.randn(4, n, n, dtype=F64) * 1.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: ops.sinkhorn_fwd(z, iters, eps), (L,))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_gradcheck_post_res(n):
    args = _post_inputs(3, n, 6, F64, F64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.post_res_fwd, tuple(args))


@pytest.mark.parametrize("n,post_mult,sinkhorn_eps", [(1, 2.0, 0.0), (2, 1.0, 0.0), (4, 2.0, 1e-4)])
def test_gradcheck_pre_mapping(n, post_mult, sinkhorn_eps):
    args = _pre_inputs(3, n, 5, F64, F64, requires_grad=True)

    def fn(x, phi, alpha, bias):
        return ops.pre_mapping_fwd(x, phi, alpha, bias, 10, post_mult, 1e-6, sinkhorn_eps)[:4]

    assert torch.autograd.gradcheck(fn, tuple(args))


def test_pre_mapping_statistics_are_not_differentiable():
    x, phi, alpha, bias = _pre_inputs(2, 4, 8, F64, F64, requires_grad=True)
    outs = ops.pre_mapping_fwd(x, phi, alpha, bias, 20, 2.0, 1e-6, 0.0)
    assert [o.requires_grad for o in outs] == [True, True, True, True, False, False]


# ---------------------------------------------------------------------------------------------------- torch.compile


class Block(torch.nn.Module):
    """One mHC site around a small MLP, through the public functional API."""

    def __init__(self, n, C):
        super().__init__()
        m = ref.num_coefficients(n)
        self.phi = torch.nn.Parameter(torch.randn(n * C, m) * 0.1)
        self.alpha = torch.nn.Parameter(torch.tensor([0.5, 0.8, 1.2]))
        self.bias = torch.nn.Parameter(torch.randn(m) * 0.3)
        self.ffn = torch.nn.Sequential(torch.nn.Linear(C, 2 * C), torch.nn.GELU(), torch.nn.Linear(2 * C, C))

    def forward(self, x):
        li, h_post, h_res = mhc.pre_mapping(x, self.phi, self.alpha, self.bias, iters=20, post_mult=2.0)
        y = self.ffn(torch.nn.functional.rms_norm(li, li.shape[-1:]))
        out = mhc.post_res(y, x, h_post, h_res)
        return out + 0.0 * mhc.sinkhorn(h_res.log(), iters=3).sum()  # exercise the standalone Sinkhorn op too


def _run(model, x):
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    out.square().mean().backward()
    grads = [x.grad] + [p.grad for p in model.parameters()]
    return out.detach(), grads


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    n, C = 4, 32
    model = Block(n, C)
    x = torch.randn(2, 5, n, C)
    want_out, want_grads = _run(model, x)
    model.zero_grad()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=(backend == "inductor"))
    got_out, got_grads = _run(compiled, x)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if backend == "inductor":  # a second token count reuses the dynamic graph
        model.zero_grad()
        x2 = torch.randn(3, 7, n, C)
        got2, _ = _run(compiled, x2)
        model.zero_grad()
        torch.testing.assert_close(got2, _run(model, x2)[0], rtol=1e-5, atol=1e-5)
