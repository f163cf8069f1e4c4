"""Run TileLang-generated CUDA C on the CPU, for machines without a GPU.

The generated kernel source is compiled with g++ against ``shim.h``, which maps the CUDA built-ins the kernels use
(thread and block indices, ``__syncthreads``, ``__shfl_xor_sync``, bf16/fp16 conversions, 128-bit stores) onto C++:
every CUDA thread of a block is a ``std::thread``, ``__syncthreads`` a ``std::barrier``, and blocks run one after
another. This checks the index math, the guards for a partial last block, the reductions and the stores of the
*exact source the GPU compiles* against the float64 reference; it says nothing about speed, memory ordering between
blocks, or code generation by nvcc/ptxas. Only the constructs in ``shim.h`` are supported: a kernel using others
fails to build here, loudly. ``MHC_EMU_CFLAGS`` adds g++ flags (``-fsanitize=address`` with libasan preloaded into
python: tests/emulation/test_asan_pre_mapping.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import re
import subprocess
import tempfile

import torch

HERE = pathlib.Path(__file__).resolve().parent
_SIG = re.compile(r"static __global__ void __launch_bounds__\((\d+)(?:, \d+)?\) (\w+)\((.*?)\) \{", re.S)


def _cache_dir() -> pathlib.Path:
    d = pathlib.Path(os.environ.get("MHC_EMU_CACHE_DIR", pathlib.Path(tempfile.gettempdir()) / "mhc-cuda-emu"))
    d.mkdir(parents=True, exist_ok=True)
    return d


class EmulatedKernel:
    """A generated kernel built for the CPU; call with torch CPU tensors by parameter name."""

    def __init__(self, source: str):
        start = source.index('extern "C" __global__ void __launch_bounds__')
        body = source[start:].replace('extern "C" ', "static ", 1)
        body = re.sub(
            r"extern __shared__ __align__\(\d+\) (\w+) (\w+)\[\];",
            r"\1 *\2 = reinterpret_cast<\1 *>(red_storage);",
            body,
        )
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
extern "C" void launch(void **ptrs, const double *scalars, int grid_x, int grid_y) {{
  for (int by = 0; by < grid_y; ++by)
  for (int bx = 0; bx < grid_x; ++bx) {{
    std::barrier<> bar({self.threads});
    g_bar = &bar;
    std::vector<std::thread> ts;
    for (int t = 0; t < {self.threads}; ++t)
      ts.emplace_back([&, t, bx, by] {{
        threadIdx.x = t; blockIdx.x = bx; blockIdx.y = by; {name}({", ".join(casts)}); }});
    for (auto &th : ts) th.join();
  }}
}}
"""
        code = '#include "shim.h"\n' + body + launcher
        extra = os.environ.get("MHC_EMU_CFLAGS", "").split()  # e.g. -fsanitize=address (python under LD_PRELOAD)
        digest = hashlib.sha1((code + (HERE / "shim.h").read_text() + " ".join(extra)).encode()).hexdigest()[:16]
        so = _cache_dir() / f"k_{digest}.so"
        if not so.exists():
            cpp = so.with_suffix(".cpp")
            cpp.write_text(code)
            tmp = so.with_suffix(f".{os.getpid()}.tmp")
            cmd = ["g++", "-std=c++20", "-O1", "-w", "-fPIC", "-shared", "-pthread", *extra, "-I", str(HERE), str(cpp)]
            cmd.append("-o")
            subprocess.run([*cmd, str(tmp)], check=True, capture_output=True)
            os.replace(tmp, so)
        self._lib = ctypes.CDLL(str(so))
        self._lib.launch.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_double),
            ctypes.c_int,
            ctypes.c_int,
        ]

    def __call__(self, *, grid: int | tuple[int, int], **args) -> None:
        """Launch ``grid`` blocks (an int, or ``(grid_x, grid_y)``); every parameter is passed by name, tensors and
        scalars alike (``num_tokens`` and other dynamic sizes are scalars: the generated signature orders the
        parameters by name, not as the TileLang program declares them)."""
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
        self._lib.launch(ptrs, scalars, gx, gy)
