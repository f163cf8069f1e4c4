"""The fused boundary backward's opt-in thread block cluster variant (``MHC_BOUNDARY_CLUSTERS``,
``mhc._cuda.boundary_clusters``) on the CPU stand-ins for the GPU (tests/cpu/gpu_stubs.py): the op launches the
variant that is on, with ``dh_part`` sized for it (one row per channel block by default, one per cluster with the
clusters; the fake checks it against the kernel's TIR signature and plan), and the GPU test's gradient comparison
passes for both. The switch and its parsing; warmup readies the variant that is on."""

from __future__ import annotations

import importlib

import pytest
import torch

from mhc import _cuda
from tests.cpu.gpu_stubs import cpu_as_cuda
from tl_kernels import boundary_bwd


@pytest.mark.parametrize("clusters", [False, True])
@pytest.mark.parametrize("n,C,dtype", [(4, 2560, "bfloat16"), (2, 1280, "float32")])
def test_boundary_backward_launches_the_variant_that_is_on(monkeypatch, n, C, dtype, clusters):
    gpu = importlib.import_module("tests.gpu.test_boundary_gpu")
    previous = _cuda.BOUNDARY_CLUSTERS
    with cpu_as_cuda(monkeypatch) as calls:
        gpu.test_boundary_gradients_match_unfused(n, C, dtype, clusters)
        fused = [(config, dyn) for name, config, dyn in calls if name == "boundary_bwd_fused"]
    assert _cuda.BOUNDARY_CLUSTERS is previous  # the context manager restored it
    assert [config for config, _ in fused] == [(n, C, dtype, clusters)]
    plan = boundary_bwd.fused_plan(n, C, dtype, clusters)
    # with clusters, n = 4: 40 channel blocks in clusters of 8; n = 2 has none (one partial a channel block)
    assert plan.groups == (C // 64 // 8 if clusters and n == 4 else C // 64)
    reduce = [dyn for name, _, dyn in calls if name == "boundary_reduce_bwd"]
    assert [dyn["num_cb"] for dyn in reduce] == [plan.groups]


def test_switch_and_parse():
    previous = _cuda.BOUNDARY_CLUSTERS
    try:
        assert _cuda.boundary_clusters(True) is previous and _cuda.BOUNDARY_CLUSTERS is True
        with _cuda.use_boundary_clusters(False):
            assert _cuda.BOUNDARY_CLUSTERS is False
        assert _cuda.BOUNDARY_CLUSTERS is True
        with pytest.raises(TypeError, match="expected a bool, got int"):
            _cuda.boundary_clusters(1)
    finally:
        _cuda.boundary_clusters(previous)
    assert [_cuda._parse_clusters(v) for v in ("1", "ON", " true ", "", "0", "off")] == [True] * 3 + [False] * 3
    with pytest.warns(UserWarning, match="MHC_BOUNDARY_CLUSTERS='2' ignored"):
        assert _cuda._parse_clusters("2") is False
    with pytest.raises(TypeError, match="clusters must be a bool"):
        boundary_bwd.fused_plan(4, 2560, "bfloat16", 1)


@pytest.mark.parametrize("clusters", [False, True])
def test_warmup_readies_the_variant_that_is_on(monkeypatch, clusters):
    """warmup without launches compiles the fused backward of the variant that is on (and not the other)."""
    built = []
    monkeypatch.setattr(
        boundary_bwd, "boundary_bwd_fused_kernel", lambda n, C, dt, cl=False: built.append((n, C, dt, cl))
    )
    from tl_kernels import boundary, post_res, pre_decode, pre_finalize, pre_proj, pre_reduce, sinkhorn

    for module in (boundary, pre_finalize, pre_reduce, pre_decode, pre_proj, post_res, sinkhorn):
        for name in dir(module):
            if name.endswith("_kernel") and callable(getattr(module, name)):
                monkeypatch.setattr(module, name, lambda *a, **k: None)
    monkeypatch.setattr(boundary_bwd, "boundary_reduce_bwd_kernel", lambda *a, **k: None)
    with _cuda.use_boundary_clusters(clusters):
        _cuda.warmup(hidden_sizes=(2560,), streams=(4,), dtypes=(torch.bfloat16,))  # no CUDA: compiles only
    assert built == [(4, 2560, "bfloat16", clusters)]


@pytest.mark.parametrize("clusters", [False, True])
def test_stage2_check_runs_the_configurations_variant(monkeypatch, clusters):
    """profiling/families.py's check of ``boundary_bwd[..., fused=True(, clusters=True)]`` launches that
    configuration's variant of the fused backward (not the runtime's default) and passes on the CPU stand-ins."""
    from profiling.check_configs import check_config
    from tl_kernels import registry

    name = "boundary_bwd[n=4,C=1280,dtype=bfloat16,fused=True" + (",clusters=True]" if clusters else "]")
    previous = _cuda.BOUNDARY_CLUSTERS
    with cpu_as_cuda(monkeypatch) as calls:
        result = check_config(registry.by_name(name), (13,), "cuda")
        assert result["ok"], result
        fused = {config for kernel, config, _ in calls if kernel == "boundary_bwd_fused"}
    assert fused == {(4, 1280, "bfloat16", clusters)} and _cuda.BOUNDARY_CLUSTERS is previous
