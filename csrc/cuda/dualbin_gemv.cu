// dualbin GEMV (decode, 1..8 activation rows) and dequantize kernels. See dualbin.cuh.
//
// GEMV work split: one warp per output row; 4 warps (4 rows) per 128-thread block.
//
//   row n, groups of 64 along k:     | g0 | g1 | ... | g31 | g32 | ...
//   step 1 (coalesced):  lane l loads plane1/plane2 uint64 + alpha1/alpha2 of group g0 + l
//   step 2, for gi = 0..31 (groups g0 + gi):
//        bits / alphas of group gi are broadcast from lane gi with __shfl_sync;
//        lane l owns elements 2l, 2l+1 of the group: x loads are coalesced across the warp
//        s1 = x[2l]*bit(2l) + x[2l+1]*bit(2l+1) (plane 1), s2 likewise (plane 2)
//        acc[r] += a1 * s1 + a2 * s2      for each activation row r < m
//   end: warp-reduce acc[r] -> y[r, n] (+ bias), rounded once to the output dtype
//
// The weight (2.5 bits/weight) is read once per warp; x rows (m * k values) are re-read by
// every row's warp and are served from L2/L1, as in any GEMV.
#include "cuda/dualbin.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace quantkit {
namespace cuda_dualbin {
namespace {

constexpr int kWarpsPerBlock = 4;

// Activation element i as fp32 (why a template: one kernel per dtype, no per-load branch).
template <typename T>
__device__ __forceinline__ float to_f32(const T* p, int64_t i) { return static_cast<float>(p[i]); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
template <>
__device__ __forceinline__ float to_f32<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }

// Store fp32 v as T with round-to-nearest-even (as Tensor.to does).
template <typename T>
__device__ __forceinline__ void store(T* p, int64_t i, float v) { p[i] = static_cast<T>(v); }
template <>
__device__ __forceinline__ void store<__nv_bfloat16>(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ void store<__half>(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }

// fp16 bits -> fp32 (exact).
__device__ __forceinline__ float h2f(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }

// 64-bit shuffle from lane `src` (two 32-bit shuffles; __shfl_sync has no 64-bit integer form
// for unsigned long long on every toolkit).
__device__ __forceinline__ uint64_t shfl64(uint64_t v, int src) {
  const uint32_t lo = __shfl_sync(0xffffffffu, static_cast<uint32_t>(v), src);
  const uint32_t hi = __shfl_sync(0xffffffffu, static_cast<uint32_t>(v >> 32), src);
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

template <typename T, int M>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
dualbin_gemv_g64_kernel(const uint8_t* __restrict__ plane1,   // [n, G*8]
                        const uint8_t* __restrict__ plane2,   // [n, G*8]
                        const uint16_t* __restrict__ alpha1,  // [n, G] fp16 bits
                        const uint16_t* __restrict__ alpha2,  // [n, G] fp16 bits
                        const T* __restrict__ x,              // [M, k]
                        const float* __restrict__ bias,       // [n] or nullptr
                        T* __restrict__ y,                    // [M, n]
                        int64_t n,                            // rows of W
                        int64_t k,                            // columns of W (= of x)
                        int64_t groups) {                     // G = ceil(k / 64)
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= n) return;  // whole warp exits together (row is warp-uniform)
  // Group words are 8-byte aligned when the plane base is (checked by the launcher).
  const uint64_t* p1 = reinterpret_cast<const uint64_t*>(plane1) + row * groups;
  const uint64_t* p2 = reinterpret_cast<const uint64_t*>(plane2) + row * groups;
  const uint16_t* a1r = alpha1 + row * groups;
  const uint16_t* a2r = alpha2 + row * groups;
  float acc[M];
#pragma unroll
  for (int r = 0; r < M; ++r) acc[r] = 0.f;
  for (int64_t g0 = 0; g0 < groups; g0 += 32) {
    const int64_t mine = g0 + lane;
    const bool have = mine < groups;
    const uint64_t w1 = have ? p1[mine] : 0ull;
    const uint64_t w2 = have ? p2[mine] : 0ull;
    const float fa1 = have ? h2f(a1r[mine]) : 0.f;
    const float fa2 = have ? h2f(a2r[mine]) : 0.f;
    const int count = groups - g0 < 32 ? static_cast<int>(groups - g0) : 32;
    for (int gi = 0; gi < count; ++gi) {
      const uint64_t b1 = shfl64(w1, gi), b2 = shfl64(w2, gi);
      const float a1 = __shfl_sync(0xffffffffu, fa1, gi), a2 = __shfl_sync(0xffffffffu, fa2, gi);
      const int e = 2 * lane;                      // this lane's first element in the group
      const int64_t col = (g0 + gi) * 64 + e;
      const float m10 = static_cast<float>((b1 >> e) & 1ull), m11 = static_cast<float>((b1 >> (e + 1)) & 1ull);
      const float m20 = static_cast<float>((b2 >> e) & 1ull), m21 = static_cast<float>((b2 >> (e + 1)) & 1ull);
#pragma unroll
      for (int r = 0; r < M; ++r) {
        // columns past k (padding of the last group) have zero bits; guard the x reads only
        const float x0 = col < k ? to_f32(x, r * k + col) : 0.f;
        const float x1 = col + 1 < k ? to_f32(x, r * k + col + 1) : 0.f;
        acc[r] += a1 * (x0 * m10 + x1 * m11) + a2 * (x0 * m20 + x1 * m21);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < M; ++r) {
    float v = acc[r];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) store(y, r * n + row, v + (bias ? bias[row] : 0.f));
  }
}

// One thread per weight; any group (multiple of 8 bits per row by construction).
__global__ void dualbin_dequantize_kernel(const uint8_t* __restrict__ plane1, const uint8_t* __restrict__ plane2,
                                          const uint16_t* __restrict__ alpha1, const uint16_t* __restrict__ alpha2,
                                          float* __restrict__ out,  // [n, k]
                                          int64_t n, int64_t k, int64_t group, int64_t groups, int64_t row_bytes) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * k) return;
  const int64_t row = i / k, col = i % k, g = col / group;
  const int sh = static_cast<int>(col & 7);
  const float b1 = static_cast<float>((plane1[row * row_bytes + (col >> 3)] >> sh) & 1);
  const float b2 = static_cast<float>((plane2[row * row_bytes + (col >> 3)] >> sh) & 1);
  // separate multiplies and add, as the reference (no FMA contraction: __fmul_rn/__fadd_rn)
  out[i] = __fadd_rn(__fmul_rn(h2f(alpha1[row * groups + g]), b1), __fmul_rn(h2f(alpha2[row * groups + g]), b2));
}

template <typename T>
cudaError_t launch_gemv(const DualBinWeight& w, const void* x, int64_t m, const float* bias, void* y,
                        cudaStream_t stream) {
  const int64_t groups = (w.k + 63) / 64;
  const dim3 grid(static_cast<unsigned>((w.n + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const dim3 block(kWarpsPerBlock * 32);
  const T* xt = static_cast<const T*>(x);
  T* yt = static_cast<T*>(y);
#define QK_DB_CASE(MM)                                                                                   \
  case MM:                                                                                                \
    dualbin_gemv_g64_kernel<T, MM><<<grid, block, 0, stream>>>(w.plane1, w.plane2, w.alpha1, w.alpha2, xt, \
                                                               bias, yt, w.n, w.k, groups);              \
    break;
  switch (m) {
    QK_DB_CASE(1) QK_DB_CASE(2) QK_DB_CASE(3) QK_DB_CASE(4) QK_DB_CASE(5) QK_DB_CASE(6) QK_DB_CASE(7)
    QK_DB_CASE(8)
    default: return cudaErrorInvalidValue;
  }
#undef QK_DB_CASE
  return cudaGetLastError();
}

}  // namespace

cudaError_t dualbin_gemv(const DualBinWeight& w, const void* x, DType dt, int64_t m, const float* bias, void* y,
                         cudaStream_t stream) {
  if (w.group != 64 || m < 1 || m > kDualBinGemvMaxM || w.n <= 0 || w.k <= 0) return cudaErrorInvalidValue;
  if ((reinterpret_cast<uintptr_t>(w.plane1) | reinterpret_cast<uintptr_t>(w.plane2)) & 7)
    return cudaErrorMisalignedAddress;  // uint64 group loads
  if (w.n > (int64_t{1} << 31) * kWarpsPerBlock) return cudaErrorInvalidValue;  // grid.x limit
  switch (dt) {
    case DType::F32: return launch_gemv<float>(w, x, m, bias, y, stream);
    case DType::BF16: return launch_gemv<__nv_bfloat16>(w, x, m, bias, y, stream);
    case DType::F16: return launch_gemv<__half>(w, x, m, bias, y, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t dualbin_dequantize(const DualBinWeight& w, float* out, cudaStream_t stream) {
  if (w.group <= 0 || w.group % 16 || w.n < 0 || w.k < 0) return cudaErrorInvalidValue;
  const int64_t total = w.n * w.k;
  if (total == 0) return cudaSuccess;
  const int64_t groups = (w.k + w.group - 1) / w.group;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  dualbin_dequantize_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      w.plane1, w.plane2, w.alpha1, w.alpha2, out, w.n, w.k, w.group, groups, groups * w.group / 8);
  return cudaGetLastError();
}

}  // namespace cuda_dualbin
}  // namespace quantkit
