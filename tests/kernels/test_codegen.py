"""Generated-code checks for every shipped kernel, on a machine without a GPU (no test here needs one).

For each :data:`tl_kernels.registry.ALL_CONFIGS` entry (test ids are the config names): it compiles for the pinned
target (``sm_90a`` on a GPU-less machine), and ``ptxas -v`` on its PTX shows zero spill bytes and a zero stack frame.
The post/res mapping kernels (fwd and bwd) move activations, so their PTX must have 128-bit global loads and
stores. A family is skipped only while its module (``tl_kernels/<family>.py``) does not exist; once it exists, any
failure to import, build or compile fails.

Each config is built once per test process: without pytest-xdist, a module-scoped fixture builds every selected
config up front with ``tl_kernels.tools.build.build`` on all usable cores; under ``pytest -n N`` each worker builds, in
process, the configs of the tests it is given (one config's two tests may land on two workers; the second finds it
in TileLang's disk cache). Measured here (2 shared cores, load average 2-6 from other jobs): this file cold, all
configs of the time (130 when measured; ``len(ALL_CONFIGS)`` is the current count), 9 min 14 s (545 s of it
building, ``process`` x 2); warm (``$TILELANG_CACHE_DIR`` kept, or ``python -m tl_kernels.build`` run first) 33 s,
or 53 s under ``-n 2``. CI should keep ``$TILELANG_CACHE_DIR`` between runs: a cold run is close to this file's
10-minute budget. The rest are unit tests of
the ptxas parser (on output captured here from ptxas 13.0), the vector-access detection, the registry and the build
report.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import itertools
import json
import os
import subprocess
import sys
import types

import pytest

from tl_kernels import _common, registry
from tl_kernels.registry import ALL_CONFIGS, KernelConfig
from tl_kernels.tools import build, codegen

POST_RES_CONFIGS = [cfg for cfg in ALL_CONFIGS if cfg.family == "post_res"]
PRE_PROJ_CONFIGS = [cfg for cfg in ALL_CONFIGS if cfg.family == "pre_proj"]
PRE_PROJ_FWD_CONFIGS = [cfg for cfg in PRE_PROJ_CONFIGS if cfg.direction == "fwd"]
PRE_FINALIZE_FWD_CONFIGS = [cfg for cfg in ALL_CONFIGS if cfg.family == "pre_finalize" and cfg.direction == "fwd"]


def _ids(cfg: KernelConfig) -> str:
    return cfg.name


# ---------------------------------------------------------------------------------------------- build once


def _selected_configs(request) -> list[KernelConfig]:
    """The configs of the parametrised tests of this module that this session will run."""
    seen: dict[str, KernelConfig] = {}
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or getattr(item, "module", None) is not request.module:
            continue
        cfg = callspec.params.get("cfg")
        if isinstance(cfg, KernelConfig) and cfg.module_exists():
            seen.setdefault(cfg.name, cfg)
    return list(seen.values())


@pytest.fixture(scope="module")
def built(request) -> dict[str, dict]:
    """``{config name: tl_kernels.build result}``, filled up front (no xdist) or on demand (under xdist)."""
    results: dict[str, dict] = {}
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        wanted = _selected_configs(request)
        if len(wanted) > 1:
            for result in build.build(wanted, jobs=build.default_jobs(), progress=False):
                results[result["name"]] = result
    return results


def _result(built: dict[str, dict], cfg: KernelConfig) -> dict:
    if not cfg.module_exists():
        pytest.skip(f"{cfg.module_name} does not exist yet")
    if cfg.name not in built:
        built[cfg.name] = build.build_one(cfg, capture_ptx=True)  # one compile at a time in this process
    result = built[cfg.name]
    if result["status"] != "ok":
        pytest.fail(f"{cfg.name}: {result['status']}\n{result['error']}", pytrace=False)
    return result


# ---------------------------------------------------------------------------------------------- per config


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=_ids)
def test_compiles_without_spills(cfg: KernelConfig, built: dict[str, dict]) -> None:
    result = _result(built, cfg)
    assert result["arch"] == _common.arch()
    assert result["kernels"], "ptxas reported no function"
    assert result["spill_bytes"] == 0, f"register spills: {result['kernels']}"
    assert result["stack_frame_bytes"] == 0, f"stack frame: {result['kernels']}"


@pytest.mark.parametrize("cfg", POST_RES_CONFIGS, ids=_ids)
def test_post_res_has_128bit_global_access(cfg: KernelConfig, built: dict[str, dict]) -> None:
    result = _result(built, cfg)
    assert result["vector_loads_128"], f"widest global load is {result['vector_load_bits']} bits"
    assert result["vector_stores_128"], f"widest global store is {result['vector_store_bits']} bits"


@pytest.mark.parametrize("cfg", PRE_PROJ_CONFIGS, ids=_ids)
def test_pre_proj_runs_on_tf32_tensor_cores(cfg: KernelConfig, built: dict[str, dict]) -> None:
    """The projection GEMMs lower to TF32 ``mma.sync`` (m16n8k8, fp32 accumulators), not to FMA loops."""
    _result(built, cfg)
    text = codegen.ptx(cfg.kernel())
    mma = [line for line in text.splitlines() if "mma.sync.aligned" in line]
    assert mma, "no mma.sync in the PTX"
    assert all(".m16n8k8." in line and ".tf32.tf32." in line and ".f32.tf32" in line for line in mma), mma[:3]


@pytest.mark.parametrize("cfg", PRE_PROJ_FWD_CONFIGS, ids=_ids)
def test_pre_proj_fwd_loads_x_128_bits_at_a_time(cfg: KernelConfig, built: dict[str, dict]) -> None:
    """Each lane reads its x rows straight into registers, 16 bytes a load (no shared-memory staging of x)."""
    result = _result(built, cfg)
    assert result["vector_loads_128"], f"widest global load is {result['vector_load_bits']} bits"


@pytest.mark.parametrize("cfg", PRE_FINALIZE_FWD_CONFIGS, ids=_ids)
def test_pre_finalize_fwd_has_128bit_global_access(cfg: KernelConfig, built: dict[str, dict]) -> None:
    result = _result(built, cfg)
    assert result["vector_loads_128"], f"widest global load is {result['vector_load_bits']} bits"
    assert result["vector_stores_128"], f"widest global store is {result['vector_store_bits']} bits"


def test_target_is_sm90a_without_gpu() -> None:
    import torch

    if os.environ.get(_common.TARGET_ENV) or torch.cuda.is_available():
        pytest.skip("target chosen by MHC_TL_TARGET or by the local GPU")
    assert _common.target() == {"kind": "cuda", "arch": "sm_90a"}


# ---------------------------------------------------------------------------------------------- ptxas parser

# `ptxas -v --gpu-name sm_90a --maxrregcount 24` (CUDA 13.0) on a file with a spilling kernel, a kernel with a
# local array and static shared memory, and a non-inlined device function.
PTXAS_13_SAMPLE = """\
ptxas info    : Overriding maximum register limit 256 for 'spill_kernel' with  24 of maxrregcount option
ptxas info    : Overriding maximum register limit 256 for 'smem_kernel' with  24 of maxrregcount option
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'spill_kernel' for 'sm_90a'
ptxas info    : Function properties for spill_kernel
    280 bytes stack frame, 708 bytes spill stores, 712 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 280 bytes cumulative stack size
