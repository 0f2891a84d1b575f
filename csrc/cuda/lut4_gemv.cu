// nf4/fp4 decode GEMV (1..8 activation rows) and weight dequantization, torch-free.
// Layout and semantics: lut4.cuh. Reference: quantkit/_ops.py (lut4_linear, lut4_dequantize).
//
// GEMV work split (k % 32 == 0, 16-byte aligned: the "vec" kernel):
//
//        k columns ->   chunk = 32 weights = 16 packed bytes = one uint4 load
//   row r  [ c0 | c1 | c2 | ... | c31 | c32 | ... ]      warp w of CTA b owns row r = 4b + w
//            ^lane0 ^lane1        ^lane31 ^lane0 (next iteration)
//
// Each lane walks chunks lane, lane+32, ...: one 16-byte load of codes, one absmax (a chunk
// never straddles a block: blocks are >= 32 and chunks start at multiples of 32 of the
// flattened index), 32 table lookups from shared memory, and per activation row 32 FMAs
// into a chunk partial that is scaled by the absmax once (the absmax factors out of the
// chunk). Partials stay in fp32; a warp shuffle sums the lanes; lane 0 adds the bias and
// rounds once to the activation dtype. The activations (<= 8 rows) are re-read by every
// row and stay in L1/L2; the packed weight is read exactly once from HBM.
#include "cuda/lut4.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace quantkit {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 4;  // output rows per CTA (one per warp)

// Activation element conversions (fp32 math everywhere, one rounding at the output).
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
  // 8 activations from p (16-byte aligned): two float4 loads.
  static __device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
};
template <>
struct Elem<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
  // 8 halves = one 16-byte load, widened pairwise.
  static __device__ __forceinline__ void load8(const __half* p, float (&v)[8]) {
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
    const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
};
template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) {
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
};

// absmax of block b. With double quant the scale decode is a separately rounded multiply
// then add (__fmul_rn/__fadd_rn cannot be contracted into an FMA), as the reference does.
__device__ __forceinline__ float block_absmax(const Lut4Weight& w, int64_t b) {
  if (w.absmax_u8 == nullptr) return __ldg(w.absmax_f32 + b);
  const float c = __ldg(w.absmax_code + __ldg(w.absmax_u8 + b));
  return __fadd_rn(__fmul_rn(c, __ldg(w.absmax_scale + b / w.absmax_blocksize)), w.absmax_offset);
}

// The 16-entry code table in shared memory: 16 words in 16 distinct banks, so any pattern
// of lookups by a warp is conflict-free (equal indices broadcast).
__device__ __forceinline__ void load_lut(const Lut4Weight& w, float* lut) {
  if (threadIdx.x < 16) lut[threadIdx.x] = __ldg(w.code + threadIdx.x);
  __syncthreads();
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Vector path: k % 32 == 0, packed and x 16-byte aligned. M = activation rows (template so
// the accumulators live in registers).
template <typename T, int M>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
lut4_gemv_vec(const Lut4Weight w,                 // weight [n, k]
              const T* __restrict__ x,            // [M, k]
              const float* __restrict__ bias,     // [n] or nullptr
              T* __restrict__ y) {                // [M, n]
  __shared__ float lut[16];
  load_lut(w, lut);
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= w.n) return;
  const int64_t chunks = w.k >> 5;
  const uint4* wrow = reinterpret_cast<const uint4*>(w.packed + row * (w.k >> 1));
  float acc[M];
#pragma unroll
  for (int i = 0; i < M; ++i) acc[i] = 0.f;
#pragma unroll 2
  for (int64_t c = lane; c < chunks; c += 32) {
    const uint4 q = __ldg(wrow + c);
    const float s = block_absmax(w, (row * w.k + (c << 5)) / w.blocksize);
    const uint32_t words[4] = {q.x, q.y, q.z, q.w};
    float wv[32];  // code values of the chunk's 32 weights (absmax applied after the sum)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t byte = (words[i] >> (8 * j)) & 0xffu;  // little-endian: byte 4i+j
        wv[8 * i + 2 * j] = lut[byte >> 4];                 // even element: high nibble
        wv[8 * i + 2 * j + 1] = lut[byte & 15u];            // odd element: low nibble
      }
    }
#pragma unroll
    for (int mi = 0; mi < M; ++mi) {
      const T* xp = x + mi * w.k + (c << 5);
      float partial = 0.f;
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        float xv[8];
        Elem<T>::load8(xp + 8 * g, xv);
#pragma unroll
        for (int t = 0; t < 8; ++t) partial = fmaf(wv[8 * g + t], xv[t], partial);
      }
      acc[mi] = fmaf(partial, s, acc[mi]);
    }
  }
#pragma unroll
  for (int mi = 0; mi < M; ++mi) {
    const float v = warp_sum(acc[mi]);
    if (lane == 0) y[mi * w.n + row] = Elem<T>::from_f(v + (bias != nullptr ? __ldg(bias + row) : 0.f));
  }
}

// Any k and alignment: one weight per lane per step, decoded exactly as the reference
// (code * absmax in fp32), rows of a block may start mid-byte and blocks may span rows.
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
lut4_gemv_scalar(const Lut4Weight w,              // weight [n, k]
                 const T* __restrict__ x,         // [m, k]
                 int m,                           // 1..kLut4GemvMaxM
                 const float* __restrict__ bias,  // [n] or nullptr
                 T* __restrict__ y) {             // [m, n]
  __shared__ float lut[16];
  load_lut(w, lut);
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= w.n) return;
  float acc[kLut4GemvMaxM];
