"""The public functional API: leading batch dimensions, layouts, dtypes, and agreement with the reference."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import mhc
from mhc import reference as ref


def _params(n, C, dtype=torch.float32):
    m = ref.num_coefficients(n)
    return torch.randn(n * C, m, dtype=dtype) * 0.1, torch.tensor([0.8, 1.1, 1.3], dtype=dtype), torch.randn(m) * 0.5


@pytest.mark.parametrize("lead", [(), (5,), (2, 3), (2, 0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_batch_dims_round_trip(lead, dtype):
    n, C = 4, 16
    x = torch.randn(*lead, n, C).to(dtype)
    phi, alpha, bias = _params(n, C)
    li, h_post, h_res = mhc.pre_mapping(x, phi, alpha, bias, iters=20, post_mult=2.0)
    assert li.shape == (*lead, C) and li.dtype == dtype
    assert h_post.shape == (*lead, n) and h_res.shape == (*lead, n, n) and h_res.dtype == torch.float32
    want = ref.pre_mapping(x.reshape(-1, n, C), phi, alpha, bias)
    torch.testing.assert_close(li.reshape(-1, C), want[0])
    torch.testing.assert_close(h_res.reshape(-1, n, n), want[2])
    y = torch.randn(*lead, C).to(dtype)
    out = mhc.post_res(y, x, h_post, h_res)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref.post_res(y, x, h_post, h_res))
    L = torch.randn(*lead, n, n)
    torch.testing.assert_close(mhc.sinkhorn(L), ref.sinkhorn(L, 20))


def test_non_contiguous_inputs_are_accepted():
    n, C = 4, 16
    x = torch.randn(3, C, n).transpose(-1, -2)  # [3, n, C], non-contiguous
    y = torch.randn(C, 3).T
    h_post = torch.rand(n, 3).T
    h_res = torch.rand(3, n, n).transpose(-1, -2)
    assert not x.is_contiguous()
    torch.testing.assert_close(mhc.post_res(y, x, h_post, h_res), ref.post_res(y, x, h_post, h_res))
    L = torch.randn(3, n, n).transpose(-1, -2)
    torch.testing.assert_close(mhc.sinkhorn(L), ref.sinkhorn(L, 20))


def test_gradients_flow_through_the_public_api():
    n, C = 4, 8
    x = torch.randn(2, 3, n, C, dtype=torch.float64, requires_grad=True)
    phi, alpha, bias = (t.double().requires_grad_(True) for t in _params(n, C))
    li, h_post, h_res = mhc.pre_mapping(x, phi, alpha, bias)
    out = mhc.post_res(torch.tanh(li), x, h_post, h_res)
    out.square().sum().backward()
    x2, phi2, alpha2, bias2 = (t.detach().clone().requires_grad_(True) for t in (x, phi, alpha, bias))
    out2 = ref.site(x2, torch.tanh, ref.SiteParams(phi2, alpha2, bias2))
    out2.square().sum().backward()
    torch.testing.assert_close(out, out2)
    for a, b in [(x, x2), (phi, phi2), (alpha, alpha2), (bias, bias2)]:
        torch.testing.assert_close(a.grad, b.grad)


def test_settings_are_forwarded():
    n, C = 2, 8
    x = torch.randn(4, n, C)
    phi, alpha, bias = _params(n, C)
    got = mhc.pre_mapping(x, phi, alpha, bias, iters=3, post_mult=1.0, rms_eps=1e-2, sinkhorn_eps=1e-3)
    want = ref.pre_mapping(x, phi, alpha, bias, 3, 1.0, 1e-2, 1e-3)
    for a, b in zip(got, want[:3], strict=True):
        torch.testing.assert_close(a, b)


def test_forgotten_expand_is_named_not_phi():
    """An embedding [B, S, C] passed as the residual used to be blamed on phi ('expected phi of shape (512, 80)')."""
    n, C = 4, 64
    phi, alpha, bias = _params(n, C)
    for x in (torch.randn(2, 8, C), torch.randn(3, C)):
        with pytest.raises(ValueError, match=r"n=4, C=64\].*did you forget mhc.expand\(x, 4\)"):
            mhc.pre_mapping(x, phi, alpha, bias)
    h_post, h_res = torch.rand(2, 8, n), torch.rand(2, 8, n, n)
    with pytest.raises(ValueError, match=r"did you forget mhc.expand\(x, 4\)"):
        mhc.post_res(torch.randn(2, 8, C), torch.randn(2, 8, C), h_post, h_res)
    with pytest.raises(ValueError, match=r"expected phi of shape \(256, 24\)"):  # a wrong phi is still phi's fault
        mhc.pre_mapping(torch.randn(2, n, C), phi[:-1], alpha, bias)


# ---------------------------------------------------------------------------------------------------- against the paper


def _paper_site(x, y_fn, phi, alpha, bias, iters=20, post_mult=2.0, rms_eps=1e-6):
    """Eq. 3 and Eq. 14-19 in float64, written from docs/spec.md without mhc.reference; Sinkhorn in the exp domain
    (Eq. 9 as the paper writes it: M = exp(logits), then iters x (columns, rows))."""
    T, n, C = x.shape
    xv = x.double().reshape(T, n * C)
    r = (xv.square().mean(-1, keepdim=True) + rms_eps).sqrt()
    proj = xv @ phi.double() / r
    a = alpha.double()
    pre = torch.sigmoid(a[0] * proj[:, :n] + bias[:n].double())
    post = post_mult * torch.sigmoid(a[1] * proj[:, n : 2 * n] + bias[n : 2 * n].double())
    M = torch.exp(a[2] * proj[:, 2 * n :] + bias[2 * n :].double()).reshape(T, n, n)
    for _ in range(iters):
        M = M / M.sum(1, keepdim=True)
        M = M / M.sum(2, keepdim=True)
    li = (pre[:, :, None] * x.double()).sum(1)
    y = y_fn(li)
    return torch.bmm(M, x.double()) + post[:, :, None] * y[:, None, :]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
def test_site_against_an_independent_float64_implementation(dtype, tol):
    """What the acceptance script checks first, without it: the public API (bf16 activations included) against
    float64 math written from the paper's equations. Relative to the output's largest entry."""
    torch.manual_seed(0)
    n, C, T = 4, 128, 64
    phi, alpha, bias = _params(n, C)
    x = torch.randn(T, n, C).to(dtype)
    w = torch.randn(C, C, dtype=torch.float64) / C**0.5
    li, h_post, h_res = mhc.pre_mapping(x, phi, alpha, bias)
    got = mhc.post_res((li.double() @ w).to(dtype), x, h_post, h_res)
    want = _paper_site(x, lambda t: t @ w, phi, alpha, bias)
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err < tol, err


ACCEPTANCE = pathlib.Path(__file__).resolve().parents[3] / "shared" / "verify" / "acceptance.py"


@pytest.mark.slow
@pytest.mark.skipif(
    not ACCEPTANCE.exists(),
    reason=f"needs the independent acceptance script at {ACCEPTANCE}, which this repository does not ship; "
    "test_site_against_an_independent_float64_implementation runs its first check everywhere",
)
def test_acceptance_harness_dry_run_on_cpu(tmp_path):
    """The independent acceptance script (written from the paper, not from this code) agrees on CPU."""
    root = pathlib.Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(ACCEPTANCE), "--device", "cpu", "--quick", "--no-compile", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "acceptance.json").read_text())
    assert result["checks"], "the acceptance run made no correctness check"
    worst = max(c["rel_err"] for c in result["checks"])
    assert worst < 1e-2, result["checks"]  # bf16 activations against float64
