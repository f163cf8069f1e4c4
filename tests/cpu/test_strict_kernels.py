"""``MHC_STRICT_KERNELS=1``: every call the CUDA kernels cannot serve raises instead of running the reference.

The CUDA wrappers in mhc._cuda are plain functions: called with CPU tensors they take the same decisions as on a GPU
(the kernel launch itself is replaced by a recording stub where a test needs a served call), so strict mode is
tested here without CUDA."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from mhc import _cuda
from mhc import reference as ref

T = 5


@pytest.fixture
def strict(monkeypatch):
    monkeypatch.setattr(_cuda, "_WARNED", set())
    monkeypatch.setattr(_cuda, "DISABLED", set())
    monkeypatch.setenv(_cuda.STRICT_ENV, "1")


def _post_res_inputs(n, C, dtype=torch.bfloat16):
    return torch.randn(T, C).to(dtype), torch.randn(T, n, C).to(dtype), torch.rand(T, n), torch.rand(T, n, n)


def _pre_mapping_inputs(n, C, dtype=torch.bfloat16):
    m = n * n + 2 * n
    return torch.randn(T, n, C).to(dtype), torch.randn(n * C, m) * 0.02, torch.ones(3), torch.zeros(m)


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: _cuda.post_res_fwd(*_post_res_inputs(3, 96)), r"mhc::post_res_fwd: .*n=3 .*configuration n=3, C=96"),
        (lambda: _cuda.post_res_bwd(torch.randn(T, 4, 96).bfloat16(), *_post_res_inputs(4, 96)),
         r"mhc::post_res_bwd: .*C=96 .*configuration n=4, C=96, dtypes=\(bfloat16, float32\)"),
        (lambda: _cuda.sinkhorn_fwd(torch.randn(T, 17, 17), 20, 0.0),
         r"mhc::sinkhorn_fwd: .*n=17 .*configuration n=17, iters=20, eps=0.0, dtype=float32"),
        (lambda: _cuda.sinkhorn_bwd(torch.randn(T, 17, 17), torch.randn(T, 17, 17), 20, 0.0), r"mhc::sinkhorn_bwd"),
        (lambda: _cuda.sinkhorn_fwd(torch.randn(T, 4, 4, dtype=torch.float64), 20, 0.0),
         r"sinkhorn_fwd: .*float64 inputs.*dtype=float64"),
        (lambda: _cuda.post_res_fwd(*_post_res_inputs(4, 64, torch.float64)), r"post_res_fwd: .*float64 inputs"),
        (lambda: _cuda.pre_mapping_fwd(*_pre_mapping_inputs(3, 64), 20, 2.0, 1e-6, 0.0),
         r"mhc::pre_mapping_fwd: .*n=3 .*configuration n=3, C=64, dtypes=\(bfloat16, float32\)"),
        (lambda: _cuda.pre_mapping_fwd(*_pre_mapping_inputs(4, 64), 10000, 2.0, 1e-6, 0.0),
         r"pre_mapping_fwd: .*iters=10000 needs .* shared memory"),
    ],
    ids=["post_res_fwd-n3", "post_res_bwd-C96", "sinkhorn_fwd-n17", "sinkhorn_bwd-n17", "sinkhorn-float64",
         "post_res-float64", "pre_mapping_fwd-n3", "pre_mapping-iters"],
)  # fmt: skip
def test_strict_mode_refuses_every_fallback(strict, call, pattern):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refusal, not a warning
        with pytest.raises(RuntimeError, match=pattern) as info:
            call()
    assert "MHC_STRICT_KERNELS is set" in str(info.value)


def test_strict_mode_refuses_pre_mapping_bwd(strict, monkeypatch):
    monkeypatch.delenv(_cuda.STRICT_ENV)
    x, phi, alpha, bias = _pre_mapping_inputs(3, 64)
    with pytest.warns(UserWarning):
        li, hq, hr, hp, proj, rinv = _cuda.pre_mapping_fwd(x, phi, alpha, bias, 20, 2.0, 1e-6, 0.0)
    grads = (torch.randn_like(li), torch.randn_like(hq), torch.randn_like(hr), torch.randn_like(hp))
    args = (*grads, x, phi, alpha, bias, hp, hq, proj, rinv, 20, 2.0, 0.0)
    monkeypatch.setenv(_cuda.STRICT_ENV, "1")
    with pytest.raises(RuntimeError, match=r"mhc::pre_mapping_bwd: .*n=3 .*configuration n=3, C=64"):
        _cuda.pre_mapping_bwd(*args)


def test_strict_mode_refuses_a_disabled_family(strict):
    _cuda.disable_kernels("sinkhorn")
    L = torch.randn(T, 4, 4)
    with pytest.raises(RuntimeError, match=r"mhc::sinkhorn_fwd: .*the sinkhorn kernels are disabled .*n=4"):
        _cuda.sinkhorn_fwd(L, 20, 0.0)
    with pytest.raises(RuntimeError, match="sinkhorn_bwd: .*disabled"):
        _cuda.sinkhorn_bwd(torch.ones_like(L), L, 20, 0.0)


def test_strict_mode_is_read_at_call_time(monkeypatch):
    """The same call falls back with a warning, raises once the variable is set, and falls back again after."""
    monkeypatch.setattr(_cuda, "_WARNED", set())
    L = torch.randn(T, 17, 17)
    monkeypatch.setenv(_cuda.STRICT_ENV, "0")
    with pytest.warns(UserWarning, match="running the PyTorch reference"):
        torch.testing.assert_close(_cuda.sinkhorn_fwd(L, 20, 0.0), ref.sinkhorn(L, 20))
    monkeypatch.setenv(_cuda.STRICT_ENV, "true")
    with pytest.raises(RuntimeError, match="sinkhorn_fwd"):
        _cuda.sinkhorn_fwd(L, 20, 0.0)
    monkeypatch.delenv(_cuda.STRICT_ENV)
    torch.testing.assert_close(_cuda.sinkhorn_fwd(L, 20, 0.0), ref.sinkhorn(L, 20))  # warned once already


@pytest.mark.parametrize("value, want", [("1", True), (" ON ", True), ("Yes", True), ("", False), ("0", False),
                                         ("off", False), ("False", False)])  # fmt: skip
def test_strict_values(monkeypatch, value, want):
    monkeypatch.setenv(_cuda.STRICT_ENV, value)
    assert _cuda.strict_kernels() is want


def test_strict_typo_is_an_error_not_off(monkeypatch):
    monkeypatch.setenv(_cuda.STRICT_ENV, "strict")
    with pytest.raises(ValueError, match=r"MHC_STRICT_KERNELS: expected one of .* got 'strict'"):
        _cuda.strict_kernels()


def test_float64_stays_quiet_without_strict_mode(monkeypatch):
    monkeypatch.delenv(_cuda.STRICT_ENV, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L = torch.randn(T, 4, 4, dtype=torch.float64)
        torch.testing.assert_close(_cuda.sinkhorn_fwd(L, 20, 0.0), ref.sinkhorn(L, 20))
        y, x, h_post, h_res = _post_res_inputs(4, 64, torch.float64)
        torch.testing.assert_close(_cuda.post_res_fwd(y, x, h_post, h_res), ref.post_res(y, x, h_post, h_res))


def test_strict_mode_lets_a_served_call_launch_its_kernel(strict, monkeypatch):
    """A call a kernel serves is untouched by strict mode: the (stubbed) kernel launches and nothing is raised."""
    import tl_kernels.post_res as tl_post_res
    import tl_kernels.sinkhorn as tl_sinkhorn

    launches = []

    def sinkhorn_builder(n, iters, eps):
        def kernel(L, out):
            launches.append(("sinkhorn_fwd", n, iters, eps))
            out.copy_(ref.sinkhorn(L, iters, eps))

        return kernel

    def post_builder(n, C, dtype, pdl=False):  # pdl: the decode variant (T <= 64)
        def kernel(y, x, h_post, h_res, out):
            launches.append(("post_res_fwd", n, C, dtype))
            out.copy_(ref.post_res(y, x, h_post, h_res))

        return kernel

    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(tl_sinkhorn, "sinkhorn_fwd_kernel", sinkhorn_builder)
    monkeypatch.setattr(tl_post_res, "post_res_fwd_kernel", post_builder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L = torch.randn(T, 4, 4)
        torch.testing.assert_close(_cuda.sinkhorn_fwd(L, 20, 0.0), ref.sinkhorn(L, 20))
        y, x, h_post, h_res = _post_res_inputs(4, 128)
        torch.testing.assert_close(_cuda.post_res_fwd(y, x, h_post, h_res), ref.post_res(y, x, h_post, h_res))
    assert launches == [("sinkhorn_fwd", 4, 20, 0.0), ("post_res_fwd", 4, 128, "bfloat16")]
