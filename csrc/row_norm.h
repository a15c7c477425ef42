// The token_norm weight of one row, shared by the CPU and CUDA statistics kernels (host and device).
//
// sqnorm_accumulate_reference adds sq[r, j] / total[r] per row, sq = x^2 and total = sum_j sq, both in
// float64, and skips a row whose total is 0 or not finite (the row holds an inf or a NaN). The
// kernels sum each row's squares in double too (exact for 16- and 32-bit inputs: no overflow for
// float32 values near 3e38, no underflow for float32 subnormals), take w = row_weight(total) once
// per row, skip rows with w == 0 (so an inf row adds nothing rather than inf * 0 = NaN), and add
// weighted_square(x, w) for the others.
//
// 1 / total overflows only for float64 rows whose squares are themselves subnormal (|x| below about
// 1e-154); such a row gets a negative w, the reciprocal of total scaled by 2^600, and its squares,
// rounded as the reference rounds them, are scaled by the same power of two before the product.
#pragma once

#include <cfloat>

#if defined(__CUDACC__)
#define MEMCORE_HD __host__ __device__ __forceinline__
#else
#define MEMCORE_HD inline
#endif

namespace memcore {

constexpr double kTinyTotal = 0x1p-1000;  // totals below this take the scaled reciprocal
constexpr double kTinyScale = 0x1p600;

// 0: the row adds nothing; > 0: 1 / total; < 0: -1 / (total * 2^600).
MEMCORE_HD double row_weight(double total) {
  if (!(total > 0.0) || !(total <= DBL_MAX)) return 0.0;
  if (total >= kTinyTotal) return 1.0 / total;
  return -1.0 / (total * kTinyScale);
}

// x^2 / total for a row of weight w != 0.
MEMCORE_HD double weighted_square(double x, double w) {
  const double sq = x * x;
  return w > 0.0 ? sq * w : (sq * kTinyScale) * -w;
}

}  // namespace memcore
