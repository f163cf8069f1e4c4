"""Unit tests of the emulator itself (cuda_emu.py, shim.h) on small hand-written kernels in TileLang's generated
style: warp collectives synchronise only their warp, shared memory is poisoned and ends where the launch says,
the approximate math sits at its documented bound in the chosen direction, flush-to-zero, and option checking."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from .cuda_emu import HERE, EmulatedKernel, EmulationDeadlock

_HEAD = 'extern "C" __global__ void __launch_bounds__({threads}, 1) k({params}) {{\n'


def _kernel(body: str, params: str, threads: int = 64, smem: int = 0, ftz: bool = False) -> dict:
    return {"source": _HEAD.format(threads=threads, params=params) + body + "\n}\n", "smem_bytes": smem, "ftz": ftz}


# warp 0 writes shared memory; warp 1 shuffles (a warp collective, not a barrier), then reads what warp 0 wrote
_WARP_SCOPE = _kernel(
    """  extern __shared__ __align__(1024) float s[];
  if (((int)threadIdx.x) < 32) s[((int)threadIdx.x)] = (float)((int)threadIdx.x);
  float v = __shfl_xor_sync((uint)4294967295, 1.0f, 1, 32);
  if (((int)threadIdx.x) >= 32) out[((int)threadIdx.x) - 32] = s[((int)threadIdx.x) - 32] * v;""",
    "float* __restrict__ out",
    smem=128,
)


def test_a_shuffle_is_not_a_block_barrier():
    kernel = EmulatedKernel(_WARP_SCOPE)
    want = torch.arange(32, dtype=torch.float32)
    out = torch.zeros(32)
    kernel(out=out, grid=1, schedule="forward")  # warp 0 runs its whole phase first: the data is there
    torch.testing.assert_close(out, want)
    kernel(out=out, grid=1, schedule="reverse")  # warp 1 first: it reads the poison (NaN), as a GPU may
    assert out.isnan().all()


# warp 1 waits at a barrier that warp 0 never reaches (it returns first): a GPU hangs
_DEADLOCK = _kernel(
    """  if (((int)threadIdx.x) < 32) return;
  __syncthreads();
  out[((int)threadIdx.x) - 32] = 1.0f;""",
    "float* __restrict__ out",
)


@pytest.mark.parametrize("schedule", ["forward", "reverse"])
def test_a_deadlock_raises_and_the_process_lives_on(schedule):
    """The waiting threads are cancelled where they wait, the remaining blocks are skipped, the launch raises; the
    same kernel object launches again (its state was reset)."""
    kernel = EmulatedKernel(_DEADLOCK)
    out = torch.zeros(32)
    with pytest.raises(EmulationDeadlock, match="deadlocked"):
        kernel(out=out, grid=3, schedule=schedule)
    assert (out == 0).all()  # no thread went past the barrier
    with pytest.raises(EmulationDeadlock):
        kernel(out=out, grid=1, schedule=schedule)
    EmulatedKernel(_WARP_SCOPE)(out=out, grid=1)  # and the emulator still runs kernels afterwards


def test_with_the_barrier_both_schedules_agree():
    fixed = dict(_WARP_SCOPE, source=_WARP_SCOPE["source"].replace("  float v =", "  __syncthreads();\n  float v ="))
    kernel = EmulatedKernel(fixed)
    for schedule in ("forward", "reverse"):
        out = torch.zeros(32)
        kernel(out=out, grid=1, schedule=schedule)
        torch.testing.assert_close(out, torch.arange(32, dtype=torch.float32))


def _run_child(info: dict, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "k.json"
    path.write_text(json.dumps(info))
    code = textwrap.dedent(f"""
        import json, sys, torch
        sys.path.insert(0, {str(HERE.parents[1])!r})
        from tests.emulation.cuda_emu import EmulatedKernel
        EmulatedKernel(json.load(open({str(path)!r})))(out=torch.zeros(64), grid=1)
        print("RETURNED")
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("past", [0, 1])
def test_shared_memory_ends_at_the_declared_size(tmp_path, past, kind):
    """Thread 0 writes float index 12 + 4 * past of a 52-byte shared array (dynamic: the launch's size; static: a
    ``__shared__ float s[13]``), rounded to 64 bytes: inside it returns, one 16-byte row past it the process dies on
    the guard page."""
    decl = "extern __shared__ __align__(1024) float s[];" if kind == "dynamic" else "__shared__ float s[13];"
    info = _kernel(
        f"""  {decl}
  if (((int)threadIdx.x) == 0) s[{12 + 4 * past}] = 1.0f;
  out[((int)threadIdx.x)] = 0.0f;""",
        "float* __restrict__ out",
        smem=52 if kind == "dynamic" else 0,  # index 12 (bytes 48..51) is inside, index 16 (byte 64) faults
    )
    proc = _run_child(info, tmp_path)
    if past:
        assert proc.returncode != 0 and "RETURNED" not in proc.stdout, proc.stdout + proc.stderr[-2000:]
    else:
        assert proc.returncode == 0 and "RETURNED" in proc.stdout, proc.stderr[-2000:]


