// geglu_accumulate, CUDA backend: kernel and host launcher (compiled only with a CUDA compiler).
//
// P is row-major contiguous [rows, 2 * inner] (h = P[:, :inner], g = P[:, inner:]); every row gets
//   out[r, j] = round(h * round(gelu(g))),  gelu(g) = g * 0.5 * (1 + erf(g / sqrt(2)))
// in float (double for float64), rounding to P's dtype where eager PyTorch does (diffusers' GEGLU is
// `h * F.gelu(g)` in P's dtype); rows in [row_start, row_end) also add
//   acc[j] += sum_r x[r, j]^2 * inv[r]   (x = the rounded out; inv = 1 / ||x[r]||^2, 0 for a zero row,
//                                          or 1 without token_norm)
// in one pass over P (the statistic is taken from values already in registers / shared memory).
//
// A persistent grid (as many blocks as fit on the device, at most one per row) loops over rows.
// Thread tid owns columns j = tid + i * kThreads of every row, so per block:
//   - xs[inner] (shared): the thread's own rounded values of the current row (token_norm only);
//   - colsum[inner] (shared): the thread's own column sums over the block's rows.
// Neither needs a barrier; the only one per row is the block reduction of ||x[r]||^2 (double
// buffered). At the end each block adds colsum into acc with one atomicAdd per column.
// When 2 * inner values do not fit in shared memory, a fallback kernel re-reads each row's just
// written out (its own writes) and atomically adds every element's term: correct, slower.
// Sums are float (double for float64 input); atomicAdd order varies between runs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "memcore.h"

namespace memcore {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStaticSmem = 1024;  // bound on the kernel's static shared memory
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr double kSqrtHalf = 0.70710678118654752440;  // M_SQRT1_2

template <typename T> struct Io;
template <> struct Io<float> {
  using C = float;
  static __device__ __forceinline__ C load(const float* p, int64_t i) { return p[i]; }
  static __device__ __forceinline__ C store(float* p, int64_t i, C v) { p[i] = v; return v; }
  static __device__ __forceinline__ C round(C v) { return v; }
};
template <> struct Io<double> {
  using C = double;
  static __device__ __forceinline__ C load(const double* p, int64_t i) { return p[i]; }
  static __device__ __forceinline__ C store(double* p, int64_t i, C v) { p[i] = v; return v; }
  static __device__ __forceinline__ C round(C v) { return v; }
};
template <> struct Io<__half> {
  using C = float;
  static __device__ __forceinline__ C load(const __half* p, int64_t i) { return __half2float(p[i]); }
  static __device__ __forceinline__ C store(__half* p, int64_t i, C v) {
    const __half r = __float2half_rn(v);
    p[i] = r;
    return __half2float(r);
  }
  static __device__ __forceinline__ C round(C v) { return __half2float(__float2half_rn(v)); }
};
template <> struct Io<__nv_bfloat16> {
  using C = float;
  static __device__ __forceinline__ C load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
  static __device__ __forceinline__ C store(__nv_bfloat16* p, int64_t i, C v) {
    const __nv_bfloat16 r = __float2bfloat16_rn(v);
    p[i] = r;
    return __bfloat162float(r);
  }
  static __device__ __forceinline__ C round(C v) { return __bfloat162float(__float2bfloat16_rn(v)); }
};

// torch's exact gelu expression: x * 0.5 * (1 + erf(x * M_SQRT1_2))
__device__ __forceinline__ float gelu(float x) { return x * 0.5f * (1.0f + erff(x * static_cast<float>(kSqrtHalf))); }
__device__ __forceinline__ double gelu(double x) { return x * 0.5 * (1.0 + erf(x * kSqrtHalf)); }

// Sum of v over the block; red is one of two [kWarps] buffers, alternated by the caller.
template <typename C>
__device__ __forceinline__ C block_sum(C v, C* red) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  C total = C(0);
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += red[w];
  return total;
}