ptxas info    : Compile time = 39.929 ms
ptxas info    : Compiling entry function 'smem_kernel' for 'sm_90a'
ptxas info    : Function properties for smem_kernel
    256 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 24 registers, used 1 barriers, 256 bytes cumulative stack size, 4096 bytes smem
ptxas info    : Compile time = 36.828 ms
ptxas info    : Function properties for _Z6helperPfi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""

# The older (CUDA 12.x) form of the "Used" line, which also reports constant banks.
PTXAS_12_SAMPLE = """\
ptxas info    : Compiling entry function '_Z4postPf' for 'sm_90a'
ptxas info    : Function properties for _Z4postPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 87 registers, 2048 bytes smem, 384 bytes cmem[0], 8 bytes cmem[2]
"""

# nvcc --ptx -arch=sm_90a -O3 on a float4 copy-and-double kernel (CUDA 13.0), trimmed of comments.
TINY_PTX = """\
.version 9.0
.target sm_90a
.address_size 64

.visible .entry tiny_kernel(
\t.param .u64 tiny_kernel_param_0,
\t.param .u64 tiny_kernel_param_1
)
{
\t.reg .f32 \t%f<13>;
\t.reg .b32 \t%r<5>;
\t.reg .b64 \t%rd<8>;

\tld.param.u64 \t%rd1, [tiny_kernel_param_0];
\tld.param.u64 \t%rd2, [tiny_kernel_param_1];
\tcvta.to.global.u64 \t%rd3, %rd2;
\tcvta.to.global.u64 \t%rd4, %rd1;
\tmov.u32 \t%r1, %ctaid.x;
\tmov.u32 \t%r2, %ntid.x;
\tmov.u32 \t%r3, %tid.x;
\tmad.lo.s32 \t%r4, %r1, %r2, %r3;
\tmul.wide.s32 \t%rd5, %r4, 16;
\tadd.s64 \t%rd6, %rd4, %rd5;
\tld.global.nc.v4.f32 \t{%f1, %f2, %f3, %f4}, [%rd6];
\tadd.s64 \t%rd7, %rd3, %rd5;
\tadd.f32 \t%f9, %f4, %f4;
\tadd.f32 \t%f10, %f3, %f3;
\tadd.f32 \t%f11, %f2, %f2;
\tadd.f32 \t%f12, %f1, %f1;
\tst.global.v4.f32 \t[%rd7], {%f12, %f11, %f10, %f9};
\tret;

}
"""


