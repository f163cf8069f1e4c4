"""Inspect generated code without a GPU: CUDA source, PTX, ``ptxas -v`` resource usage, 128-bit global accesses.

(Named ``codegen`` rather than ``inspect``: a ``tl_kernels/inspect.py`` shadows the standard library's ``inspect``
for any script run from inside its folder, e.g. ``python tl_kernels/tools/build.py`` dies in ``import dataclasses``.)

* :func:`cuda_source` - the device CUDA C++ TileLang generated for a compiled kernel.
* :func:`ptx` - that source compiled to PTX by nvcc for the kernel's (pinned) arch, with the same include paths and
  options TileLang's own cubin build uses (``tilelang/cuda/backend.py::tilelang_callback_cuda_compile``: C++20,
  TileLang templates, CUTLASS, ``--use_fast_math`` and ``TL_DEVICE_COMPILE_FLAGS`` from the pass configs);
  ``tilelang.contrib.nvcc.compile_cuda`` runs nvcc and adds ``-O3 -lineinfo``.
* :func:`ptxas_stats` - ``ptxas -v --gpu-name <arch>`` on PTX, parsed per function by :func:`parse_ptxas_output`:
  registers, spill store/load bytes, stack frame bytes, static shared memory (ptxas ``smem``), barriers, and
  constant memory where ptxas reports it (ptxas 13.0 no longer prints ``cmem``).
* :func:`dynamic_smem_bytes` - the dynamic shared memory TileLang requests at launch (read from the host stub).
  TileLang places ``T.alloc_shared`` buffers in dynamic shared memory, which ptxas cannot see: its ``smem`` is
  only the static part.
* :func:`has_vector_global_loads` / :func:`has_vector_global_stores` - whether the PTX has global loads / stores
  of at least 128 bits per thread (``ld.global.nc.v4.u32``, ``st.global.v4.f32``, ``.v2.b64``, ``.v8.b32``, ...).
* :func:`analyze` - all of the above for one kernel, as a JSON-ready dict.

PTX and ptxas results are cached on disk, keyed by a hash of their inputs (source or PTX text, arch, options,
tool versions), under ``$MHC_CODEGEN_CACHE_DIR`` (default ``$TILELANG_CACHE_DIR/mhc-codegen``, i.e.
``~/.tilelang/cache/mhc-codegen``), so clearing TileLang's cache clears them too and CI can keep both with one
cache entry. :func:`capture_ptx` seeds that cache with the PTX of TileLang's own nvcc run during a cold compile.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from typing import Any

__all__ = [
    "analyze",
    "cache_dir",
    "capture_ptx",
    "cuda_source",
    "dynamic_smem_bytes",
    "has_vector_global_loads",
    "has_vector_global_stores",
    "max_vector_global_bits",
    "nvcc_options",
    "parse_ptxas_output",
    "ptx",
    "ptxas_stats",
    "sass_with_line_info",
]

_CACHE_FORMAT = "mhc-codegen-v1"
CACHE_ENV = "MHC_CODEGEN_CACHE_DIR"


# --------------------------------------------------------------------------------------------------- disk cache


def cache_dir() -> str:
    """Where PTX and ptxas results are cached (see the module docstring)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return explicit
    tl_cache = os.environ.get("TILELANG_CACHE_DIR") or os.path.expanduser("~/.tilelang/cache")
    return os.path.join(tl_cache, "mhc-codegen")


