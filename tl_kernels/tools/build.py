"""Compile every shipped kernel configuration into TileLang's disk cache and report its resource usage.

Usage::

    python -m tl_kernels.build [--jobs N] [--family F] [--direction D] [--executor process|serial]
                               [--json PATH] [--no-ptxas] [--force] [--allow-missing] [--quiet | --verbose]

For each :data:`tl_kernels.registry.ALL_CONFIGS` entry (or the selected family / direction) it calls
``KernelConfig.kernel()``, which lowers the TileLang program and builds it with nvcc for the pinned target
(``tl_kernels._common``; ``sm_90a`` on a machine without a GPU) into ``$TILELANG_CACHE_DIR`` (default
``~/.tilelang/cache``). It then compiles the CUDA source to PTX and runs ``ptxas -v`` on it
(:mod:`tl_kernels.tools.codegen`; both cached under ``$TILELANG_CACHE_DIR/mhc-codegen``), and prints one row per
config::

    kernel        config                     regs  spill  stack   smem  ld128  st128  compile_s  cache
    post_res_bwd  n=2,C=1280,dtype=bfloat16    55      0      0    120  yes    yes         5.53  miss
    sinkhorn_bwd  n=4,iters=20,eps=0.0        101      0      0  99328  no     no          6.56  hit

``regs`` is ptxas's register count (max over the module's kernels), ``spill`` the spill store + load bytes,
``stack`` the stack frame bytes, ``smem`` static (ptxas) + dynamic (launch) shared memory bytes, ``ld128`` /
``st128`` whether the PTX has 128-bit global loads / stores, ``compile_s`` the seconds ``KernelConfig.kernel()``
took in the worker, and ``cache`` ``hit`` when the config's TileLang cache entry existed before the build began
(the kernel directory under ``$TILELANG_CACHE_DIR/<version>/<platform>/kernels/`` is compared before and after),
``miss`` when it was compiled, ``manifest`` when it was reported from the build manifest (see below).
``--json PATH`` (``-`` for stdout) writes the same data, plus per-function ptxas figures, for CI and docs.

Exit status: 0 when every config compiled with zero spill bytes; 1 when any failed, spilled, or (without
``--allow-missing``) belongs to a family whose module does not exist yet; 2 for usage errors.

Parallelism. A cold compile is TVM lowering (Python and C++) plus nvcc subprocesses. ``--executor``:

* ``process`` (default for ``--jobs`` > 1): a spawn-context process pool. Each worker compiles one config at a
  time, so it can keep the PTX of TileLang's own ``nvcc --cubin`` run (:func:`tl_kernels.tools.codegen.capture_ptx`)
  and the analysis costs only ptxas instead of a second nvcc front-end pass;
* ``serial``: in this process (also what ``--jobs 1`` means); captures the PTX.

(No thread pool, as TileLang's ``par_compile`` uses: it cannot capture the PTX, which is process-wide, so every cold
config pays a second nvcc pass, on top of the GIL.)

The build manifest (``$TILELANG_CACHE_DIR/mhc-codegen/build-manifest.json``) stores each analysed result under a
fingerprint of the package's sources, the TileLang version, the target, ``TILELANG_*``/``MHC_*`` variables and
the nvcc/ptxas versions. A config whose fingerprint matches and whose TileLang cache entry still exists is
reported from it (``cache`` column ``manifest``) without importing TileLang. ``--force`` skips it.

Calling :func:`build` with ``executor="process"`` from a script needs the usual ``if __name__ == "__main__":``
guard (spawned workers import the main module).

Progress goes to stderr whatever it is (unless ``--quiet``): a tqdm bar with done/total, elapsed time and ETA on a
terminal; on a log file or a pipe, plain lines (:class:`LineProgress`): one when the build starts, then
``Compiling kernels: 40/275 (15%), 1:02 elapsed, ETA 5:41, last: sinkhorn_bwd`` every 20 s or every 5% of the
configurations, whichever comes first, and one at the end.

TileLang's per-kernel INFO lines ("TileLang begins to compile kernel ...") are silenced during the progress bar
(``TILELANG_PRINT_ON_COMPILATION=0`` and the ``tilelang`` logger at WARNING) unless ``--verbose``. Messages go
through ``logging.getLogger("mhc")``, redirected around the tqdm bar.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import glob
import hashlib
import importlib.metadata
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

from .. import registry
from ..registry import KernelConfig

logger = logging.getLogger("mhc")

EXECUTORS = ("process", "serial")
DEFAULT_EXECUTOR = "process"
_MAX_ERROR_CHARS = 6000


# ------------------------------------------------------------------------------------------------ environment


def tilelang_cache_dir() -> str:
    return os.environ.get("TILELANG_CACHE_DIR") or os.path.expanduser("~/.tilelang/cache")


def cached_kernel_entries() -> set[str]:
    """Names (cache keys) of every complete-looking kernel entry in TileLang's disk cache, all versions."""
    pattern = os.path.join(glob.escape(tilelang_cache_dir()), "*", "*", "kernels", "*")
    return {os.path.basename(path) for path in glob.glob(pattern) if os.path.isdir(path)}


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def configure_quiet(verbose: bool) -> None:
    """Silence (or keep) TileLang's per-kernel compile messages in this process and the workers it starts."""
    os.environ["TILELANG_PRINT_ON_COMPILATION"] = "1" if verbose else "0"
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("tilelang").setLevel(level)
    if "tilelang" in sys.modules:  # tilelang sets its level at import; set it again once it is in
        sys.modules["tilelang"].set_log_level(level)


