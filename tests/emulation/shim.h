// CPU emulation shim for TileLang-generated CUDA kernels. Covers the constructs the post/res, Sinkhorn and pre-mapping
// kernels use; anything else fails to compile, loudly.
//
// Execution model (deterministic, adversarial for missing barriers):
// * one std::thread per CUDA thread, but exactly one of them runs at any time: a baton (one binary semaphore per
//   thread) passes at every synchronisation point. A thread runs until it blocks (at __syncthreads, or at a warp
//   collective: shuffle, mma, ldmatrix) or exits; the next thread to run is the runnable one with the lowest thread
//   index (schedule 0, "forward") or the highest (schedule 1, "reverse"). So between two __syncthreads warp 0 runs
//   its whole phase before warp 1 starts (forward), or warp 3 before warp 2 (reverse): a read of another warp's
//   shared-memory data that a deleted barrier no longer orders sees the value from before the phase, in one of the
//   two schedules, every time.
// * warp collectives synchronise only the 32 threads of their warp (the last lane to arrive computes the results of
//   all 32); only __syncthreads orders shared memory between warps.
// * thread block clusters: the blocks of one cluster run together (the baton passes among all their threads, lower
//   block rank first in the forward schedule), each with its own shared memory, __syncthreads and warps;
//   barrier.cluster.arrive/wait (tl::cluster_*) waits for every thread of the cluster, mapa + ld.shared::cluster
//   (mhc_ld_shared_cluster_f32) reads the same offset of another block's shared memory, and a block's shared memory
//   is poisoned again when its last thread exits (a peer reading it without a final cluster barrier gets NaN).
// * shared memory: each block gets a fresh allocation of exactly the declared dynamic size (the launch's), filled
//   with 0xFF bytes (NaN in every float format, -1 as an integer) and ending at a PROT_NONE page (under ASan: an
//   exact-size heap block, whose redzones catch both ends), so a read of a never-written byte is poisoned and an
//   access past the declared size faults.
// * approximate math (MHC_EMU_APPROX = +1 or -1): exp2f/expf/rsqrtf/__fdividef/__log2f return the correctly rounded
//   value moved by the PTX ISA's / CUDA's documented worst-case error, all in the chosen direction; 0 = exact libm.
//   MHC_EMU_FTZ = 1 (a kernel compiled with -ftz=true) flushes subnormal inputs and results of all fp32 arithmetic
//   (x86 MXCSR FTZ|DAZ) and of the approximations.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <semaphore>
#include <thread>
#include <vector>
#include <sys/mman.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif
#ifndef MHC_EMU_APPROX
#define MHC_EMU_APPROX 0
#endif
#ifndef MHC_EMU_FTZ
#define MHC_EMU_FTZ 0
#endif

struct dim3_ { unsigned x = 0, y = 0, z = 0; };
inline thread_local dim3_ threadIdx, blockIdx;

