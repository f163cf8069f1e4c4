"""Run TileLang-generated CUDA C on the CPU, for machines without a GPU.

The generated kernel source is compiled with g++ against ``shim.h``, which maps the CUDA built-ins the kernels use
onto C++. The execution model is built to expose bugs a GPU would show only sometimes (details in ``shim.h``):

* every CUDA thread of a block is a ``std::thread``, but only one runs at a time and the baton passes only at
  synchronisation points, lowest thread first (``schedule="forward"``) or highest first (``"reverse"``): between two
  ``__syncthreads`` one warp finishes its phase before the next starts, so a shared-memory read that a missing
  barrier leaves unordered returns stale or poisoned data, deterministically, in at least one of the two schedules
  (tests/emulation/test_barrier_mutations.py deletes each barrier of each kernel family and checks this);
* warp collectives (``__shfl_*_sync``, ``mma.sync``, ``ldmatrix``) synchronise the 32 lanes of their warp only;
* dynamic shared memory is allocated per block at exactly the launch's size (read from TileLang's host code), filled
  with 0xFF (NaN) and followed by an inaccessible page (an exact-size heap block under ASan), so reading a byte no
  thread wrote gives NaN and an access past the declared size faults;
* blocks run in ``block_order`` ``"forward"``, ``"reverse"`` or ``"shuffle"`` (seeded) order, one at a time;
* a deadlock (threads waiting at a barrier that the others never reach: a GPU hangs) cancels the waiting threads
  where they wait, skips the remaining blocks and raises :class:`EmulationDeadlock`; the process lives on (a barrier
  deleted by tests/emulation/test_barrier_mutations.py may do this, and counts as detected);
  a kernel launched with thread block clusters (TileLang's ``T.Kernel(..., cluster_dims=(cs, 1, 1))``; read from
  its host code) runs one cluster at a time instead, its ``cs`` blocks together (each its own shared memory and
  ``__syncthreads``; the cluster barrier waits for all their threads; distributed shared memory reads the peer
  block's allocation; a block's shared memory is poisoned again when it exits), the clusters in ``block_order``;
* the approximate math (``exp2f``, ``expf``, ``__log2f``, ``rsqrtf``, ``__fdividef``) returns the exact value moved by
  the documented worst-case error of the PTX instruction or CUDA function, all upwards (``approx="up"``) or all
  downwards (``"down"``), or exact libm (``"exact"``); kernels compiled with ``-ftz=true`` flush subnormals.

It checks the index math, guards, reductions, barriers and stores of the *exact source the GPU compiles* against the
float64 reference; it says nothing about speed, memory ordering between concurrently running blocks, alignment
faults (x86 does not fault on misaligned vector accesses) or code generation by nvcc/ptxas. A kernel using a
construct ``shim.h`` lacks fails to build here, loudly. ``MHC_EMU_CFLAGS`` adds g++ flags (``-fsanitize=address``
with libasan preloaded into python: tests/emulation/test_asan_pre_mapping.py). Defaults for the options come from
``MHC_EMU_APPROX`` (``up``), ``MHC_EMU_SCHEDULE`` (``forward``) and ``MHC_EMU_BLOCK_ORDER`` (``forward``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import random
import re
import subprocess
import tempfile

import torch

HERE = pathlib.Path(__file__).resolve().parent
_SIG = re.compile(r"static __global__ void __launch_bounds__\((\d+)(?:, \d+)?\) (\w+)\((.*?)\) \{", re.S)
_DYN_SHARED = re.compile(r"extern __shared__ __align__\(\d+\) (\w+) (\w+)\[\];")
_STATIC_SHARED = re.compile(r"(?<!extern )__shared__ (?:__align__\(\d+\) )?(\w+) (\w+)\[(\d+)\];")
APPROX_MODES = {"exact": 0, "up": 1, "down": -1}
SCHEDULES = {"forward": 0, "reverse": 1}
BLOCK_ORDERS = ("forward", "reverse", "shuffle")
#: the defaults the options fall back to (tests/emulation/conftest.py sets ``approx`` per test)
DEFAULTS = {
    "approx": os.environ.get("MHC_EMU_APPROX", "up"),
    "schedule": os.environ.get("MHC_EMU_SCHEDULE", "forward"),
    "block_order": os.environ.get("MHC_EMU_BLOCK_ORDER", "forward"),
}


def _cache_dir() -> pathlib.Path:
    d = pathlib.Path(os.environ.get("MHC_EMU_CACHE_DIR", pathlib.Path(tempfile.gettempdir()) / "mhc-cuda-emu"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def dynamic_smem_bytes(host_source: str) -> int:
    """The dynamic shared memory size TileLang's host code launches the kernel with: the last argument of the
    kernel call (TVM's launch parameters end with the dynamic shared memory size when the kernel declares any)."""
    calls = list(re.finditer(r"TVMFFIFunctionCall\((\w+)_packed, \(TVMFFIAny\*\) stack_ffi_any, (\d+),", host_source))
    calls = [c for c in calls if c.group(1) != "__tvm_set_device"]
    if len(calls) != 1:
        raise ValueError(f"expected one kernel launch in the host source, found {len(calls)}")
    last = int(calls[0].group(2)) - 1
    pattern = r"\(\(\(TVMFFIAny\*\)stack_ffi_any\)\[" + str(last) + r"\]\.v_int64\) = \(\(int64_t\)(\d+)\);"
    values = re.findall(pattern, host_source[: calls[0].start()])
    if not values:
        raise ValueError("the dynamic shared memory size is not a constant in the host source")
    return int(values[-1])


def cluster_dims(host_source: str, num_params: int) -> tuple[int, int, int]:
    """The thread block cluster shape TileLang's host code launches the kernel with, ``(1, 1, 1)`` for none.

    TVM's CUDA runtime takes the launch values after the kernel's ``num_params`` arguments in the order of the
    kernel's launch tags; a cluster kernel's tags begin with ``tir.cluster_dim_x/y/z`` (its runtime then launches
    with ``cuLaunchKernelEx`` and the cluster attribute). The host source does not name the tags, so this reads the
    three values after the parameters; :func:`kernel_sources` calls it only for a program with TileLang's
    ``cluster_dims`` launch annotation, and checks that the two agree."""
    calls = list(re.finditer(r"TVMFFIFunctionCall\((\w+)_packed, \(TVMFFIAny\*\) stack_ffi_any, (\d+),", host_source))
    calls = [c for c in calls if c.group(1) != "__tvm_set_device"]
    if len(calls) != 1:
        raise ValueError(f"expected one kernel launch in the host source, found {len(calls)}")
    head = host_source[: calls[0].start()]
    dims = []
    for i in range(num_params, num_params + 3):
        pattern = r"\(\(\(TVMFFIAny\*\)stack_ffi_any\)\[" + str(i) + r"\]\.v_int64\) = \(\(int64_t\)(\d+)\);"
        values = re.findall(pattern, head)
        if not values:
            raise ValueError(f"the cluster dimension at launch argument {i} is not a constant in the host source")
        dims.append(int(values[-1]))
    return tuple(dims)


def _annotated_cluster_dims(kernel) -> tuple[int, int, int] | None:
    """TileLang's ``cluster_dims`` launch annotation of a ``JITKernel``'s program, or ``None`` without one."""
    m = re.search(r'"cluster_dims": \[(\d+), (\d+), (\d+)\]', kernel.prim_func.script())
    return tuple(int(v) for v in m.groups()) if m else None


def kernel_sources(kernel) -> dict:
    """What :class:`EmulatedKernel` needs from a TileLang ``JITKernel``, as plain data (for a child process)."""
    source = kernel.get_kernel_source()
    flags = (kernel.pass_configs or {}).get("tl.device_compile_flags") or []
    flags = [flags] if isinstance(flags, str) else list(flags)
    annotated = _annotated_cluster_dims(kernel)
    cluster = (1, 1, 1)
    if annotated is not None:
        sig = _SIG.search(
            source[source.index('extern "C" __global__ void __launch_bounds__') :].replace('extern "C" ', "static ", 1)
        )
        cluster = cluster_dims(kernel.get_host_source(), len(sig.group(3).split(",")))
        if cluster != annotated:
            raise ValueError(f"host code launches clusters {cluster}, the program declares {annotated}")
    return {
        "source": source,
        "cluster": list(cluster),
        "smem_bytes": dynamic_smem_bytes(kernel.get_host_source()) if _DYN_SHARED.search(source) else 0,
        "ftz": any("-ftz=true" in f or "use_fast_math" in f for f in flags)
        or bool((kernel.pass_configs or {}).get("tl.enable_fast_math")),
    }


class EmulationDeadlock(RuntimeError):
    """Some threads of a block (or cluster) waited at a barrier that the others never reached: on a GPU the kernel
    hangs. The emulator cancels the waiting threads, skips the remaining blocks and raises this."""


class EmulatedKernel:
    """A generated kernel built for the CPU; call with torch CPU tensors by parameter name.

    ``kernel`` is a TileLang ``JITKernel`` (shared memory size and flush-to-zero read from it) or the dict
    :func:`kernel_sources` makes of one; ``approx`` is ``"up"``, ``"down"`` or ``"exact"`` (default: ``DEFAULTS``).
    """

    def __init__(self, kernel, *, approx: str | None = None):
        info = kernel if isinstance(kernel, dict) else kernel_sources(kernel)
        source, self.smem_bytes, ftz = info["source"], int(info["smem_bytes"]), bool(info["ftz"])
        self.cluster = tuple(int(v) for v in info.get("cluster", (1, 1, 1)))
        if len(self.cluster) != 3 or self.cluster[1:] != (1, 1) or not 1 <= self.cluster[0] <= 8:
            raise ValueError(f"cluster: expected (cs, 1, 1) with 1 <= cs <= 8, got {self.cluster}")
        approx = approx or DEFAULTS["approx"]
        if approx not in APPROX_MODES:
            raise ValueError(f"approx: expected one of {sorted(APPROX_MODES)}, got {approx!r}")
        self.approx, self.ftz = approx, ftz
        start = source.index('extern "C" __global__ void __launch_bounds__')
        body = source[start:].replace('extern "C" ', "static ", 1)
        if _DYN_SHARED.search(body) and self.smem_bytes <= 0:
            raise ValueError("the kernel declares dynamic shared memory but its launch size is unknown")
        body = _DYN_SHARED.sub(r"\1 *\2 = reinterpret_cast<\1 *>(emu::g_smem);", body)
        statics = iter(range(1 << 30))
        body = _STATIC_SHARED.sub(
            lambda m: (
                f"{m[1]} *{m[2]} = reinterpret_cast<{m[1]} *>(emu::static_shared({next(statics)}, "
                f"sizeof({m[1]}) * {m[3]}));"
            ),
            body,
        )
        if "__shared__" in body:
            raise ValueError("a __shared__ declaration the emulator does not recognise")
        sig = _SIG.match(body)
        if sig is None:
            raise ValueError("unrecognised kernel signature in the generated source")
        self.threads, name, params = int(sig.group(1)), sig.group(2), sig.group(3)
        plist = [p.strip() for p in params.split(",")]
        self.names = [p.split()[-1] for p in plist]
        self.pointers = set()
        casts = []
        for i, p in enumerate(plist):
            typ = p[: p.rindex(" ")].replace("__restrict__", "").strip()
            if "*" in typ:
                self.pointers.add(self.names[i])
                casts.append(f"({typ})ptrs[{i}]")
            else:  # a scalar (int or float) parameter: passed as a double, converted to its type
                casts.append(f"({typ})scalars[{i}]")
        launcher = f"""
extern "C" int launch(void **ptrs, const double *scalars, int grid_x, const int *order, int clusters, int schedule,
                      long smem_bytes, int cs) {{
  int clusters_x = grid_x / cs;
  emu::g_deadlocked = false;
  for (int i = 0; i < clusters && !emu::g_deadlocked; ++i) {{
    unsigned bx0 = order[i] % clusters_x * cs, by = order[i] / clusters_x;
    emu::run_cluster({self.threads}, cs, schedule, smem_bytes, bx0, by, [&] {{ {name}({", ".join(casts)}); }});
  }}
  return emu::g_deadlocked ? 1 : 0;
}}
"""
        defines = f"#define MHC_EMU_APPROX {APPROX_MODES[approx]}\n#define MHC_EMU_FTZ {int(ftz)}\n"
        code = defines + '#include "shim.h"\n' + body + launcher
        extra = os.environ.get("MHC_EMU_CFLAGS", "").split()  # e.g. -fsanitize=address (python under LD_PRELOAD)
        digest = hashlib.sha1((code + (HERE / "shim.h").read_text() + " ".join(extra)).encode()).hexdigest()[:16]
        so = _cache_dir() / f"k_{digest}.so"
        if not so.exists():
            cpp = so.with_suffix(f".{os.getpid()}.cpp")
            cpp.write_text(code)
            tmp = so.with_suffix(f".{os.getpid()}.tmp")
            cmd = ["g++", "-std=c++20", "-O1", "-w", "-fPIC", "-shared", "-pthread", *extra, "-I", str(HERE), str(cpp)]
            proc = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True)
            cpp.unlink()
            if proc.returncode != 0:
                raise RuntimeError(f"g++ failed to build the emulated kernel:\n{proc.stderr[-4000:]}")
            os.replace(tmp, so)
        self._lib = ctypes.CDLL(str(so))
        self._lib.launch.restype = ctypes.c_int
        self._lib.launch.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_double),
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
            ctypes.c_int,
        ]

    def __call__(
        self,
        *,
        grid: int | tuple[int, int],
        schedule: str | None = None,
        block_order: str | None = None,
        seed: int = 0,
        **args,
    ) -> None:
        """Launch ``grid`` blocks (an int, or ``(grid_x, grid_y)``); every parameter is passed by name, tensors and
        scalars alike (``num_tokens`` and other dynamic sizes are scalars: the generated signature orders the
        parameters by name, not as the TileLang program declares them). ``schedule`` orders the threads of a block
        (``"forward"``/``"reverse"``), ``block_order`` the blocks, or the clusters of a cluster launch
        (``"forward"``/``"reverse"``/``"shuffle"``, the last with ``seed``)."""
        schedule = schedule or DEFAULTS["schedule"]
        block_order = block_order or DEFAULTS["block_order"]
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {sorted(SCHEDULES)}, got {schedule!r}")
        if block_order not in BLOCK_ORDERS:
            raise ValueError(f"block_order: expected one of {BLOCK_ORDERS}, got {block_order!r}")
        if sorted(args) != sorted(self.names):
            raise ValueError(f"expected arguments {sorted(self.names)}, got {sorted(args)}")
        ptrs = (ctypes.c_void_p * len(self.names))()
        scalars = (ctypes.c_double * len(self.names))()
        for i, n in enumerate(self.names):
            value = args[n]
            if n not in self.pointers:
                scalars[i] = float(value)
                continue
            if not isinstance(value, torch.Tensor) or value.device.type != "cpu" or not value.is_contiguous():
                raise ValueError(f"{n}: expected a contiguous CPU tensor")
            ptrs[i] = value.data_ptr()
        gx, gy = (grid, 1) if isinstance(grid, int) else grid
        cs = self.cluster[0]
        if gx % cs:
            raise ValueError(f"grid: the x extent {gx} is not a multiple of the cluster size {cs}")
        order = list(range(gx // cs * gy))  # clusters (blocks without clusters)
        if block_order == "reverse":
            order.reverse()
        elif block_order == "shuffle":
            random.Random(seed).shuffle(order)
        c_order = (ctypes.c_int * len(order))(*order)
        if self._lib.launch(ptrs, scalars, gx, c_order, len(order), SCHEDULES[schedule], self.smem_bytes, cs):
            raise EmulationDeadlock(
                "the emulated kernel deadlocked: threads waited at a barrier that not all threads reach (a GPU hangs)"
            )
