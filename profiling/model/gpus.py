"""The machine parameters of the performance model, with where each comes from.

Public numbers (NVIDIA):

* H100 SXM5: 132 SMs (NVIDIA H100 Tensor Core GPU Architecture whitepaper, 2022, Table "H100 SXM5"); 1980 MHz
  maximum SM clock (``nvidia-smi -q -d CLOCK``, "Max Clocks / SM", on H100 SXM5 and H200 SXM; the whitepaper
  left the boost clock "not finalized"); HBM3 3.35 TB/s (H100 datasheet).
* H200 SXM: the same GH100 die with 132 SMs and 1980 MHz; HBM3e 4.8 TB/s, 141 GB (H200 datasheet).
* Per SM (compute capability 9.0, CUDA C++ Programming Guide, "Compute Capabilities" table and the
  "Arithmetic Instructions" throughput table): 65536 registers, 2048 threads, 32 blocks, 228 KB shared memory
  (227 KB usable by one block, 1 KB reserved per block), 4 warp schedulers issuing one instruction each per cycle;
  per cycle and SM 128 FP32 FMA lanes, 64 INT32 lanes, 16 special-function (MUFU) lanes, 64 FP64 lanes; shared memory
  serves one 128-byte wavefront (32 banks x 4 bytes) per cycle.

Parameters that are not datasheet numbers (the model's assumptions, to be calibrated by a GPU run):

* ``copy_gbps``: the bandwidth a plain device-to-device copy reaches, the denominator of "% of copy bandwidth":
  the datasheet bandwidth times ``profiling.bytemodel.ACHIEVABLE`` (0.9, the byte model's assumed copy efficiency),
  3015 GB/s for H100 SXM and 4320 GB/s for H200. ``profiling.bench`` measures the real one on the GPU, and a GPU
  run's predictions use that (``predict(..., copy_gbps=)``).
* ``dram_latency_us``: loaded DRAM latency for Little's law: 0.7 us (about 1400 cycles). Microbenchmark studies of
  Hopper (Luo et al., "Benchmarking and Dissecting the Nvidia Hopper GPU Architecture", arXiv 2402.13499, 2024, and
  arXiv 2501.12084, 2025; Chips and Cheese, "Nvidia's H100: Funny L2, and Tons of Bandwidth", 2023) report unloaded
  global-memory latencies of several hundred cycles; under full load queueing adds to that. An assumption.
* ``mma_tf32_flop_per_clk``: ``mma.sync`` TF32 throughput per SM, assumed half the dense ``wgmma`` peak (1024 of
  2048 FLOP per cycle per SM): Luo et al. find that only ``wgmma`` reaches Hopper's tensor-core peak.
* ``dependent_cpi``: cycles between two dependent instructions of one warp: 4, the dependent FP32 FMA latency
  measured since Volta (Jia et al., "Dissecting the NVIDIA Volta GPU Architecture via Microbenchmarking", arXiv
  1804.06826, 2018); also used for the integer and uniform pipes. It is the result latency of those pipes in the
  lone-warp scoreboard, not a cost per instruction: independent instructions issue one per cycle.
* ``mufu_latency_cycles`` (18), ``smem_latency_cycles`` (30), ``mma_latency_cycles`` (32), ``fp64_latency_cycles``
  (8): cycles from issue until a dependent instruction can use the result of a MUFU op, a shared-memory load (also
  shuffles, constant and special-register reads), an ``mma.sync`` and an FP64 FMA, for the lone-warp scoreboard of
  :func:`profiling.model.bounds.warp_cycles`. Assumptions of the order the microbenchmark studies above report for
  Volta to Hopper (Jia et al. 2018; Luo et al. 2024, 2025: shared-memory loads a few tens of cycles, MUFU between
  the FP32 latency and the shared-memory latency), to be calibrated by a GPU run like the other assumptions.
* ``dsmem_latency_cycles`` (200): cycles from issue until a load from another block's shared memory (distributed
  shared memory, ``ld.shared::cluster``: a generic ``LD`` into the shared window in SASS) can be used. It crosses
  the GPC's SM-to-SM network, not the memory hierarchy (Luo et al. 2024 above measure that network); the model takes
  a value between its local shared-memory (30) and DRAM (1400) latencies. An assumption, to be calibrated.
* Thread block clusters: the cluster barrier (``UCGABAR_ARV``/``UCGABAR_WAIT``) and the ``MEMBAR.ALL.GPU`` that its
  default release semantics adds are issue slots only, as ``BAR.SYNC``: the waits for the cluster's other blocks
  and for the thread's outstanding memory operations are not modelled (a kernel places the arrive where its loads
  have been used). A cluster's blocks must be resident together on the SMs of one GPC; the model assumes that
  costs no resident slots. The whitepaper's full GH100 has 8 GPCs of 18 SMs and H100 SXM5 enables 132 of the 144,
  so a GPC holds at most 18: clusters of 8 blocks at one block an SM can leave SMs of a GPC idle
  (``cudaOccupancyMaxActiveClusters`` tells on the GPU). An assumption.
* ``launch_us``: the least time a kernel launch occupies the stream in eager PyTorch (host launch overhead and the
  gap between back-to-back kernels, a few microseconds; CUDA graphs shrink it). 2.5 us.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from profiling import bytemodel
from tl_kernels import _common

__all__ = ["GPU", "GPUS", "gpu"]


@dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    clock_hz: float
    copy_gbps: float
    nominal_gbps: float
    dram_latency_us: float = 0.7
    launch_us: float = 2.5
    dependent_cpi: float = 4.0
    mufu_latency_cycles: float = 18.0
    smem_latency_cycles: float = 30.0
    dsmem_latency_cycles: float = 200.0
    mma_latency_cycles: float = 32.0
    fp64_latency_cycles: float = 8.0
    schedulers: int = 4
    regs_per_sm: int = _common.REGS_PER_SM
    threads_per_sm: int = _common.THREADS_PER_SM
    blocks_per_sm: int = _common.BLOCKS_PER_SM
    smem_per_sm: int = _common.SMEM_PER_SM
    smem_reserved_per_block: int = 1024
    # warp instructions per cycle per SM, by pipe (lanes per cycle / 32)
    fma_rate: float = 4.0
    alu_rate: float = 2.0
    mufu_rate: float = 0.5
    lsu_rate: float = 1.0
    fp64_rate: float = 2.0
    mma_tf32_flop_per_clk: float = 1024.0
    smem_wavefronts_per_clk: float = 1.0

    def with_copy_bandwidth(self, gbps: float) -> GPU:
        return replace(self, copy_gbps=float(gbps))


GPUS: dict[str, GPU] = {
    name: GPU(
        name, sms=_common.H100_SMS, clock_hz=1.98e9, copy_gbps=nominal * bytemodel.ACHIEVABLE, nominal_gbps=nominal
    )
    for name, nominal in (("H100", bytemodel.NOMINAL_GBPS["H100 SXM"]), ("H200", bytemodel.NOMINAL_GBPS["H200"]))
}


def gpu(name: str, copy_gbps: float | None = None) -> GPU:
    """The parameters of ``"H100"`` or ``"H200"``, optionally with a measured copy bandwidth (GB/s)."""
    if name not in GPUS:
        raise ValueError(f"gpu must be one of {sorted(GPUS)}, got {name!r}")
    g = GPUS[name]
    return g if copy_gbps is None else g.with_copy_bandwidth(copy_gbps)


# ---------------------------------------------------------------------------------------------------- launch overhead


@dataclass(frozen=True)
class LaunchOverhead:
    """The per-launch overhead of a sequence of dependent kernels on one stream: what decides a site's latency at
    decode sizes (T <= 64), where each kernel's own work is a few microseconds or less. All three are ASSUMPTIONS
    (first-principles orders of magnitude, to be calibrated by a GPU run's decode measurements), not datasheet
    numbers:

    * ``host_us``: eager PyTorch, the CPU's cost to issue one launch (Python dispatch, the custom op, the driver's
      launch call); the stream cannot run kernels faster than this when the GPU work is shorter. The model's
      existing ``GPU.launch_us`` (2.5 us), so that eager records agree with :mod:`.bounds`.
    * ``graph_gap_us``: between two dependent kernels on one stream with the host out of the way (a CUDA graph):
      the first grid drains (its last block exits, its writes are made visible), the front end signals completion
      and dispatches the next grid's blocks, which load their parameters before the first instruction. 1.0 us: the
      order of magnitude NVIDIA's "Getting Started with CUDA Graphs" (technical blog, 2019) shows for the gap
      between short back-to-back kernels launched from a graph; not measured on Hopper.
    * ``pdl_gap_us``: the same gap when the second kernel is launched with programmatic dependent launch (its
      source calls ``cudaGridDependencySynchronize``, TileLang's ``T.pdl_sync``): its blocks are dispatched and run
      their prologue while the first kernel's tail runs (CUDA C++ Programming Guide, "Programmatic Dependent Launch
      and Synchronization", which gives no figure), leaving the dependency wait, the first kernel's memory flush.
      0.3 us, an assumption.

    The first load round of each kernel (the grid's fill) is already in each launch's ``t_latency``.
    """

    host_us: float = 2.5
    graph_gap_us: float = 1.0
    pdl_gap_us: float = 0.3


#: The assumed launch overheads (see :class:`LaunchOverhead`); ``host_us`` is ``GPU.launch_us``.
LAUNCH = LaunchOverhead(host_us=GPU.launch_us)
