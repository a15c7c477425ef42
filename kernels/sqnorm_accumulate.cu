// sqnorm_accumulate, CUDA backend: kernel and host launcher (compiled only with a CUDA compiler).
//
// One block per chunk of kRowsPerBlock rows (grid-stride over chunks):
//   1. token_norm: one warp per row sums x[r, :]^2 (shuffle reduction) -> inv[r] in shared memory;
//   2. each thread owns columns j = tid, tid + blockDim, ... and sums x[r, j]^2 * inv[r] over the
//      chunk's rows (coalesced across threads), then atomicAdd's the float partial into acc[j].
// Sums are float (double for float64 input). atomicAdd order varies, so the last bits may differ
// between runs; the CPU backend is the deterministic one.
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
constexpr int kRowsPerBlock = 32;
constexpr int64_t kMaxBlocks = 65535;

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double load(const double* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sqnorm_accumulate_kernel(const T* __restrict__ x, int64_t cols, int64_t n, float* __restrict__ acc,
                             bool token_norm) {
  using A = typename AccType<T>::type;
  __shared__ A inv[kRowsPerBlock];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  for (int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; r0 < n;
       r0 += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int rows_here = static_cast<int>(min(static_cast<int64_t>(kRowsPerBlock), n - r0));
    const T* chunk = x + r0 * cols;

    if (token_norm) {
      for (int r = warp; r < rows_here; r += kWarps) {
        const T* row = chunk + static_cast<int64_t>(r) * cols;
        A s = A(0);
        for (int64_t j = lane; j < cols; j += 32) {
          const A v = load(row, j);
          s += v * v;
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0) inv[r] = s > A(0) ? A(1) / s : A(0);
      }
    } else if (threadIdx.x < kRowsPerBlock) {
      inv[threadIdx.x] = A(1);
    }
    __syncthreads();

    for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
      A s = A(0);
      for (int r = 0; r < rows_here; ++r) {
        const A v = load(chunk, static_cast<int64_t>(r) * cols + j);
        s += v * v * inv[r];
      }
      atomicAdd(acc + j, static_cast<float>(s));
    }
    __syncthreads();  // inv is rewritten for the next chunk
  }
}

template <typename T>
void launch(const void* x, int64_t cols, int64_t row_start, int64_t n, float* acc, bool token_norm,
            cudaStream_t stream) {
  const int64_t chunks = (n + kRowsPerBlock - 1) / kRowsPerBlock;
  const unsigned grid = static_cast<unsigned>(std::min(chunks, kMaxBlocks));
  const T* base = static_cast<const T*>(x) + row_start * cols;
  sqnorm_accumulate_kernel<T><<<grid, kThreads, 0, stream>>>(base, cols, n, acc, token_norm);
}

}  // namespace

void sqnorm_accumulate_cuda(const void* x, Dtype dtype, int64_t rows, int64_t cols, int64_t row_start,
                            int64_t row_end, float* acc, bool token_norm, std::uintptr_t stream) {
  if (rows < 0 || cols <= 0) {
    throw std::invalid_argument("sqnorm_accumulate_cuda: bad shape [" + std::to_string(rows) + ", " +
                                std::to_string(cols) + "]");
  }
  if (!(0 <= row_start && row_start <= row_end && row_end <= rows)) {
    throw std::invalid_argument("sqnorm_accumulate_cuda: row range [" + std::to_string(row_start) + ", " +
                                std::to_string(row_end) + ") does not fit " + std::to_string(rows) + " rows");
  }
  const int64_t n = row_end - row_start;
  if (n == 0) return;
  if (x == nullptr || acc == nullptr) throw std::invalid_argument("sqnorm_accumulate_cuda: null pointer");

  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case Dtype::Float32: launch<float>(x, cols, row_start, n, acc, token_norm, s); break;
    case Dtype::Float64: launch<double>(x, cols, row_start, n, acc, token_norm, s); break;
    case Dtype::Float16: launch<__half>(x, cols, row_start, n, acc, token_norm, s); break;
    case Dtype::BFloat16: launch<__nv_bfloat16>(x, cols, row_start, n, acc, token_norm, s); break;
    default: throw std::invalid_argument("sqnorm_accumulate_cuda: bad dtype");
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("sqnorm_accumulate_cuda: kernel launch failed: ") +
                             cudaGetErrorString(err));
  }
}

}  // namespace memcore
