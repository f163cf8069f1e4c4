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


ACCEPTANCE = pathlib.Path(__file__).resolve().parents[3] / "shared" / "verify" / "acceptance.py"


@pytest.mark.slow
@pytest.mark.skipif(not ACCEPTANCE.exists(), reason="the shared acceptance script is not beside this checkout")
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
