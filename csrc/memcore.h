// memcore native ops: the C++ functions that python/bindings.cpp binds.
// Plain C++ (no libtorch): tensors arrive as data pointers and sizes; the Python wrappers check
// dtype, device, contiguity and shape before calling.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace memcore {

enum class Dtype : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// "float32" | "float16" | "bfloat16" | "float64"; anything else throws std::invalid_argument.
Dtype parse_dtype(const std::string& name);

// acc[j] += sum_{r in [row_start, row_end)} x[r, j]^2 * inv[r] for a row-major contiguous
// [rows, cols] matrix x, where inv[r] = 1 / sum_j x[r, j]^2 (0 for a zero row) when token_norm and
// 1 otherwise. Sums are taken in double and rounded to float once per call; the result does not
// depend on the number of OpenMP threads. Throws std::invalid_argument on a bad range.
void sqnorm_accumulate_cpu(const void* x, Dtype dtype, int64_t rows, int64_t cols, int64_t row_start,
                           int64_t row_end, float* acc, bool token_norm);

// Number of OpenMP threads a parallel region would use (1 without OpenMP).
int openmp_threads();

// The memorized-neuron mask of one layer (memcore/ops/wanda_mask.py, SPEC section 3), bit-exact with
// wanda_mask_reference. w: row-major contiguous [out, in] in `dtype` (float64 is rounded to float32
// first); norms, null: float32 contiguous [T, in] (null may be nullptr: no null condition);
// mask: uint8 [out, ceil(in / 8)], fully written (bit b of byte c = column 8c + b, padding zero).
// Throws std::invalid_argument on a bad shape or k outside [0, in].
void wanda_mask_cpu(const void* w, Dtype dtype, int64_t out, int64_t in, const float* norms, const float* null,
                    int64_t T, int64_t k, bool largest, uint8_t* mask);

// GEGLU with the statistic of its output (memcore/ops/geglu_accumulate.py). p: row-major contiguous
// [rows, 2 * inner] in `dtype`, h = p[:, :inner], g = p[:, inner:]; out: [rows, inner] in `dtype`,
// out = h * gelu(g) (exact erf gelu) computed in float32 (float64 for float64) and rounded once;
// then, over rows [row_start, row_end), acc[j] += sum_r x[r, j]^2 * inv[r] with x the rounded out and
// inv as in sqnorm_accumulate_cpu. Sums in double, independent of the OpenMP thread count.
void geglu_accumulate_cpu(const void* p, Dtype dtype, int64_t rows, int64_t inner, int64_t row_start,
                          int64_t row_end, float* acc, void* out, bool token_norm);

#ifdef MEMCORE_WITH_CUDA
// Same statistic on the GPU, enqueued on `stream` (a cudaStream_t); x and acc are device pointers
// on the current device. Partial column sums are float, added into acc with atomicAdd, so the
// result may differ in the last bits between runs. Throws std::runtime_error on a CUDA error.
void sqnorm_accumulate_cuda(const void* x, Dtype dtype, int64_t rows, int64_t cols, int64_t row_start,
                            int64_t row_end, float* acc, bool token_norm, std::uintptr_t stream);

// wanda_mask_cpu on device pointers (current device), enqueued on `stream`; bit-exact with the CPU.
void wanda_mask_cuda(const void* w, Dtype dtype, int64_t out, int64_t in, const float* norms, const float* null,
                     int64_t T, int64_t k, bool largest, uint8_t* mask, std::uintptr_t stream);

// geglu_accumulate_cpu on device pointers (current device), enqueued on `stream`. out is the same
// (rounded once from float32/float64); the statistic is summed in float and added with atomicAdd.
void geglu_accumulate_cuda(const void* p, Dtype dtype, int64_t rows, int64_t inner, int64_t row_start,
                           int64_t row_end, float* acc, void* out, bool token_norm, std::uintptr_t stream);
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