template <typename T, bool kShared>
__global__ void __launch_bounds__(kThreads)
    geglu_accumulate_kernel(const T* __restrict__ p, T* __restrict__ out, int64_t rows, int64_t inner,
                            int64_t row_start, int64_t row_end, float* __restrict__ acc, bool token_norm) {
  using C = typename Io<T>::C;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  C* colsum = reinterpret_cast<C*>(smem_raw);  // [inner] (kShared)
  C* xs = colsum + inner;                      // [inner] (kShared and token_norm)
  __shared__ C red[2][kWarps];

  const int tid = threadIdx.x;
  if (kShared) {
    for (int64_t j = tid; j < inner; j += kThreads) colsum[j] = C(0);
  }
  bool any_stat = false;
  int buf = 0;

  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* prow = p + r * 2 * inner;
    T* orow = out + r * inner;
    const bool stat = r >= row_start && r < row_end;  // block-uniform
    C ss = C(0);
    for (int64_t j = tid; j < inner; j += kThreads) {
      const C h = Io<T>::load(prow, j);
      const C g = Io<T>::load(prow, inner + j);
      const C x = Io<T>::store(orow, j, h * Io<T>::round(gelu(g)));
      if (stat) {
        if (token_norm) {
          ss += x * x;
          if (kShared) xs[j] = x;
        } else if (kShared) {
          colsum[j] += x * x;
        } else {
          atomicAdd(acc + j, static_cast<float>(x * x));
        }
      }
    }
    if (stat && token_norm) {
      const C total = block_sum(ss, red[buf]);
      buf ^= 1;  // the next statistic row writes the other buffer: this row's barrier orders the reuse
      const C inv = total > C(0) ? C(1) / total : C(0);
      for (int64_t j = tid; j < inner; j += kThreads) {
        if (kShared) {
          colsum[j] += xs[j] * xs[j] * inv;
        } else {
          const C x = Io<T>::load(orow, j);  // this thread's own write above
          atomicAdd(acc + j, static_cast<float>(x * x * inv));
        }
      }
    }
    any_stat = any_stat || stat;
  }

  if (kShared && any_stat) {
    for (int64_t j = tid; j < inner; j += kThreads) atomicAdd(acc + j, static_cast<float>(colsum[j]));
  }
}

template <typename T, bool kShared>
void launch(const void* p, int64_t rows, int64_t inner, int64_t row_start, int64_t row_end, float* acc, void* out,
            bool token_norm, size_t smem, int sms, cudaStream_t stream) {
  auto kernel = geglu_accumulate_kernel<T, kShared>;
  if (smem > kDefaultSmem) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) {
      throw std::runtime_error(std::string("geglu_accumulate_cuda: cannot reserve shared memory: ") +
                               cudaGetErrorString(err));
    }
  }
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem) != cudaSuccess || per_sm < 1) {
    per_sm = 1;
  }
  const int64_t grid = std::min<int64_t>(rows, static_cast<int64_t>(sms) * per_sm);
  kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(static_cast<const T*>(p), static_cast<T*>(out), rows,
                                                                  inner, row_start, row_end, acc, token_norm);
}

template <typename T>
void dispatch(const void* p, int64_t rows, int64_t inner, int64_t row_start, int64_t row_end, float* acc, void* out,
              bool token_norm, cudaStream_t stream) {
  using C = typename Io<T>::C;
  int device = 0, optin = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const size_t limit = optin > kStaticSmem ? static_cast<size_t>(optin - kStaticSmem) : kDefaultSmem - kStaticSmem;
  const size_t smem = static_cast<size_t>(inner) * sizeof(C) * (token_norm ? 2 : 1);
  if (smem <= limit) {
    launch<T, true>(p, rows, inner, row_start, row_end, acc, out, token_norm, smem, std::max(sms, 1), stream);
  } else {
    launch<T, false>(p, rows, inner, row_start, row_end, acc, out, token_norm, 0, std::max(sms, 1), stream);
  }
}

}  // namespace

void geglu_accumulate_cuda(const void* p, Dtype dtype, int64_t rows, int64_t inner, int64_t row_start,
                           int64_t row_end, float* acc, void* out, bool token_norm, std::uintptr_t stream) {
  if (rows < 0 || inner <= 0) {
    throw std::invalid_argument("geglu_accumulate_cuda: bad shape: rows=" + std::to_string(rows) +
                                ", inner=" + std::to_string(inner));
  }
  if (!(0 <= row_start && row_start <= row_end && row_end <= rows)) {
    throw std::invalid_argument("geglu_accumulate_cuda: row range [" + std::to_string(row_start) + ", " +
                                std::to_string(row_end) + ") does not fit " + std::to_string(rows) + " rows");
  }
  if (rows == 0) return;
  if (p == nullptr || out == nullptr || (row_end > row_start && acc == nullptr)) {
    throw std::invalid_argument("geglu_accumulate_cuda: null pointer");
  }
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case Dtype::Float32: dispatch<float>(p, rows, inner, row_start, row_end, acc, out, token_norm, s); break;
    case Dtype::Float64: dispatch<double>(p, rows, inner, row_start, row_end, acc, out, token_norm, s); break;
    case Dtype::Float16: dispatch<__half>(p, rows, inner, row_start, row_end, acc, out, token_norm, s); break;
    case Dtype::BFloat16: dispatch<__nv_bfloat16>(p, rows, inner, row_start, row_end, acc, out, token_norm, s); break;
    default: throw std::invalid_argument("geglu_accumulate_cuda: bad dtype");
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("geglu_accumulate_cuda: kernel launch failed: ") + cudaGetErrorString(err));
  }
}

}  // namespace memcore