// ---------------------------------------------------------------------------------------------------------------
// The baton scheduler. A launch runs one cluster at a time (a cluster of one block without cluster dims): the
// blocks of a cluster run together, each with its own shared memory, __syncthreads and warps; the baton passes
// among all the cluster's threads, lowest global thread index (rank * threads + threadIdx.x) first ("forward") or
// highest first ("reverse"), so block rank 0 runs its whole phase before rank 1 starts (or the reverse).
namespace emu {
enum State : char { kRunnable, kBlocked, kDone };
struct Block {  // the running group of threads: one cluster of `ranks` blocks of `threads` threads
  int threads = 0, ranks = 1, schedule = 0;
  std::vector<std::unique_ptr<std::binary_semaphore>> go;
  std::vector<State> state;
  std::binary_semaphore finished{0};
  bool deadlock = false;
};
inline Block *g_block = nullptr;
inline thread_local int t_rank = 0;  // the running thread's block rank in its cluster (%cluster_ctarank)
inline thread_local int t_gtid = 0;  // its index among the cluster's threads: t_rank * threads + threadIdx.x
constexpr int kMaxThreads = 8 * 1024;  // a portable cluster of 8 blocks of 1024 threads

inline int pick_next() {
  Block &b = *g_block;
  int total = b.threads * b.ranks;
  if (b.schedule == 0) {
    for (int t = 0; t < total; ++t)
      if (b.state[t] == kRunnable) return t;
  } else {
    for (int t = total - 1; t >= 0; --t)
      if (b.state[t] == kRunnable) return t;
  }
  return -1;
}
// Thrown in every thread still inside the kernel once a deadlock is found, caught where the thread starts: the launch
// then reports the deadlock (cuda_emu.EmulationDeadlock) instead of hanging or aborting the process.
struct Cancelled {};
inline bool g_deadlocked = false;  // set by a cluster that deadlocked; read and reset by the launch
// The running thread (tid) gives the baton to the next runnable thread and, unless that is itself, waits for it back.
inline void pass_baton(int tid) {
  Block &b = *g_block;
  int next = pick_next();
  if (next < 0) {
    bool all_done = true;
    for (State s : b.state) all_done &= s == kDone;
    if (all_done) {
      b.finished.release();
      return;
    }
    // threads wait at a barrier that the others will never reach (a GPU hangs): wake them all to be cancelled
    if (!b.deadlock)
      std::fprintf(stderr, "cuda_emu: deadlock: threads blocked at a barrier that not all threads reach\n");
    b.deadlock = true;
    for (State &s : b.state)
      if (s == kBlocked) s = kRunnable;
    next = pick_next();
  }
  if (next != tid) {
    b.go[next]->release();
    if (b.state[tid] != kDone) b.go[tid]->acquire();
  }
  if (b.deadlock && b.state[tid] != kDone) throw Cancelled{};
}
// A barrier of `expected` threads; the last to arrive runs `complete` (the collective's work) and wakes the others.
struct Barrier {
  int expected = 0, arrived = 0;
  std::vector<int> waiting;
  template <class F> void arrive(F &&complete) {
    int tid = t_gtid;
    if (++arrived == expected) {
      complete();
      for (int w : waiting) g_block->state[w] = kRunnable;
      waiting.clear();
      arrived = 0;
    } else {
      waiting.push_back(tid);
      g_block->state[tid] = kBlocked;
    }
    pass_baton(tid);
  }
  void arrive() { arrive([] {}); }
};
// The cluster barrier, split as barrier.cluster.arrive / barrier.cluster.wait, as a counting barrier: each thread
// counts its arrives, and a wait returns once every thread of the cluster has arrived at least as often as the
// caller. With arrive and wait alternating in every thread (as PTX requires) these are the hardware's phases; a
// kernel that breaks the alternation (a deleted wait or arrive) still gets a defined schedule here: a missing wait
// leaves its reads unordered (they see the peers' poison or stale data), a missing arrive holds the peers' waits
// until the thread exits (or deadlocks, reported).
struct ClusterBarrier {
  std::vector<long> arrivals;  // per thread of the cluster
  std::vector<int> waiting;
  std::vector<long> want;  // per waiting thread: the arrivals it waits for
  bool complete(long k) const {
    for (long a : arrivals)
      if (a < k) return false;
    return true;
  }
  void arrive() {
    ++arrivals[t_gtid];
    release();
  }
  // An exited thread no longer holds the cluster back (PTX: the wait is for "all non-exited threads").
  void exit() {
    arrivals[t_gtid] = std::numeric_limits<long>::max();
    release();
  }
  void release() {
    for (size_t i = 0; i < waiting.size();) {
      if (complete(want[i])) {
        g_block->state[waiting[i]] = kRunnable;
        waiting.erase(waiting.begin() + i);
        want.erase(want.begin() + i);
      } else {
        ++i;
      }
    }
  }
  void wait() {
    int tid = t_gtid;
    if (!complete(arrivals[tid])) {
      waiting.push_back(tid);
      want.push_back(arrivals[tid]);
      g_block->state[tid] = kBlocked;
    }
    pass_baton(tid);
  }
};
inline std::vector<Barrier> g_block_bars;  // __syncthreads of each block of the cluster
inline std::vector<Barrier> g_warp_bar;    // every warp of the cluster: rank * warps_per_block + warp
inline ClusterBarrier g_cluster_bar;
inline int g_warps_per_block = 0;
inline Barrier &warp_barrier() { return g_warp_bar[t_rank * g_warps_per_block + threadIdx.x / 32]; }

// Shared memory: exact-size, poisoned (0xFF: NaN in every float format), guarded allocations.
struct Guarded {
  unsigned char *ptr = nullptr, *map = nullptr;
  size_t map_bytes = 0, bytes = 0;
};
inline Guarded guarded_alloc(size_t bytes) {
  Guarded g;
  g.bytes = bytes;
#if defined(__SANITIZE_ADDRESS__)
  g.ptr = static_cast<unsigned char *>(std::malloc(bytes ? bytes : 1));  // ASan's redzones guard both ends
  std::memset(g.ptr, 0xFF, bytes);
#else
  size_t page = (size_t)sysconf(_SC_PAGESIZE), body = (bytes + page - 1) / page * page;
  g.map_bytes = body + page;
  void *p = mmap(nullptr, g.map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) std::abort();
  g.map = static_cast<unsigned char *>(p);
  mprotect(g.map + body, page, PROT_NONE);  // the first byte past the (16-byte rounded) size faults
  size_t rounded = (bytes + 15) / 16 * 16;
  g.ptr = g.map + body - rounded;
  std::memset(g.ptr, 0xFF, rounded);
#endif
  return g;
}
inline void guarded_free(Guarded &g) {
#if defined(__SANITIZE_ADDRESS__)
  std::free(g.ptr);
#else
  if (g.map) munmap(g.map, g.map_bytes);
#endif
  g = Guarded{};
}
inline void guarded_poison(Guarded &g) {
  if (g.ptr) std::memset(g.ptr, 0xFF, g.bytes);
}
// Per block rank of the running cluster: its dynamic shared memory and its static __shared__ arrays (slot = the
// declaration's index in the source; only one thread runs at a time, so the first to reach a declaration
// allocates it).
inline std::vector<Guarded> g_dyn_smem;
inline std::vector<std::vector<Guarded>> g_static_smem;
inline thread_local unsigned char *g_smem = nullptr;  // the dynamic shared memory of the running thread's block
inline void *static_shared(int slot, size_t bytes) {
  std::vector<Guarded> &mine = g_static_smem[t_rank];
  if ((int)mine.size() <= slot) mine.resize(slot + 1);
  if (!mine[slot].ptr) mine[slot] = guarded_alloc(bytes);
  return mine[slot].ptr;
}
// Distributed shared memory (mapa.shared::cluster): the address in block `rank`'s shared memory that corresponds
// to `p` in the caller's. A rank outside the cluster or an address outside the caller's shared memory aborts (a GPU
// faults); so does an access that would run past the end of the target allocation.
inline void *map_shared(const void *p, int rank, size_t access_bytes) {
  Block &b = *g_block;
  if (rank < 0 || rank >= b.ranks) {
    std::fprintf(stderr, "cuda_emu: mapa.shared::cluster to rank %d of a cluster of %d blocks\n", rank, b.ranks);
    std::fflush(stderr);
    std::abort();
  }
  auto c = static_cast<const unsigned char *>(p);
  auto in = [&](const Guarded &g) { return g.ptr && c >= g.ptr && c + access_bytes <= g.ptr + g.bytes; };
  if (in(g_dyn_smem[t_rank])) return g_dyn_smem[rank].ptr + (c - g_dyn_smem[t_rank].ptr);
  std::vector<Guarded> &mine = g_static_smem[t_rank], &theirs = g_static_smem[rank];
  for (size_t s = 0; s < mine.size(); ++s)
    if (in(mine[s])) {
      if (theirs.size() <= s || !theirs[s].ptr) {  // that block has not reached the declaration: nothing there yet
        if (theirs.size() <= s) theirs.resize(s + 1);
        theirs[s] = guarded_alloc(mine[s].bytes);
      }
      return theirs[s].ptr + (c - mine[s].ptr);
    }
  std::fprintf(stderr, "cuda_emu: a distributed shared memory access outside the caller's shared memory\n");
  std::fflush(stderr);
  std::abort();
}

// Runs one cluster of `ranks` blocks (cluster rank r = block (bx0 + r, by)) of `threads` threads; `body` is the
// kernel call. When every thread of a block has exited, its shared memory is poisoned again: a block of the cluster
// that still reads it (no cluster barrier before the owner's exit) gets NaN.
template <class F>
void run_cluster(int threads, int ranks, int schedule, size_t smem_bytes, unsigned bx0, unsigned by, F body) {
  Block b;
  b.threads = threads;
  b.ranks = ranks;
  b.schedule = schedule;
  int total = threads * ranks;
  if (total > kMaxThreads) {
    std::fprintf(stderr, "cuda_emu: a cluster of %d threads (at most %d)\n", total, kMaxThreads);
    std::abort();
  }
  for (int t = 0; t < total; ++t) b.go.emplace_back(new std::binary_semaphore(0));
  b.state.assign(total, kRunnable);
  g_block = &b;
  g_block_bars.assign(ranks, Barrier{threads});
  g_warps_per_block = (threads + 31) / 32;
  g_warp_bar.assign(g_warps_per_block * ranks, Barrier{});
  for (int r = 0; r < ranks; ++r)
    for (int w = 0; w * 32 < threads; ++w) g_warp_bar[r * g_warps_per_block + w].expected = std::min(32, threads - 32 * w);
  g_cluster_bar = ClusterBarrier{};
  g_cluster_bar.arrivals.assign(total, 0);
  g_dyn_smem.clear();
  for (int r = 0; r < ranks; ++r) g_dyn_smem.push_back(guarded_alloc(smem_bytes));
  g_static_smem.assign(ranks, {});
  std::vector<int> exited(ranks, 0);
  std::vector<std::thread> ts;
  for (int t = 0; t < total; ++t)
    ts.emplace_back([&, t] {
      b.go[t]->acquire();
#if MHC_EMU_FTZ && (defined(__x86_64__) || defined(__i386__))
      _mm_setcsr(_mm_getcsr() | 0x8040);  // FTZ | DAZ
#endif
      int r = t / threads;
      t_rank = r;
      t_gtid = t;
      threadIdx.x = t % threads;
      blockIdx.x = bx0 + r;
      blockIdx.y = by;
      g_smem = g_dyn_smem[r].ptr;
      try {
        body();
      } catch (const Cancelled &) {  // a deadlock: this thread leaves the kernel where it waited
      }
      g_cluster_bar.exit();
      if (++exited[r] == threads) {  // the block has exited: its shared memory is gone
        guarded_poison(g_dyn_smem[r]);
        for (Guarded &g : g_static_smem[r]) guarded_poison(g);
      }
      b.state[t] = kDone;
      pass_baton(t);
    });
  b.go[pick_next()]->release();
  b.finished.acquire();
  for (auto &th : ts) th.join();
  g_deadlocked |= b.deadlock;
  for (Guarded &g : g_dyn_smem) guarded_free(g);
  g_dyn_smem.clear();
  for (auto &v : g_static_smem)
    for (Guarded &g : v) guarded_free(g);
  g_static_smem.clear();
  g_block = nullptr;
}
template <class F> void run_block(int threads, int schedule, size_t smem_bytes, unsigned bx, unsigned by, F body) {
  run_cluster(threads, 1, schedule, smem_bytes, bx, by, body);
}
}  // namespace emu