def test_parse_ptxas_13_output() -> None:
    stats = codegen.parse_ptxas_output(PTXAS_13_SAMPLE)
    assert set(stats) == {"spill_kernel", "smem_kernel", "_Z6helperPfi"}
    assert stats["spill_kernel"] == {
        "entry": True,
        "registers": 24,
        "barriers": 0,
        "spill_store_bytes": 708,
        "spill_load_bytes": 712,
        "stack_frame_bytes": 280,
        "cumulative_stack_bytes": 280,
        "smem_bytes": 0,
        "cmem_bytes": 0,
    }
    smem = stats["smem_kernel"]
    assert (smem["registers"], smem["barriers"], smem["smem_bytes"], smem["stack_frame_bytes"]) == (24, 1, 4096, 256)
    assert (smem["spill_store_bytes"], smem["spill_load_bytes"]) == (0, 0)
    helper = stats["_Z6helperPfi"]
    assert helper["entry"] is False and helper["registers"] is None and helper["stack_frame_bytes"] == 0


def test_parse_ptxas_12_output_with_cmem() -> None:
    stats = codegen.parse_ptxas_output(PTXAS_12_SAMPLE)["_Z4postPf"]
    assert (stats["registers"], stats["smem_bytes"], stats["cmem_bytes"]) == (87, 2048, 392)
    assert stats["entry"] is True and stats["barriers"] == 0


def test_parse_ptxas_empty_output() -> None:
    assert codegen.parse_ptxas_output("") == {}
    assert codegen.parse_ptxas_output("ptxas info    : 0 bytes gmem\n") == {}


