// CPU emulation shim for TileLang-generated CUDA kernels (one std::thread per CUDA thread, one block at a time).
// Covers the constructs the post/res, Sinkhorn and pre-mapping finalisation kernels use; anything else fails to compile, loudly.
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
inline uint32_t __pack_nv_bfloat162(bfloat16_t a, bfloat16_t b) { return (uint32_t)a.bits | ((uint32_t)b.bits << 16); }
inline uint32_t __pack_half2(half_t a, half_t b) {
  uint16_t x, y; std::memcpy(&x, &a.v, 2); std::memcpy(&y, &b.v, 2); return (uint32_t)x | ((uint32_t)y << 16);
}
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __shfl_xor_sync(unsigned, float v, int m, int w) {
  int tid = threadIdx.x;
  g_slots[tid] = v;
  g_bar->arrive_and_wait();
  int base = tid & ~(w - 1);
  float r = g_slots[base + ((tid - base) ^ m)];
  g_bar->arrive_and_wait();
  return r;
}
struct uint1 { uint32_t x; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint2 make_uint2(uint32_t x, uint32_t y) { return {x, y}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {(float)v.x, (float)v.y}; }
inline float2 __half22float2(half2 v) { return {(float)v.x, (float)v.y}; }
namespace tl {
inline void store_global_128(void *p, uint4 v) { std::memcpy(p, &v, 16); }

// Warp-collective tensor-core and ldmatrix instructions, emulated with the fragment layouts of the PTX ISA. Every
// thread of the block must reach them together (true for T.gemm: uniform control flow); lanes exchange their
// fragments through per-thread slots between two block barriers, as __shfl_xor_sync does above.
enum class DataType { kInt4, kUInt4, kInt8, kUInt8, kInt16, kInt32, kFloat16, kBFloat16, kTensorFloat32, kFloat32,
                      kFloat64, kFloat8_e4m3, kFloat8_e5m2 };
inline uint32_t g_frag[1024][4];
inline uint32_t g_frag_b[1024][2];
inline const char *g_rows[1024];
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
  int tid = threadIdx.x, lane = tid & 31, base = tid - lane, g = lane >> 2, q = lane & 3;
  for (int i = 0; i < 4; ++i) g_frag[tid][i] = a[i];
  for (int i = 0; i < 2; ++i) g_frag_b[tid][i] = b[i];
  g_bar->arrive_and_wait();
  auto at = [&](int r, int k) { return tf32_operand(g_frag[base + (r & 7) * 4 + (k & 3)][(r >> 3) + 2 * (k >> 2)]); };
  auto bt = [&](int k, int n) { return tf32_operand(g_frag_b[base + n * 4 + (k & 3)][k >> 2]); };
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * q, 2 * q + 1, 2 * q, 2 * q + 1};
  float out[4];
  for (int i = 0; i < 4; ++i) {
    float acc = c[i];
    for (int k = 0; k < 8; ++k) acc += at(rows[i], k) * bt(k, cols[i]);
    out[i] = acc;
  }
  g_bar->arrive_and_wait();
  for (int i = 0; i < 4; ++i) c[i] = out[i];
}
// ldmatrix.sync.aligned.x4.m8n8.shared.b16: lane t gives the address of row t % 8 of matrix t / 8 (16 bytes);
// register i of lane t receives 32-bit word t % 4 of row t / 4 of matrix i.
inline void ptx_ldmatrix_x4(const void *smem, void *local) {
  int tid = threadIdx.x, lane = tid & 31, base = tid - lane;
  g_rows[tid] = static_cast<const char *>(smem);
  g_bar->arrive_and_wait();
  uint32_t v[4];
  for (int i = 0; i < 4; ++i) std::memcpy(&v[i], g_rows[base + i * 8 + lane / 4] + 4 * (lane % 4), 4);
  g_bar->arrive_and_wait();
  std::memcpy(local, v, 16);
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
}