@contextlib.contextmanager
def _quiet(verbose: bool):
    saved_env = os.environ.get("TILELANG_PRINT_ON_COMPILATION")
    saved_level = logging.getLogger("tilelang").level
    configure_quiet(verbose)
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("TILELANG_PRINT_ON_COMPILATION", None)
        else:
            os.environ["TILELANG_PRINT_ON_COMPILATION"] = saved_env
        logging.getLogger("tilelang").setLevel(saved_level)


def _worker_init(verbose: bool) -> None:
    configure_quiet(verbose)
    import tilelang

    tilelang.set_log_level(logging.INFO if verbose else logging.WARNING)


# ------------------------------------------------------------------------------------------------ one config


def _format_error(exc: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    if len(text) > _MAX_ERROR_CHARS:  # TileLang/nvcc errors embed the whole generated source
        half = _MAX_ERROR_CHARS // 2
        text = f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"
    return text


def _base_result(cfg: KernelConfig) -> dict[str, Any]:
    return {
        "name": cfg.name,
        "op": cfg.op,
        "family": cfg.family,
        "direction": cfg.direction,
        "config": cfg.config_str,
        "params": cfg.kwargs,
        "status": "ok",
        "error": None,
        "compile_s": None,
        "analyze_s": None,
        "cache_path": None,
        "pid": os.getpid(),
    }


def _seed(seed, kernel) -> bool:
    """File the captured PTX; a failure here only means the analysis compiles the PTX itself."""
    if seed is None:
        return False
    try:
        return seed(kernel)
    except Exception:  # noqa: BLE001
        logger.debug("could not file the captured PTX", exc_info=True)
        return False


def build_one(cfg: KernelConfig, analyze: bool = True, capture_ptx: bool = False) -> dict[str, Any]:
    """Compile one config (through TileLang's disk cache) and, with ``analyze``, inspect its PTX.

    ``capture_ptx`` keeps the PTX of TileLang's own nvcc run (:func:`tl_kernels.tools.codegen.capture_ptx`), which
    saves the analysis a second nvcc front-end pass on a cold compile; only where one compile runs at a time in
    the process (serial and process executors). Never raises: failures are reported in ``status`` (``ok``,
    ``missing``, ``compile_error``, ``analysis_error``) and ``error``. The result is plain JSON-ready data.
    """
    from . import codegen

    result = _base_result(cfg)
    if not cfg.module_exists():
        result.update(status="missing", error=f"module {cfg.module_name} does not exist")
        return result
    capture = codegen.capture_ptx() if capture_ptx and analyze else contextlib.nullcontext()
    start = time.perf_counter()
    try:
        with capture as seed:
            kernel = cfg.kernel()
            result["compile_s"] = time.perf_counter() - start
            result["ptx_captured"] = _seed(seed, kernel)
    except Exception as exc:  # noqa: BLE001 - reported per config
        result.update(status="compile_error", error=_format_error(exc), compile_s=time.perf_counter() - start)
        return result
    result["cache_path"] = getattr(kernel, "_tilelang_cache_path", None)
    if analyze:
        start = time.perf_counter()
        try:
            result.update(codegen.analyze(kernel))
        except Exception as exc:  # noqa: BLE001 - reported per config
            result.update(status="analysis_error", error=_format_error(exc))
        result["analyze_s"] = time.perf_counter() - start
    return result


# ------------------------------------------------------------------------------------------------ many configs


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


class LineProgress:
    """Progress as plain lines, for a log file or a pipe (where a tqdm bar would leave nothing readable): one line at
    the start, then ``done/total (percent), elapsed, ETA, last config`` at most every ``interval_s`` seconds and at
    least every ``step`` configs (5% of the total), and one at the end. Same ``update``/``set_postfix_str``
    interface as the tqdm bar it stands in for."""

    def __init__(self, total: int, desc: str, stream=None, *, interval_s: float = 20.0, clock=time.monotonic):
        self.total, self.desc, self.stream, self.clock = total, desc, stream, clock
        self.interval_s = interval_s
        self.step = max(1, total // 20)
        self.done = 0
        self.last = ""
        self.start = self.clock()
        self._printed_at, self._printed_done = self.start, 0

    def _write(self, text: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(text, file=stream, flush=True)

    def line(self) -> str:
        elapsed = self.clock() - self.start
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.desc}: {self.done}/{self.total} ({pct:.0f}%), {_clock(elapsed)} elapsed"
        if 0 < self.done < self.total:
            text += f", ETA {_clock(elapsed / self.done * (self.total - self.done))}"
        return text + (f", last: {self.last}" if self.last else "")

    def __enter__(self) -> LineProgress:
        self._write(f"{self.desc}: {self.total} configurations to build")
        return self

    def __exit__(self, *exc) -> None:
        if self._printed_done != self.done or self.done == 0:
            self._write(self.line())

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.last = text

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if (
            self.done >= self.total
            or now - self._printed_at >= self.interval_s
            or self.done - self._printed_done >= self.step
        ):
            self._write(self.line())
            self._printed_at, self._printed_done = now, self.done


def _progress(total: int, enabled: bool, tty: bool):
    """A tqdm bar (done/total, elapsed, ETA) on a terminal; plain :class:`LineProgress` lines otherwise."""
    if enabled and not tty:
        return LineProgress(total, "Compiling kernels")
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Compiling kernels", unit="cfg", disable=not enabled, dynamic_ncols=True)


# Build manifest: `build(..., manifest=True)` (the CLI's default) records each analysed result under a fingerprint
# of everything that decides TileLang's cache key and our analysis: the sources of every module of this package,
# the TileLang version, the target, TILELANG_*/MHC_* environment variables, and the nvcc and ptxas versions. A
# config whose fingerprint matches and whose TileLang cache entry still exists is reported from the manifest
# without importing TileLang, which is what makes a warm rebuild of every config take about a second.
_MANIFEST_NAME = "build-manifest.json"
_ENV_NOT_FINGERPRINTED = {
    "TILELANG_PRINT_ON_COMPILATION",
    "TILELANG_VERBOSE",
    "TILELANG_CACHE_DIR",
    "TILELANG_TMP_DIR",
    "TILELANG_CLEANUP_TEMP_FILES",
    "MHC_QUIET",
    "MHC_CODEGEN_CACHE_DIR",
}


def _manifest_path() -> str:
    from . import codegen

    return os.path.join(codegen.cache_dir(), _MANIFEST_NAME)


def manifest_fingerprint() -> str:
    """Hash of every input of a build other than the config itself (see the comment above)."""
    from .. import _common
    from . import codegen

    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tl_kernels/, tools/ included
    sources = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(package_dir), "**", "*.py"), recursive=True)):
        with open(path, "rb") as f:
            sources[os.path.relpath(path, package_dir)] = hashlib.sha256(f.read()).hexdigest()
    try:
        tilelang_version = importlib.metadata.version("tilelang")
    except importlib.metadata.PackageNotFoundError:
        tilelang_version = None
    try:
        tools = [codegen._tool_version("nvcc"), codegen._tool_version("ptxas")]
    except (OSError, subprocess.CalledProcessError):
        tools = None
    env = {
        key: value
        for key, value in os.environ.items()
        if key.startswith(("TILELANG_", "MHC_")) and key not in _ENV_NOT_FINGERPRINTED
    }
    blob = json.dumps([sources, tilelang_version, _common.target(), env, tools], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _load_manifest(fingerprint: str) -> dict[str, dict[str, Any]]:
    try:
        with open(_manifest_path(), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("fingerprint") != fingerprint:
        return {}
    entries = doc.get("configs")
    return entries if isinstance(entries, dict) else {}


def shipped_cache_entries() -> list[str]:
    """The TileLang cache entries of every shipped configuration, relative to :func:`tilelang_cache_dir`, from the
    manifest of the last build of this tree (``profiling/gpu_prep.sh`` packs only these, not the experiments a shared
    cache also holds). Raises ``RuntimeError`` naming the first configuration without a current entry: run ``make``
    (``python -m tl_kernels.build``) first."""
    entries = _load_manifest(manifest_fingerprint())
    root = os.path.realpath(tilelang_cache_dir())
    out = []
    for cfg in registry.ALL_CONFIGS:
        path = (entries.get(cfg.name) or {}).get("cache_path")
        if not path or not os.path.isdir(path):
            raise RuntimeError(
                f"{cfg.name}: no TileLang cache entry recorded by the last build of this tree (run make)"
            )
        rel = os.path.relpath(os.path.realpath(path), root)
        if rel.startswith(".."):
            raise RuntimeError(f"{cfg.name}: cache entry {path} lies outside the TileLang cache {root}")
        out.append(rel)
    return out


def _save_manifest(fingerprint: str, entries: dict[str, dict[str, Any]]) -> None:
    path = _manifest_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"fingerprint": fingerprint, "configs": entries}, f, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("could not write the build manifest %s: %s", path, exc)


def _from_manifest(entries: dict[str, dict[str, Any]], cfg: KernelConfig) -> dict[str, Any] | None:
    entry = entries.get(cfg.name)
    if not entry or entry.get("status") != "ok" or "kernels" not in entry:
        return None
    path = entry.get("cache_path")
    if not path or not os.path.isdir(path):  # the TileLang cache entry was removed: build it again
        return None
    return {**entry, "compile_s": 0.0, "analyze_s": 0.0, "pid": os.getpid(), "cache_hit": True, "from_manifest": True}


def _run(
    configs: list[KernelConfig], jobs: int, executor: str, analyze: bool, verbose: bool, bar
) -> list[dict[str, Any]]:
    results: list[dict[str, Any] | None] = [None] * len(configs)

    def record(index: int, result: dict[str, Any]) -> None:
        results[index] = result
        if result["status"] in ("compile_error", "analysis_error"):
            logger.error("%s: %s", result["name"], result["error"].splitlines()[0])
        elif result.get("spill_bytes"):
            logger.error("%s: %d bytes of register spills", result["name"], result["spill_bytes"])
        bar.set_postfix_str(result["op"], refresh=False)
        bar.update()

    if executor == "serial":
        _worker_init(verbose)
        for index, cfg in enumerate(configs):
            record(index, build_one(cfg, analyze, capture_ptx=True))
        return results  # type: ignore[return-value]
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(jobs, context, initializer=_worker_init, initargs=(verbose,)) as pool:
        futures = {pool.submit(build_one, cfg, analyze, True): i for i, cfg in enumerate(configs)}
        for future in cf.as_completed(futures):
            index = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - a dead worker fails its config, not the build
                result = {**_base_result(configs[index]), "status": "compile_error", "error": _format_error(exc)}
            record(index, result)
    return results  # type: ignore[return-value]


def build(
    configs: Iterable[KernelConfig],
    *,
    jobs: int | None = None,
    executor: str = DEFAULT_EXECUTOR,
    analyze: bool = True,
    progress: bool = False,
    verbose: bool = False,
    manifest: bool = False,
    tty: bool | None = None,
) -> list[dict[str, Any]]:
    """Build ``configs``; return :func:`build_one` results in input order, with ``cache_hit`` and ``from_manifest``.

    ``executor``: ``process`` (a spawn-context process pool) or ``serial`` (in this process; also used when ``jobs``
    is 1); both capture the PTX. ``manifest``: report configs
    whose inputs have not changed since they were last built from the build manifest (see above) instead of
    building them again. ``progress``: show progress on stderr, as a tqdm bar when ``tty`` (default: whether stderr
    is a terminal), else as plain :class:`LineProgress` lines.
    """
    configs = list(configs)
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    fingerprint = manifest_fingerprint() if manifest else ""
    entries = _load_manifest(fingerprint) if manifest else {}
    reused = {i: r for i, cfg in enumerate(configs) if (r := _from_manifest(entries, cfg)) is not None}
    todo = [cfg for i, cfg in enumerate(configs) if i not in reused]
    jobs = min(jobs or default_jobs(), max(1, len(todo)))
    if jobs == 1:
        executor = "serial"

    if tty is None:
        tty = sys.stderr.isatty()
    if progress and reused:
        logger.info(
            "%d of %d configurations unchanged since the last build (build manifest); %d to build",
            len(reused), len(configs), len(todo),
        )  # fmt: skip
    built: list[dict[str, Any]] = []
    if todo:
        before = cached_kernel_entries()
        redirect = contextlib.nullcontext()
        if progress and tty:
            from tqdm.contrib.logging import logging_redirect_tqdm

            redirect = logging_redirect_tqdm(loggers=[logger])
        with _quiet(verbose), _progress(len(todo), progress, tty) as bar, redirect:
            built = _run(todo, jobs, executor, analyze, verbose, bar)
        for result in built:
            path = result.get("cache_path")
            result["cache_hit"] = None if path is None else os.path.basename(path) in before
            result["from_manifest"] = False

    pending = iter(built)
    results = [reused[i] if i in reused else next(pending) for i in range(len(configs))]
    if manifest and built:
        for result in built:
            if result["status"] == "ok" and "kernels" in result:
                entries[result["name"]] = {k: v for k, v in result.items() if k not in ("pid", "from_manifest")}
        _save_manifest(fingerprint, entries)
    return results


# ------------------------------------------------------------------------------------------------ report

_COLUMNS = ("kernel", "config", "regs", "spill", "stack", "smem", "ld128", "st128", "compile_s", "cache")
_NUMERIC = {"regs", "spill", "stack", "smem", "compile_s"}


def _row(result: dict[str, Any]) -> list[str]:
    def num(key: str) -> str:
        value = result.get(key)
        return "-" if value is None else str(value)

    def flag(key: str) -> str:
        value = result.get(key)
        return "-" if value is None else ("yes" if value else "no")

    if result["status"] in ("missing", "compile_error"):
        tail = ["-"] * 7 + [result["status"]]
    else:
        hit = result.get("cache_hit")
        tail = [
            num("registers"),
            num("spill_bytes"),
            num("stack_frame_bytes"),
            num("smem_bytes"),
            flag("vector_loads_128"),
            flag("vector_stores_128"),
            "-" if result.get("compile_s") is None else f"{result['compile_s']:.2f}",
            "-" if hit is None else "manifest" if result.get("from_manifest") else "hit" if hit else "miss",
        ]
        if result["status"] != "ok":
            tail[-1] = result["status"]
    return [result["op"], result["config"], *tail]


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """The report table (see the module docstring)."""
    rows = [list(_COLUMNS), *(_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]

    def fmt(row: list[str]) -> str:
        cells = [
            cell.rjust(width) if column in _NUMERIC else cell.ljust(width)
            for cell, width, column in zip(row, widths, _COLUMNS, strict=True)
        ]
        return "  ".join(cells).rstrip()

    return "\n".join(fmt(row) for row in rows)


def summarize(results: Sequence[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    statuses = [r["status"] for r in results]
    return {
        "configs": len(results),
        "ok": statuses.count("ok"),
        "missing": statuses.count("missing"),
        "compile_errors": statuses.count("compile_error"),
        "analysis_errors": statuses.count("analysis_error"),
        "with_spills": sum(1 for r in results if r.get("spill_bytes")),
        "with_stack": sum(1 for r in results if r.get("stack_frame_bytes")),
        "cache_hits": sum(1 for r in results if r.get("cache_hit")),
        "from_manifest": sum(1 for r in results if r.get("from_manifest")),
        "cache_misses": sum(1 for r in results if r.get("cache_hit") is False),
        "compile_s_total": round(sum(r.get("compile_s") or 0.0 for r in results), 3),
        "wall_s": round(wall_s, 3),
    }


def summary_line(summary: dict[str, Any]) -> str:
    return (
        f"{summary['configs']} configs: {summary['ok']} ok, {summary['compile_errors']} failed to compile, "
        f"{summary['analysis_errors']} failed analysis, {summary['missing']} missing modules, "
        f"{summary['with_spills']} with spills; {summary['cache_misses']} compiled, {summary['cache_hits']} from "
        f"cache ({summary['from_manifest']} unchanged since the last build); {summary['compile_s_total']:.1f} s "
        f"compile, {summary['wall_s']:.1f} s wall"
    )


def report(results: Sequence[dict[str, Any]], *, wall_s: float, jobs: int, executor: str) -> dict[str, Any]:
    """The ``--json`` document."""
    from .. import _common

    try:
        tilelang_version = importlib.metadata.version("tilelang")
    except importlib.metadata.PackageNotFoundError:
        tilelang_version = None
    summary = summarize(results, wall_s)
    failed = summary["configs"] - summary["ok"] + summary["with_spills"]
    return {
        "schema": "mhc-tl-kernels-build/1",
        "tilelang_version": tilelang_version,
        "target": _common.target(),
        "tilelang_cache_dir": tilelang_cache_dir(),
        "jobs": jobs,
        "executor": executor,
        "ok": failed == 0,
        "summary": summary,
        "configs": list(results),
    }


# ------------------------------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tl_kernels.build",
        description="Compile every registered TileLang kernel into TileLang's disk cache and report ptxas usage.",
    )
    parser.add_argument("--jobs", "-j", type=int, default=None, help="parallel workers (default: usable CPUs)")
    parser.add_argument("--family", action="append", choices=registry.FAMILIES, help="only this family (repeatable)")
    parser.add_argument("--direction", choices=registry.DIRECTIONS, help="only fwd or bwd kernels")
    parser.add_argument("--executor", choices=EXECUTORS, default=DEFAULT_EXECUTOR, help="how to parallelise")
    parser.add_argument("--json", metavar="PATH", help="write the JSON report to PATH ('-' for stdout)")
    parser.add_argument("--no-ptxas", action="store_true", help="skip the PTX/ptxas analysis (spills unchecked)")
    parser.add_argument(
        "--force", action="store_true", help="ask TileLang for every config, even those unchanged since the last build"
    )
    parser.add_argument(
        "--allow-missing", action="store_true", help="do not fail for families whose module does not exist yet"
    )
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("--quiet", "-q", action="store_true", help="no progress bar or table; summary and errors")
    noise.add_argument("--verbose", "-v", action="store_true", help="keep TileLang's per-kernel compile messages")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        _parser().error("--jobs must be at least 1")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)

    selected = registry.configs(family=args.family, direction=args.direction)
    jobs = args.jobs or default_jobs()
    executor = "serial" if jobs == 1 else args.executor
    start = time.perf_counter()
    results = build(
        selected,
        jobs=jobs,
        executor=executor,
        analyze=not args.no_ptxas,
        progress=not args.quiet,
        verbose=args.verbose,
        manifest=not args.force,
    )
    doc = report(results, wall_s=time.perf_counter() - start, jobs=jobs, executor=executor)
    if args.allow_missing:
        doc["ok"] = all(r["status"] in ("ok", "missing") and not r.get("spill_bytes") for r in results)

    for module in sorted({f"tl_kernels.{r['family']}" for r in results if r["status"] == "missing"}):
        logger.warning("module %s does not exist yet: its configs were not built", module)
    if not args.quiet:
        print(format_table(results), flush=True)
    for result in results:
        if result["status"] in ("compile_error", "analysis_error") and (args.verbose or not args.quiet):
            logger.error("%s failed:\n%s", result["name"], result["error"])
    logger.info(summary_line(doc["summary"]))
    if args.json:
        text = json.dumps(doc, indent=2, sort_keys=False, default=str)
        if args.json == "-":
            print(text)
        else:
            directory = os.path.dirname(os.path.abspath(args.json))
            os.makedirs(directory, exist_ok=True)
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
