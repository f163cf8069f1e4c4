"""Launches per residual site at decode sizes (T in {1, 8, 64}), counted from what the package really runs: the
performance model's capture (profiling/model/capture.py) records a site's ops on fake tensors and replays each
``mhc::*`` op through its CUDA wrapper with the launch recorded; every TileLang launch and every torch op between
them (glue) counts. Issue 18 item 4: at most 2 launches a site, forward (decode runs no backward).
"""

from __future__ import annotations

import pytest
import torch

import mhc
from mhc import _cuda
from profiling.model import capture

SMS = 132
C = 1280


def _kernel_name(launch) -> str:
    return launch.kernel.get_kernel_source().split("__global__ void")[1].split("(")[0].split()[-1]


def _launches(op) -> list[str]:
    """The launches of one logged op (:func:`profiling.model.capture.launches_of`: an mhc op through its CUDA
    implementation, nested mhc ops expanded, an aten op that moves bytes as one glue launch)."""
    return [_kernel_name(e) if isinstance(e, capture.Launch) else e.name for e in capture.launches_of([op], SMS)]


def _stack_forward(T: int, sites: int, dtype=torch.bfloat16) -> list:
    """The ops a no-grad :class:`mhc.MHCStack` of ``sites`` identity sites runs (decode: inference)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        stack = mhc.MHCStack([mhc.MHC(torch.nn.Identity(), C, n_streams=4, layer_index=i) for i in range(sites)])
        x = torch.empty(T, 4, C, dtype=dtype)
        log = capture._Log()
        with torch.no_grad(), log:
            stack(x)
    for op in log.ops:
        op.mode = mode
    return log.ops


def _pre_mapping(T: int) -> list[str]:
    """The lone site's pre-mapping launches: the decode kernel where the model predicts it faster (T <= 16,
    mhc._cuda._DECODE_ONE_LAUNCH_TOKENS), else pre_proj + pre_finalize."""
    if T <= _cuda._DECODE_ONE_LAUNCH_TOKENS:
        return ["pre_decode_fwd_kernel"]
    return ["pre_proj_fwd_kernel", "pre_finalize_fwd_kernel"]


def test_the_one_launch_bound_is_a_decode_size():
    assert 8 <= _cuda._DECODE_ONE_LAUNCH_TOKENS <= 64


@pytest.mark.parametrize("T", [1, 8, 16, 17, 64])
def test_a_single_site_forward_launches(T):
    """Two launches at T <= 16; above, three (the two-launch pre-mapping is predicted faster there)."""
    ops = [op for op in capture.site_ops(4, C, torch.bfloat16, T) if op.phase == "fwd"]
    launches = [name for op in ops for name in _launches(op)]
    assert launches == [*_pre_mapping(T), "post_res_fwd_kernel"], launches


@pytest.mark.parametrize("T", [1, 8, 64])
def test_a_chain_of_sites_is_two_launches_an_interior_site(T):
    """In an MHCStack chain the first site's pre-mapping is the lone site's, every later one is the fused
    boundary (boundary_fwd + pre_finalize_fwd, which replaces the previous site's post_res), the last post_res ends
    it: 2 launches a site, plus one at 16 < T where the first pre-mapping is two launches."""
    sites = 3
    launches = [name for op in _stack_forward(T, sites) for name in _launches(op)]
    boundary = ["boundary_fwd_kernel", "pre_finalize_fwd_kernel"]
    assert launches == [*_pre_mapping(T), *boundary * (sites - 1), "post_res_fwd_kernel"], launches
    assert len(launches) == 2 * sites + len(_pre_mapping(T)) - 1


def test_above_64_tokens_or_disabled_the_two_launch_forward_runs(monkeypatch):
    ops = [op for op in capture.site_ops(4, C, torch.bfloat16, 65) if op.phase == "fwd"]
    assert [name for op in ops for name in _launches(op)] == [
        "pre_proj_fwd_kernel", "pre_finalize_fwd_kernel", "post_res_fwd_kernel",
    ]  # fmt: skip
    monkeypatch.setattr(_cuda, "DISABLED", {"pre_decode"})
    ops = [op for op in capture.site_ops(4, C, torch.bfloat16, 8) if op.phase == "fwd"]
    assert [name for op in ops for name in _launches(op)][:2] == ["pre_proj_fwd_kernel", "pre_finalize_fwd_kernel"]


def test_stage2_check_runs_the_decode_kernel_and_refuses_the_two_launch_path(monkeypatch):
    """profiling/families.py's check of a pre_decode configuration, on the CPU stand-ins for the GPU
    (tests/cpu/gpu_stubs.py): it launches exactly the decode kernel at every token count, passes, and fails when
    the call would silently take the two-launch forward instead."""
    from profiling import families
    from profiling.check_configs import check_config
    from tests.cpu.gpu_stubs import cpu_as_cuda
    from tl_kernels import registry

    cfg = registry.by_name("pre_decode_fwd[n=4,C=1280,dtype=bfloat16,iters=20,eps=0.0]")
    with cpu_as_cuda(monkeypatch) as calls:
        result = check_config(cfg, families.tokens_for("pre_decode"), "cuda")
        assert result["ok"], result
        assert {name for name, _, _ in calls} == {"pre_decode_fwd"}
        assert {dyn["num_tokens"] for _, _, dyn in calls} == {1, 9, 64}
        monkeypatch.setattr(_cuda, "DISABLED", {"pre_decode"})
        result = check_config(cfg, (8,), "cuda")
        assert not result["ok"] and "did not serve" in result["error"], result


def test_ticket_rows_per_device_and_stream(monkeypatch):
    """mhc._cuda's ticket counters with torch.cuda stood in for: one zeroed buffer per device made by the first
    eager call, one row per stream (the same row again for the same stream), and under capture before the buffer
    exists no allocation but the two-launch path (None)."""
    import contextlib
    import types

    from tl_kernels import pre_decode

    state = {"capturing": False, "stream": 5}
    made = []
    real_zeros = torch.zeros

    def zeros(*shape, dtype=None, device=None):  # records the device, makes the buffer on the CPU
        made.append(device)
        return real_zeros(*shape, dtype=dtype)

    monkeypatch.setattr(_cuda, "_DECODE_TICKETS", {})
    monkeypatch.setattr(_cuda, "_DECODE_ROWS", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: types.SimpleNamespace(stream_id=state["stream"]))
    monkeypatch.setattr(torch.cuda, "device", lambda *a: contextlib.nullcontext())
    monkeypatch.setattr(torch, "zeros", zeros)
    dev0, dev1 = torch.device("cuda", 0), torch.device("cuda", 1)
    state["capturing"] = True
    assert _cuda._decode_tickets(dev0) is None and not made  # capture before the buffer exists: nothing allocated
    state["capturing"] = False
    a = _cuda._decode_tickets(dev0)
    assert made == [dev0] and a.shape == (pre_decode.MAX_GROUPS,) and a.dtype == torch.int32 and not a.any()
    state["stream"] = 9
    b = _cuda._decode_tickets(dev0)
    state["capturing"] = True  # the buffer exists now: a new stream gets a row under capture too, nothing allocated
    state["stream"] = 11
    c = _cuda._decode_tickets(dev0)
    state["stream"], state["capturing"] = 5, False
    again = _cuda._decode_tickets(dev0)
    assert len(made) == 1
    rows = {t.data_ptr() for t in (a, b, c)}
    assert len(rows) == 3 and again.data_ptr() == a.data_ptr()
    assert _cuda._decode_tickets(dev1).data_ptr() not in rows and made == [dev0, dev1]