def test_shared_memory_starts_poisoned_in_every_block():
    info = _kernel(
        """  extern __shared__ __align__(1024) float s[];
  out[((int)blockIdx.x) * 64 + ((int)threadIdx.x)] = s[((int)threadIdx.x)];
  s[((int)threadIdx.x)] = 1.0f;""",
        "float* __restrict__ out",
        smem=256,
    )
    out = torch.zeros(3 * 64)
    EmulatedKernel(info)(out=out, grid=3)
    assert out.isnan().all()  # the previous block's writes are not visible to the next


_MATH = _kernel(
    """  int i = ((int)threadIdx.x);
  e2[i] = exp2f(x[i]);
  e[i] = expf(x[i]);
  lg[i] = __log2f(y[i]);
  rs[i] = rsqrtf(y[i]);
  dv[i] = __fdividef(x[i], y[i]);""",
    "float* __restrict__ dv, float* __restrict__ e, float* __restrict__ e2, float* __restrict__ lg, "
    "float* __restrict__ rs, const float* __restrict__ x, const float* __restrict__ y",
)


def _math(mode: str, x, y, ftz: bool = False) -> dict:
    outs = {k: torch.empty(64) for k in ("dv", "e", "e2", "lg", "rs")}
    EmulatedKernel(dict(_MATH, ftz=ftz), approx=mode)(x=x, y=y, **outs, grid=1)
    return outs


def _ulps(got, want) -> torch.Tensor:
    """Signed distance (positive: towards +inf) in float32 ulps from the correctly rounded value (normal values)."""
    w = want.float()
    return (got.view(torch.int32).long() - w.view(torch.int32).long()).double() * torch.sign(w).double()


def test_approximate_math_sits_at_its_bound_in_the_chosen_direction():
    x = torch.linspace(-20, 20, 64)
    y = torch.linspace(0.1, 300, 64)
    y[5] = 0.75  # inside lg2's absolute-error interval (0.5, 2)
    exact = _math("exact", x, y)
    x64, y64 = x.double(), y.double()
    assert torch.equal(exact["e2"], torch.exp2(x64).float())
    for mode, sign in (("up", 1), ("down", -1)):
        got = _math(mode, x, y)
        assert (_ulps(got["e2"], torch.exp2(x64)) == 2 * sign).all(), mode  # ex2.approx: 2 ulp
        assert (_ulps(got["e"], torch.exp(x64)) == 2 * sign).all(), mode
        assert (_ulps(got["dv"], x64 / y64) == 2 * sign).all(), mode  # __fdividef: 2 ulp
        rel = (got["rs"].double() * y64.sqrt() - 1) * sign  # rsqrt.approx: 2**-22.9 relative, up to rounding
        assert ((rel > 2**-22.9 - 2**-24) & (rel < 2**-22.9 + 2**-24)).all(), mode
        err = (got["lg"].double() - torch.log2(y64)) * sign
        inside = (y > 0.5) & (y < 2)
        assert (err[inside] > 2**-22 - 2**-24).all() and (err[inside] < 2**-22 + 2**-24).all(), mode
        rel_lg = err[~inside] / torch.log2(y64[~inside]).abs()
        assert (rel_lg > 2**-22 - 2**-23).all() and (rel_lg < 2**-22 + 2**-23).all(), mode


def test_flush_to_zero():
    """exp2f(-140) is subnormal (2**-140): kept without -ftz, flushed to zero with it; a subnormal input of
    __fdividef reads as zero."""
    x = torch.full((64,), -140.0)
    y = torch.ones(64)
    assert (_math("exact", x, y)["e2"] > 0).all()
    assert (_math("exact", x, y, ftz=True)["e2"] == 0).all()
    x = torch.full((64,), 2.0**-140)
    assert (_math("exact", x, y)["dv"] > 0).all()
    assert (_math("exact", x, y, ftz=True)["dv"] == 0).all()


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="approx"):
        EmulatedKernel(_WARP_SCOPE, approx="sideways")
    kernel = EmulatedKernel(_WARP_SCOPE)
    with pytest.raises(ValueError, match="schedule"):
        kernel(out=torch.zeros(32), grid=1, schedule="random")
    with pytest.raises(ValueError, match="block_order"):
        kernel(out=torch.zeros(32), grid=1, block_order="sideways")
    with pytest.raises(ValueError, match="launch size"):
        EmulatedKernel(dict(_WARP_SCOPE, smem_bytes=0))


