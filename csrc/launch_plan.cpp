// Shared-memory plans of the CUDA kernels (memcore.h): which kernel variant a width gets and whether
// its launch must raise the kernel's dynamic shared-memory limit. Pure arithmetic on the kernel's
// static shared memory and the device's opt-in limit, so that tests check the boundary widths of any
// device without one (tests/test_cuda_launch.py reads the static sizes from the built library).
//
// The rule, from the CUDA programming guide: a launch fails unless static + dynamic <= the opt-in
// limit per block, and unless dynamic <= cudaFuncAttributeMaxDynamicSharedMemorySize, whose default
// is 48 KiB - static. So the limit must be raised whenever static + dynamic > 48 KiB, not only when
// dynamic alone is: counting the dynamic part alone failed at geglu inner widths 6137-6144 and
// 12273-12288 and wanda widths 11641-11912 (the static part pushed 48 KiB over).
#include <stdexcept>
#include <string>

#include "memcore.h"

namespace memcore {

namespace {

void check_width(int64_t width, const char* what) {
  if (width <= 0) throw std::invalid_argument(std::string(what) + " must be positive, got " + std::to_string(width));
}

SmemPlan fits(int variant, int64_t static_bytes, int64_t dynamic_bytes) {
  return {variant, dynamic_bytes, static_bytes + dynamic_bytes > kDefaultSmemPerBlock};
}

}  // namespace

int64_t geglu_fused_smem_bytes(int64_t inner, Dtype dtype, bool token_norm) {
  check_width(inner, "geglu inner");
  const int64_t value_bytes = dtype == Dtype::Float64 ? 8 : 4;
  return inner * (static_cast<int64_t>(sizeof(double)) + (token_norm ? value_bytes : 0));
}

SmemPlan plan_geglu_smem(int64_t inner, Dtype dtype, bool token_norm, int64_t static_bytes, int64_t optin_limit,
                         bool force_fallback) {
  const int64_t dynamic_bytes = geglu_fused_smem_bytes(inner, dtype, token_norm);
  if (!force_fallback && static_bytes + dynamic_bytes <= optin_limit) return fits(0, static_bytes, dynamic_bytes);
  return {1, 0, false};
}

int64_t wanda_bits_smem_bytes(int64_t in) {
  check_width(in, "wanda in_features");
  const int64_t words = (in + 31) / 32;
  return (words + 3) / 4 * 16;
}

int64_t wanda_row_smem_bytes(int64_t in) {
  return wanda_bits_smem_bytes(in) + in * static_cast<int64_t>(sizeof(float));
}

SmemPlan plan_wanda_smem(int64_t in, int64_t static_row, int64_t static_bits, int64_t optin_limit,
                         bool force_fallback) {
  const int64_t row = wanda_row_smem_bytes(in);
  if (!force_fallback && static_row + row <= optin_limit) return fits(0, static_row, row);
  const int64_t bits = wanda_bits_smem_bytes(in);
  if (static_bits + bits <= optin_limit) return fits(1, static_bits, bits);
  return {-1, 0, false};
}

}  // namespace memcore