#pragma unroll
  for (int i = 0; i < kLut4GemvMaxM; ++i) acc[i] = 0.f;
  const int64_t base = row * w.k;
  for (int64_t col = lane; col < w.k; col += 32) {
    const int64_t e = base + col;
    const uint32_t byte = __ldg(w.packed + (e >> 1));
    const uint32_t q = (e & 1) ? (byte & 15u) : (byte >> 4);
    const float wv = __fmul_rn(lut[q], block_absmax(w, e / w.blocksize));
#pragma unroll
    for (int mi = 0; mi < kLut4GemvMaxM; ++mi) {
      if (mi < m) acc[mi] = fmaf(wv, Elem<T>::to_f(x[mi * w.k + col]), acc[mi]);
    }
  }
#pragma unroll
  for (int mi = 0; mi < kLut4GemvMaxM; ++mi) {
    if (mi >= m) break;
    const float v = warp_sum(acc[mi]);
    if (lane == 0) y[mi * w.n + row] = Elem<T>::from_f(v + (bias != nullptr ? __ldg(bias + row) : 0.f));
  }
}

// One thread per packed byte (two weights), grid-stride.
template <typename T>
__global__ void lut4_dequantize_kernel(const Lut4Weight w,   // weight [n, k]
                                       T* __restrict__ out) {  // [n, k]
  __shared__ float lut[16];
  load_lut(w, lut);
  const int64_t numel = w.n * w.k;
  const int64_t nbytes = (numel + 1) >> 1;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nbytes;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t byte = __ldg(w.packed + i);
    const int64_t e = i << 1;
    out[e] = Elem<T>::from_f(__fmul_rn(lut[byte >> 4], block_absmax(w, e / w.blocksize)));
    if (e + 1 < numel) out[e + 1] = Elem<T>::from_f(__fmul_rn(lut[byte & 15u], block_absmax(w, (e + 1) / w.blocksize)));
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
void launch_gemv(const Lut4Weight& w, const T* x, int64_t m, const float* bias, T* y, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((w.n + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const dim3 block(kWarpsPerBlock * 32);
  const bool vec = w.k % 32 == 0 && aligned16(w.packed) && aligned16(x);
  if (!vec) {
    lut4_gemv_scalar<T><<<grid, block, 0, stream>>>(w, x, static_cast<int>(m), bias, y);
    return;
  }
  switch (m) {  // explicit instantiations: M = 1..8 per activation dtype
    case 1: lut4_gemv_vec<T, 1><<<grid, block, 0, stream>>>(w, x, bias, y); break;
    case 2: lut4_gemv_vec<T, 2><<<grid, block, 0, stream>>>(w, x, bias, y); break;
    case 3: lut4_gemv_vec<T, 3><<<grid, block, 0, stream>>>(w, x, bias, y); break;
    case 4: lut4_gemv_vec<T, 4><<<grid, block, 0, stream>>>(w, x, bias, y); break;
    case 5: lut4_gemv_vec<T, 5><<<grid, block, 0, stream>>>(w, x, bias, y); break;
    case 6: lut4_gemv_vec<T, 6><<<grid, block, 0, stream>>>(w, x, bias, y); break;
    case 7: lut4_gemv_vec<T, 7><<<grid, block, 0, stream>>>(w, x, bias, y); break;
    default: lut4_gemv_vec<T, 8><<<grid, block, 0, stream>>>(w, x, bias, y); break;
  }
}

template <typename T>
void launch_dequantize(const Lut4Weight& w, T* out, cudaStream_t stream) {
  const int64_t nbytes = (w.n * w.k + 1) / 2;
  const int threads = 256;
  const int64_t blocks = (nbytes + threads - 1) / threads;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
  lut4_dequantize_kernel<T><<<grid, threads, 0, stream>>>(w, out);
}

bool valid(const Lut4Weight& w) {
  if (w.packed == nullptr || w.code == nullptr || w.blocksize <= 0 || w.n < 0 || w.k < 0) return false;
  if (w.absmax_u8 != nullptr)
    return w.absmax_code != nullptr && w.absmax_scale != nullptr && w.absmax_blocksize > 0;
  return w.absmax_f32 != nullptr;
}

}  // namespace

cudaError_t lut4_gemv(const Lut4Weight& w, const void* x, DType dt, int64_t m, const float* bias, void* y,
                      cudaStream_t stream) {
  if (!valid(w) || m < 1 || m > kLut4GemvMaxM || x == nullptr || y == nullptr) return cudaErrorInvalidValue;
  if (w.n == 0) return cudaSuccess;
  switch (dt) {
    case DType::F32:
      launch_gemv(w, static_cast<const float*>(x), m, bias, static_cast<float*>(y), stream);
      break;
    case DType::F16:
      launch_gemv(w, static_cast<const __half*>(x), m, bias, static_cast<__half*>(y), stream);
      break;
    case DType::BF16:
      launch_gemv(w, static_cast<const __nv_bfloat16*>(x), m, bias, static_cast<__nv_bfloat16*>(y), stream);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t lut4_dequantize(const Lut4Weight& w, void* out, DType dt, cudaStream_t stream) {
  if (!valid(w) || out == nullptr) return cudaErrorInvalidValue;
  if (w.n * w.k == 0) return cudaSuccess;
  switch (dt) {
    case DType::F32: launch_dequantize(w, static_cast<float*>(out), stream); break;
    case DType::F16: launch_dequantize(w, static_cast<__half*>(out), stream); break;
    case DType::BF16: launch_dequantize(w, static_cast<__nv_bfloat16*>(out), stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace quantkit
