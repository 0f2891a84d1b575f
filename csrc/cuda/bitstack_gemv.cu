// BitStack decode GEMV on CUDA cores, without forming the dense weight.
//
// y_r = sum_i sum_j u_i[r, j] * sum_c S_i[r, c] * Z_i[j, c],   Z_i = v_i diag(x)   (k x n)
//
// One thread owns one output row r and keeps the k-vector acc = sum_c S_i[r, c] Z_i[:, c] in
// registers. Z is built per chunk of kChunk columns in shared memory by the whole thread
// block (k * kChunk fp32), then every thread walks its row's sign bits over the chunk and
// adds +/- Z[c][:]. All threads read the same Z[c] at the same time (a shared-memory
// broadcast: no bank conflicts).
//
//      grid.x: row tiles of kRows        grid.y: activation rows t
//      +-------- n columns ---------+
//      | chunk 0 | chunk 1 | ...    |   Z chunk [kChunk][K] in smem, zero past n
//  r0  |  bits   |  bits   |        |   thread r: acc[K] += (bit ? +1 : -1) * Z[c][:]
//  ..  |         |         |        |
//  r0+kRows-1                       |   then y[t, r] += dot(u_i[r, :], acc)
//
// Cost: K FMAs per weight per block; cheap in memory (1 bit + the factors per weight), so
// at k = 16 the kernel is compute-bound on CUDA cores. A tensor-core version (signs
// expanded to +/-1 fp16 fragments times Z) is the next step; not written because it could
// not be run here. Compile-checked only (no GPU on the dev machine).
#include "cuda/bitstack.cuh"

namespace quantkit {
namespace cuda {
namespace {

constexpr int kRows = 128;   // output rows per thread block (one per thread)
constexpr int kChunk = 128;  // columns of Z staged in shared memory per step

__device__ __forceinline__ float factor_to_float(__half f) { return __half2float(f); }
__device__ __forceinline__ float factor_to_float(int8_t f) { return static_cast<float>(f); }

// F = __half (scale == nullptr) or int8_t (scale [b, K]: u's component j times scale[i, j]).
template <int K, typename F>
__global__ void __launch_bounds__(kRows) bitstack_gemv_kernel(
    const uint8_t* __restrict__ signs,  // [b, m, nbytes]
    const F* __restrict__ u,            // [b, m, K]
    const F* __restrict__ v,            // [b, K, n]
    const float* __restrict__ scale,    // [b, K] or nullptr
    const float* __restrict__ x,        // [rows, n]
    const float* __restrict__ bias,     // [m] or nullptr
    float* __restrict__ y,              // [rows, m]
    int b, int m, int n) {
  __shared__ float z[kChunk][K];  // Z[:, c0 + c] for c < kChunk, as rows of K
  const int t = blockIdx.y;       // activation row
  const int r = blockIdx.x * kRows + threadIdx.x;
  const int nbytes = (n + 7) / 8;
  const float* xt = x + static_cast<int64_t>(t) * n;
  float total = 0.f;
  for (int i = 0; i < b; ++i) {
    float acc[K];
#pragma unroll
    for (int j = 0; j < K; ++j) acc[j] = 0.f;
    const F* vi = v + static_cast<int64_t>(i) * K * n;
    const uint8_t* row = signs + (static_cast<int64_t>(i) * m + r) * nbytes;
    for (int c0 = 0; c0 < n; c0 += kChunk) {
      __syncthreads();  // the previous chunk's readers are done
      // stage Z: element e = c * K + j, coalesced over c for each j in v's row-major layout
      for (int e = threadIdx.x; e < kChunk * K; e += kRows) {
        const int j = e / kChunk, c = e % kChunk, col = c0 + c;
        z[c][j] = col < n ? factor_to_float(vi[static_cast<int64_t>(j) * n + col]) * xt[col] : 0.f;
      }
      __syncthreads();
      if (r < m) {
        const int q_end = min(kChunk / 8, nbytes - c0 / 8);
        for (int q = 0; q < q_end; ++q) {
          const unsigned byte = row[c0 / 8 + q];
#pragma unroll
          for (int bit = 0; bit < 8; ++bit) {
            // padding columns have Z = 0, so their (zero) bits add -0
            const float s = ((byte >> (7 - bit)) & 1u) ? 1.f : -1.f;
            const float* zc = z[q * 8 + bit];
#pragma unroll
            for (int j = 0; j < K; ++j) acc[j] = fmaf(s, zc[j], acc[j]);
          }
        }
      }
    }
    if (r < m) {
      const F* ur = u + (static_cast<int64_t>(i) * m + r) * K;
      const float* si = scale ? scale + static_cast<int64_t>(i) * K : nullptr;
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const float uj = si ? factor_to_float(ur[j]) * si[j] : factor_to_float(ur[j]);
        total = fmaf(uj, acc[j], total);
      }
    }
  }
  if (r < m) y[static_cast<int64_t>(t) * m + r] = total + (bias ? bias[r] : 0.f);
}

template <int K, typename F>
cudaError_t launch(const uint8_t* signs, const F* u, const F* v, const float* scale, const float* x, const float* bias,
                   float* y, int64_t b, int64_t m, int64_t n, int64_t rows, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((m + kRows - 1) / kRows), static_cast<unsigned>(rows));
  bitstack_gemv_kernel<K, F><<<grid, kRows, 0, stream>>>(signs, u, v, scale, x, bias, y, static_cast<int>(b),
                                                          static_cast<int>(m), static_cast<int>(n));
  return cudaGetLastError();
}

template <typename F>
cudaError_t dispatch(const uint8_t* signs, const F* u, const F* v, const float* scale, const float* x,
                     const float* bias, float* y, int64_t b, int64_t m, int64_t n, int64_t k, int64_t rows,
                     cudaStream_t stream) {
  // int32 indexing inside the kernel for m, n, b; grid.y <= 65535 rows
  if (b < 1 || m < 1 || n < 1 || rows < 1 || rows > 65535 || m > (1 << 30) || n > (1 << 30) || b > 4096)
    return cudaErrorInvalidValue;
  switch (k) {
    case 4: return launch<4, F>(signs, u, v, scale, x, bias, y, b, m, n, rows, stream);
    case 8: return launch<8, F>(signs, u, v, scale, x, bias, y, b, m, n, rows, stream);
    case 16: return launch<16, F>(signs, u, v, scale, x, bias, y, b, m, n, rows, stream);
    case 32: return launch<32, F>(signs, u, v, scale, x, bias, y, b, m, n, rows, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t bitstack_gemv(const uint8_t* signs, const __half* u, const __half* v, const float* x, const float* bias,
                          float* y, int64_t b, int64_t m, int64_t n, int64_t k, int64_t rows, cudaStream_t stream) {
  return dispatch<__half>(signs, u, v, nullptr, x, bias, y, b, m, n, k, rows, stream);
}

cudaError_t bitstack_gemv_int8(const uint8_t* signs, const int8_t* u, const int8_t* v, const float* scale,
                               const float* x, const float* bias, float* y, int64_t b, int64_t m, int64_t n, int64_t k,
                               int64_t rows, cudaStream_t stream) {
  if (scale == nullptr) return cudaErrorInvalidValue;
  return dispatch<int8_t>(signs, u, v, scale, x, bias, y, b, m, n, k, rows, stream);
}

// Explicit list of instantiations (bounds compile time): K = 4, 8, 16, 32 x {fp16, int8} above.

}  // namespace cuda
}  // namespace quantkit
