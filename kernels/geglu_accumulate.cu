// geglu_accumulate, CUDA backend: kernels and host launcher (compiled only with a CUDA compiler).
//
// P is row-major contiguous [rows, 2 * inner] (h = P[:, :inner], g = P[:, inner:]); every row gets
//   out[r, j] = round(h * round(gelu(g))),  gelu(g) = g * 0.5 * (1 + erf(g / sqrt(2)))
// in float (double for float64), rounding to P's dtype where eager PyTorch does (diffusers' GEGLU is
// `h * F.gelu(g)` in P's dtype); rows in [row_start, row_end) also add
//   acc[j] += sum_r x[r, j]^2 * inv[r]   (x = the rounded out; inv and skipped rows as in
//                                          csrc/row_norm.h with token_norm, else 1)
// summed in double, as the CPU backend and the float64 reference. One pass over P: the statistic is
// taken from values already in registers / shared memory.
//
// Fused kernel (the row fits in shared memory): a persistent grid of G blocks (G = min(rows, SMs x
// the blocks per SM the occupancy calculator allows), a function of the shape and the device); block
// b takes rows b, b + G, ... Thread tid owns columns j = tid + i * kThreads of every row, so per block:
//   - xs[inner] (shared, token_norm only): the thread's own rounded values of the current row;
//   - colsum[inner] (shared, double): the thread's own column sums over the block's statistic rows.
// Neither needs a barrier; the only one per row is the block reduction of ||x[r]||^2 (double
// buffered, fixed order). Each block holding statistic rows writes colsum to its slot of a workspace
// (slot = (b - row_start) mod G) and a second kernel adds the slots in order: no atomics, so the
// result is the same from run to run.
// Fallback (the row does not fit, or MEMCORE_CUDA_SMEM_FALLBACK): GEGLU alone, then the statistic of
// the rows just written as sqnorm_accumulate computes it (csrc/cuda_device.h: column_stat); slower
// (out is read back) but with no shared-memory limit. Which one runs: plan_geglu_smem (launch_plan.cpp).
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

constexpr double kSqrtHalf = 0.70710678118654752440;  // M_SQRT1_2
constexpr int64_t kOutBlocksPerSm = 8;                // grid of the GEGLU-only kernel, in blocks per SM

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

// Sum of v over the block in a fixed order; red is one of two [kWarps] buffers, alternated by the
// caller. Every thread of the block must call it (it holds a barrier).
__device__ __forceinline__ double block_sum(double v, double* red) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  double total = 0.0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += red[w];
  return total;
}

template <typename T>
__device__ __forceinline__ typename Io<T>::C geglu_store(const T* prow, T* orow, int64_t inner, int64_t j) {
  using C = typename Io<T>::C;
  const C h = Io<T>::load(prow, j);
  const C g = Io<T>::load(prow, inner + j);
  return Io<T>::store(orow, j, h * Io<T>::round(gelu(g)));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    geglu_fused_kernel(const T* __restrict__ p, T* __restrict__ out, int64_t rows, int64_t inner, int64_t row_start,
                       int64_t row_end, bool token_norm, double* __restrict__ partial, int64_t slots) {
  using C = typename Io<T>::C;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* colsum = reinterpret_cast<double*>(smem_raw);  // [inner]
  C* xs = reinterpret_cast<C*>(colsum + inner);          // [inner] (token_norm)
  __shared__ double red[2][kWarps];

  const int tid = threadIdx.x;
  for (int64_t j = tid; j < inner; j += kThreads) colsum[j] = 0.0;
  int buf = 0;

  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* prow = p + r * 2 * inner;
    T* orow = out + r * inner;
    const bool stat = r >= row_start && r < row_end;  // block-uniform
    double ss = 0.0;
    for (int64_t j = tid; j < inner; j += kThreads) {
      const C x = geglu_store(prow, orow, inner, j);
      if (stat) {
        const double v = static_cast<double>(x);
        if (token_norm) {
          ss += v * v;
          xs[j] = x;
        } else {
          colsum[j] += v * v;
        }
      }
    }
    if (stat && token_norm) {
      const double total = block_sum(ss, red[buf]);
      buf ^= 1;  // the next statistic row writes the other buffer: this row's barrier orders the reuse
      const double w = row_weight(total);
      if (w != 0.0) {  // a zero, inf or NaN row adds nothing
        for (int64_t j = tid; j < inner; j += kThreads) colsum[j] += weighted_square(static_cast<double>(xs[j]), w);
      }
    }
  }

  // every block with statistic rows owns one slot; each thread writes the columns it summed itself
  const int64_t grid = gridDim.x;
  const int64_t slot = ((static_cast<int64_t>(blockIdx.x) - row_start % grid) % grid + grid) % grid;
  if (slot < slots) {
    double* dst = partial + slot * inner;
    for (int64_t j = tid; j < inner; j += kThreads) dst[j] = colsum[j];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    geglu_out_kernel(const T* __restrict__ p, T* __restrict__ out, int64_t rows, int64_t inner) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    for (int64_t j = threadIdx.x; j < inner; j += kThreads) geglu_store(p + r * 2 * inner, out + r * inner, inner, j);
  }
}