def _key(*parts: Any) -> str:
    blob = json.dumps([_CACHE_FORMAT, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache_read(key: str, suffix: str) -> str | None:
    path = os.path.join(cache_dir(), key[:2], key + suffix)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _cache_write(key: str, suffix: str, text: str) -> None:
    directory = os.path.join(cache_dir(), key[:2])
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(directory, key + suffix))  # atomic: concurrent writers race harmlessly
    except OSError:
        pass  # a read-only cache must not break inspection


# ------------------------------------------------------------------------------------------------------- tools


def _cuda_home() -> str | None:
    try:
        from tilelang.env import CUDA_HOME

        return CUDA_HOME or None
    except Exception:  # noqa: BLE001 - fall back to PATH when tilelang cannot tell
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")


def _wheel_bin_dirs() -> list[str]:
    """``bin`` folders of NVIDIA's pip wheels (``nvidia-cuda-cuobjdump``, ``nvidia-cuda-nvdisasm``: dev extras)."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs: list[str] = []
    for root in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(root, "cu*", "bin")))
    return dirs


def _find_tool(name: str) -> str:
    home = _cuda_home()
    candidates = [os.path.join(home, "bin", name)] if home else []
    candidates += [os.path.join(d, name) for d in _wheel_bin_dirs()]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"`{name}` not found under CUDA_HOME/bin, NVIDIA's pip wheels or on PATH")
    return found


@functools.cache
def _tool_version(name: str) -> str:
    out = subprocess.run([_find_tool(name), "--version"], capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if "release" in line or line.startswith("Build")]
    return " | ".join(lines) or out.strip()


# ---------------------------------------------------------------------------------------------- source and PTX


def cuda_source(kernel) -> str:
    """The device CUDA C++ source of a compiled TileLang kernel."""
    return kernel.get_kernel_source()


def _split_flags(flags: str | Iterable[Any] | None) -> list[str]:
    if not flags:
        return []
    if isinstance(flags, str):
        return shlex.split(flags)
    tokens: list[str] = []
    for flag in flags:
        tokens.extend(shlex.split(flag) if isinstance(flag, str) else [str(flag)])
    return tokens


def nvcc_options(pass_configs: dict[str, Any] | None = None, compile_flags: str | Iterable[str] | None = None):
    """The nvcc options TileLang's CUDA backend compiles a kernel's device code with (minus ``-arch``).

    Mirrors ``tilelang_callback_cuda_compile`` in ``tilelang/cuda/backend.py`` (0.1.15), which does not expose
    them; ``compile_flags`` (the ``tilelang.compile`` argument) are appended the way ``JITKernel.export_ptx`` does.
    """
    from tilelang.env import CUTLASS_INCLUDE_DIR, TILELANG_TEMPLATE_PATH
    from tilelang.transform import PassConfigKey

    cfg = dict(pass_configs or {})
    options = ["-std=c++20", f"-I{TILELANG_TEMPLATE_PATH}", f"-I{CUTLASS_INCLUDE_DIR}"]
    options += _split_flags(cfg.get(PassConfigKey.TL_DEVICE_COMPILE_FLAGS.value))
    if cfg.get(PassConfigKey.TL_ENABLE_FAST_MATH.value):
        options.append("--use_fast_math")
    options += _split_flags(compile_flags)
    return options


def _kernel_arch(kernel) -> str:
    return str(kernel.target.attrs["arch"])


def _ptxas_options(pass_configs: dict[str, Any] | None) -> list[str]:
    from tilelang.transform import PassConfigKey

    level = (pass_configs or {}).get(PassConfigKey.TL_PTXAS_REGISTER_USAGE_LEVEL.value)
    return [] if level is None else [f"--register-usage-level={int(level)}"]


def _ptx_inputs(kernel_or_source, arch, pass_configs, compile_flags) -> tuple[str, str, list[str]]:
    if isinstance(kernel_or_source, str):
        source = kernel_or_source
        if arch is None or pass_configs is None:
            from .. import _common

            arch = arch or _common.arch()
            pass_configs = _common.PASS_CONFIGS if pass_configs is None else pass_configs
    else:
        kernel = kernel_or_source
        source = cuda_source(kernel)
        arch = arch or _kernel_arch(kernel)
        pass_configs = kernel.pass_configs if pass_configs is None else pass_configs
        compile_flags = kernel.compile_flags if compile_flags is None else compile_flags
    return source, arch, nvcc_options(pass_configs, compile_flags)


def ptx(
    kernel_or_source,
    *,
    arch: str | None = None,
    pass_configs: dict[str, Any] | None = None,
    compile_flags: str | Iterable[str] | None = None,
    use_cache: bool = True,
) -> str:
    """PTX for a compiled TileLang kernel or for a CUDA source string.

    For a kernel, the arch, pass configs and compile flags are the kernel's own. For a source string they default
    to the pinned target (``tl_kernels._common.arch()``) and ``tl_kernels._common.PASS_CONFIGS``.
    """
    source, arch, options = _ptx_inputs(kernel_or_source, arch, pass_configs, compile_flags)
    key = _key("ptx", source, arch, options, _tool_version("nvcc"))
    if use_cache and (cached := _cache_read(key, ".ptx")) is not None:
        return cached

    from tilelang.contrib import nvcc

    text = bytes(nvcc.compile_cuda(source, "ptx", [f"-arch={arch}"], options=options)).decode("utf-8")
    if use_cache:
        _cache_write(key, ".ptx", text)
    return text


_ENTRY = re.compile(r"^\s*(?:\.(?:visible|weak)\s+)?\.entry\s+(\w+)", re.MULTILINE)


@contextlib.contextmanager
def capture_ptx():
    """Keep the PTX of the nvcc runs made inside the block, to seed the :func:`ptx` cache without running nvcc again.

    TileLang compiles a kernel's device code with ``nvcc --cubin``, which writes PTX on the way and throws it away.
    Inside this block ``NVCC_APPEND_FLAGS`` (an nvcc feature) adds ``--keep --keep-dir <tmp>``, which keeps those
    files and changes neither TileLang's cache keys nor the code (only the ``.file`` paths in the line info). Yields
    a callable ``seed(kernel) -> bool`` that files the kept PTX of ``kernel`` under its :func:`ptx` cache key. The
    environment is process-wide: use it where one kernel compiles at a time in the process (not with threads).
    A kernel TileLang found in its cache ran no nvcc and has nothing kept; :func:`ptx` then compiles as usual.
    """
    keep_dir = tempfile.mkdtemp(prefix="mhc-nvcc-keep-")
    saved = os.environ.get("NVCC_APPEND_FLAGS")
    os.environ["NVCC_APPEND_FLAGS"] = f"{saved or ''} --keep --keep-dir={keep_dir}".strip()

    def seed(kernel) -> bool:
        names = set(
            re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", cuda_source(kernel))
        )
        candidates = []
        for path in glob.glob(os.path.join(glob.escape(keep_dir), "*.ptx")):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if names and set(_ENTRY.findall(text)) == names:
                candidates.append(text)
        if len(candidates) != 1:
            return False
        source, arch, options = _ptx_inputs(kernel, None, None, None)
        _cache_write(_key("ptx", source, arch, options, _tool_version("nvcc")), ".ptx", candidates[0])
        return True

    try:
        yield seed
    finally:
        if saved is None:
            os.environ.pop("NVCC_APPEND_FLAGS", None)
        else:
            os.environ["NVCC_APPEND_FLAGS"] = saved
        shutil.rmtree(keep_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------- ptxas -v

_FUNC_PROPS = re.compile(r"Function properties for (\S+)")
_COMPILING_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")
_CMEM = re.compile(r"(\d+) bytes cmem\[(\d+)\]")
_CUMULATIVE_STACK = re.compile(r"(\d+) bytes cumulative stack size")


def _empty_stats(entry: bool) -> dict[str, Any]:
    return {
        "entry": entry,
        "registers": None,
        "barriers": 0,
        "spill_store_bytes": 0,
        "spill_load_bytes": 0,
        "stack_frame_bytes": 0,
        "cumulative_stack_bytes": 0,
        "smem_bytes": 0,
        "cmem_bytes": 0,
    }


def parse_ptxas_output(text: str) -> dict[str, dict[str, Any]]:
    """Parse ``ptxas -v`` output into ``{function: stats}``.

    Stats: ``entry`` (a ``__global__`` kernel, rather than a non-inlined device function), ``registers`` (None
    where ptxas prints no "Used" line, as for device functions), ``barriers``, ``spill_store_bytes``,
    ``spill_load_bytes``, ``stack_frame_bytes``, ``cumulative_stack_bytes``, ``smem_bytes`` (static only),
    ``cmem_bytes`` (sum over banks, 0 when not printed).
    """
    stats: dict[str, dict[str, Any]] = {}
    entries: set[str] = set()
    current: str | None = None
    for line in text.splitlines():
        if m := _COMPILING_ENTRY.search(line):
            entries.add(m.group(1))
            continue
        if m := _FUNC_PROPS.search(line):
            current = m.group(1)
            stats.setdefault(current, _empty_stats(current in entries))
            continue
        if current is None:
            continue
        record = stats[current]
        if m := _FRAME.search(line):
            record["stack_frame_bytes"], record["spill_store_bytes"], record["spill_load_bytes"] = map(int, m.groups())
        if m := _USED.search(line):
            record["registers"] = int(m.group(1))
            if b := _BARRIERS.search(line):
                record["barriers"] = int(b.group(1))
            if s := _SMEM.search(line):
                record["smem_bytes"] = int(s.group(1))
            if c := _CUMULATIVE_STACK.search(line):
                record["cumulative_stack_bytes"] = int(c.group(1))
            record["cmem_bytes"] = sum(int(size) for size, _bank in _CMEM.findall(line))
    return stats


def ptxas_stats(
    ptx_text: str, arch: str | None = None, *, extra_args: Iterable[str] = (), use_cache: bool = True
) -> dict[str, dict[str, Any]]:
    """Run ``ptxas -v --gpu-name <arch>`` on PTX text and parse it (see :func:`parse_ptxas_output`).

    ``arch`` defaults to the ``.target`` directive of the PTX. Raises ``RuntimeError`` if ptxas fails.
    """
    if arch is None:
        m = re.search(r"^\s*\.target\s+(sm_\w+)", ptx_text, re.MULTILINE)
        if m is None:
            raise ValueError("no arch given and no .target directive in the PTX")
        arch = m.group(1)
    args = [str(a) for a in extra_args]
    key = _key("ptxas", ptx_text, arch, args, _tool_version("ptxas"))
    if use_cache and (cached := _cache_read(key, ".json")) is not None:
        return json.loads(cached)
    with tempfile.TemporaryDirectory(prefix="mhc-ptxas-") as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w", encoding="utf-8") as f:
            f.write(ptx_text)
        cmd = [_find_tool("ptxas"), "-v", "--gpu-name", arch, *args, path, "-o", os.path.join(tmp, "kernel.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    stats = parse_ptxas_output(proc.stdout + proc.stderr)
    if use_cache:
        _cache_write(key, ".json", json.dumps(stats, sort_keys=True))
    return stats


# ------------------------------------------------------------------------------------------------ vector access

# ld.global[.nc][.L1::no_allocate][.L2::128B].v4.u32 {...}, [addr];   st.global.v2.b64 [addr], {...};
_GLOBAL_VEC = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*?)\.v(\d+)\.[a-z]+(\d+)\b")


def _vector_bits(ptx_text: str, op: str) -> list[int]:
    return [int(vec) * int(bits) for kind, _q, vec, bits in _GLOBAL_VEC.findall(ptx_text) if kind == op]


def max_vector_global_bits(ptx_text: str, op: str = "ld") -> int:
    """Widest vector global ``ld`` or ``st`` in the PTX, in bits per thread (0 if none is vectorised)."""
    return max(_vector_bits(ptx_text, op), default=0)


def has_vector_global_loads(ptx_text: str) -> bool:
    """Whether the PTX has a global load of at least 128 bits (``ld.global[.nc].v4.u32``, ``.v2.b64``, ...)."""
    return max_vector_global_bits(ptx_text, "ld") >= 128


def has_vector_global_stores(ptx_text: str) -> bool:
    """Whether the PTX has a global store of at least 128 bits (``st.global.v4.u32``, ``.v2.b64``, ...)."""
    return max_vector_global_bits(ptx_text, "st") >= 128


# -------------------------------------------------------------------------------------------- dynamic smem

_FFI_ARG = re.compile(r"\(\(\(TVMFFIAny\*\)stack_ffi_any\)\[(\d+)\]\.v_int64\) = \(\(int64_t\)(\d+)\);")


def dynamic_smem_bytes(kernel) -> dict[str, int]:
    """Dynamic shared memory per device kernel, as requested at launch by TileLang's host stub.

    Best effort for the ``tvm_ffi`` execution backend: the launch packs the kernel arguments, grid and block
    dimensions, then the dynamic shared memory size last. Kernels without ``extern __shared__`` report 0; a kernel
    whose launch cannot be parsed is left out.
    """
    source = cuda_source(kernel)
    names = re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", source)
    try:
        host = kernel.get_host_source()
    except Exception:  # noqa: BLE001 - other backends keep no host source
        return {}
    result: dict[str, int] = {}
    if "extern __shared__" not in source:
        return dict.fromkeys(names, 0)
    for name in dict.fromkeys(names):
        call = re.search(rf"TVMFFIFunctionCall\({re.escape(name)}_packed, \(TVMFFIAny\*\) stack_ffi_any, (\d+),", host)
        if call is None:
            continue
        nargs = int(call.group(1))
        # the launch block for this kernel is the stretch of host code right before its call
        start = host.rfind("stack_ffi_any)[0].type_index", 0, call.start())
        block = host[max(start, 0) : call.start()]
        values = {int(i): int(v) for i, v in _FFI_ARG.findall(block)}
        if nargs - 1 in values:
            result[name] = values[nargs - 1]
    return result


# ------------------------------------------------------------------------------------------------------ analyze


def analyze(kernel, *, use_cache: bool = True) -> dict[str, Any]:
    """Everything the build report and the codegen tests check, for one compiled kernel.

    Returns ``{"arch", "kernels": {name: ptxas stats + "dynamic_smem_bytes"}, "registers", "spill_bytes",
    "spill_store_bytes", "spill_load_bytes", "stack_frame_bytes", "static_smem_bytes", "dynamic_smem_bytes",
    "smem_bytes", "vector_load_bits", "vector_store_bits", "vector_loads_128", "vector_stores_128"}``, where the
    scalar figures are the maximum (registers) or the sum (bytes) over the functions in the module.
    """
    arch = _kernel_arch(kernel)
    ptx_text = ptx(kernel, use_cache=use_cache)
    per_function = ptxas_stats(ptx_text, arch, extra_args=_ptxas_options(kernel.pass_configs), use_cache=use_cache)
    dyn = dynamic_smem_bytes(kernel)
    for name, record in per_function.items():
        record["dynamic_smem_bytes"] = dyn.get(name, 0) if record["entry"] else 0
    entries = [r for r in per_function.values() if r["entry"]] or list(per_function.values())
    stores = sum(r["spill_store_bytes"] for r in per_function.values())
    loads = sum(r["spill_load_bytes"] for r in per_function.values())
    static_smem = max((r["smem_bytes"] for r in entries), default=0)
    dynamic_smem = max((r["dynamic_smem_bytes"] for r in entries), default=0)
    return {
        "arch": arch,
        "kernels": per_function,
        "registers": max((r["registers"] or 0 for r in entries), default=0),
        "spill_store_bytes": stores,
        "spill_load_bytes": loads,
        "spill_bytes": stores + loads,
        "stack_frame_bytes": sum(r["stack_frame_bytes"] for r in per_function.values()),
        "static_smem_bytes": static_smem,
        "dynamic_smem_bytes": dynamic_smem,
        "smem_bytes": static_smem + dynamic_smem,
        "vector_load_bits": max_vector_global_bits(ptx_text, "ld"),
        "vector_store_bits": max_vector_global_bits(ptx_text, "st"),
        "vector_loads_128": has_vector_global_loads(ptx_text),
        "vector_stores_128": has_vector_global_stores(ptx_text),
    }


# ------------------------------------------------------------------------------------------------------- SASS


def sass(kernel_or_ptx, *, arch: str | None = None) -> str:
    """The SASS of a kernel (or of PTX text): ``ptxas`` to a cubin, then ``cuobjdump -sass`` (which runs
    ``nvdisasm``; both ship as pip wheels, ``nvidia-cuda-cuobjdump`` and ``nvidia-cuda-nvdisasm``, in the dev extras).
    Raises ``FileNotFoundError`` when a tool is missing."""
    text = kernel_or_ptx if isinstance(kernel_or_ptx, str) else ptx(kernel_or_ptx)
    if arch is None:
        arch = _kernel_arch(kernel_or_ptx) if not isinstance(kernel_or_ptx, str) else _common.arch()
    cuobjdump = _find_tool("cuobjdump")
    nvdisasm_dir = os.path.dirname(_find_tool("nvdisasm"))
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(text)
        subprocess.run([_find_tool("ptxas"), f"--gpu-name={arch}", "-O3", src, "-o", cubin], check=True)
        env = dict(os.environ, PATH=nvdisasm_dir + os.pathsep + os.environ.get("PATH", ""))
        return subprocess.run([cuobjdump, "-sass", cubin], check=True, capture_output=True, text=True, env=env).stdout


_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_SASS_BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")
_SASS_GLOBAL = re.compile(r"\b(LDG|STG|ATOMG|RED)\b")


def sass_instructions(sass_text: str) -> list[tuple[int, str]]:
    """``(address, instruction)`` for every instruction of every function in ``cuobjdump -sass`` output."""
    out = []
    for line in sass_text.splitlines():
        m = _SASS_LINE.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def sass_loops(sass_text: str) -> list[dict[str, int]]:
    """Every loop of a single-function SASS listing, as the span from a backward branch's target to the branch:
    ``{"start", "end", "instructions", "mufu", "global"}`` in address order (outer loops include their inner ones);
    ``mufu`` counts MUFU instructions, ``global`` global-memory ones (LDG/STG/ATOMG/RED: staging loops)."""
    ins = sass_instructions(sass_text)
    index = {addr: i for i, (addr, _) in enumerate(ins)}
    loops = []
    for i, (addr, text) in enumerate(ins):
        m = _SASS_BRANCH.search(text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target < addr and target in index:
            body = ins[index[target] : i + 1]
            loops.append(
                {
                    "start": target,
                    "end": addr,
                    "instructions": len(body),
                    "mufu": sum("MUFU" in t for _, t in body),
                    "global": sum(bool(_SASS_GLOBAL.search(t)) for _, t in body),
                }
            )
    return sorted(loops, key=lambda loop: loop["start"])


def sass_with_line_info(kernel_or_ptx, *, arch: str | None = None, ptxas_args: Iterable[str] = (), use_cache=True):
    """``nvdisasm -gi -c`` of the kernel's cubin built with ``ptxas -lineinfo -O3``: the SASS of every function with
    ``//## File "...", line N [inlined at "...", line M]`` comments naming the CUDA source line of each instruction
    (the PTX carries ``.loc`` directives because TileLang's and :func:`ptx`'s nvcc runs pass ``-lineinfo``). Branch
    targets are labels (``.L_x_12``) defined in the listing. Cached like :func:`ptx`, keyed by the PTX text, the
    arch, the ptxas options and the tool versions (the performance model, ``profiling/model``, reads it)."""
    text = kernel_or_ptx if isinstance(kernel_or_ptx, str) else ptx(kernel_or_ptx)
    if arch is None:
        if isinstance(kernel_or_ptx, str):
            m = re.search(r"^\s*\.target\s+(sm_\w+)", text, re.MULTILINE)
            if m is None:
                raise ValueError("no arch given and no .target directive in the PTX")
            arch = m.group(1)
        else:
            arch = _kernel_arch(kernel_or_ptx)
    if not isinstance(kernel_or_ptx, str) and not ptxas_args:
        ptxas_args = _ptxas_options(kernel_or_ptx.pass_configs)
    args = [str(a) for a in ptxas_args]
    key = _key("sass-lineinfo", text, arch, args, _tool_version("ptxas"))
    if use_cache and (cached := _cache_read(key, ".sass")) is not None:
        return cached
    with tempfile.TemporaryDirectory(prefix="mhc-sass-") as tmp:
        src, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w", encoding="utf-8") as f:
            f.write(text)
        cmd = [_find_tool("ptxas"), f"--gpu-name={arch}", "-O3", "-lineinfo", *args, src, "-o", cubin]
        subprocess.run(cmd, check=True, capture_output=True)
        out = subprocess.run(
            [_find_tool("nvdisasm"), "-gi", "-c", cubin], check=True, capture_output=True, text=True
        ).stdout
    if use_cache:
        _cache_write(key, ".sass", out)
    return out
