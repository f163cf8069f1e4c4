"""The GPU tests' bodies on the CPU (tests/cpu/gpu_stubs.py): each test below calls one test function of tests/gpu
with ``device="cuda"`` meaning the CPU, the ops going through their CUDA wrappers in mhc._cuda, and every TileLang
kernel replaced by a fake that checks its arguments against the kernel's TIR signature by position and writes the
float64 reference. A slip in a GPU test (a wrong expected value, a kernel called with the wrong arguments, a wrong
shape) fails here, in CI, instead of costing device time. Numerical error and launch faults need the GPU.

Not run here (named so that a new GPU test is a conscious choice): the torch.compile, opcheck and profiler tests,
the memory measurements, and the cases too large for a CPU (> 10**8 elements)."""

from __future__ import annotations

import importlib

import pytest
import torch

from mhc import _cuda
from tests.cpu.gpu_stubs import cpu_as_cuda


def _gpu(name):
    return importlib.import_module(f"tests.gpu.{name}")


runtime, post_res, sinkhorn = _gpu("test_runtime_gpu"), _gpu("test_post_res_gpu"), _gpu("test_sinkhorn_gpu")
pre_mapping, pre_kernels, layer = _gpu("test_pre_mapping_gpu"), _gpu("test_pre_kernels_gpu"), _gpu("test_layer_gpu")


@pytest.fixture
def calls(monkeypatch):
    with cpu_as_cuda(monkeypatch) as recorded:
        yield recorded


def _names(calls):
    return [c[0] for c in calls]


# ---------------------------------------------------------------------------------------------------- runtime


def test_runtime_misaligned_views(calls):
    runtime.test_misaligned_view_refused_by_op_and_copied_by_public_function()
    assert "post_res_fwd" in _names(calls) and "sinkhorn_fwd" in _names(calls)


def test_runtime_fallback_tests_opt_out_of_strict_mode(calls, monkeypatch):
    monkeypatch.setenv(_cuda.STRICT_ENV, "0")  # what the allow_fallback fixture does
    runtime.test_unsupported_shape_falls_back_to_the_reference_with_a_warning(monkeypatch, None)
    runtime.test_disabled_family_falls_back(monkeypatch, None)
    assert calls == []  # both ran the reference


def test_runtime_fallback_tests_fail_in_strict_mode(calls, monkeypatch):
    """Without the opt-out, strict mode turns the expected warning into an error."""
    with pytest.raises(BaseException) as info:  # pytest.warns reports "DID NOT WARN" over the RuntimeError
        runtime.test_unsupported_shape_falls_back_to_the_reference_with_a_warning(monkeypatch, None)
    chain = [info.value, info.value.__context__]
    assert any(isinstance(e, RuntimeError) and "MHC_STRICT_KERNELS is set" in str(e) for e in chain), chain


def test_runtime_current_device(calls):
    runtime.test_current_device_is_left_as_found()


def test_runtime_graph_after_warmup(calls):
    """warmup() makes 16 kernels ready for n = 4, C = 2560, bf16 (the GPU test asserted 4 until issue 21; 12 before
    the fully fused boundary backward, 13 before its pre_finalize_bwd variant without grad_h_pre', 14 before the
    decode kernel, 15 before post_res's decode variant)."""
    runtime.test_graph_captured_straight_after_warmup()
    built = {(name, cfg) for name, cfg, _ in calls}
    assert ("post_res_fwd", (4, 2560, "bfloat16", True)) in built and (
        "post_res_fwd",
        (4, 2560, "bfloat16", False),
    ) in built
    assert {name for name, _ in built} == {"sinkhorn_fwd", "sinkhorn_bwd", "post_res_fwd", "post_res_bwd",
                                           "pre_proj_fwd", "pre_proj_bwd", "pre_finalize_fwd", "pre_finalize_bwd",
                                           "pre_reduce_bwd", "boundary_fwd", "boundary_bwd_fused",
                                           "boundary_reduce_bwd", "pre_decode_fwd"}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- post_res


@pytest.mark.parametrize("n, dtype", [(4, "bfloat16"), (1, "float32"), (8, "float16")])
def test_post_res_direct_kernels(calls, n, dtype):
    post_res.test_forward_matches_reference(7, n, 1280, dtype)
    post_res.test_backward_matches_reference(7, n, 1280, dtype)
    assert _names(calls) == ["post_res_fwd", "post_res_fwd", "post_res_bwd"]


def test_post_res_ops(calls):
    post_res.test_token_edge_counts(0)
    post_res.test_autograd_through_kernels_matches_reference()
    assert calls and all(dyn["num_tokens"] == 33 for _, _, dyn in calls)


# ---------------------------------------------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize("n, eps", [(1, 0.0), (4, 0.3), (16, 0.0)])
def test_sinkhorn_direct_kernels(calls, n, eps):
    sinkhorn.test_forward_and_backward_match_reference(7, n, eps)
    assert _names(calls) == ["sinkhorn_fwd", "sinkhorn_bwd"]


def test_sinkhorn_ops(calls):
    sinkhorn.test_other_iteration_counts(1)
    sinkhorn.test_extreme_logits_stay_finite_and_row_stochastic(4, 1e2)
    sinkhorn.test_exp_domain_against_the_log_domain_kernels(4)
    sinkhorn.test_nan_propagates_to_its_token_only()
    sinkhorn.test_zero_tokens()
    sinkhorn.test_bitwise_deterministic()
    assert ("sinkhorn_fwd", (4, 20, 0.0, False)) in {(name, cfg) for name, cfg, _ in calls}