constexpr const char* kOp = "geglu_accumulate_cuda";

// The launch of one call, computed identically by the workspace query and the launch.
struct Plan {
  SmemPlan smem;
  int64_t grid = 0;   // blocks of the fused kernel (variant 0)
  int64_t slots = 0;  // workspace slots of the fused kernel
  int64_t workspace = 0;
};

template <typename T>
const void* fused_kernel() {
  return reinterpret_cast<const void*>(geglu_fused_kernel<T>);
}

template <typename T>
Plan make_plan(Dtype dtype, int64_t rows, int64_t inner, int64_t n, bool token_norm, int device) {
  const DeviceInfo& info = device_info(device);
  Plan plan;
  const void* kernel = fused_kernel<T>();
  plan.smem = plan_geglu_smem(inner, dtype, token_norm, static_smem(kernel, device), info.optin_smem,
                              smem_fallback_forced());
  if (n == 0) return plan;  // GEGLU only
  if (plan.smem.variant == 0) {
    // raised for any dynamic size, not only when opt_in says it must be (csrc/cuda_device.h)
    allow_dynamic_smem(kernel, device, plan.smem.dynamic_bytes, kOp);
    const int64_t per_sm = blocks_per_sm(kernel, plan.smem.dynamic_bytes, kOp);
    plan.grid = std::min<int64_t>(rows, static_cast<int64_t>(info.sms) * per_sm);
    plan.slots = std::min(plan.grid, n);
    plan.workspace = plan.slots * inner * 8;
  } else {
    plan.workspace = column_stat_workspace(n, inner, token_norm, device);
  }
  return plan;
}

template <typename T>
void launch(Dtype dtype, const void* p, int64_t rows, int64_t inner, int64_t row_start, int64_t row_end, float* acc,
            void* out, bool token_norm, void* ws, int64_t ws_bytes, cudaStream_t stream) {
  const int device = current_device(kOp);
  const int64_t n = row_end - row_start;
  const Plan plan = make_plan<T>(dtype, rows, inner, n, token_norm, device);
  if (n > 0 && (ws == nullptr || ws_bytes < plan.workspace)) {
    throw std::invalid_argument(std::string(kOp) + ": workspace of " + std::to_string(ws_bytes) + " bytes, " +
                                std::to_string(plan.workspace) + " needed");
  }
  const T* pt = static_cast<const T*>(p);
  T* ot = static_cast<T*>(out);
  if (n > 0 && plan.smem.variant == 0) {
    auto* partial = static_cast<double*>(ws);
    geglu_fused_kernel<T><<<static_cast<unsigned>(plan.grid), kThreads, plan.smem.dynamic_bytes, stream>>>(
        pt, ot, rows, inner, row_start, row_end, token_norm, partial, plan.slots);
    check(cudaGetLastError(), kOp, "fused kernel launch");
    reduce_partials(partial, plan.slots, inner, acc, stream, kOp);
    return;
  }
  const int64_t grid = std::min<int64_t>(rows, device_info(device).sms * kOutBlocksPerSm);
  geglu_out_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(pt, ot, rows, inner);
  check(cudaGetLastError(), kOp, "kernel launch");
  if (n > 0) column_stat(ot + row_start * inner, dtype, n, inner, acc, token_norm, ws, ws_bytes, device, stream, kOp);
}

