"""Every GPU check in one command with a time budget: environment, correctness of every shipped kernel
configuration, a quick profile, compute-sanitizer, the acceptance run, then (with what time is left) the full GPU
test suite and the full benchmark sweep. See docs/gpu-runs.md.

    python -m profiling.gpu_run OUT [--budget 450] [--jobs N]       # on the GPU machine (bash profiling/gpu_run.sh)
    python -m profiling.gpu_run OUT --dry-run                        # the same stages on a CPU, in under 3 minutes

Stages run in priority order, each in its own process (group) with its own time limit: the smaller of its cap and
what is left of ``--budget`` (seconds since the driver started; ``MHC_RUN_STARTED`` = epoch seconds counts the
bundle unpacking before it too). A stage that does not fit is recorded as skipped. After every stage the driver
rewrites ``OUT/summary.md`` and ``OUT/summary.json`` (one PASS/FAIL/TIMEOUT/SKIP line per stage with its seconds)
and ``OUT/results.tar.xz`` (every log and result file), and copies a few reports beside them, so whatever point the
run reaches, what it measured comes back: at most 8 files in OUT.

The dry run runs every stage's code on the CPU: the kernels' compile step for one family and direction, the
correctness sweep over every configuration on the reference, the benchmark harness with the CUDA timing code and a
stand-in for the device timer, the sanitizer cases without compute-sanitizer, the acceptance script on the CPU,
the GPU suite's collection, and the sweep on tiny shapes.

This module imports only the standard library at the top, so it starts even when torch or TileLang cannot load.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field

from profiling.provenance import DEVICE_DIR, ROOT, commit

SITE_ARCHIVE = DEVICE_DIR / "tilelang-site.tar.xz"
CACHE_ARCHIVE = DEVICE_DIR / "tilelang-cache.tar.xz"
#: third-party baselines for the bench (pure-Python wheels fetched by ``profiling/gpu_prep.sh``; never committed)
PEERS_DIR = DEVICE_DIR / "peers"
#: every stage runs with it: a call no CUDA kernel serves raises instead of passing on the reference (mhc/_cuda.py)
STRICT_ENV = "MHC_STRICT_KERNELS"
#: where the acceptance script is looked for, in order (``../shared`` does not travel to the GPU machine, so
#: ``profiling/gpu_prep.sh`` copies it into ``.device``).
ACCEPTANCE_PATHS = (
    DEVICE_DIR / "acceptance.py",
    ROOT / "shared" / "verify" / "acceptance.py",
    ROOT.parent / "shared" / "verify" / "acceptance.py",
)
MAX_OUT_FILES = 8
PACK_RESERVE_S = 15.0
#: reports copied from the work folder to OUT beside the summary (with summary.md, summary.json, results.tar.xz:
#: at most 8 files)
COPIED = {
    "env.json": "env.json",
    "bench-quick/bench.md": "bench-quick.md",
    "acceptance/acceptance.md": "acceptance.md",
    "bench-full/bench.md": "bench-full.md",
    "bench-compile/bench.md": "bench-compile.md",
}


@dataclass
class Stage:
    key: str  # "1-env": number (priority) and name; also the log file's stem
    title: str
    cap_s: float  # the stage's own time limit
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    min_s: float = 20.0  # not started with less time left than this
    note: str = ""  # e.g. what the dry run replaces
    ok_codes: tuple[int, ...] = (0,)


@dataclass
class Result:
    key: str
    title: str
    status: str  # PASS, FAIL, TIMEOUT, SKIP
    seconds: float = 0.0
    limit_s: float = 0.0
    rc: int | None = None
    detail: str = ""
    log: str = ""


# ---------------------------------------------------------------------------------------------------- stages


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def find_acceptance() -> pathlib.Path | None:
    for path in ACCEPTANCE_PATHS:
        if path.is_file():
            return path
    return None


def build_stages(work: pathlib.Path, *, dry_run: bool, jobs: int) -> list[Stage]:
    """The stages in priority order. ``dry_run``: the same code on a CPU with stand-ins (module docstring)."""
    dev = ["--device", "cpu"] if dry_run else ["--device", "cuda"]
    stages = [
        Stage("1-env", "environment and copy bandwidth", 60 if not dry_run else 40,
              _py("-m", "profiling.gpu_run", "--env-info", str(work / "env.json"), *(["--dry-run"] if dry_run else []))),
    ]  # fmt: skip
    build = _py("-m", "tl_kernels.build", "--jobs", str(jobs), "--no-ptxas", "--allow-missing", "--quiet")
    build += ["--json", str(work / "compile.json")]
    if dry_run:  # one family and direction: the same code path, a few kernels (from the disk cache when warm)
        build += ["--family", "sinkhorn", "--direction", "fwd"]
    stages.append(Stage("1-compile", "compile every shipped kernel in parallel", 150 if not dry_run else 90, build))
    # the four pre-mapping kernels called directly as mhc/_cuda.py calls them (positional binding, dynamic
    # num_splits / num_slices, the host-side grid): first in stage 2, the one contract never run anywhere before
    direct = _py("-m", "pytest", "tests/gpu/test_pre_kernels_gpu.py", "-m", "gpu", "-p", "no:cacheprovider")
    if dry_run:
        direct += ["--collect-only", "-q"]
    else:
        direct += ["-v", "--junitxml", str(work / "pre-kernels.xml")]
    note = "dry run: collection only (the GPU tests skip without CUDA)" if dry_run else ""
    stages.append(Stage("2-pre-kernels", "pre_proj and pre_finalize kernels called directly (tests/gpu)", 120,
                        direct, note=note))  # fmt: skip
    check = _py("-m", "profiling.check_configs", *dev, "--json", str(work / "check_configs.json"))
    if dry_run:
        check += ["--tokens", "0", "3"]  # the reference on a CPU: the code path, not the kernels' blocks
    # the dry run's limit is wider: on a CPU the stage times the float64 reference of every configuration, not kernels
    stages.append(Stage("2-correctness", "every registry configuration vs the float64 reference",
                        150 if not dry_run else 300, check))  # fmt: skip
    # no third-party baselines here: TileKernels compiles its kernels on first use, per hidden size (not in the
    # carried cache), which could push this stage past its limit; 6-bench-compile times them
    quick = _py("-m", "profiling.bench", *dev, "--quick", "--no-compile", "--no-baselines", "--out",
                str(work / "bench-quick"))  # fmt: skip
    if dry_run:
        quick += ["--timer", "standin"]
    stages.append(Stage("3-bench-quick", "benchmarks at the target shapes (n=4, T=16384)", 120, quick))
    for tool in ("memcheck", "racecheck"):
        cases = _py("-m", "profiling.sanitize_cases", *dev)
        if dry_run:  # the reference on a CPU: the code path at two small token counts
            cmd, note = [*cases, "--tokens", "1", "3"], "dry run: the cases without compute-sanitizer"
        else:
            cmd, note = ["compute-sanitizer", "--tool", tool, "--error-exitcode", "1", *cases], ""
        env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if tool == "memcheck" else {}
        stages.append(Stage(f"4-{tool}", f"compute-sanitizer {tool} on tiny cases", 120, cmd, env=env, note=note))
    acc = find_acceptance()
    acc_cmd = _py(str(acc), *dev, "--quick", "--out", str(work / "acceptance")) if acc else []
    if dry_run and acc:
        acc_cmd.append("--no-compile")
    stages.append(Stage("5-acceptance", "independent acceptance check (../shared/verify/acceptance.py)", 150,
                        acc_cmd, note="" if acc else "acceptance.py not found: run profiling/gpu_prep.sh first"))  # fmt: skip
    # ours, TileKernels, Liger, eager and torch.compile side by side at the target shape (n = 4, C = 4096, T = 16384
    # and Sinkhorn's token counts): stage 3 leaves torch.compile out to keep stages 1-5 inside the budget
    # (not in the dry run: stage 3 runs the same code there, and torch.compile on 2 cores would not fit)
    side = _py("-m", "profiling.bench", *dev, "--quick", "--hidden", "4096", "--no-block", "--out",
               str(work / "bench-compile"))  # fmt: skip
    if not dry_run:
        stages.append(Stage("6-bench-compile", "quick bench with torch.compile beside the peers (C=4096)", 240,
                            side, min_s=60))  # fmt: skip
    pytest = _py("-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider")
    if dry_run:
        pytest += ["--collect-only", "-q"]
        note = "dry run: collection only (the GPU tests skip without CUDA)"
    else:
        pytest += ["-v", "--junitxml", str(work / "gpu-tests.xml")]
        missing = [m for m in ("xdist", "pytest_timeout") if importlib.util.find_spec(m) is None]
        pytest += [] if "xdist" in missing else ["-n", "4"]
        pytest += [] if "pytest_timeout" in missing else ["--timeout", "120"]
        note = f"missing: {', '.join(missing)}" if missing else ""
    stages.append(Stage("6-gpu-suite", "full GPU test suite", 600, pytest, min_s=60 if not dry_run else 10, note=note))
    sweep = _py("-m", "profiling.bench", *dev, "--out", str(work / "bench-full"))
    if dry_run:
        sweep += ["--timer", "standin", "--no-compile", "--no-block"]  # stage 3 already ran the block's code
    stages.append(Stage("6-bench-full", "full benchmark sweep", 600, sweep, min_s=60 if not dry_run else 10))
    return stages


# ---------------------------------------------------------------------------------------------------- running


def run_stage(stage: Stage, work: pathlib.Path, env: dict[str, str], limit_s: float) -> Result:
    log = work / "logs" / f"{stage.key}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    res = Result(stage.key, stage.title, "FAIL", limit_s=round(limit_s, 1), log=str(log.relative_to(work)))
    if not stage.cmd:  # nothing to run (the acceptance script was not found)
        log.write_text(stage.note + "\n")
        res.detail = stage.note
        return res
    t0 = time.monotonic()
    with open(log, "w") as fh:
        fh.write(f"$ {' '.join(stage.cmd)}\n# limit {limit_s:.0f} s {stage.note}\n")
        fh.flush()
        try:
            proc = subprocess.Popen(
                stage.cmd, cwd=ROOT, env={**env, **stage.env}, stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            fh.write(f"could not start: {exc}\n")
            res.detail = f"could not start: {exc}"
            return res
        try:
            res.rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            res.status, res.rc = "TIMEOUT", proc.returncode
        res.seconds = round(time.monotonic() - t0, 1)
    if res.status != "TIMEOUT":
        res.status = "PASS" if res.rc in stage.ok_codes else "FAIL"
    res.detail = _detail(stage, work, log)
    if stage.note:
        res.detail = f"{res.detail} ({stage.note})" if res.detail else stage.note
    return res


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group (the benchmark writes what it has), SIGKILL 10 s later."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail_line(log: pathlib.Path, *needles: str) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if not needles or any(n in ln for n in needles):
            return ln[:200]
    return ""


def _detail(stage: Stage, work: pathlib.Path, log: pathlib.Path) -> str:
    """One line saying what the stage found."""
    try:
        if stage.key == "1-env":
            env = json.loads((work / "env.json").read_text())
            return f"{env.get('device')}, copy {env.get('copy_GBps', 0):.0f} GB/s, commit {env.get('commit')}"
        if stage.key == "1-compile":
            return _tail_line(log, "config", "compiled", "failed", "Error")
        if stage.key == "2-correctness":
            data = json.loads((work / "check_configs.json").read_text())
            bad = [c["name"] for c in data["configs"] if not c["ok"]]
            notes = "; ".join(f"{k}: {v}" for k, v in data["families"].items())
            worst = max((c["worst_ratio"] for c in data["configs"]), default=0.0)
            text = f"{sum(c['ok'] for c in data['configs'])}/{len(data['configs'])} configs pass, worst err/tol "
            text += f"{worst:.3g}; {notes}"
            return text + (f"; FAILED: {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}" if bad else "")
        if stage.key.startswith("3-") or stage.key in ("6-bench-full", "6-bench-compile"):
            sub = {"6-bench-full": "bench-full", "6-bench-compile": "bench-compile"}.get(stage.key, "bench-quick")
            data = json.loads((work / sub / "bench.json").read_text())
            rows = data["records"]
            post = [r for r in rows if r["op"] == "post_res"]
            sk = [r for r in rows if r["op"] == "sinkhorn" and r["mode"] == "fwd+bwd"]
            text = f"{len(rows)} timings"
            if post:
                text += (
                    f", post_res {min(r['pct_copy'] for r in post):.0f}-{max(r['pct_copy'] for r in post):.0f}% copy"
                )
            if sk:
                text += f", sinkhorn fwd+bwd {sk[-1]['us']:.1f} us (T={sk[-1]['T']})"
            meta = data.get("meta", {})
            peers = [v["label"] for v in meta.get("baselines", {}).values() if v.get("available")]
            if any("--no-baselines" in note for note in meta.get("baseline_skips", [])):
                text += ", peers not run here"
            else:
                text += f", peers: {', '.join(peers) or 'none importable'}"
            return text + (" (truncated)" if data.get("meta", {}).get("truncated") else "")
        if stage.key.startswith("4-"):
            return _tail_line(log, "ERROR SUMMARY", "MISMATCH", "Error", "sanitize cases ran")
        if stage.key == "5-acceptance":
            return _tail_line(log, "PASS", "FAIL", "wrote", "Error") or _tail_line(log)
        if stage.key in ("6-gpu-suite", "2-pre-kernels"):
            return _tail_line(log, "passed", "failed", "error", "tests collected", "selected")
    except (OSError, ValueError, KeyError) as exc:
        return f"(no result file: {type(exc).__name__})"
    return ""


# ---------------------------------------------------------------------------------------------------- reports


def write_reports(out: pathlib.Path, work: pathlib.Path, meta: dict, results: list[Result]) -> None:
    data = {"meta": meta, "stages": [asdict(r) for r in results]}
    (work / "summary.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [
        f"# mHC GPU run{' (DRY RUN on a CPU)' if meta['dry_run'] else ''}: {meta.get('device', '?')}",
        "",
        f"commit `{meta['commit']}`, started {meta['date']}, budget {meta['budget_s']:.0f} s, "
        f"elapsed {meta.get('elapsed_s', 0):.0f} s, python {meta['python']}, host {meta['host']}",
        "",
        "| stage | status | seconds | limit s | what it found |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.key} {r.title} | {r.status} | {r.seconds:.0f} | {r.limit_s:.0f} | {r.detail} |")
    lines += ["", f"OVERALL: {overall(results)}", "", "Logs and result files: results.tar.xz (logs/<stage>.log)."]
    (work / "summary.md").write_text("\n".join(lines) + "\n")
    for name in ("summary.md", "summary.json"):
        shutil.copyfile(work / name, out / name)
    for rel, name in COPIED.items():
        if (work / rel).is_file():
            shutil.copyfile(work / rel, out / name)
    tmp = out / "results.tar.xz.tmp"
    with tarfile.open(tmp, "w:xz") as tar:
        for path in sorted(work.rglob("*")):
            if path.is_file() and "tilelang-cache" not in path.parts and "site" not in path.parts[:1]:
                tar.add(path, arcname=str(path.relative_to(work)))
    os.replace(tmp, out / "results.tar.xz")


def overall(results: list[Result]) -> str:
    """PASS when every stage 1-5 ran and passed and no stage failed; the stage-6 extras, which get whatever time is
    left, may be skipped or cut at their time limit (named in the verdict), but not fail."""
    extra = [r for r in results if r.key.startswith("6-")]
    bad = [r.key for r in results if r.status == "FAIL" or (r.status == "TIMEOUT" and r not in extra)]
    missing = [r.key for r in results if r.status == "SKIP" and r not in extra]
    if bad or missing:
        return "FAIL (" + ", ".join(bad + [f"{k} skipped" for k in missing]) + ")"
    cut = [r.key for r in extra if r.status == "TIMEOUT"]
    return "PASS" + (f" ({', '.join(cut)} cut at the time limit)" if cut else "")


# ---------------------------------------------------------------------------------------------------- setup


def unpack(archive: pathlib.Path, dest: pathlib.Path) -> float:
    """Extracts a .tar.xz into ``dest``; returns the seconds it took."""
    t0 = time.monotonic()
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - Python < 3.11.4
            tar.extractall(dest)
    return time.monotonic() - t0


def unpack_wheels(wheels: list[pathlib.Path], dest: pathlib.Path) -> float:
    """Extracts pure-Python wheels (zip files) into ``dest``, one folder for all, ready for ``PYTHONPATH``; returns
    the seconds it took."""
    t0 = time.monotonic()
    dest.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                target = (dest / name).resolve()
                if not target.is_relative_to(dest.resolve()):
                    raise ValueError(f"{wheel.name}: member {name!r} would land outside {dest}")
            zf.extractall(dest)
    return time.monotonic() - t0


def child_env(work: pathlib.Path, args) -> tuple[dict[str, str], list[str]]:
    """Environment of every stage; unpacks the carried TileLang bundle and kernel cache when asked to."""
    env = dict(os.environ)
    notes = []
    paths = [str(ROOT)]
    site = pathlib.Path(args.site) if args.site else None
    if site is not None:
        if site.is_file():
            dest = pathlib.Path(tempfile.gettempdir()) / "mhc-site"
            notes.append(f"unpacked {site.name} into {dest} in {unpack(site, dest):.1f} s")
            paths.insert(0, str(dest))
        else:
            notes.append(f"--site {site} not found: using the installed packages")
    cache = pathlib.Path(args.cache) if args.cache else None
    if cache is not None:
        if cache.is_file():
            dest = work / "tilelang-cache"
            notes.append(f"unpacked {cache.name} into {dest} in {unpack(cache, dest):.1f} s")
            env["TILELANG_CACHE_DIR"] = str(dest)
        else:
            notes.append(f"--cache {cache} not found: compiling into the default cache")
    peers = pathlib.Path(args.peers) if args.peers else None
    if peers is not None:
        wheels = sorted(peers.glob("*.whl")) if peers.is_dir() else []
        if wheels:
            dest = pathlib.Path(tempfile.gettempdir()) / "mhc-peers"
            seconds = unpack_wheels(wheels, dest)
            notes.append(f"unpacked {', '.join(w.name for w in wheels)} into {dest} in {seconds:.1f} s")
            paths.append(str(dest))  # after the TileLang bundle and the checkout: the peers never shadow them
        else:
            notes.append(f"--peers {peers}: no wheels there (bash profiling/gpu_prep.sh fetches them)")
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["TILELANG_PRINT_ON_COMPILATION"] = "0"
    env[STRICT_ENV] = "1"
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run must not touch a GPU even where one exists
    return env, notes


def env_info(path: str, dry_run: bool) -> int:
    """Stage 1 body (runs in a child process): versions, device, commit, date, measured copy bandwidth."""
    import torch

    from profiling import bench

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
    }
    for dist in ("tile-kernels", "liger-kernel"):  # the bench's peers (.device/peers), found on PYTHONPATH
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = "not found"
    for mod in ("tilelang", "tvm_ffi", "triton"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            info[mod] = f"not importable: {type(exc).__name__}: {exc}"[:200]
    for tool, flag in (("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader"),
                       ("nvcc", "--version"), ("compute-sanitizer", "--version")):  # fmt: skip
        exe = shutil.which(tool)
        if exe is None:
            info[tool] = "not found"
            continue
        try:
            run = subprocess.run([exe, *flag.split()], capture_output=True, text=True, timeout=30)
            info[tool] = (run.stdout.strip().splitlines() or [""])[-1]
        except (OSError, subprocess.SubprocessError) as exc:
            info[tool] = f"failed: {exc}"
    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability())
        timer, how = bench.make_timer("cuda", cupti=False)
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()})"
        timer, how = bench.make_timer("cuda", do_bench=bench.standin_do_bench, cupti=False)
        how = "STAND-IN for the device timer (dry run): " + how
    info["copy_GBps"] = bench.copy_bandwidth_gbs(device, timer)
    info["timer"] = how
    pathlib.Path(path).write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="output folder (at most 8 files are written there)")
    ap.add_argument("--dry-run", action="store_true", help="run every stage's code on the CPU (stand-ins)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 450; dry 170)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel kernel compiles")
    ap.add_argument("--site", default=None, help="TileLang bundle to unpack and put on PYTHONPATH "
                    "(default: .device/tilelang-site.tar.xz when present, not in a dry run)")  # fmt: skip
    ap.add_argument("--cache", default=None, help="compressed TileLang kernel cache to use "
                    "(default: .device/tilelang-cache.tar.xz when present, not in a dry run)")  # fmt: skip
    ap.add_argument("--peers", default=None, help="folder of third-party wheels for the bench, unpacked onto "
                    "PYTHONPATH (default: .device/peers when present, not in a dry run)")  # fmt: skip
    ap.add_argument("--work", default=None, help="folder for logs and results (default: a new temporary one)")
    ap.add_argument("--only", nargs="+", help="run only these stage keys (e.g. 2-correctness)")
    ap.add_argument("--env-info", metavar="PATH", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.env_info:
        return env_info(args.env_info, args.dry_run)
    if not args.out:
        ap.error("the output folder is required")
    started = float(os.environ.get("MHC_RUN_STARTED", time.time()))
    budget = args.budget if args.budget is not None else (170.0 if args.dry_run else 450.0)
    deadline = time.monotonic() + budget - (time.time() - started)
    if not args.dry_run:
        args.site = args.site or (str(SITE_ARCHIVE) if SITE_ARCHIVE.is_file() else None)
        args.cache = args.cache or (str(CACHE_ARCHIVE) if CACHE_ARCHIVE.is_file() else None)
        args.peers = args.peers or (str(PEERS_DIR) if PEERS_DIR.is_dir() else None)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(args.work) if args.work else pathlib.Path(tempfile.mkdtemp(prefix="mhc-gpu-run-"))
    work.mkdir(parents=True, exist_ok=True)
    env, notes = child_env(work, args)
    meta = {
        "dry_run": args.dry_run, "budget_s": budget, "commit": commit(), "python": sys.version.split()[0],
        "host": platform.node(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "setup": notes, "work": str(work), "device": "CPU (dry run)" if args.dry_run else "?",
    }  # fmt: skip
    for note in notes:
        print(note, flush=True)
    results: list[Result] = []
    stages = build_stages(work, dry_run=args.dry_run, jobs=args.jobs)
    for stage in stages:
        if args.only and stage.key not in args.only:
            continue
        left = deadline - time.monotonic() - PACK_RESERVE_S
        if left < stage.min_s:
            res = Result(stage.key, stage.title, "SKIP", detail=f"out of time ({max(left, 0):.0f} s left)")
        else:
            print(f"== {stage.key}: {stage.title} (limit {min(stage.cap_s, left):.0f} s)", flush=True)
            res = run_stage(stage, work, env, min(stage.cap_s, left))
        print(f"   {res.status} in {res.seconds:.0f} s: {res.detail}", flush=True)
        results.append(res)
        if stage.key == "1-env" and res.status == "PASS":
            meta["device"] = res.detail.split(",")[0]
        meta["elapsed_s"] = round(time.time() - started, 1)
        write_reports(out, work, meta, results)
    verdict = overall(results)
    print(f"OVERALL: {verdict}\n" + (out / "summary.md").read_text(), flush=True)
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) > MAX_OUT_FILES:
        print(f"WARNING: {len(files)} files in {out}, only {MAX_OUT_FILES} come back", flush=True)
    return 0 if verdict.startswith("PASS") else 1


if __name__ == "__main__":
    sys.exit(main())
