// memcore native ops: the C++ functions that python/bindings.cpp binds.
// Plain C++ (no libtorch): tensors arrive as data pointers and sizes; the Python wrappers check
// dtype, device, contiguity and shape before calling.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace memcore {

enum class Dtype : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// "float32" | "float16" | "bfloat16" | "float64"; anything else throws std::invalid_argument.
Dtype parse_dtype(const std::string& name);

// acc[j] += sum_{r in [row_start, row_end)} x[r, j]^2 * inv[r] for a row-major contiguous
// [rows, cols] matrix x, where inv[r] = 1 / sum_j x[r, j]^2 when token_norm and 1 otherwise; with
// token_norm a row whose sum of squares is 0 or not finite adds nothing (row_norm.h). Sums are taken
// in double and rounded to float once per call; the result does not depend on the number of OpenMP
// threads. Throws std::invalid_argument on a bad range.
void sqnorm_accumulate_cpu(const void* x, Dtype dtype, int64_t rows, int64_t cols, int64_t row_start,
                           int64_t row_end, float* acc, bool token_norm);

// Number of OpenMP threads a parallel region would use (1 without OpenMP).
int openmp_threads();

// Bits of the wanda flag word (memcore/ops/wanda_mask.py): which input holds a NaN or an inf.
constexpr int32_t kBadWeight = 1, kBadNorms = 2, kBadNullNorms = 4;

// The memorized-neuron mask of one layer (memcore/ops/wanda_mask.py, docs/method.md section 3), bit-exact with
// wanda_mask_reference. w: row-major contiguous [out, in] in `dtype` (float64 is rounded to float32
// first); norms, null: float32 contiguous [T, in] (null may be nullptr: no null condition);
// mask: uint8 [out, ceil(in / 8)], fully written (bit b of byte c = column 8c + b, padding zero).
// flags: one int32, OR-ed with kBadWeight / kBadNorms / kBadNullNorms for each input holding a value
// that is not finite (checked while the values are read; float64 weights are checked before rounding),
// whatever k. Throws std::invalid_argument on a bad shape or k outside [0, in].
void wanda_mask_cpu(const void* w, Dtype dtype, int64_t out, int64_t in, const float* norms, const float* null,
                    int64_t T, int64_t k, bool largest, uint8_t* mask, int32_t* flags);

// One layer of wanda_mask_grouped_cpu: the arguments of wanda_mask_cpu but T and largest.
struct WandaLayer {
  const void* w;
  Dtype dtype;
  int64_t out, in;
  const float* norms;
  const float* null;
  int64_t k;
  uint8_t* mask;
  int32_t* flags;
};

// wanda_mask_cpu for many layers in one parallel region (the rows of all layers share the threads),
// each mask and flag word as wanda_mask_cpu writes them; every layer is checked before any runs.
void wanda_mask_grouped_cpu(const WandaLayer* layers, int64_t count, int64_t T, bool largest);

// GEGLU with the statistic of its output (memcore/ops/geglu_accumulate.py). p: row-major contiguous
// [rows, 2 * inner] in `dtype`, h = p[:, :inner], g = p[:, inner:]; out: [rows, inner] in `dtype`,
// out = h * gelu(g) (exact erf gelu) computed in float32 (float64 for float64) and rounded once;
// then, over rows [row_start, row_end), acc[j] += sum_r x[r, j]^2 * inv[r] with x the rounded out and
// inv as in sqnorm_accumulate_cpu. Sums in double, independent of the OpenMP thread count.
void geglu_accumulate_cpu(const void* p, Dtype dtype, int64_t rows, int64_t inner, int64_t row_start,
                          int64_t row_end, float* acc, void* out, bool token_norm);

// Shared-memory plan of a CUDA launch: pure host arithmetic (csrc/launch_plan.cpp), compiled without
// CUDA too, so that it is tested on machines without a GPU. A launch with static shared memory S (the
// kernel's, cudaFuncGetAttributes().sharedSizeBytes) and dynamic D runs when S + D <= the device's
// opt-in limit per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), and needs
// cudaFuncAttributeMaxDynamicSharedMemorySize >= D, set beforehand, whenever S + D > 48 KiB.
constexpr int64_t kDefaultSmemPerBlock = 48 * 1024;

struct SmemPlan {
  int variant;            // 0: the kernel holding its rows in shared memory, 1: the fallback, -1: none fits
  int64_t dynamic_bytes;  // D
  bool opt_in;            // S + D > 48 KiB: raise the kernel's dynamic shared memory limit first
};

// Dynamic shared memory of the fused geglu kernel: inner double column sums, and with token_norm the
// current row's inner values (float, double for float64).
int64_t geglu_fused_smem_bytes(int64_t inner, Dtype dtype, bool token_norm);
// variant 0: the fused kernel (static_bytes = its static shared memory) when it fits in optin_limit
// and force_fallback is off; else 1: GEGLU alone, then the statistic of its output as sqnorm_accumulate
// (static shared memory only, far below 48 KiB).
SmemPlan plan_geglu_smem(int64_t inner, Dtype dtype, bool token_norm, int64_t static_bytes, int64_t optin_limit,
                         bool force_fallback);