# ---------------------------------------------------------------------------------------------------- pre-mapping


@pytest.mark.parametrize("n, C, dtype, T", [(4, 1280, "bfloat16", 13), (6, 2560, "bfloat16", 1),
                                            (4, 1280, "float32", 137)])  # fmt: skip
def test_pre_mapping_ops(calls, n, C, dtype, T):
    pre_mapping.test_forward_and_backward_match_reference(n, C, dtype, T)
    # forward: 2 launches (1 for T <= 16: tl_kernels/pre_decode.py); backward: 4, with no torch op between them
    fwd = ["pre_decode_fwd"] if T <= _cuda._DECODE_ONE_LAUNCH_TOKENS else ["pre_proj_fwd", "pre_finalize_fwd"]
    assert _names(calls) == [*fwd, "pre_finalize_bwd", "sinkhorn_bwd", "pre_proj_bwd", "pre_reduce_bwd"]


def test_pre_mapping_other_cases(calls):
    pre_mapping.test_eps_and_other_iteration_counts()
    pre_mapping.test_zero_tokens()
    pre_mapping.test_nan_in_one_token_stays_in_that_token_and_does_not_hang()
    pre_mapping.test_bitwise_deterministic_and_grad_mode_independent()
    iters = {cfg[3:] for name, cfg, _ in calls if name == "pre_finalize_fwd"}
    assert iters == {(3, 0.3), (20, 0.3), (7, 0.0), (3, 0.0), (20, 0.0)}  # eps = 0.3 is compared with eps = 0


@pytest.mark.parametrize("T", [1, 137])
@pytest.mark.parametrize("shape", pre_kernels.SHAPES, ids=pre_kernels.IDS)
def test_pre_kernels_direct(calls, T, shape):
    pre_kernels.test_pre_proj_fwd(T, *shape)
    pre_kernels.test_pre_finalize_fwd(T, *shape)
    pre_kernels.test_pre_finalize_bwd(T, *shape)
    pre_kernels.test_pre_proj_bwd(T, *shape)
    splits = {dyn["num_splits"] for name, _, dyn in calls if name == "pre_proj_fwd"}
    assert 1 in splits and len(splits) == 2, "the direct tests must launch a split count other than 1"
    assert ("pre_proj_bwd" in _names(calls)) and ("pre_finalize_bwd" in _names(calls))


# ---------------------------------------------------------------------------------------------------- layer


def test_layer_against_float64(calls):
    layer.test_layer_matches_float64_on_cpu("attn")
    assert {"pre_proj_fwd", "pre_finalize_fwd", "post_res_fwd", "pre_proj_bwd", "post_res_bwd"} <= set(_names(calls))


# ---------------------------------------------------------------------------------------------------- the fakes


def test_fake_kernels_refuse_what_tilelang_would(calls):
    """The fakes' binding checks can fail: wrong count, dtype, static dim, inconsistent or empty dynamic dims, a
    scalar of the wrong kind, and a split count that leaves a split without work."""
    from tl_kernels import pre_finalize, pre_proj, sinkhorn

    L, out = torch.randn(3, 4, 4), torch.empty(3, 4, 4)
    fwd = sinkhorn.sinkhorn_fwd_kernel(4, 20, 0.0)
    fwd(L, out)
    with pytest.raises(TypeError, match="expected 2 arguments"):
        fwd(L)
    with pytest.raises(TypeError, match="argument 1 \\(out\\): expected float32, got float64"):
        fwd(L, out.double())
    with pytest.raises(ValueError, match="dim 2 must be 4"):
        fwd(torch.randn(3, 4, 5), out)
    with pytest.raises(ValueError, match="num_tokens = 2 here but 3 earlier"):
        fwd(L, out[:2])
    with pytest.raises(ValueError, match="empty grid"):
        fwd(L[:0], out[:0])
    n, C = 4, 256
    x, phi = torch.randn(5, n * C).bfloat16(), torch.randn(n * C, 24)
    with pytest.raises(ValueError, match="split 16 of 17 has no K-chunk"):  # 16 chunks: at most 16 splits
        pre_proj.pre_proj_fwd_kernel(n, C, "bfloat16")(x, phi, torch.empty(17, 5, 24), torch.empty(17, 5))
    fin = pre_finalize.pre_finalize_fwd_kernel(n, C, "bfloat16", 20, 0.0)
    args = [torch.zeros(2, 5, 24), torch.ones(2, 5), torch.ones(3), torch.zeros(24), x.view(5, n, C),
            torch.empty(5, C).bfloat16(), torch.empty(5, n), torch.empty(5, n, n), torch.empty(5, n),
            torch.empty(5, 24), torch.empty(5)]  # fmt: skip
    fin(*args, 1e-6, 2.0, 1)
    with pytest.raises(TypeError, match="num_slices.*expected a Python int32 scalar, got float"):
        fin(*args, 1e-6, 2.0, 1.0)
    with pytest.raises(ValueError, match="num_slices=0"):
        fin(*args, 1e-6, 2.0, 0)