def test_ptxas_stats_runs_ptxas(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(codegen.CACHE_ENV, str(tmp_path))
    try:
        codegen._find_tool("ptxas")
    except FileNotFoundError:
        pytest.fail("ptxas is required for the codegen checks (CUDA toolkit: nvcc + ptxas)")
    stats = codegen.ptxas_stats(TINY_PTX)  # arch from the .target directive
    assert set(stats) == {"tiny_kernel"}
    tiny = stats["tiny_kernel"]
    assert tiny["entry"] and tiny["registers"] > 0
    assert tiny["spill_store_bytes"] == tiny["spill_load_bytes"] == tiny["stack_frame_bytes"] == 0
    assert codegen.ptxas_stats(TINY_PTX, "sm_90a") == stats  # second call: from the cache
    assert any(tmp_path.rglob("*.json"))


def test_ptxas_stats_reports_ptxas_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(codegen.CACHE_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match="ptxas failed"):
        codegen.ptxas_stats(TINY_PTX.replace("ret;", "bogus.instruction;"), "sm_90a")


# ---------------------------------------------------------------------------------------------- vector access


@pytest.mark.parametrize(
    ("line", "loads", "stores"),
    [
        ("\tld.global.nc.v4.u32 \t{%r87, %r88, %r89, %r90}, [%rd9];", True, False),
        ("\tld.global.v4.f32 \t{%f1, %f2, %f3, %f4}, [%rd6];", True, False),
        ("\tld.global.nc.L1::no_allocate.v4.b32 \t{%r1, %r2, %r3, %r4}, [%rd1];", True, False),
        ("\tld.global.v2.u64 \t{%rd1, %rd2}, [%rd3];", True, False),
        ("\tld.global.nc.v2.b64 \t{%rd1, %rd2}, [%rd3];", True, False),
        ("\tst.global.v4.u32 \t[%rd10], {%r1, %r4, %r7, %r10};", False, True),
        ("\tst.global.v2.f64 \t[%rd10], {%fd1, %fd2};", False, True),
        ("\tld.global.v2.f32 \t{%f1, %f2}, [%rd6];", False, False),
        ("\tld.global.nc.v4.b16 \t{%rs1, %rs2, %rs3, %rs4}, [%rd6];", False, False),
        ("\tld.global.nc.f32 \t%f1, [%rd7];", False, False),
        ("\tld.shared.v4.u32 \t{%r1, %r2, %r3, %r4}, [%r5];", False, False),
        ("\tst.shared.v4.f32 \t[%r4], {%f1, %f2, %f3, %f4};", False, False),
        ("\tst.global.v2.b32 \t[%rd10], {%r1, %r2};", False, False),
    ],
)
def test_vector_global_access(line: str, loads: bool, stores: bool) -> None:
    assert codegen.has_vector_global_loads(line) is loads
    assert codegen.has_vector_global_stores(line) is stores


def test_vector_global_access_in_ptx() -> None:
    assert codegen.has_vector_global_loads(TINY_PTX) and codegen.has_vector_global_stores(TINY_PTX)
    assert codegen.max_vector_global_bits(TINY_PTX, "ld") == 128
    assert codegen.max_vector_global_bits("", "st") == 0


# ---------------------------------------------------------------------------------------------- registry


def test_registry_counts() -> None:
    post_res = registry.configs("post_res")
    sinkhorn = registry.configs("sinkhorn")
    assert len(post_res) == 4 * 5 * 3 * 2 + 30 == 150
    assert len(sinkhorn) == 5 * 2 == 10
    pre = registry.configs(("pre_proj", "pre_finalize"))
    shapes = {(n, c, d) for n in (1, 2, 4, 6, 8) for c in registry.HIDDEN_SIZES for d in registry.DTYPES
              if n == 4 or d == "bfloat16"}  # fmt: skip
    assert len(shapes) == 35 and len(pre) == 35 * 5 + 5 == 180
    no_grad_pre = registry.configs("pre_finalize", "bwd", grad_pre=False)
    assert {(c.kwargs["n"], c.kwargs["C"], c.kwargs["dtype"]) for c in no_grad_pre} == shapes
    boundary = registry.configs("boundary")
    plain = [c for c in boundary if len(c.kwargs) == 3]
    assert {(c.kwargs["n"], c.kwargs["C"], c.kwargs["dtype"], c.direction) for c in plain} == {
        (*shape, d) for shape in shapes for d in ("fwd", "bwd")
    }
    fused = registry.configs("boundary", "bwd", fused=True)
    unclustered = [c for c in fused if "clusters" not in c.kwargs]
    assert len(unclustered) == 35 and {(c.kwargs["n"], c.kwargs["C"], c.kwargs["dtype"]) for c in unclustered} == shapes
    # the opt-in thread block cluster variant: every shape with a cluster (none at n = 2; C / g is even elsewhere)
    clustered = registry.configs("boundary", "bwd", fused=True, clusters=True)
    assert {(c.kwargs["n"], c.kwargs["C"], c.kwargs["dtype"]) for c in clustered} == {s for s in shapes if s[0] != 2}
    assert len(clustered) == 30 and len(fused) == 65
    assert {c.kwargs["n"] for c in registry.configs("boundary", "bwd", reduce_dh=True)} == {1, 2, 4, 6, 8}
    assert len(boundary) == 70 + 35 + 30 + 5
    reduce = registry.configs("pre_reduce")
    assert {(c.direction, c.kwargs["n"], c.kwargs["reduce_phi"]) for c in reduce} == {
        ("bwd", n, r) for n in (1, 2, 4, 6, 8) for r in (True, False)
    }
    decode = registry.configs("pre_decode")
    assert {(c.kwargs["n"], c.kwargs["C"], c.kwargs["dtype"], c.direction) for c in decode} == {
        (*shape, "fwd") for shape in shapes
    }
    assert all(c.kwargs["iters"] == 20 and c.kwargs["eps"] == 0.0 for c in decode)
    pdl = registry.configs("post_res", "fwd", pdl=True)
    assert {(c.kwargs["n"], c.kwargs["C"], c.kwargs["dtype"]) for c in pdl} == {s for s in shapes if s[0] != 1}
    assert len(ALL_CONFIGS) == 525 and set(ALL_CONFIGS) == {*post_res, *sinkhorn, *pre, *reduce, *boundary, *decode}
    for family, direction in itertools.product(("pre_proj", "pre_finalize"), ("fwd", "bwd")):
        got = {(c.kwargs["n"], c.kwargs["C"], c.kwargs["dtype"]) for c in registry.configs(family, direction)}
        assert got == shapes, (family, direction)
    accumulate = registry.configs("pre_proj", "bwd", accumulate=True)
    assert {(c.kwargs["n"], c.kwargs["dtype"]) for c in accumulate} == {(4, "bfloat16")} and len(accumulate) == 5
    assert all(c.kwargs["iters"] == 20 and c.kwargs["eps"] == 0.0 for c in registry.configs("pre_finalize", "fwd"))
    assert {(c.kwargs["n"], c.kwargs["C"], c.kwargs["dtype"], c.direction) for c in post_res} == {
        (n, c, dtype, direction)
        for n in (2, 4, 6, 8)
        for c in (1280, 1920, 2560, 4096, 7168)
        for dtype in ("bfloat16", "float16", "float32")
        for direction in ("fwd", "bwd")
    }
    assert {(c.kwargs["n"], c.direction) for c in sinkhorn} == {
        (n, d) for n in (2, 4, 6, 8, 16) for d in ("fwd", "bwd")
    }
    assert all(c.kwargs == {"n": c.kwargs["n"], "iters": 20, "eps": 0.0} for c in sinkhorn)
    assert all(c % 64 == 0 for c in registry.HIDDEN_SIZES)


def test_registry_names() -> None:
    names = [cfg.name for cfg in ALL_CONFIGS]
    assert len(set(names)) == len(names)
    assert "post_res_fwd[n=4,C=7168,dtype=bfloat16]" in names
    assert "sinkhorn_bwd[n=16,iters=20,eps=0.0]" in names
    assert registry.by_name("post_res_bwd[n=2,C=1280,dtype=float32]").kwargs == {
        "n": 2,
        "C": 1280,
        "dtype": "float32",
    }
    with pytest.raises(KeyError):
        registry.by_name("post_res_fwd[n=3]")


def test_registry_selection() -> None:
    # post_res + sinkhorn, pre_proj, pre_finalize (+ its grad_pre=False variant), pre_reduce, boundary (+ its fused
    # backward's thread block cluster variant)
    assert len(registry.configs(direction="bwd")) == 65 + 40 + 35 + 35 + 10 + 35 + 40 + 30
    picked = registry.configs("post_res", "fwd", n=4, C=(4096, 7168))
    assert [c.name for c in picked] == [
        f"post_res_fwd[n=4,C={c},dtype={d}]" for c in (4096, 7168) for d in ("bfloat16", "float16", "float32")
    ] + [
        f"post_res_fwd[n=4,C={c},dtype={d},pdl=True]" for c in (4096, 7168) for d in ("bfloat16", "float16", "float32")
    ]
    assert registry.configs(family=["sinkhorn"], n=16) == [
        KernelConfig.make("sinkhorn", d, n=16, iters=20, eps=0.0) for d in ("fwd", "bwd")
    ]
    assert registry.configs("sinkhorn", dtype="bfloat16") == []  # no Sinkhorn config has a dtype
    both = registry.configs(iters=20, dtype="bfloat16")
    assert both and {c.name.split("[")[0] for c in both} == {"pre_finalize_fwd", "pre_decode_fwd"}


def test_kernel_config_is_frozen_and_validated() -> None:
    cfg = KernelConfig.make("post_res", "fwd", n=4, C=1280, dtype="bfloat16")
    assert cfg == KernelConfig("post_res", "fwd", (("n", 4), ("C", 1280), ("dtype", "bfloat16")))
    assert hash(cfg) == hash(KernelConfig("post_res", "fwd", [["n", 4], ["C", 1280], ["dtype", "bfloat16"]]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.family = "sinkhorn"  # type: ignore[misc]
    with pytest.raises(ValueError):
        KernelConfig("post_res", "forward")
    with pytest.raises(ValueError):
        KernelConfig("post-res", "fwd")


def _fake_family(monkeypatch, name: str = "fakefam") -> types.ModuleType:
    module = types.ModuleType(f"tl_kernels.{name}")
    module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    module.fakefam_fwd_program = lambda n: ("program", n)

    class FakeKernel:
        _tilelang_cache_path = "/nonexistent/tilelang/kernels/0123abcd"

    module.fakefam_fwd_kernel = lambda n: FakeKernel()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def test_kernel_config_resolves_builders_lazily(monkeypatch) -> None:
    missing = KernelConfig.make("nosuchfamily", "fwd", n=1)
    assert not missing.module_exists()
    with pytest.raises(ModuleNotFoundError):
        missing.program()
    _fake_family(monkeypatch)
    cfg = KernelConfig.make("fakefam", "fwd", n=3)
    assert cfg.module_exists()
    assert cfg.program() == ("program", 3)
    assert cfg.kernel()._tilelang_cache_path.endswith("0123abcd")
    with pytest.raises(AttributeError):
        KernelConfig.make("fakefam", "bwd", n=3).program()


def test_registry_import_is_light() -> None:
    code = (
        "import sys, tl_kernels.registry as r; assert len(r.ALL_CONFIGS) == 525; "
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('tilelang', 'torch', 'tvm') "
        "or m.startswith('tl_kernels.') and m.split('.')[1] in r.FAMILIES]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(registry.__file__)))


# ---------------------------------------------------------------------------------------------- build report


def test_build_one_reports_missing_module() -> None:
    result = build.build_one(KernelConfig.make("nosuchfamily", "bwd", n=2))
    assert result["status"] == "missing" and "tl_kernels.nosuchfamily" in result["error"]


def test_build_cli_json(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(codegen.CACHE_ENV, str(tmp_path / "codegen-cache"))
    _fake_family(monkeypatch)
    fake = (KernelConfig.make("fakefam", "fwd", n=1), KernelConfig.make("nosuchfamily", "bwd", n=2))
    monkeypatch.setattr(registry, "ALL_CONFIGS", fake)
    path = tmp_path / "report.json"
    argv = ["--jobs", "1", "--no-ptxas", "--quiet", "--json", str(path)]
    assert build.main(argv) == 1  # a missing module fails the build ...
    assert build.main([*argv, "--allow-missing"]) == 0  # ... unless allowed
    doc = json.loads(path.read_text())
    assert doc["schema"] == "mhc-tl-kernels-build/1" and doc["ok"] is True
    assert doc["target"] == _common.target() and doc["executor"] == "serial"
    assert [r["status"] for r in doc["configs"]] == ["ok", "missing"]
    assert doc["configs"][0]["cache_hit"] is False and doc["configs"][0]["config"] == "n=1"
    assert doc["summary"]["configs"] == 2 and doc["summary"]["missing"] == 1


def test_build_manifest_skips_unchanged_configs(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(codegen.CACHE_ENV, str(tmp_path / "codegen-cache"))
    module = _fake_family(monkeypatch)
    entry = tmp_path / "kernels" / "0123abcd"
    entry.mkdir(parents=True)
    module.fakefam_fwd_kernel = lambda n: types.SimpleNamespace(_tilelang_cache_path=str(entry))
    calls = []

    def fake_analyze(kernel):
        calls.append(kernel)
        return {"kernels": {"k": {}}, "registers": 10, "spill_bytes": 0, "stack_frame_bytes": 0}

    monkeypatch.setattr(codegen, "analyze", fake_analyze)
    cfgs = [KernelConfig.make("fakefam", "fwd", n=n) for n in (1, 2)]
    first = build.build(cfgs, jobs=1, manifest=True)
    assert [r["from_manifest"] for r in first] == [False, False] and len(calls) == 2
    second = build.build(cfgs, jobs=1, manifest=True)
    assert [r["from_manifest"] for r in second] == [True, True] and len(calls) == 2
    assert second[0]["registers"] == 10 and second[0]["cache_hit"] is True
    assert build.format_table(second).splitlines()[1].split()[-1] == "manifest"
    monkeypatch.setenv("MHC_SOMETHING_NEW", "1")  # any input change invalidates the manifest
    assert [r["from_manifest"] for r in build.build(cfgs, jobs=1, manifest=True)] == [False, False]
    entry.rmdir()  # a removed TileLang cache entry is built again
    assert not any(r["from_manifest"] for r in build.build(cfgs, jobs=1, manifest=True))


def test_format_table() -> None:
    base = {"op": "post_res_fwd", "config": "n=4,C=7168,dtype=bfloat16", "error": None}
    ok = {
        **base,
        "status": "ok",
        "registers": 40,
        "spill_bytes": 0,
        "stack_frame_bytes": 0,
        "smem_bytes": 4096,
        "vector_loads_128": True,
        "vector_stores_128": False,
        "compile_s": 3.456,
        "cache_hit": True,
    }
    failed = {**base, "op": "sinkhorn_bwd", "config": "n=16,iters=20,eps=0.0", "status": "compile_error"}
    lines = build.format_table([ok, failed]).splitlines()
    assert lines[0].split() == list(build._COLUMNS)
    row = ["post_res_fwd", "n=4,C=7168,dtype=bfloat16", "40", "0", "0", "4096", "yes", "no", "3.46", "hit"]
    assert lines[1].split() == row
    assert lines[2].split()[-1] == "compile_error"
    assert lines[0].index("config") == lines[1].index("n=4")  # text columns left-aligned
    assert lines[0].index("regs") + len("regs") == lines[1].index(" 40 ") + len(" 40")  # numbers right-aligned
