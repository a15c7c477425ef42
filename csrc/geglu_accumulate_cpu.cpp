// geglu_accumulate, CPU backend (C++17, OpenMP).
//
// P is row-major contiguous [rows, 2 * inner]: h = P[:, :inner], g = P[:, inner:]. Writes
//   out[r, j] = round(h * round(gelu(g))),  gelu(g) = g * 0.5 * (1 + erf(g / sqrt(2)))   (exact gelu)
// in float32 (float64 for float64 input), rounding to P's dtype where eager PyTorch does (diffusers'
// GEGLU is `h * F.gelu(g)` in P's dtype; both roundings are no-ops in float32), for every row; then
// adds the statistic of the ROUNDED out (what the next layer reads) over rows [row_start, row_end):
//   acc[j] += sum_r x[r, j]^2 * inv[r],  inv[r] = 1 / sum_j x[r, j]^2 (token_norm; 0 for a zero row) or 1.
// One pass over P: a row is computed into a double buffer, stored, and its statistic taken from the
// buffer. Deterministic whatever the thread count, as csrc/sqnorm_accumulate_cpu.cpp: the statistic
// rows are cut into a partition that depends only on the shape, each chunk sums its rows in order into
// a double partial[chunk, inner], and the chunks are added in order and rounded to float once.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "memcore.h"

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

// The same expression as torch's exact gelu: x * 0.5 * (1 + erf(x * M_SQRT1_2)).
inline float gelu(float x) { return x * 0.5f * (1.0f + std::erf(x * static_cast<float>(kSqrtHalf))); }
inline double gelu(double x) { return x * 0.5 * (1.0 + std::erf(x * kSqrtHalf)); }

// out row r = h * gelu(g); the rounded values (as double) go to buf when it is not null.
template <typename T>
inline void geglu_row(const T* p_row, T* out_row, int64_t inner, double* buf) {
  using C = typename Io<T>::C;
  for (int64_t j = 0; j < inner; ++j) {
    const C h = Io<T>::load(p_row, j);
    const C g = Io<T>::load(p_row, inner + j);
    const C x = Io<T>::store(out_row, j, h * Io<T>::round(gelu(g)));
    if (buf != nullptr) buf[j] = static_cast<double>(x);
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
    geglu_row(p + r * 2 * inner, out + r * inner, inner, nullptr);
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
        geglu_row(p + r * 2 * inner, out + r * inner, inner, x);
        double w = 1.0;
        if (token_norm) {
          const double total = row_sumsq(x, inner);
          w = total > 0.0 ? 1.0 / total : 0.0;
        }
        for (int64_t j = 0; j < inner; ++j) sum[j] += x[j] * x[j] * w;
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