#define __global__
#define __launch_bounds__(...)
#define __restrict__
#define __align__(x)
typedef unsigned char uchar;
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
// Programmatic dependent launch (griddepcontrol.wait / launch_dependents): one kernel runs at a time here, so the
// predecessor grid has always completed; both are no-ops, as on a GPU for a grid not launched as a dependent.
inline void cudaGridDependencySynchronize() {}
inline void cudaTriggerProgrammaticLaunchCompletion() {}
// TileLang's AtomicAddRet (tl_templates/cuda/atomic.h) on an int: the blocks of a launch run one after another, the
// threads of a block one at a time, so a plain read-modify-write is atomic; the old value is returned.
template <typename T1, typename T2>
inline T1 AtomicAddRet(T1 *address, T2 value, int memory_order = 0) {
  T1 old = *address;
  *address = old + (T1)value;
  return old;
}
inline float max(float a, float b) { return fmaxf(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline void __syncthreads() { emu::g_block_bars[emu::t_rank].arrive(); }
// Thread block clusters (TileLang's tl_templates/cuda/cluster.h): barrier.cluster.arrive/wait over every thread of
// the cluster (the relaxed arrive orders no memory on a GPU; here every access is sequential, so it is the same),
// %cluster_ctarank, and the distributed shared memory load of tl_kernels (mhc_ld_shared_cluster_f32: mapa +
// ld.shared::cluster.f32 in the kernel's prelude).
namespace tl {
inline void cluster_arrive() { emu::g_cluster_bar.arrive(); }
inline void cluster_arrive_relaxed() { emu::g_cluster_bar.arrive(); }
inline void cluster_wait() { emu::g_cluster_bar.wait(); }
inline void cluster_sync() {
  emu::g_cluster_bar.arrive();
  emu::g_cluster_bar.wait();
}
inline int block_rank_in_cluster() { return emu::t_rank; }
}  // namespace tl
inline float mhc_ld_shared_cluster_f32(const float *p, int rank) {
  return *static_cast<const float *>(emu::map_shared(p, rank, sizeof(float)));
}
typedef unsigned int uint;
struct uint2 { uint32_t x, y; };
struct int2 { int x, y; };  // index pairs of vectorized gathers
struct uint4 { uint32_t x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };

// ---------------------------------------------------------------------------------------------------------------
// Approximate math at the documented worst-case error.
namespace emu {
inline float ftz(float x) {
#if MHC_EMU_FTZ
  if (std::fpclassify(x) == FP_SUBNORMAL) return std::copysign(0.0f, x);
#endif
  return x;
}
// The correctly rounded float of `exact`, moved `ulps` ulps in the mode's direction (up: towards +inf).
inline float ulp_bound(double exact, int ulps) {
  float r = ftz((float)exact);
  if (MHC_EMU_APPROX == 0 || !std::isfinite(r)) return r;
  for (int i = 0; i < ulps; ++i) r = std::nextafter(r, MHC_EMU_APPROX > 0 ? INFINITY : -INFINITY);
  return ftz(r);
}
// exact moved by rel * |exact| in the mode's direction, rounded to float
inline float rel_bound(double exact, double rel) {
  return ftz((float)(exact + MHC_EMU_APPROX * rel * std::fabs(exact)));
}
}  // namespace emu
// ex2.approx.f32 (exp2f without --use_fast_math compiles to it): "maximum ulp error is 2 ulp from correctly rounded
// result across the full range of inputs" (PTX ISA 9.1, 9.7.3.21).
inline float emu_exp2f(float x) { return emu::ulp_bound(std::exp2((double)emu::ftz(x)), 2); }
// expf: CUDA Math API, single precision: maximum 2 ulp.
inline float emu_expf(float x) { return emu::ulp_bound(std::exp((double)emu::ftz(x)), 2); }
// lg2.approx.f32: "maximum absolute error is 2^-22 when the input operand is in the range (0.5, 2). For positive
// finite inputs outside of this interval, maximum relative error is 2^-22" (PTX ISA 9.1, 9.7.3.20).
inline float emu_log2f(float x) {
  x = emu::ftz(x);
  double e = std::log2((double)x);
  if (!(x > 0.5f && x < 2.0f) || MHC_EMU_APPROX == 0) return emu::rel_bound(e, std::ldexp(1.0, -22));
  return emu::ftz((float)(e + MHC_EMU_APPROX * std::ldexp(1.0, -22)));
}
// rsqrt.approx.f32: "maximum relative error ... over the entire positive finite floating-point range is 2^-22.9"
// (PTX ISA 9.1, 9.7.3.16); rsqrtf is 2 ulp in the CUDA Math API, a tighter bound: the ISA's is used.
inline float emu_rsqrtf(float x) { return emu::rel_bound(1.0 / std::sqrt((double)emu::ftz(x)), std::exp2(-22.9)); }
// __fdividef(x, y): CUDA Math API intrinsics: maximum 2 ulp for 2^-126 <= |y| <= 2^126; 0 for 2^126 < |y| < 2^128.
inline float __fdividef(float x, float y) {
  x = emu::ftz(x);
  y = emu::ftz(y);
  float ay = std::fabs(y);
  if (ay > 0x1p126f && std::isfinite(ay)) return std::isfinite(x) ? std::copysign(0.0f, x / y) : NAN;
  return emu::ulp_bound((double)x / (double)y, 2);
}
#define exp2f emu_exp2f
#define expf emu_expf
#define __log2f emu_log2f
#define rsqrtf emu_rsqrtf

struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  explicit bfloat16_t(float f) {
    uint32_t u; std::memcpy(&u, &f, 4);
    if (std::isnan(f)) { bits = 0x7fc0; return; }
    uint32_t lsb = (u >> 16) & 1u; u += 0x7fffu + lsb; bits = (uint16_t)(u >> 16);
  }
  operator float() const { uint32_t u = (uint32_t)bits << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
struct half_t {
  _Float16 v;
  half_t() = default;
  explicit half_t(float f) : v((_Float16)f) {}
  operator float() const { return (float)v; }
};
struct __nv_bfloat162 { bfloat16_t x, y; };
struct half2 { half_t x, y; };
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return {bfloat16_t(f.x), bfloat16_t(f.y)}; }
inline half2 __float22half2_rn(float2 f) { return {half_t(f.x), half_t(f.y)}; }
inline uint32_t __pack_nv_bfloat162(bfloat16_t a, bfloat16_t b) { return (uint32_t)a.bits | ((uint32_t)b.bits << 16); }
inline uint32_t __pack_half2(half_t a, half_t b) {
  uint16_t x, y; std::memcpy(&x, &a.v, 2); std::memcpy(&y, &b.v, 2); return (uint32_t)x | ((uint32_t)y << 16);
}
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct uint1 { uint32_t x; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint2 make_uint2(uint32_t x, uint32_t y) { return {x, y}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {(float)v.x, (float)v.y}; }
inline float2 __half22float2(half2 v) { return {(float)v.x, (float)v.y}; }

// ---------------------------------------------------------------------------------------------------------------
// Warp collectives: every lane of the warp must arrive (full mask); the last one computes all lanes' results.
namespace emu {
inline uint64_t g_shfl_in[kMaxThreads], g_shfl_out[kMaxThreads];
inline int g_shfl_src[kMaxThreads];
template <class T> T shuffle(T v, int src_lane, int width) {
  static_assert(sizeof(T) <= 8, "shim: shuffle of a value wider than 64 bits");
  int tid = t_gtid, lane = threadIdx.x & 31, base = tid - lane;
  int seg = lane & ~(width - 1);
  if (src_lane < seg || src_lane >= seg + width) src_lane = lane;  // outside the caller's segment: its own value
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  g_shfl_in[tid] = bits;
  g_shfl_src[tid] = src_lane;
  Barrier &bar = warp_barrier();
  bar.arrive([&] {
    for (int l = 0; l < bar.expected; ++l) g_shfl_out[base + l] = g_shfl_in[base + g_shfl_src[base + l]];
  });
  T r;
  std::memcpy(&r, &g_shfl_out[tid], sizeof(T));
  return r;
}
}  // namespace emu
template <class T> inline T __shfl_xor_sync(unsigned, T v, int m, int w = 32) {
  return emu::shuffle(v, (int)(threadIdx.x & 31) ^ m, w);
}
template <class T> inline T __shfl_sync(unsigned, T v, int src, int w = 32) {
  int lane = threadIdx.x & 31;
  return emu::shuffle(v, (lane & ~(w - 1)) + (src & (w - 1)), w);
}
template <class T> inline T __shfl_down_sync(unsigned, T v, unsigned d, int w = 32) {
  return emu::shuffle(v, (int)(threadIdx.x & 31) + (int)d, w);
}
template <class T> inline T __shfl_up_sync(unsigned, T v, unsigned d, int w = 32) {
  return emu::shuffle(v, (int)(threadIdx.x & 31) - (int)d, w);
}

namespace tl {
inline void store_global_128(void *p, uint4 v) { std::memcpy(p, &v, 16); }

// Warp-collective tensor-core and ldmatrix instructions, emulated with the fragment layouts of the PTX ISA.
enum class DataType { kInt4, kUInt4, kInt8, kUInt8, kInt16, kInt32, kFloat16, kBFloat16, kTensorFloat32, kFloat32,
                      kFloat64, kFloat8_e4m3, kFloat8_e5m2 };
inline uint32_t g_frag[emu::kMaxThreads][4];
inline uint32_t g_frag_b[emu::kMaxThreads][2];
inline float g_acc[emu::kMaxThreads][4];
inline uint32_t g_ld_out[emu::kMaxThreads][4];
inline const char *g_rows[emu::kMaxThreads];
inline float tf32_operand(uint32_t bits) {  // mma .tf32 reads the top 19 bits of each operand
  bits &= 0xFFFFE000u; float f; std::memcpy(&f, &bits, 4); return f;
}
// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (PTX ISA, "Matrix fragments for mma.m16n8k8", .tf32):
// A 16x8: a{0,1,2,3} = (g, q), (g + 8, q), (g, q + 4), (g + 8, q + 4); B 8x8: b{0,1} = (q, g), (q + 4, g);
// C 16x8: c{0,1,2,3} = (g, 2q), (g, 2q + 1), (g + 8, 2q), (g + 8, 2q + 1); g = lane / 4, q = lane % 4.
template <DataType A, DataType B, DataType C, int M, int N, int K, bool TransA, bool TransB, bool Saturate = false>
inline void mma_sync(float *c, const unsigned *a, const unsigned *b) {
  static_assert(A == DataType::kTensorFloat32 && B == DataType::kTensorFloat32 && C == DataType::kFloat32 &&
                M == 16 && N == 8 && K == 8 && !TransA && TransB, "shim: only the TF32 m16n8k8 row.col mma");
  int tid = emu::t_gtid, base = tid - (threadIdx.x & 31);
  for (int i = 0; i < 4; ++i) g_frag[tid][i] = a[i];
  for (int i = 0; i < 2; ++i) g_frag_b[tid][i] = b[i];
  for (int i = 0; i < 4; ++i) g_acc[tid][i] = c[i];
  emu::warp_barrier().arrive([base] {
    auto at = [&](int r, int k) { return tf32_operand(g_frag[base + (r & 7) * 4 + (k & 3)][(r >> 3) + 2 * (k >> 2)]); };
    auto bt = [&](int k, int n) { return tf32_operand(g_frag_b[base + n * 4 + (k & 3)][k >> 2]); };
    for (int lane = 0; lane < 32; ++lane) {
      int g = lane >> 2, q = lane & 3;
      const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * q, 2 * q + 1, 2 * q, 2 * q + 1};
      for (int i = 0; i < 4; ++i) {
        float acc = g_acc[base + lane][i];
        for (int k = 0; k < 8; ++k) acc += at(rows[i], k) * bt(k, cols[i]);
        g_acc[base + lane][i] = acc;
      }
    }
  });
  for (int i = 0; i < 4; ++i) c[i] = g_acc[tid][i];
}
// ldmatrix.sync.aligned.x4.m8n8.shared.b16: lane t gives the address of row t % 8 of matrix t / 8 (16 bytes);
// register i of lane t receives 32-bit word t % 4 of row t / 4 of matrix i.
inline void ptx_ldmatrix_x4(const void *smem, void *local) {
  int tid = emu::t_gtid, base = tid - (threadIdx.x & 31);
  g_rows[tid] = static_cast<const char *>(smem);
  emu::warp_barrier().arrive([base] {
    for (int lane = 0; lane < 32; ++lane)
      for (int i = 0; i < 4; ++i)
        std::memcpy(&g_ld_out[base + lane][i], g_rows[base + i * 8 + lane / 4] + 4 * (lane % 4), 4);
  });
  std::memcpy(local, g_ld_out[tid], 16);
}
struct SumOp { template <typename T> T operator()(T const &x, T const &y) const { return x + y; } };
struct MaxOp { template <typename T> T operator()(T const &x, T const &y) const { return x > y ? x : y; } };
struct SyncThreadsBarrier {};
template <int all_threads> struct NamedBarrier {};
// XOR butterfly within a warp (offsets threads/2 .. scale), as TileLang's AllReduce for widths up to 32 lanes.
template <class Reducer, int threads, int scale, int thread_offset = 0, class Barrier = SyncThreadsBarrier,
          int batch_size = 1, int workspace_stride = 0>
struct AllReduce {
  static_assert(threads <= 32, "shim: AllReduce across warps is not emulated");
  template <typename T> static T run(T x, T * = nullptr) {
    for (int offset = threads / 2; offset >= scale; offset /= 2) x = Reducer()(x, __shfl_xor_sync(~0u, x, offset, 32));
    return x;
  }
};
}  // namespace tl
