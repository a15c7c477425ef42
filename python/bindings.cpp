// memcore._C: thin pybind11 bindings, free of libtorch. Tensors arrive as integer data pointers
// plus sizes, the CUDA stream as an integer; the Python wrappers in memcore/ops validate first.
// std::invalid_argument surfaces as ValueError, std::runtime_error as RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "memcore.h"

namespace py = pybind11;

namespace {

template <typename P>
P* ptr(std::uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

void sqnorm_accumulate_cpu(std::uintptr_t x_ptr, const std::string& dtype, int64_t rows, int64_t cols,
                           int64_t row_start, int64_t row_end, std::uintptr_t acc_ptr, bool token_norm) {
  const memcore::Dtype dt = memcore::parse_dtype(dtype);
  py::gil_scoped_release release;
  memcore::sqnorm_accumulate_cpu(ptr<const void>(x_ptr), dt, rows, cols, row_start, row_end, ptr<float>(acc_ptr),
                                 token_norm);
}

void wanda_mask_cpu(std::uintptr_t w_ptr, const std::string& w_dtype, int64_t out, int64_t in,
                    std::uintptr_t norms_ptr, std::uintptr_t null_ptr, int64_t T, int64_t k, bool largest,
                    std::uintptr_t mask_ptr, std::uintptr_t flags_ptr) {
  const memcore::Dtype dt = memcore::parse_dtype(w_dtype);
  py::gil_scoped_release release;
  memcore::wanda_mask_cpu(ptr<const void>(w_ptr), dt, out, in, ptr<const float>(norms_ptr), ptr<const float>(null_ptr),
                          T, k, largest, ptr<uint8_t>(mask_ptr), ptr<int32_t>(flags_ptr));
}

void wanda_mask_grouped_cpu(const std::vector<std::uintptr_t>& w_ptrs, const std::vector<std::string>& w_dtypes,
                            const std::vector<int64_t>& outs, const std::vector<int64_t>& ins,
                            const std::vector<std::uintptr_t>& norms_ptrs, const std::vector<std::uintptr_t>& null_ptrs,
                            int64_t T, const std::vector<int64_t>& ks, bool largest,
                            const std::vector<std::uintptr_t>& mask_ptrs, const std::vector<std::uintptr_t>& flags_ptrs) {
  const size_t n = w_ptrs.size();
  for (const size_t size : {w_dtypes.size(), outs.size(), ins.size(), norms_ptrs.size(), null_ptrs.size(), ks.size(),
                            mask_ptrs.size(), flags_ptrs.size()}) {
    if (size != n) throw std::invalid_argument("wanda_mask_grouped_cpu: lists of different lengths");
  }
  std::vector<memcore::WandaLayer> layers;
  layers.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    layers.push_back({ptr<const void>(w_ptrs[i]), memcore::parse_dtype(w_dtypes[i]), outs[i], ins[i],
                      ptr<const float>(norms_ptrs[i]), ptr<const float>(null_ptrs[i]), ks[i], ptr<uint8_t>(mask_ptrs[i]),
                      ptr<int32_t>(flags_ptrs[i])});
  }
  py::gil_scoped_release release;
  memcore::wanda_mask_grouped_cpu(layers.data(), static_cast<int64_t>(n), T, largest);
}

void geglu_accumulate_cpu(std::uintptr_t p_ptr, const std::string& dtype, int64_t rows, int64_t inner,
                          int64_t row_start, int64_t row_end, std::uintptr_t acc_ptr, std::uintptr_t out_ptr,
                          bool token_norm) {
  const memcore::Dtype dt = memcore::parse_dtype(dtype);
  py::gil_scoped_release release;
  memcore::geglu_accumulate_cpu(ptr<const void>(p_ptr), dt, rows, inner, row_start, row_end, ptr<float>(acc_ptr),
                                ptr<void>(out_ptr), token_norm);
}

py::tuple plan_tuple(const memcore::SmemPlan& plan) {
  return py::make_tuple(plan.variant, plan.dynamic_bytes, plan.opt_in);
}

py::tuple geglu_smem_plan(int64_t inner, const std::string& dtype, bool token_norm, int64_t static_bytes,
                          int64_t optin_limit, bool force_fallback) {
  return plan_tuple(memcore::plan_geglu_smem(inner, memcore::parse_dtype(dtype), token_norm, static_bytes, optin_limit,
                                             force_fallback));
}

py::tuple wanda_smem_plan(int64_t in, int64_t static_row, int64_t static_bits, int64_t optin_limit,
                          bool force_fallback) {
  return plan_tuple(memcore::plan_wanda_smem(in, static_row, static_bits, optin_limit, force_fallback));
}

#ifdef MEMCORE_WITH_CUDA
void sqnorm_accumulate_cuda(std::uintptr_t x_ptr, const std::string& dtype, int64_t rows, int64_t cols,
                            int64_t row_start, int64_t row_end, std::uintptr_t acc_ptr, bool token_norm,
                            std::uintptr_t ws_ptr, int64_t ws_bytes, std::uintptr_t stream) {
  const memcore::Dtype dt = memcore::parse_dtype(dtype);
  py::gil_scoped_release release;
  memcore::sqnorm_accumulate_cuda(ptr<const void>(x_ptr), dt, rows, cols, row_start, row_end, ptr<float>(acc_ptr),
                                  token_norm, ptr<void>(ws_ptr), ws_bytes, stream);
}

int64_t sqnorm_accumulate_cuda_workspace(const std::string& dtype, int64_t rows, int64_t cols, int64_t row_start,
                                         int64_t row_end, bool token_norm, int device) {
  return memcore::sqnorm_accumulate_cuda_workspace(memcore::parse_dtype(dtype), rows, cols, row_start, row_end,
                                                   token_norm, device);
}

void wanda_mask_cuda(std::uintptr_t w_ptr, const std::string& w_dtype, int64_t out, int64_t in,
                     std::uintptr_t norms_ptr, std::uintptr_t null_ptr, int64_t T, int64_t k, bool largest,
                     std::uintptr_t mask_ptr, std::uintptr_t flags_ptr, std::uintptr_t stream) {
  const memcore::Dtype dt = memcore::parse_dtype(w_dtype);
  py::gil_scoped_release release;
  memcore::wanda_mask_cuda(ptr<const void>(w_ptr), dt, out, in, ptr<const float>(norms_ptr),
                           ptr<const float>(null_ptr), T, k, largest, ptr<uint8_t>(mask_ptr), ptr<int32_t>(flags_ptr),
                           stream);
}

void geglu_accumulate_cuda(std::uintptr_t p_ptr, const std::string& dtype, int64_t rows, int64_t inner,
                           int64_t row_start, int64_t row_end, std::uintptr_t acc_ptr, std::uintptr_t out_ptr,
                           bool token_norm, std::uintptr_t ws_ptr, int64_t ws_bytes, std::uintptr_t stream) {
  const memcore::Dtype dt = memcore::parse_dtype(dtype);
  py::gil_scoped_release release;
  memcore::geglu_accumulate_cuda(ptr<const void>(p_ptr), dt, rows, inner, row_start, row_end, ptr<float>(acc_ptr),
                                 ptr<void>(out_ptr), token_norm, ptr<void>(ws_ptr), ws_bytes, stream);
}

int64_t geglu_accumulate_cuda_workspace(const std::string& dtype, int64_t rows, int64_t inner, int64_t row_start,
                                        int64_t row_end, bool token_norm, int device) {
  return memcore::geglu_accumulate_cuda_workspace(memcore::parse_dtype(dtype), rows, inner, row_start, row_end,
                                                  token_norm, device);
}

std::string cuda_probe(int device) {
  py::gil_scoped_release release;
  return memcore::cuda_probe(device);
}
#endif

bool compiled_with_cuda() {
#ifdef MEMCORE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "memcore native ops (C++/OpenMP, optional CUDA); see memcore.ops";

  m.def("sqnorm_accumulate_cpu", &sqnorm_accumulate_cpu, py::arg("x_ptr"), py::arg("dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("row_start"), py::arg("row_end"), py::arg("acc_ptr"), py::arg("token_norm"),
        "acc[j] += sum_r x[r,j]^2 * inv[r] over rows [row_start, row_end) of a contiguous [rows, cols] host matrix");
  m.def("wanda_mask_cpu", &wanda_mask_cpu, py::arg("w_ptr"), py::arg("w_dtype"), py::arg("out"), py::arg("in"),
        py::arg("norms_ptr"), py::arg("null_ptr"), py::arg("T"), py::arg("k"), py::arg("largest"), py::arg("mask_ptr"),
        py::arg("flags_ptr"),
        "packed wanda mask uint8[out, ceil(in/8)] of a contiguous host W[out, in] and float32 norms[T, in] "
        "(null_ptr 0: no null norms); ORs the non-finite input bits into the int32 at flags_ptr");
  m.def("wanda_mask_grouped_cpu", &wanda_mask_grouped_cpu, py::arg("w_ptrs"), py::arg("w_dtypes"), py::arg("outs"),
        py::arg("ins"), py::arg("norms_ptrs"), py::arg("null_ptrs"), py::arg("T"), py::arg("ks"), py::arg("largest"),
        py::arg("mask_ptrs"), py::arg("flags_ptrs"),
        "wanda_mask_cpu for many layers in one parallel region (lists, one entry per layer)");
  m.def("geglu_accumulate_cpu", &geglu_accumulate_cpu, py::arg("p_ptr"), py::arg("dtype"), py::arg("rows"),
        py::arg("inner"), py::arg("row_start"), py::arg("row_end"), py::arg("acc_ptr"), py::arg("out_ptr"),
        py::arg("token_norm"),
        "out[rows, inner] = h * gelu(g) of a contiguous host P[rows, 2*inner] = [h | g], and acc[j] += "
        "sum_r xhat[r,j]^2 of out over rows [row_start, row_end)");
  m.def("geglu_smem_plan", &geglu_smem_plan, py::arg("inner"), py::arg("dtype"), py::arg("token_norm"),
        py::arg("static_bytes"), py::arg("optin_limit"), py::arg("force_fallback") = false,
        "(variant, dynamic_bytes, opt_in) of the CUDA geglu launch: variant 0 fused, 1 fallback (pure host "
        "arithmetic; static_bytes: the fused kernel's static shared memory)");
  m.def("wanda_smem_plan", &wanda_smem_plan, py::arg("in_features"), py::arg("static_row"), py::arg("static_bits"),
        py::arg("optin_limit"), py::arg("force_fallback") = false,
        "(variant, dynamic_bytes, opt_in) of the CUDA wanda launch: variant 0 row in shared memory, 1 bits only, "
        "-1 none (pure host arithmetic)");
#ifdef MEMCORE_WITH_CUDA
  m.def("sqnorm_accumulate_cuda", &sqnorm_accumulate_cuda, py::arg("x_ptr"), py::arg("dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("row_start"), py::arg("row_end"), py::arg("acc_ptr"), py::arg("token_norm"),
        py::arg("ws_ptr"), py::arg("ws_bytes"), py::arg("stream"),
        "sqnorm_accumulate_cpu on device pointers, enqueued on the given cudaStream_t, with a device workspace of "
        "sqnorm_accumulate_cuda_workspace(...) bytes");
  m.def("sqnorm_accumulate_cuda_workspace", &sqnorm_accumulate_cuda_workspace, py::arg("dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("row_start"), py::arg("row_end"), py::arg("token_norm"), py::arg("device"),
        "bytes of device workspace sqnorm_accumulate_cuda needs on the given device");
  m.def("wanda_mask_cuda", &wanda_mask_cuda, py::arg("w_ptr"), py::arg("w_dtype"), py::arg("out"), py::arg("in"),
        py::arg("norms_ptr"), py::arg("null_ptr"), py::arg("T"), py::arg("k"), py::arg("largest"), py::arg("mask_ptr"),
        py::arg("flags_ptr"), py::arg("stream"), "wanda_mask_cpu on device pointers, enqueued on the given cudaStream_t");
  m.def("geglu_accumulate_cuda", &geglu_accumulate_cuda, py::arg("p_ptr"), py::arg("dtype"), py::arg("rows"),
        py::arg("inner"), py::arg("row_start"), py::arg("row_end"), py::arg("acc_ptr"), py::arg("out_ptr"),
        py::arg("token_norm"), py::arg("ws_ptr"), py::arg("ws_bytes"), py::arg("stream"),
        "geglu_accumulate_cpu on device pointers, enqueued on the given cudaStream_t, with a device workspace of "
        "geglu_accumulate_cuda_workspace(...) bytes");
  m.def("geglu_accumulate_cuda_workspace", &geglu_accumulate_cuda_workspace, py::arg("dtype"), py::arg("rows"),
        py::arg("inner"), py::arg("row_start"), py::arg("row_end"), py::arg("token_norm"), py::arg("device"),
        "bytes of device workspace geglu_accumulate_cuda needs on the given device");
  m.def("cuda_probe", &cuda_probe, py::arg("device"),
        "launch a trivial kernel on the device and wait: '' when it ran, else why not");
  m.def("cuda_architectures", &memcore::cuda_architectures, "CUDA architectures the kernels were compiled for");
  m.def("set_cuda_smem_fallback", &memcore::set_cuda_smem_fallback, py::arg("force"),
        "force the shared-memory fallback kernels (initially MEMCORE_CUDA_SMEM_FALLBACK)");
  m.def("cuda_smem_fallback", &memcore::cuda_smem_fallback, "whether the shared-memory fallbacks are forced");
  m.def("cuda_kernel_static_smem", &memcore::cuda_kernel_static_smem, py::arg("device"),
        "[(kernel, static shared memory bytes)] from cudaFuncGetAttributes on the device");
#endif
  m.def("compiled_with_cuda", &compiled_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("openmp_threads", &memcore::openmp_threads, "OpenMP threads a parallel region would use (1 without OpenMP)");
}
