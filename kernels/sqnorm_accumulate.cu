// sqnorm_accumulate, CUDA backend: kernels and host launcher (compiled only with a CUDA compiler).
//
// acc[j] += float(sum_r x[r, j]^2 * inv[r]) over rows r of a contiguous [n, cols] matrix, inv[r] as
// in csrc/row_norm.h (token_norm; rows whose sum of squares is 0, inf or NaN add nothing) or 1.
// Everything is summed in double, as the CPU backend and the float64 reference, so float32 rows near
// 3e38 do not overflow and float32 subnormal rows still count. Three kernels, no atomics, so the
// result is the same from run to run:
//   1. row_weights (token_norm): one warp per row sums x[r, :]^2 in a fixed order (lanes strided,
//      then a butterfly) and stores w[r] = row_weight(total) in the workspace;
//   2. column_partials: block (tile, group) gives each of its kThreads threads one column j of the
//      tile and sums the rows of the group in order into partial[group, j] (workspace, double);
//   3. reduce_partials: acc[j] += float(sum over groups, in order, of partial[group, j]).
// The number of row groups is a function of (n, cols, the device's SM count) only: about kBlocksPerSm
// blocks per SM in kernel 2, at least kMinGroupRows rows per group. geglu_accumulate's fallback uses
// the same path on its output (csrc/cuda_device.h: column_stat).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_device.h"
#include "memcore.h"
#include "row_norm.h"

namespace memcore {
namespace cuda {
namespace {

constexpr int64_t kBlocksPerSm = 8;     // 8 x 256 threads: the most an SM of sm_80 / sm_90 runs
constexpr int64_t kMinGroupRows = 32;   // rows per group before a second group is cut
constexpr int64_t kMaxGroups = 65535;   // gridDim.y

__device__ __forceinline__ double load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double load(const double* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ double load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_weights_kernel(const T* __restrict__ x, int64_t cols, int64_t n, double* __restrict__ w) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (r >= n) return;  // the whole warp leaves together: no barrier below, full-mask shuffles stay legal
  const int lane = threadIdx.x & 31;
  const T* row = x + r * cols;
  double s = 0.0;
  for (int64_t j = lane; j < cols; j += 32) {
    const double v = load(row, j);
    s += v * v;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) w[r] = row_weight(s);
}

template <typename T, bool kNorm>
__global__ void __launch_bounds__(kThreads)
    column_partials_kernel(const T* __restrict__ x, int64_t cols, int64_t n, int64_t group_rows,
                           const double* __restrict__ w, double* __restrict__ partial) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= cols) return;  // no barrier in this kernel
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * group_rows;
  const int64_t r1 = min(n, r0 + group_rows);
  double s = 0.0;
#pragma unroll 4
  for (int64_t r = r0; r < r1; ++r) {
    const double v = load(x, r * cols + j);
    if (kNorm) {
      const double wr = w[r];  // the same address for the whole block: one broadcast load
      if (wr != 0.0) s += weighted_square(v, wr);
    } else {
      s += v * v;
    }
  }
  partial[static_cast<int64_t>(blockIdx.y) * cols + j] = s;
}

__global__ void __launch_bounds__(kThreads)
    reduce_partials_kernel(const double* __restrict__ partial, int64_t slots, int64_t cols, float* __restrict__ acc) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= cols) return;
  double s = 0.0;
  for (int64_t g = 0; g < slots; ++g) s += partial[g * cols + j];
  acc[j] += static_cast<float>(s);
}

struct Groups {
  int64_t rows;   // rows per group
  int64_t count;  // groups with rows: ceil(n / rows)
};

Groups row_groups(int64_t n, int64_t cols, int sms) {
  const int64_t tiles = (cols + kThreads - 1) / kThreads;
  const int64_t wanted = (static_cast<int64_t>(sms) * kBlocksPerSm + tiles - 1) / tiles;
  const int64_t most = (n + kMinGroupRows - 1) / kMinGroupRows;
  const int64_t groups = std::clamp<int64_t>(std::min(wanted, most), 1, kMaxGroups);
  const int64_t rows = (n + groups - 1) / groups;
  return {rows, (n + rows - 1) / rows};
}

template <typename T>
void launch_column_stat(const T* x, int64_t n, int64_t cols, float* acc, bool token_norm, unsigned char* ws,
                        const Groups& g, cudaStream_t stream, const char* op) {
  double* w = reinterpret_cast<double*>(ws);
  double* partial = reinterpret_cast<double*>(ws + (token_norm ? align256(n * 8) : 0));
  const unsigned tiles = static_cast<unsigned>((cols + kThreads - 1) / kThreads);
  if (token_norm) {
    const unsigned blocks = static_cast<unsigned>((n + kWarps - 1) / kWarps);
    row_weights_kernel<T><<<blocks, kThreads, 0, stream>>>(x, cols, n, w);
    check(cudaGetLastError(), op, "row weights kernel launch");
    column_partials_kernel<T, true>
        <<<dim3(tiles, static_cast<unsigned>(g.count)), kThreads, 0, stream>>>(x, cols, n, g.rows, w, partial);
  } else {
    column_partials_kernel<T, false>
        <<<dim3(tiles, static_cast<unsigned>(g.count)), kThreads, 0, stream>>>(x, cols, n, g.rows, w, partial);
  }
  check(cudaGetLastError(), op, "column kernel launch");
  reduce_partials(partial, g.count, cols, acc, stream, op);
}

}  // namespace

