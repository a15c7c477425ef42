// CUDA host helpers (csrc/cuda_device.h) and the probe that tells whether memcore's kernels can run
// on a device with this driver (memcore.h: cuda_probe).
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "cuda_device.h"

#ifndef MEMCORE_CUDA_ARCHS
#define MEMCORE_CUDA_ARCHS "unknown"
#endif

namespace memcore {

namespace cuda {

void check(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so that it does not resurface in a later check
    throw std::runtime_error(std::string(op) + ": " + what + ": " + cudaGetErrorString(err));
  }
}

int current_device(const char* op) {
  int device = 0;
  check(cudaGetDevice(&device), op, "cudaGetDevice");
  return device;
}

namespace {

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}

int attribute(cudaDeviceAttr attr, int device, const char* name) {
  int value = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&value, attr, device);
  if (err != cudaSuccess) {
    check(err, "memcore", (std::string("cudaDeviceGetAttribute(") + name + ") on device " + std::to_string(device)).c_str());
  }
  return value;
}

std::atomic<bool>& fallback_flag() {
  static std::atomic<bool> flag([] {
    const char* env = std::getenv("MEMCORE_CUDA_SMEM_FALLBACK");
    return env != nullptr && env[0] != '\0' && std::string(env) != "0";
  }());
  return flag;
}

}  // namespace

const DeviceInfo& device_info(int device) {
  static std::map<int, std::unique_ptr<DeviceInfo>> cache;
  std::lock_guard<std::mutex> lock(cache_mutex());
  auto it = cache.find(device);
  if (it != cache.end()) return *it->second;
  auto info = std::make_unique<DeviceInfo>();
  info->sms = attribute(cudaDevAttrMultiProcessorCount, device, "MultiProcessorCount");
  info->optin_smem = attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device, "MaxSharedMemoryPerBlockOptin");
  info->major = attribute(cudaDevAttrComputeCapabilityMajor, device, "ComputeCapabilityMajor");
  info->minor = attribute(cudaDevAttrComputeCapabilityMinor, device, "ComputeCapabilityMinor");
  if (info->sms < 1) throw std::runtime_error("memcore: device " + std::to_string(device) + " reports no SM");
  return *cache.emplace(device, std::move(info)).first->second;
}

int64_t static_smem(const void* func, int device) {
  static std::map<std::pair<const void*, int>, int64_t> cache;
  std::lock_guard<std::mutex> lock(cache_mutex());
  const auto key = std::make_pair(func, device);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  cudaFuncAttributes attr{};
  check(cudaFuncGetAttributes(&attr, func), "memcore", "cudaFuncGetAttributes");
  const int64_t bytes = static_cast<int64_t>(attr.sharedSizeBytes);
  cache.emplace(key, bytes);
  return bytes;
}

void allow_dynamic_smem(const void* func, int device, int64_t bytes, const char* op) {
  static std::map<std::pair<const void*, int>, int64_t> granted;
  std::lock_guard<std::mutex> lock(cache_mutex());
  int64_t& have = granted[std::make_pair(func, device)];
  if (bytes <= have) return;
  const cudaError_t err =
      cudaFuncSetAttribute(func, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) {
    check(err, op, ("cannot reserve " + std::to_string(bytes) + " bytes of dynamic shared memory").c_str());
  }
  have = bytes;
}

int blocks_per_sm(const void* func, int64_t dynamic_bytes, const char* op) {
  int per_sm = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, func, kThreads, static_cast<size_t>(dynamic_bytes)), op,
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  if (per_sm < 1) {
    throw std::runtime_error(std::string(op) + ": a block with " + std::to_string(dynamic_bytes) +
                             " bytes of dynamic shared memory does not fit on an SM");
  }
  return per_sm;
}

bool smem_fallback_forced() { return fallback_flag().load(); }

}  // namespace cuda

void set_cuda_smem_fallback(bool force) { cuda::fallback_flag().store(force); }

