// CPU emulation shim for TileLang-generated CUDA kernels (one std::thread per CUDA thread, one block at a time).
// Covers the constructs the post/res and Sinkhorn kernels use; anything else fails to compile, loudly.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
struct dim3_ { unsigned x = 0, y = 0, z = 0; };
inline thread_local dim3_ threadIdx, blockIdx;
inline std::barrier<> *g_bar = nullptr;
inline float g_slots[1024];
alignas(1024) inline unsigned char red_storage[1 << 18];  // dynamic shared memory of the running block
#define __global__
#define __launch_bounds__(...)
#define __restrict__
#define __align__(x)
#define __log2f log2f
typedef unsigned char uchar;
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
#define __syncthreads() g_bar->arrive_and_wait()
typedef unsigned int uint;
struct uint2 { uint32_t x, y; };
struct uint4 { uint32_t x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
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
inline float __shfl_xor_sync(unsigned, float v, int m, int w) {
  int tid = threadIdx.x;
  g_slots[tid] = v;
  g_bar->arrive_and_wait();
  int base = tid & ~(w - 1);
  float r = g_slots[base + ((tid - base) ^ m)];
  g_bar->arrive_and_wait();
  return r;
}
namespace tl {
inline void store_global_128(void *p, uint4 v) { std::memcpy(p, &v, 16); }
}