void reduce_partials(const double* partial, int64_t slots, int64_t cols, float* acc, cudaStream_t stream,
                     const char* op) {
  const unsigned tiles = static_cast<unsigned>((cols + kThreads - 1) / kThreads);
  reduce_partials_kernel<<<tiles, kThreads, 0, stream>>>(partial, slots, cols, acc);
  check(cudaGetLastError(), op, "reduction kernel launch");
}

int64_t column_stat_workspace(int64_t n, int64_t cols, bool token_norm, int device) {
  if (n <= 0) return 0;
  const Groups g = row_groups(n, cols, device_info(device).sms);
  return (token_norm ? align256(n * 8) : 0) + g.count * cols * 8;
}

void column_stat(const void* x, Dtype dtype, int64_t n, int64_t cols, float* acc, bool token_norm, void* ws,
                 int64_t ws_bytes, int device, cudaStream_t stream, const char* op) {
  if (n <= 0) return;
  const int64_t need = column_stat_workspace(n, cols, token_norm, device);
  if (ws == nullptr || ws_bytes < need) {
    throw std::invalid_argument(std::string(op) + ": workspace of " + std::to_string(ws_bytes) + " bytes, " +
                                std::to_string(need) + " needed");
  }
  const Groups g = row_groups(n, cols, device_info(device).sms);
  auto* w = static_cast<unsigned char*>(ws);
  switch (dtype) {
    case Dtype::Float32: return launch_column_stat(static_cast<const float*>(x), n, cols, acc, token_norm, w, g, stream, op);
    case Dtype::Float64: return launch_column_stat(static_cast<const double*>(x), n, cols, acc, token_norm, w, g, stream, op);
    case Dtype::Float16: return launch_column_stat(static_cast<const __half*>(x), n, cols, acc, token_norm, w, g, stream, op);
    case Dtype::BFloat16:
      return launch_column_stat(static_cast<const __nv_bfloat16*>(x), n, cols, acc, token_norm, w, g, stream, op);
  }
  throw std::invalid_argument(std::string(op) + ": bad dtype");
}

}  // namespace cuda

namespace {

void check_args(int64_t rows, int64_t cols, int64_t row_start, int64_t row_end) {
  if (rows < 0 || cols <= 0) {
    throw std::invalid_argument("sqnorm_accumulate_cuda: bad shape [" + std::to_string(rows) + ", " +
                                std::to_string(cols) + "]");
  }
  if (!(0 <= row_start && row_start <= row_end && row_end <= rows)) {
    throw std::invalid_argument("sqnorm_accumulate_cuda: row range [" + std::to_string(row_start) + ", " +
                                std::to_string(row_end) + ") does not fit " + std::to_string(rows) + " rows");
  }
}

int64_t element_bytes(Dtype dtype) {
  switch (dtype) {
    case Dtype::Float32: return 4;
    case Dtype::Float64: return 8;
    case Dtype::Float16:
    case Dtype::BFloat16: return 2;
  }
  throw std::invalid_argument("sqnorm_accumulate_cuda: bad dtype");
}

}  // namespace

int64_t sqnorm_accumulate_cuda_workspace(Dtype dtype, int64_t rows, int64_t cols, int64_t row_start,
                                         int64_t row_end, bool token_norm, int device) {
  check_args(rows, cols, row_start, row_end);
  element_bytes(dtype);
  return cuda::column_stat_workspace(row_end - row_start, cols, token_norm, device);
}

void sqnorm_accumulate_cuda(const void* x, Dtype dtype, int64_t rows, int64_t cols, int64_t row_start,
                            int64_t row_end, float* acc, bool token_norm, void* ws, int64_t ws_bytes,
                            std::uintptr_t stream) {
  check_args(rows, cols, row_start, row_end);
  const int64_t n = row_end - row_start;
  if (n == 0) return;
  if (x == nullptr || acc == nullptr) throw std::invalid_argument("sqnorm_accumulate_cuda: null pointer");
  const int device = cuda::current_device("sqnorm_accumulate_cuda");
  const auto* base = static_cast<const unsigned char*>(x) + row_start * cols * element_bytes(dtype);
  cuda::column_stat(base, dtype, n, cols, acc, token_norm, ws, ws_bytes, device,
                    reinterpret_cast<cudaStream_t>(stream), "sqnorm_accumulate_cuda");
}

}  // namespace memcore