void check_args(int64_t rows, int64_t inner, int64_t row_start, int64_t row_end) {
  if (rows < 0 || inner <= 0) {
    throw std::invalid_argument(std::string(kOp) + ": bad shape: rows=" + std::to_string(rows) +
                                ", inner=" + std::to_string(inner));
  }
  if (!(0 <= row_start && row_start <= row_end && row_end <= rows)) {
    throw std::invalid_argument(std::string(kOp) + ": row range [" + std::to_string(row_start) + ", " +
                                std::to_string(row_end) + ") does not fit " + std::to_string(rows) + " rows");
  }
}

}  // namespace

void geglu_static_smem_report(int device, std::vector<std::pair<std::string, int64_t>>& out) {
  out.emplace_back("geglu_accumulate<float32>", static_smem(fused_kernel<float>(), device));
  out.emplace_back("geglu_accumulate<float64>", static_smem(fused_kernel<double>(), device));
  out.emplace_back("geglu_accumulate<float16>", static_smem(fused_kernel<__half>(), device));
  out.emplace_back("geglu_accumulate<bfloat16>", static_smem(fused_kernel<__nv_bfloat16>(), device));
}

}  // namespace cuda

int64_t geglu_accumulate_cuda_workspace(Dtype dtype, int64_t rows, int64_t inner, int64_t row_start,
                                        int64_t row_end, bool token_norm, int device) {
  using namespace cuda;
  check_args(rows, inner, row_start, row_end);
  const int64_t n = row_end - row_start;
  if (rows == 0 || n == 0) return 0;
  int previous = 0;
  check(cudaGetDevice(&previous), kOp, "cudaGetDevice");
  if (previous != device) check(cudaSetDevice(device), kOp, "cudaSetDevice");
  int64_t bytes = 0;
  try {
    switch (dtype) {
      case Dtype::Float32: bytes = make_plan<float>(dtype, rows, inner, n, token_norm, device).workspace; break;
      case Dtype::Float64: bytes = make_plan<double>(dtype, rows, inner, n, token_norm, device).workspace; break;
      case Dtype::Float16: bytes = make_plan<__half>(dtype, rows, inner, n, token_norm, device).workspace; break;
      case Dtype::BFloat16: bytes = make_plan<__nv_bfloat16>(dtype, rows, inner, n, token_norm, device).workspace; break;
      default: throw std::invalid_argument(std::string(kOp) + ": bad dtype");
    }
  } catch (...) {
    if (previous != device) cudaSetDevice(previous);
    throw;
  }
  if (previous != device) cudaSetDevice(previous);
  return bytes;
}

void geglu_accumulate_cuda(const void* p, Dtype dtype, int64_t rows, int64_t inner, int64_t row_start,
                           int64_t row_end, float* acc, void* out, bool token_norm, void* ws, int64_t ws_bytes,
                           std::uintptr_t stream) {
  using namespace cuda;
  check_args(rows, inner, row_start, row_end);
  if (rows == 0) return;
  if (p == nullptr || out == nullptr || (row_end > row_start && acc == nullptr)) {
    throw std::invalid_argument(std::string(kOp) + ": null pointer");
  }
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case Dtype::Float32: return launch<float>(dtype, p, rows, inner, row_start, row_end, acc, out, token_norm, ws, ws_bytes, s);
    case Dtype::Float64: return launch<double>(dtype, p, rows, inner, row_start, row_end, acc, out, token_norm, ws, ws_bytes, s);
    case Dtype::Float16: return launch<__half>(dtype, p, rows, inner, row_start, row_end, acc, out, token_norm, ws, ws_bytes, s);
    case Dtype::BFloat16:
      return launch<__nv_bfloat16>(dtype, p, rows, inner, row_start, row_end, acc, out, token_norm, ws, ws_bytes, s);
  }
  throw std::invalid_argument(std::string(kOp) + ": bad dtype");
}

}  // namespace memcore
