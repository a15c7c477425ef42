// geglu_accumulate, CPU backend (C++17, OpenMP).
//
// P is row-major contiguous [rows, 2 * inner]: h = P[:, :inner], g = P[:, inner:]. Writes
//   out[r, j] = round(h * round(gelu(g))),  gelu(g) = g * 0.5 * (1 + erf(g / sqrt(2)))   (exact gelu)
// in float32 (float64 for float64 input), rounding to P's dtype where eager PyTorch does (diffusers'
// GEGLU is `h * F.gelu(g)` in P's dtype; both roundings are no-ops in float32), for every row; then
// adds the statistic of the ROUNDED out (what the next layer reads) over rows [row_start, row_end):
//   acc[j] += sum_r x[r, j]^2 * inv[r],  inv[r] = 1 / sum_j x[r, j]^2 (token_norm) or 1,
// where with token_norm a row whose sum of squares is 0, inf or NaN adds nothing (csrc/row_norm.h).
// One pass over P: a row is computed into a double buffer, stored, and its statistic taken from the
// buffer. Deterministic whatever the thread count, as csrc/sqnorm_accumulate_cpu.cpp: the statistic
// rows are cut into a partition that depends only on the shape, each chunk sums its rows in order into
// a double partial[chunk, inner], and the chunks are added in order and rounded to float once.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "memcore.h"
#include "row_norm.h"

