// memcore native ops: the C++ functions that python/bindings.cpp binds.
// Plain C++ (no libtorch): tensors arrive as data pointers and sizes; the Python wrappers check
// dtype, device, contiguity and shape before calling.
#pragma once

#include <cstdint>
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

#ifdef MEMCORE_WITH_CUDA
// Same statistic on the GPU, enqueued on `stream` (a cudaStream_t); x and acc are device pointers
// on the current device. Partial column sums are float, added into acc with atomicAdd, so the
// result may differ in the last bits between runs. Throws std::runtime_error on a CUDA error.
void sqnorm_accumulate_cuda(const void* x, Dtype dtype, int64_t rows, int64_t cols, int64_t row_start,
                            int64_t row_end, float* acc, bool token_norm, std::uintptr_t stream);
#endif

}  // namespace memcore
