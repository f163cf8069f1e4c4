"""DDP and FSDP2 of a model made of mhc.MHC sites (with and without block recompute): 2 real processes on the CPU
(gloo, 127.0.0.1, a free port), bounded in time. The work is in tests/cpu/dist_worker.py; this test checks its
numbers against a single-process run of the same model on the full batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.cpu.dist_worker", str(_free_port()), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    return ranks


# fp32 reduction-order error: the 2-rank gradient average vs the full-batch mean, after 3 SGD steps
FP32_TOL = 2e-6


@pytest.mark.parametrize("tag", ["r0", "r2"])
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_matches_single_process(results, kind, tag):
    for r in results:
        assert r[f"{kind}_{tag}_loss"] <= FP32_TOL
        assert r[f"{kind}_{tag}_params"] <= FP32_TOL
        assert r[f"{kind}_{tag}_{'reload' if kind == 'ddp' else 'dcp_reload'}"] <= FP32_TOL


def test_fsdp2_mixed_precision_units(results):
    """The documented choice: sublayers sharded as bf16 units, each MHC site as its own fp32 unit."""
    for r in results:
        assert r["mp_units_dtypes"] == {
            "phi": "torch.float32",
            "res": "torch.float32",
            "sub": "torch.bfloat16",
            "sub_in": "torch.bfloat16",
        }
        # bf16 sublayer compute: close to the fp32 run at bf16 resolution, but not equal (the policy is active)
        assert 1e-5 < r["mp_units_loss"] < 2e-2 and r["mp_units_params"] < 2e-2


def test_fsdp2_bf16_everything(results):
    """The alternative: one bf16 policy; MHC sees bf16 phi and upcasts it inside, the sharded master stays fp32."""
    for r in results:
        assert r["mp_bf16_dtypes"] == {"phi": "torch.bfloat16"} and r["mp_bf16_grad_dtype"] == "torch.float32"
        assert 1e-5 < r["mp_bf16_loss"] < 5e-2
