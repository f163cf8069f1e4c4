"""The GPU run's environment: strict mode in every stage and in stage 2's checks, the bench's third-party wheels
unpacked onto PYTHONPATH, and the baselines' adapters bound to the functions of the released peers (when
``bash profiling/gpu_prep.sh`` has fetched them into .device/peers; skipped otherwise)."""

from __future__ import annotations

import argparse
import ast
import inspect
import os
import pathlib
import subprocess
import sys
import tempfile
import types
import zipfile

import pytest
import torch

from mhc import _cuda
from mhc import reference as ref
from profiling import baselines, families, gpu_run

PEERS = gpu_run.PEERS_DIR


def _wheel(path: pathlib.Path, members: dict[str, str]) -> pathlib.Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path


def test_child_env_is_strict_and_puts_the_peers_on_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    peers = tmp_path / "peers"
    peers.mkdir()
    _wheel(peers / "fakepeer-1.0-py3-none-any.whl", {"fakepeer/__init__.py": "VALUE = 42\n",
                                                      "fakepeer-1.0.dist-info/METADATA": "Name: fakepeer\n"})  # fmt: skip
    args = argparse.Namespace(site=None, cache=None, peers=str(peers), dry_run=True)
    env, notes = gpu_run.child_env(tmp_path / "work", args)
    assert env[gpu_run.STRICT_ENV] == "1" and gpu_run.STRICT_ENV == _cuda.STRICT_ENV
    assert any("fakepeer-1.0-py3-none-any.whl" in n for n in notes), notes
    paths = env["PYTHONPATH"].split(os.pathsep)
    assert paths.index(str(gpu_run.ROOT)) < paths.index(str(tmp_path / "tmp" / "mhc-peers"))
    run = subprocess.run([sys.executable, "-c", "import fakepeer; print(fakepeer.VALUE)"], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.stdout.strip() == "42", run.stderr
    empty = tmp_path / "none"
    empty.mkdir()
    _, notes = gpu_run.child_env(tmp_path / "work", argparse.Namespace(site=None, cache=None, peers=str(empty),
                                                                       dry_run=True))  # fmt: skip
    assert any("no wheels there" in n for n in notes)


def test_a_wheel_member_outside_the_folder_is_refused(tmp_path):
    bad = _wheel(tmp_path / "bad-1.0-py3-none-any.whl", {"../escape.py": "x = 1\n"})
    with pytest.raises(ValueError, match="would land outside"):
        gpu_run.unpack_wheels([bad], tmp_path / "dest")
    assert not (tmp_path / "escape.py").exists()


def test_every_family_check_runs_strict(monkeypatch):
    monkeypatch.delenv(_cuda.STRICT_ENV, raising=False)
    seen = families.strict(lambda: os.environ.get(_cuda.STRICT_ENV))()
    assert seen == "1" and _cuda.STRICT_ENV not in os.environ
    monkeypatch.setenv(_cuda.STRICT_ENV, "0")
    families.strict(lambda: None)()
    assert os.environ[_cuda.STRICT_ENV] == "0"
    for name, check in families.CHECKS.items():
        assert check.__wrapped__.__name__.startswith("check_"), name


def test_stage_6_may_be_cut_but_not_fail():
    R = gpu_run.Result
    core = [R("1-env", "", "PASS"), R("5-acceptance", "", "PASS")]
    assert gpu_run.overall([*core, R("6-gpu-suite", "", "TIMEOUT")]) == "PASS (6-gpu-suite cut at the time limit)"
    assert gpu_run.overall([*core, R("6-bench-compile", "", "FAIL")]).startswith("FAIL (6-bench-compile")
    assert gpu_run.overall([R("2-pre-kernels", "", "TIMEOUT"), *core]).startswith("FAIL (2-pre-kernels")


def test_quick_bench_leaves_the_peers_to_stage_6(tmp_path):
    stages = {s.key: s for s in gpu_run.build_stages(tmp_path, dry_run=False, jobs=16)}
    assert "--no-baselines" in stages["3-bench-quick"].cmd
    side = stages["6-bench-compile"].cmd
    assert "--no-baselines" not in side and "--no-compile" not in side and side[side.index("--hidden") + 1] == "4096"
    keys = list(stages)
    assert keys.index("2-pre-kernels") == keys.index("2-correctness") - 1
    assert keys.index("6-bench-compile") < keys.index("6-gpu-suite")


# ---------------------------------------------------------------------------------------------------- the peers


def _peer_wheel(prefix: str) -> pathlib.Path:
    wheels = sorted(PEERS.glob(f"{prefix}-*.whl")) if PEERS.is_dir() else []
    if not wheels:
        pytest.skip(f"no {prefix} wheel in {PEERS} (bash profiling/gpu_prep.sh fetches it)")
    return wheels[-1]


def _inputs(T=3, n=4, C=128):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, n, C, generator=g).bfloat16()
    L = torch.randn(T, n, n, generator=g)
    return {"y": torch.randn(T, C, generator=g).bfloat16(), "x": x, "h_post": torch.rand(T, n, generator=g),
            "h_res": ref.sinkhorn(L), "grad": torch.randn(T, n, C, generator=g).bfloat16(), "L": L,
            "gL": torch.randn(T, n, n, generator=g), "iters": 20}  # fmt: skip