namespace memcore {
namespace {

constexpr int64_t kMinChunkRows = 64;      // statistic rows per chunk before a second chunk is cut
constexpr int64_t kMaxChunks = 64;         // bounds the partial buffer to kMaxChunks * inner doubles
constexpr int64_t kParallelMin = 1 << 14;  // output elements below which we stay serial
constexpr double kSqrtHalf = 0.70710678118654752440;  // M_SQRT1_2

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

// Compute type C, load to C, and round C to the storage type (returning the rounded value as C).
template <typename T> struct Io;
template <> struct Io<float> {
  using C = float;
  static C load(const float* p, int64_t i) { return p[i]; }
  static C store(float* p, int64_t i, C v) { return p[i] = v; }
  static C round(C v) { return v; }
};
template <> struct Io<double> {
  using C = double;
  static C load(const double* p, int64_t i) { return p[i]; }
  static C store(double* p, int64_t i, C v) { return p[i] = v; }
  static C round(C v) { return v; }
};
template <> struct Io<Half> {
  using C = float;
  static C load(const Half* p, int64_t i) { return convert::half_to_float(p[i].bits); }
  static C store(Half* p, int64_t i, C v) {
    p[i].bits = convert::float_to_half(v);
    return convert::half_to_float(p[i].bits);
  }
  static C round(C v) { return convert::half_to_float(convert::float_to_half(v)); }
};
template <> struct Io<BFloat16> {
  using C = float;
  static C load(const BFloat16* p, int64_t i) { return convert::bfloat16_to_float(p[i].bits); }
  static C store(BFloat16* p, int64_t i, C v) {
    p[i].bits = convert::float_to_bfloat16(v);
    return convert::bfloat16_to_float(p[i].bits);
  }
  static C round(C v) { return convert::bfloat16_to_float(convert::float_to_bfloat16(v)); }
};

// erf for float inputs, evaluated in double without a library call, so that the loop over a row
// vectorizes (std::erf is a scalar call: it made this kernel slower than PyTorch's vectorized GEGLU).
// erf(x) = x P(x^2) / Q(x^2) on |x| < kErfOne, a rational fit of degree 6/6 made for memcore (weighted
// least squares, iterated towards minimax) with |error| <= 7.6e-10; beyond kErfOne, erf(x) rounds to
// +-1 in float32 anyway. Rounded to float, gelu is within half an ulp plus ~1e-9 relative of the
// float64 gelu: more accurate than float32 torch (~0.6 ulp for erf, more where 1 + erf cancels).
constexpr double kErfOne = 3.92;
constexpr double kErfP[] = {1.1283791679447082,     0.1618669006232742,     0.05004505548735912,
                            0.002714715438075307,   0.00028698966331961324, -1.622252737551113e-06,
                            -5.3850141777941546e-08};
constexpr double kErfQ[] = {1.0,
                            0.4767841708392601,
                            0.1032791113599747,
                            0.012963937142689785,
                            0.0009692365232987372,
                            3.529619860595048e-05,
                            -7.919850445581867e-07};

// Branch-free (selects of computed values only), so that GCC vectorizes it under -ftrapping-math.
inline double erf_rational(double x) {
  const double c = x > kErfOne ? kErfOne : (x < -kErfOne ? -kErfOne : x);
  const double t = c * c;
  const double p = ((((((kErfP[6] * t + kErfP[5]) * t + kErfP[4]) * t + kErfP[3]) * t + kErfP[2]) * t + kErfP[1]) * t +
                    kErfP[0]);
  const double q = ((((((kErfQ[6] * t + kErfQ[5]) * t + kErfQ[4]) * t + kErfQ[3]) * t + kErfQ[2]) * t + kErfQ[1]) * t +
                    kErfQ[0]);
  const double r = c * p / q;
  const double one = x < 0.0 ? -1.0 : 1.0;
  return c == x ? r : one;
}

// Exact gelu, x * 0.5 * (1 + erf(x / sqrt 2)): float inputs through erf_rational (rounded once to
// float), float64 inputs through the C library's erf (the float64 reference).
inline float gelu(float x) {
  const double g = static_cast<double>(x);
  return static_cast<float>(g * 0.5 * (1.0 + erf_rational(g * kSqrtHalf)));
}
inline double gelu(double x) { return x * 0.5 * (1.0 + std::erf(x * kSqrtHalf)); }

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// Also compiled for x86-64-v3 (AVX2: four doubles per instruction), chosen when the library loads.
// With -ffp-contract=off (CMakeLists.txt) both versions round alike: results do not depend on the CPU.
// Measured on the 2-core development machine, one thread, 5120 x 512: 14.1 ns per output with the C
// library's erff, 7.3 with erf_rational on SSE2, 2.6 with it on x86-64-v3.
#define MEMCORE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MEMCORE_CLONES
#endif

// out row = h * gelu(g) for float32 rows; the values also go to buf (as double) when it is not null.
// Two loops rather than a test in one, so that each vectorizes.
MEMCORE_CLONES void geglu_row_float(const float* p_row, float* out_row, int64_t inner, double* buf) {
  const float* h = p_row;
  const float* g = p_row + inner;
  if (buf == nullptr) {
    for (int64_t j = 0; j < inner; ++j) out_row[j] = h[j] * gelu(g[j]);
  } else {
    for (int64_t j = 0; j < inner; ++j) {
      const float x = h[j] * gelu(g[j]);
      out_row[j] = x;
      buf[j] = static_cast<double>(x);
    }
  }
}

// out row r = h * gelu(g); with kKeep the rounded values (as double) also go to buf.
template <typename T, bool kKeep>
inline void geglu_row(const T* p_row, T* out_row, int64_t inner, double* buf) {
  if constexpr (std::is_same_v<T, float>) {
    geglu_row_float(p_row, out_row, inner, kKeep ? buf : nullptr);
  } else {
    using C = typename Io<T>::C;
    for (int64_t j = 0; j < inner; ++j) {
      const C h = Io<T>::load(p_row, j);
      const C g = Io<T>::load(p_row, inner + j);
      const C x = Io<T>::store(out_row, j, h * Io<T>::round(gelu(g)));
      if constexpr (kKeep) buf[j] = static_cast<double>(x);
    }
  }
}

// Sum of squares in a fixed order (4 interleaved lanes), as sqnorm_accumulate_cpu.
inline double row_sumsq(const double* v, int64_t n) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    s0 += v[j] * v[j];
    s1 += v[j + 1] * v[j + 1];
    s2 += v[j + 2] * v[j + 2];
    s3 += v[j + 3] * v[j + 3];
  }
  for (; j < n; ++j) s0 += v[j] * v[j];
  return (s0 + s1) + (s2 + s3);
}

