// sqnorm_accumulate, CPU backend (C++17, OpenMP).
//
// acc[j] += sum_r x[r, j]^2 * inv[r] over rows r in [row_start, row_end), inv[r] = 1/||x[r]||^2
// (token_norm) or 1; with token_norm a row whose sum of squares is 0, inf or NaN adds nothing
// (csrc/row_norm.h). Squares and sums are double: float32 rows near 3e38 do not overflow, float32
// subnormal rows still count. Deterministic whatever the thread count: every partial sum is taken in
// a fixed order over a fixed partition that depends only on the shape.
//   1. inv[r] = row_weight(total): parallel over rows, each row summed in order (4 fixed lanes).
//   2. partial[c, j]: the input is cut into at most kMaxChunks row chunks and kColBlock-wide column
//      blocks; each (chunk, block) tile sums its rows in row order into doubles.
//   3. acc[j] += float(sum_c partial[c, j]), chunks added in order.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "memcore.h"
#include "row_norm.h"

namespace memcore {
namespace {

constexpr int64_t kMinChunkRows = 512;   // rows per chunk before a second chunk is cut
constexpr int64_t kMaxChunks = 64;       // bounds the partial buffer to kMaxChunks * cols doubles
constexpr int64_t kColBlock = 256;       // columns per tile (a 2 KiB double accumulator)
constexpr int64_t kParallelMin = 1 << 15;  // elements below which we stay serial

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline double load(const float* p, int64_t i) { return static_cast<double>(p[i]); }
inline double load(const double* p, int64_t i) { return p[i]; }
inline double load(const Half* p, int64_t i) { return static_cast<double>(convert::half_to_float(p[i].bits)); }
inline double load(const BFloat16* p, int64_t i) { return static_cast<double>(convert::bfloat16_to_float(p[i].bits)); }

template <typename T>
void run(const T* x, int64_t cols, int64_t row_start, int64_t row_end, float* acc, bool token_norm) {
  const int64_t n = row_end - row_start;
  const T* base = x + row_start * cols;
  const bool parallel = n * cols >= kParallelMin;

  // 1. per-row weights
  std::vector<double> inv(static_cast<size_t>(n), 1.0);
  if (token_norm) {
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t r = 0; r < n; ++r) {
      const T* row = base + r * cols;
      double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
      int64_t j = 0;
      for (; j + 4 <= cols; j += 4) {
        const double a = load(row, j), b = load(row, j + 1), c = load(row, j + 2), d = load(row, j + 3);
        s0 += a * a;
        s1 += b * b;
        s2 += c * c;
        s3 += d * d;
      }
      for (; j < cols; ++j) {
        const double a = load(row, j);
        s0 += a * a;
      }
      inv[static_cast<size_t>(r)] = row_weight((s0 + s1) + (s2 + s3));
    }
  }

  // 2. per-tile column sums, in row order within each tile
  const int64_t chunks = std::clamp<int64_t>((n + kMinChunkRows - 1) / kMinChunkRows, 1, kMaxChunks);
  const int64_t chunk_rows = (n + chunks - 1) / chunks;
  const int64_t blocks = (cols + kColBlock - 1) / kColBlock;
  std::vector<double> partial(static_cast<size_t>(chunks * cols), 0.0);
#pragma omp parallel for collapse(2) schedule(static) if (parallel)
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t r0 = c * chunk_rows;
      const int64_t r1 = std::min(n, r0 + chunk_rows);
      const int64_t j0 = b * kColBlock;
      const int64_t width = std::min(cols - j0, kColBlock);
      double sum[kColBlock] = {};
      for (int64_t r = r0; r < r1; ++r) {
        const T* row = base + r * cols + j0;
        const double w = inv[static_cast<size_t>(r)];
        if (w > 0.0) {
          for (int64_t j = 0; j < width; ++j) {
            const double v = load(row, j);
            sum[j] += v * v * w;
          }
        } else if (w < 0.0) {  // float64 rows of tiny values (row_norm.h)
          for (int64_t j = 0; j < width; ++j) sum[j] += weighted_square(load(row, j), w);
        }  // w == 0: the row adds nothing
      }
      std::copy(sum, sum + width, partial.begin() + c * cols + j0);
    }
  }

  // 3. reduce the chunks in order and add once, rounded to float
#pragma omp parallel for schedule(static) if (parallel && cols >= 4096)
  for (int64_t j = 0; j < cols; ++j) {
    double s = 0.0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[static_cast<size_t>(c * cols + j)];
    acc[j] += static_cast<float>(s);
  }
}

}  // namespace

Dtype parse_dtype(const std::string& name) {
  if (name == "float32") return Dtype::Float32;
  if (name == "float16") return Dtype::Float16;
  if (name == "bfloat16") return Dtype::BFloat16;
  if (name == "float64") return Dtype::Float64;
  throw std::invalid_argument("memcore: unknown dtype '" + name +
                              "' (expected float32, float16, bfloat16 or float64)");
}

int openmp_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void sqnorm_accumulate_cpu(const void* x, Dtype dtype, int64_t rows, int64_t cols, int64_t row_start,
                           int64_t row_end, float* acc, bool token_norm) {
  if (rows < 0 || cols <= 0) {
    throw std::invalid_argument("sqnorm_accumulate_cpu: bad shape [" + std::to_string(rows) + ", " +
                                std::to_string(cols) + "]");
  }
  if (!(0 <= row_start && row_start <= row_end && row_end <= rows)) {
    throw std::invalid_argument("sqnorm_accumulate_cpu: row range [" + std::to_string(row_start) + ", " +
                                std::to_string(row_end) + ") does not fit " + std::to_string(rows) + " rows");
  }
  if (row_start == row_end) return;
  if (x == nullptr || acc == nullptr) throw std::invalid_argument("sqnorm_accumulate_cpu: null pointer");
  switch (dtype) {
    case Dtype::Float32:
      return run(static_cast<const float*>(x), cols, row_start, row_end, acc, token_norm);
    case Dtype::Float64:
      return run(static_cast<const double*>(x), cols, row_start, row_end, acc, token_norm);
    case Dtype::Float16:
      return run(static_cast<const Half*>(x), cols, row_start, row_end, acc, token_norm);
    case Dtype::BFloat16:
      return run(static_cast<const BFloat16*>(x), cols, row_start, row_end, acc, token_norm);
  }
  throw std::invalid_argument("sqnorm_accumulate_cpu: bad dtype");
}

}  // namespace memcore