def _stub_from_source(tree: ast.Module, name: str):
    """A function with the signature ``name`` has in ``tree`` (the peer's source), for :func:`baselines.bind`."""
    fn = next((f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == name), None)
    if fn is None:
        return None
    a, P = fn.args, inspect.Parameter
    params = [P(x.arg, P.POSITIONAL_ONLY) for x in a.posonlyargs]
    params += [P(x.arg, P.POSITIONAL_OR_KEYWORD) for x in a.args]
    first_default = len(params) - len(a.defaults)
    params = [p.replace(default=None) if i >= first_default else p for i, p in enumerate(params)]
    params += [P(x.arg, P.KEYWORD_ONLY, default=None if d is not None else P.empty)
               for x, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)]  # fmt: skip

    def stub(*args, **kwargs):
        return None

    stub.__name__, stub.__signature__ = name, inspect.Signature(params)
    return stub


@pytest.mark.parametrize("key", [k for k in baselines.ADAPTERS if k[0] == "liger"], ids=lambda k: "-".join(k[1:]))
def test_liger_adapters_bind_to_the_released_signatures(key):
    """Liger's module needs Triton (not on this machine): its function signatures are read from the wheel's source
    and the adapter must bind every required parameter of the function it looks up."""
    wheel = _peer_wheel("liger_kernel")
    with zipfile.ZipFile(wheel) as zf:
        tree = ast.parse(zf.read("liger_kernel/ops/mhc.py"))
    names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    module = types.ModuleType("liger_kernel.ops.mhc")
    for name in names:
        setattr(module, name, _stub_from_source(tree, name))
    call, _check = baselines.ADAPTERS[key](module, _inputs())
    assert callable(call)
    call()  # the stub accepts exactly what bind passes


@pytest.fixture(scope="module")
def tilekernels(tmp_path_factory):
    """TileKernels imported once from its wheel (the import is slow: TileLang's JIT wrappers for every kernel)."""
    wheel = _peer_wheel("tile_kernels")
    dest = tmp_path_factory.mktemp("tile_kernels")
    gpu_run.unpack_wheels([wheel], dest)
    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m == "tile_kernels" or m.startswith("tile_kernels.")}
    sys.path.insert(0, str(dest))
    try:
        yield baselines.load_tilekernels()
    finally:
        sys.path.remove(str(dest))
        for m in [m for m in sys.modules if m == "tile_kernels" or m.startswith("tile_kernels.")]:
            del sys.modules[m]
        sys.modules.update(saved)


@pytest.mark.parametrize("key", [k for k in baselines.ADAPTERS if k[0] == "tilekernels"],
                         ids=lambda k: "-".join(k[1:]))  # fmt: skip
def test_tilekernels_adapters_bind_to_the_released_functions(key, tilekernels):
    """TileKernels imports on this machine (TileLang is installed): the adapters look up and bind its real
    functions (the kernels themselves need a GPU)."""
    assert tilekernels.available, tilekernels.note
    call, _check = baselines.ADAPTERS[key](tilekernels.module, _inputs())
    cells = [c.cell_contents for c in call.__closure__]  # bind's closure: the function found and its arguments
    assert any(getattr(c, "__module__", "").startswith("tile_kernels.") for c in cells), cells