template <typename T>
void run(const T* p, int64_t rows, int64_t inner, int64_t row_start, int64_t row_end, float* acc, T* out,
         bool token_norm) {
  const bool parallel = rows * inner >= kParallelMin;

  // 1. rows outside the statistic range: out only
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t r = 0; r < rows; ++r) {
    if (r >= row_start && r < row_end) continue;
    geglu_row<T, false>(p + r * 2 * inner, out + r * inner, inner, nullptr);
  }

  const int64_t n = row_end - row_start;
  if (n == 0) return;

  // 2. statistic rows: out and per-chunk partial column sums, rows in order within a chunk
  const int64_t chunks = std::clamp<int64_t>((n + kMinChunkRows - 1) / kMinChunkRows, 1, kMaxChunks);
  const int64_t chunk_rows = (n + chunks - 1) / chunks;
  std::vector<double> partial(static_cast<size_t>(chunks * inner), 0.0);
#pragma omp parallel if (parallel)
  {
    std::vector<double> buf(static_cast<size_t>(inner));
    double* x = buf.data();
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      double* sum = partial.data() + c * inner;
      const int64_t r1 = std::min(n, (c + 1) * chunk_rows);
      for (int64_t i = c * chunk_rows; i < r1; ++i) {
        const int64_t r = row_start + i;
        geglu_row<T, true>(p + r * 2 * inner, out + r * inner, inner, x);
        const double w = token_norm ? row_weight(row_sumsq(x, inner)) : 1.0;
        if (w > 0.0) {
          for (int64_t j = 0; j < inner; ++j) sum[j] += x[j] * x[j] * w;
        } else if (w < 0.0) {  // float64 rows of tiny values (row_norm.h)
          for (int64_t j = 0; j < inner; ++j) sum[j] += weighted_square(x[j], w);
        }  // w == 0: the row adds nothing
      }
    }
  }

  // 3. reduce the chunks in order and add once, rounded to float
  for (int64_t j = 0; j < inner; ++j) {
    double s = 0.0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[static_cast<size_t>(c * inner + j)];
    acc[j] += static_cast<float>(s);
  }
}

}  // namespace

void geglu_accumulate_cpu(const void* p, Dtype dtype, int64_t rows, int64_t inner, int64_t row_start,
                          int64_t row_end, float* acc, void* out, bool token_norm) {
  if (rows < 0 || inner <= 0) {
    throw std::invalid_argument("geglu_accumulate_cpu: bad shape: rows=" + std::to_string(rows) +
                                ", inner=" + std::to_string(inner));
  }
  if (!(0 <= row_start && row_start <= row_end && row_end <= rows)) {
    throw std::invalid_argument("geglu_accumulate_cpu: row range [" + std::to_string(row_start) + ", " +
                                std::to_string(row_end) + ") does not fit " + std::to_string(rows) + " rows");
  }
  if (rows == 0) return;
  if (p == nullptr || out == nullptr || (row_end > row_start && acc == nullptr)) {
    throw std::invalid_argument("geglu_accumulate_cpu: null pointer");
  }
  switch (dtype) {
    case Dtype::Float32:
      return run(static_cast<const float*>(p), rows, inner, row_start, row_end, acc, static_cast<float*>(out),
                 token_norm);
    case Dtype::Float64:
      return run(static_cast<const double*>(p), rows, inner, row_start, row_end, acc, static_cast<double*>(out),
                 token_norm);
    case Dtype::Float16:
      return run(static_cast<const Half*>(p), rows, inner, row_start, row_end, acc, static_cast<Half*>(out),
                 token_norm);
    case Dtype::BFloat16:
      return run(static_cast<const BFloat16*>(p), rows, inner, row_start, row_end, acc,
                 static_cast<BFloat16*>(out), token_norm);
  }
  throw std::invalid_argument("geglu_accumulate_cpu: bad dtype");
}

}  // namespace memcore