bool cuda_smem_fallback() { return cuda::smem_fallback_forced(); }

std::string cuda_architectures() { return MEMCORE_CUDA_ARCHS; }

namespace {

constexpr int kProbeValue = 0x6d656d63;  // "memc"

__global__ void probe_kernel(int* out) { *out = kProbeValue; }

std::string version_text(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

// Why a probe step failed, in words a user can act on.
std::string explain(cudaError_t err, const char* step, int device) {
  std::string why = std::string(step) + " failed: " + cudaGetErrorString(err);
  int driver = 0, runtime = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  const std::string built = "memcore's kernels were built with CUDA " + version_text(runtime) +
                            " for architectures " + std::string(MEMCORE_CUDA_ARCHS);
  switch (err) {
    case cudaErrorInsufficientDriver:
    case cudaErrorUnsupportedPtxVersion:
    case cudaErrorCallRequiresNewerDriver:
      if (driver == 0) return why + " (no NVIDIA driver is loaded; " + built + ")";
      return why + " (the NVIDIA driver supports CUDA " + version_text(driver) + " but " + built +
             ": update the driver or rebuild memcore with the CUDA toolkit the driver supports)";
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorInvalidKernelImage: {
      int major = 0, minor = 0;
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
      return why + " (device " + std::to_string(device) + " has compute capability " + std::to_string(major) + "." +
             std::to_string(minor) + "; " + built + ": rebuild with MEMCORE_CUDA_ARCH including " +
             std::to_string(major) + std::to_string(minor) + ")";
    }
    default:
      return why + " (" + built + ", driver supports CUDA " + version_text(driver) + ")";
  }
}

}  // namespace

std::string cuda_probe(int device) {
  int previous = -1;
  cudaError_t err = cudaGetDevice(&previous);
  if (err != cudaSuccess) return explain(err, "cudaGetDevice", device);
  err = cudaSetDevice(device);
  if (err != cudaSuccess) return explain(err, "cudaSetDevice", device);
  std::string result;
  int* value = nullptr;
  cudaStream_t stream = nullptr;
  int got = 0;
  if ((err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)) != cudaSuccess) {
    result = explain(err, "cudaStreamCreate", device);
  } else if ((err = cudaMalloc(&value, sizeof(int))) != cudaSuccess) {
    result = explain(err, "cudaMalloc", device);
  } else {
    probe_kernel<<<1, 1, 0, stream>>>(value);
    if ((err = cudaGetLastError()) != cudaSuccess) {
      result = explain(err, "a kernel launch", device);
    } else if ((err = cudaStreamSynchronize(stream)) != cudaSuccess) {
      result = explain(err, "the probe kernel", device);
    } else if ((err = cudaMemcpy(&got, value, sizeof(int), cudaMemcpyDeviceToHost)) != cudaSuccess) {
      result = explain(err, "cudaMemcpy", device);
    } else if (got != kProbeValue) {
      result = "the probe kernel ran but did not write its value";
    }
  }
  if (value != nullptr) cudaFree(value);
  if (stream != nullptr) cudaStreamDestroy(stream);
  cudaGetLastError();
  cudaSetDevice(previous);
  return result;
}

std::vector<std::pair<std::string, int64_t>> cuda_kernel_static_smem(int device) {
  int previous = 0;
  cuda::check(cudaGetDevice(&previous), "cuda_kernel_static_smem", "cudaGetDevice");
  cuda::check(cudaSetDevice(device), "cuda_kernel_static_smem", "cudaSetDevice");
  std::vector<std::pair<std::string, int64_t>> out;
  try {
    cuda::geglu_static_smem_report(device, out);
    cuda::wanda_static_smem_report(device, out);
  } catch (...) {
    cudaSetDevice(previous);
    throw;
  }
  cudaSetDevice(previous);
  return out;
}

}  // namespace memcore
