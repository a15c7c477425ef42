// Host-side helpers shared by the CUDA launchers (kernels/*.cu), defined in csrc/cuda_device.cu:
// checked CUDA calls, device attributes and kernel attributes cached per device, the dynamic
// shared-memory limit, and the deterministic column statistic used by sqnorm_accumulate and by the
// fallback of geglu_accumulate.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "memcore.h"

namespace memcore {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of every memcore kernel
constexpr int kWarps = kThreads / 32;

// Throws std::runtime_error("<op>: <what>: <CUDA error string>") unless err is cudaSuccess.
void check(cudaError_t err, const char* op, const char* what);

// The current device (checked).
int current_device(const char* op);

struct DeviceInfo {
  int sms;             // cudaDevAttrMultiProcessorCount
  int64_t optin_smem;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int major, minor;    // compute capability
};
// Read once per device, return codes checked.
const DeviceInfo& device_info(int device);

// cudaFuncGetAttributes(func).sharedSizeBytes on `device` (the current one), cached.
int64_t static_smem(const void* func, int device);

// Lets func launch with `bytes` of dynamic shared memory on `device` (the current one): raises
// cudaFuncAttributeMaxDynamicSharedMemorySize to at least `bytes` (checked). The limit only ever
// grows, under a lock, so concurrent launches of the same kernel with less keep working, and the
// CUDA call is made only when a launch needs more than any before it. The launchers call it for
// every dynamic size, beyond what SmemPlan::opt_in requires: for sm_90 the library reports 1 KiB
// more static shared memory per kernel than ptxas declares (the block's reserved shared memory),
// and raising the limit anyway leaves no doubt about which of the two the driver counts.
void allow_dynamic_smem(const void* func, int device, int64_t bytes, const char* op);

// cudaOccupancyMaxActiveBlocksPerMultiprocessor for kThreads threads (checked, at least 1).
int blocks_per_sm(const void* func, int64_t dynamic_bytes, const char* op);

// Whether the shared-memory fallbacks are forced (memcore.h: set_cuda_smem_fallback).
bool smem_fallback_forced();

// The column statistic of n rows of a contiguous [n, cols] device matrix x:
//   acc[j] += float(sum_r x[r, j]^2 * inv[r])   (inv and skipped rows as sqnorm_accumulate_cpu)
// in three kernels: row weights (token_norm), per-(row group, column) partial sums in double, and
// the sum of the groups in order. The row groups are a function of (n, cols, the device's SM count).
int64_t column_stat_workspace(int64_t n, int64_t cols, bool token_norm, int device);
void column_stat(const void* x, Dtype dtype, int64_t n, int64_t cols, float* acc, bool token_norm, void* ws,
                 int64_t ws_bytes, int device, cudaStream_t stream, const char* op);

// acc[j] += float(sum_{s < slots} partial[s, j]), the slots in order.
void reduce_partials(const double* partial, int64_t slots, int64_t cols, float* acc, cudaStream_t stream,
                     const char* op);

// Appends (name, static shared memory) of the kernels of each op with a shared-memory plan.
void geglu_static_smem_report(int device, std::vector<std::pair<std::string, int64_t>>& out);
void wanda_static_smem_report(int device, std::vector<std::pair<std::string, int64_t>>& out);

// Bytes rounded up to a multiple of 256 (workspace sub-buffers stay aligned).
constexpr int64_t align256(int64_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace cuda
}  // namespace memcore