// Dynamic shared memory of the wanda kernel: the row's bitmask (32-bit words, padded to 16 bytes),
// plus the row of |W| as float when kRowInSmem.
int64_t wanda_bits_smem_bytes(int64_t in);
int64_t wanda_row_smem_bytes(int64_t in);
// variant 0: |W| row and bitmask in shared memory (static_row: that kernel's static shared memory),
// unless force_fallback; 1: the bitmask only, |W| re-read per pass (static_bits); -1: not even that fits.
SmemPlan plan_wanda_smem(int64_t in, int64_t static_row, int64_t static_bits, int64_t optin_limit,
                         bool force_fallback);

#ifdef MEMCORE_WITH_CUDA
// CUDA launchers (kernels/*.cu, csrc/cuda_device.cu). Pointers are device pointers on the current
// device, work is enqueued on `stream` (a cudaStream_t). Results do not depend on scheduling: no
// floating-point atomics; per-block partial sums go to a workspace (device memory of ws_bytes, from
// the caller, at least what the matching *_workspace function returns for the current device) and are
// added in a fixed order by a second kernel. The grid is a function of the shape and the device.
// Errors throw std::runtime_error with the CUDA error string.

// Bytes of workspace sqnorm_accumulate_cuda needs on `device` (0 when there is nothing to add).
int64_t sqnorm_accumulate_cuda_workspace(Dtype dtype, int64_t rows, int64_t cols, int64_t row_start,
                                         int64_t row_end, bool token_norm, int device);
// The statistic of sqnorm_accumulate_cpu (same weights, same skipped rows), sums in double.
void sqnorm_accumulate_cuda(const void* x, Dtype dtype, int64_t rows, int64_t cols, int64_t row_start,
                            int64_t row_end, float* acc, bool token_norm, void* ws, int64_t ws_bytes,
                            std::uintptr_t stream);

// wanda_mask_cpu on device pointers, bit-exact with it; flags is a device int32 (atomicOr).
void wanda_mask_cuda(const void* w, Dtype dtype, int64_t out, int64_t in, const float* norms, const float* null,
                     int64_t T, int64_t k, bool largest, uint8_t* mask, int32_t* flags, std::uintptr_t stream);

int64_t geglu_accumulate_cuda_workspace(Dtype dtype, int64_t rows, int64_t inner, int64_t row_start,
                                        int64_t row_end, bool token_norm, int device);
// geglu_accumulate_cpu on device pointers: out the same (rounded once from float32/float64), the
// statistic summed in double.
void geglu_accumulate_cuda(const void* p, Dtype dtype, int64_t rows, int64_t inner, int64_t row_start,
                           int64_t row_end, float* acc, void* out, bool token_norm, void* ws, int64_t ws_bytes,
                           std::uintptr_t stream);

// Launches a trivial kernel on `device` and waits for it: "" when it ran, else why not (driver too
// old for this build, no kernel image for the device's architecture, ...). Leaves the current device
// as it was.
std::string cuda_probe(int device);
// The architectures the kernels were compiled for, e.g. "80,90".
std::string cuda_architectures();
// Force the shared-memory fallback kernels (tests); initially set from MEMCORE_CUDA_SMEM_FALLBACK.
void set_cuda_smem_fallback(bool force);
bool cuda_smem_fallback();
// Static shared memory (bytes) of every kernel with a shared-memory plan, on `device`, by name
// (e.g. "geglu_accumulate<float16>", "wanda_mask<float32,row>").
std::vector<std::pair<std::string, int64_t>> cuda_kernel_static_smem(int device);
#endif

// Host-side scalar conversions shared by the CPU kernels (IEEE round-to-nearest-even, as torch).
namespace convert {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// binary16 -> binary32, exact for every input.
inline float half_to_float(uint16_t h) {
  constexpr uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (static_cast<uint32_t>(h) & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  if (exp == shifted_exp) {
    o += (128u - 16u) << 23;
  } else if (exp == 0) {
    o += 1u << 23;
    o = float_to_bits(bits_to_float(o) - bits_to_float(113u << 23));
  }
  return bits_to_float(o | ((static_cast<uint32_t>(h) & 0x8000u) << 16));
}

// binary32 -> binary16, round to nearest even (c10's fp16_ieee_from_fp32_value, integer exponent
// bias trick: the float addition rounds the mantissa; no fused multiply-add may touch it).
inline uint16_t float_to_half(float f) {
  const float scale_to_inf = bits_to_float(0x77800000u);   // 2^112
  const float scale_to_zero = bits_to_float(0x08800000u);  // 2^-110
  const float scaled = (f < 0.0f ? -f : f) * scale_to_inf;
  float base = scaled * scale_to_zero;
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xff000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007c00u;
  const uint32_t mantissa_bits = bits & 0x00000fffu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
}

inline float bfloat16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// binary32 -> bfloat16, round to nearest even; NaN stays a quiet NaN.
inline uint16_t float_to_bfloat16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace convert

}  // namespace memcore
