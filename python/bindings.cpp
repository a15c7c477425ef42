// memcore._C: thin pybind11 bindings, free of libtorch. Tensors arrive as integer data pointers
// plus sizes, the CUDA stream as an integer; the Python wrappers in memcore/ops validate first.
// std::invalid_argument surfaces as ValueError, std::runtime_error as RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "memcore.h"

namespace py = pybind11;

namespace {

void sqnorm_accumulate_cpu(std::uintptr_t x_ptr, const std::string& dtype, int64_t rows, int64_t cols,
                           int64_t row_start, int64_t row_end, std::uintptr_t acc_ptr, bool token_norm) {
  const memcore::Dtype dt = memcore::parse_dtype(dtype);
  py::gil_scoped_release release;
  memcore::sqnorm_accumulate_cpu(reinterpret_cast<const void*>(x_ptr), dt, rows, cols, row_start, row_end,
                                 reinterpret_cast<float*>(acc_ptr), token_norm);
}

#ifdef MEMCORE_WITH_CUDA
void sqnorm_accumulate_cuda(std::uintptr_t x_ptr, const std::string& dtype, int64_t rows, int64_t cols,
                            int64_t row_start, int64_t row_end, std::uintptr_t acc_ptr, bool token_norm,
                            std::uintptr_t stream) {
  const memcore::Dtype dt = memcore::parse_dtype(dtype);
  py::gil_scoped_release release;
  memcore::sqnorm_accumulate_cuda(reinterpret_cast<const void*>(x_ptr), dt, rows, cols, row_start, row_end,
                                  reinterpret_cast<float*>(acc_ptr), token_norm, stream);
}
#endif

void wanda_mask_cpu(std::uintptr_t w_ptr, const std::string& w_dtype, int64_t out, int64_t in,
                    std::uintptr_t norms_ptr, std::uintptr_t null_ptr, int64_t T, int64_t k, bool largest,
                    std::uintptr_t mask_ptr) {
  const memcore::Dtype dt = memcore::parse_dtype(w_dtype);
  py::gil_scoped_release release;
  memcore::wanda_mask_cpu(reinterpret_cast<const void*>(w_ptr), dt, out, in, reinterpret_cast<const float*>(norms_ptr),
                          reinterpret_cast<const float*>(null_ptr), T, k, largest,
                          reinterpret_cast<uint8_t*>(mask_ptr));
}

void geglu_accumulate_cpu(std::uintptr_t p_ptr, const std::string& dtype, int64_t rows, int64_t inner,
                          int64_t row_start, int64_t row_end, std::uintptr_t acc_ptr, std::uintptr_t out_ptr,
                          bool token_norm) {
  const memcore::Dtype dt = memcore::parse_dtype(dtype);
  py::gil_scoped_release release;
  memcore::geglu_accumulate_cpu(reinterpret_cast<const void*>(p_ptr), dt, rows, inner, row_start, row_end,
                                reinterpret_cast<float*>(acc_ptr), reinterpret_cast<void*>(out_ptr), token_norm);
}

#ifdef MEMCORE_WITH_CUDA
void wanda_mask_cuda(std::uintptr_t w_ptr, const std::string& w_dtype, int64_t out, int64_t in,
                     std::uintptr_t norms_ptr, std::uintptr_t null_ptr, int64_t T, int64_t k, bool largest,
                     std::uintptr_t mask_ptr, std::uintptr_t stream) {
  const memcore::Dtype dt = memcore::parse_dtype(w_dtype);
  py::gil_scoped_release release;
  memcore::wanda_mask_cuda(reinterpret_cast<const void*>(w_ptr), dt, out, in, reinterpret_cast<const float*>(norms_ptr),
                           reinterpret_cast<const float*>(null_ptr), T, k, largest,
                           reinterpret_cast<uint8_t*>(mask_ptr), stream);
}

void geglu_accumulate_cuda(std::uintptr_t p_ptr, const std::string& dtype, int64_t rows, int64_t inner,
                           int64_t row_start, int64_t row_end, std::uintptr_t acc_ptr, std::uintptr_t out_ptr,
                           bool token_norm, std::uintptr_t stream) {
  const memcore::Dtype dt = memcore::parse_dtype(dtype);
  py::gil_scoped_release release;
  memcore::geglu_accumulate_cuda(reinterpret_cast<const void*>(p_ptr), dt, rows, inner, row_start, row_end,
                                 reinterpret_cast<float*>(acc_ptr), reinterpret_cast<void*>(out_ptr), token_norm,
                                 stream);
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
#ifdef MEMCORE_WITH_CUDA
  m.def("sqnorm_accumulate_cuda", &sqnorm_accumulate_cuda, py::arg("x_ptr"), py::arg("dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("row_start"), py::arg("row_end"), py::arg("acc_ptr"), py::arg("token_norm"),
        py::arg("stream"), "sqnorm_accumulate_cpu on device pointers, enqueued on the given cudaStream_t");
#endif
  m.def("wanda_mask_cpu", &wanda_mask_cpu, py::arg("w_ptr"), py::arg("w_dtype"), py::arg("out"), py::arg("in"),
        py::arg("norms_ptr"), py::arg("null_ptr"), py::arg("T"), py::arg("k"), py::arg("largest"), py::arg("mask_ptr"),
        "packed wanda mask uint8[out, ceil(in/8)] of a contiguous host W[out, in] and float32 norms[T, in] "
        "(null_ptr 0: no null norms)");
  m.def("geglu_accumulate_cpu", &geglu_accumulate_cpu, py::arg("p_ptr"), py::arg("dtype"), py::arg("rows"),
        py::arg("inner"), py::arg("row_start"), py::arg("row_end"), py::arg("acc_ptr"), py::arg("out_ptr"),
        py::arg("token_norm"),
        "out[rows, inner] = h * gelu(g) of a contiguous host P[rows, 2*inner] = [h | g], and acc[j] += "
        "sum_r xhat[r,j]^2 of out over rows [row_start, row_end)");
#ifdef MEMCORE_WITH_CUDA
  m.def("wanda_mask_cuda", &wanda_mask_cuda, py::arg("w_ptr"), py::arg("w_dtype"), py::arg("out"), py::arg("in"),
        py::arg("norms_ptr"), py::arg("null_ptr"), py::arg("T"), py::arg("k"), py::arg("largest"), py::arg("mask_ptr"),
        py::arg("stream"), "wanda_mask_cpu on device pointers, enqueued on the given cudaStream_t");
  m.def("geglu_accumulate_cuda", &geglu_accumulate_cuda, py::arg("p_ptr"), py::arg("dtype"), py::arg("rows"),
        py::arg("inner"), py::arg("row_start"), py::arg("row_end"), py::arg("acc_ptr"), py::arg("out_ptr"),
        py::arg("token_norm"), py::arg("stream"),
        "geglu_accumulate_cpu on device pointers, enqueued on the given cudaStream_t");
#endif
  m.def("compiled_with_cuda", &compiled_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("openmp_threads", &memcore::openmp_threads, "OpenMP threads a parallel region would use (1 without OpenMP)");
}