# Thread block clusters: each block of a 4-block cluster stores its x in shared memory, then every block sums, over
# the cluster's ranks in order, the element of its own thread index from each rank's shared memory (distributed
# shared memory), between two cluster barriers (the second keeps every block's shared memory alive until its
# peers have read it).
_CLUSTER_BODY = """  extern __shared__ __align__(1024) float s[];
  s[((int)threadIdx.x)] = x[((int)blockIdx.x) * 64 + ((int)threadIdx.x)];
  tl::cluster_sync();
  float acc = 0.0f;
  for (int r = 0; r < 4; ++r) acc = acc + mhc_ld_shared_cluster_f32(&s[((int)threadIdx.x)], r);
  out[((int)blockIdx.x) * 64 + ((int)threadIdx.x)] = acc * (float)(tl::block_rank_in_cluster() + 1);
  tl::cluster_sync();"""


def _cluster_kernel(body: str) -> EmulatedKernel:
    info = _kernel(body, "float* __restrict__ out, const float* __restrict__ x", smem=256)
    return EmulatedKernel(dict(info, cluster=[4, 1, 1]))


def _cluster_run(
    kernel: EmulatedKernel, schedule: str, block_order: str = "forward"
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(8 * 64)  # two clusters of four blocks
    out = torch.zeros(8 * 64)
    kernel(out=out, x=x, grid=8, schedule=schedule, block_order=block_order)
    rank = torch.arange(8).repeat_interleave(64) % 4 + 1
    want = x.view(2, 4, 64).sum(1, keepdim=True).expand(2, 4, 64).reshape(-1) * rank
    return out, want


@pytest.mark.parametrize("schedule", ["forward", "reverse"])
def test_cluster_blocks_read_each_others_shared_memory(schedule):
    out, want = _cluster_run(_cluster_kernel(_CLUSTER_BODY), schedule, "reverse")
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize(
    "mutation",
    [
        ("  tl::cluster_sync();\n  float acc", "  float acc"),  # no barrier between the writes and the peers' reads
        ("  tl::cluster_sync();\n  float acc", "  __syncthreads();\n  float acc"),  # a block barrier only
        (
            "acc * (float)(tl::block_rank_in_cluster() + 1);\n  tl::cluster_sync();",
            "acc * (float)(tl::block_rank_in_cluster() + 1);",
        ),  # exits early
    ],
    ids=["no-barrier", "block-barrier", "no-final-barrier"],
)
def test_a_missing_cluster_barrier_is_caught(mutation):
    """Each planted bug poisons some output in at least one of the two schedules (a reader sees a peer's
    never-written, or already freed, shared memory: NaN)."""
    body = _CLUSTER_BODY.replace(*mutation)
    assert body != _CLUSTER_BODY
    kernel = _cluster_kernel(body)
    caught = [_cluster_run(kernel, schedule)[0].isnan().any().item() for schedule in ("forward", "reverse")]
    assert any(caught), caught


def test_cluster_launches_are_checked():
    kernel = _cluster_kernel(_CLUSTER_BODY)
    with pytest.raises(ValueError, match="multiple of the cluster size"):
        kernel(out=torch.zeros(6 * 64), x=torch.zeros(6 * 64), grid=6)
    with pytest.raises(ValueError, match="cluster"):
        EmulatedKernel(dict(_kernel(_CLUSTER_BODY, "float* __restrict__ out", smem=256), cluster=[16, 1, 1]))


def test_cluster_dims_come_from_tilelangs_host_code():
    """A TileLang program with ``cluster_dims``: the emulator reads the launch's cluster shape from the host code
    (TVM's launch arguments after the kernel's parameters), and the compiled kernel runs as the hand-written one."""
    pytest.importorskip("tilelang")
    import tilelang.language as T

    from tl_kernels import _common

    from .cuda_emu import kernel_sources

    prelude = (
        "__device__ __forceinline__ float mhc_ld_shared_cluster_f32(const float *p, int rank) {\n"
        "  unsigned a = (unsigned)__cvta_generic_to_shared(p), r; float v;\n"
        '  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));\n'
        '  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(r) : "memory");\n'
        "  return v;\n}\n"
    )

    @T.prim_func
    def summed(x: T.Tensor((8, 64), "float32"), out: T.Tensor((8, 64), "float32")):
        with T.Kernel(8, threads=64, cluster_dims=(4, 1, 1), prelude=prelude) as bx:
            s = T.alloc_shared((64,), "float32")
            tx = T.get_thread_binding()
            s[tx] = x[bx, tx]
            T.cluster_sync()
            acc = T.alloc_var("float32")
            acc = T.float32(0)
            for r in T.serial(4):
                acc = acc + T.call_extern("float32", "mhc_ld_shared_cluster_f32", T.address_of(s[tx]), r)
            out[bx, tx] = acc * T.cast(T.block_rank_in_cluster() + 1, "float32")
            T.cluster_sync()

    info = kernel_sources(_common.compile_program(summed))
    assert info["cluster"] == [4, 1, 1]
    kernel = EmulatedKernel(info)
    for schedule in ("forward", "reverse"):
        out, want = _cluster_run(kernel, schedule)
        torch.testing.assert_close(out, want)
