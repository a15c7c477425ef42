// wanda_mask, CUDA backend: kernel and host launcher (compiled only with a CUDA compiler).
// Bit-exact with wanda_mask_reference and csrc/wanda_mask_cpu.cpp (see there for the math):
//   S[j] = |W[r, j]| * norms[t, j] (float32, one rounding), the k largest (or smallest) S per row,
//   ties -> lower column, AND S_mem > S_null, OR over t; mask packed little bit order.
//
// One block of kThreads per row r:
//   1. |W[r, :]| is converted to float once into shared memory (when it fits; else it is re-read
//      from global memory per pass), the row's bitmask lives in shared memory as 32-bit words.
//   2. For each t, a radix select finds the k-th largest key (8 bits per pass, most significant
//      first, at most 4 passes). key(S) is the float's bit pattern mapped to an unsigned integer of
//      the same order (-0.0 == +0.0; negative scores too), complemented for largest=False, so both
//      directions take the k LARGEST keys. Each pass histograms the digit of the keys that match the
//      prefix found so far (warp-aggregated with __match_any_sync, since scores concentrate in few
//      bins), and a block scan from the top bin finds the bin holding the k-th key. It stops early
//      when that whole bin is needed (no tie to break).
//   3. Marking: keys above the threshold prefix are taken; keys equal to it are taken in column order
//      until k (a block-wide running prefix count over 256-column chunks, only when the bin is not
//      taken whole). The null condition is applied, and a warp ballot ORs 32 columns at a time into
//      the row's bitmask word (warp w of chunk c owns word 8c + w: no atomics).
//   4. The row's packed bytes are written once (padding bits are zero: columns >= in never vote).
// Non-finite inputs set bits of the int32 flag word (kBadWeight, kBadNorms, kBadNullNorms) with
// atomicOr (an integer OR: the result does not depend on the order): W while its row is first read
// (step 1, or the first pass of step 2 when the row stays in global memory), the norms and null
// norms in slices, block r reading elements r * kThreads + tid + i * out * kThreads (each element
// once over the grid; the null norms are otherwise read only where a column is selected).
// Shared memory: the row of |W| is kept only when the plan of csrc/launch_plan.cpp says the launch
// fits (static + dynamic shared memory against the device's opt-in limit).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_device.h"
#include "memcore.h"

namespace memcore {
namespace cuda {
namespace {

constexpr int kBins = 256;
static_assert(kThreads == kBins, "one histogram bin per thread");
constexpr const char* kOp = "wanda_mask_cuda";

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(double v) { return __double2float_rn(v); }  // weight.to(float32)
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Whether a stored weight is finite: float64 is checked before its rounding to float32 (as the op's
// flag word is defined on the weight itself); the other types convert exactly.
__device__ __forceinline__ bool finite_weight(float v) { return isfinite(v); }
__device__ __forceinline__ bool finite_weight(double v) { return isfinite(v); }
__device__ __forceinline__ bool finite_weight(__half v) { return isfinite(__half2float(v)); }
__device__ __forceinline__ bool finite_weight(__nv_bfloat16 v) { return isfinite(__bfloat162float(v)); }

// Flag bits for the elements of a [T_ * in] float array this block checks (a slice; see the header).
__device__ __forceinline__ int32_t check_slice(const float* __restrict__ v, int64_t count, int32_t bit) {
  int32_t bad = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < count; i += stride) {
    if (!isfinite(__ldg(v + i))) bad = bit;
  }
  return bad;
}

// Unsigned key with the order of the float s (not NaN); -0.0 and +0.0 share the key of +0.0.
__device__ __forceinline__ uint32_t order_key(float s, uint32_t flip) {
  uint32_t u = __float_as_uint(s);
  if (u == 0x80000000u) u = 0u;
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return u ^ flip;
}

// Inclusive scan of v over the block (kThreads), through scratch[kWarps]; ends synchronized.
__device__ __forceinline__ uint32_t block_inclusive_scan(uint32_t v, uint32_t* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const uint32_t up = __shfl_up_sync(0xffffffffu, v, off);
    if (lane >= off) v += up;
  }
  if (lane == 31) scratch[warp] = v;
  __syncthreads();
  for (int w = 0; w < warp; ++w) v += scratch[w];
  return v;
}

template <typename T, bool kRowInSmem>
__global__ void __launch_bounds__(kThreads)
    wanda_mask_kernel(const T* __restrict__ w, int64_t in, const float* __restrict__ norms,
                      const float* __restrict__ null, int64_t T_, uint32_t k, uint32_t flip,
                      uint8_t* __restrict__ mask, int32_t* __restrict__ flags) {
  extern __shared__ uint32_t smem[];
  const int64_t words = (in + 31) / 32;
  uint32_t* row_bits = smem;                                          // [words]
  float* abs_row = reinterpret_cast<float*>(smem + ((words + 3) & ~int64_t(3)));  // [in], 16-byte aligned

  __shared__ uint32_t hist[kBins];
  __shared__ uint32_t scan_scratch[kWarps];
  __shared__ uint32_t tied_counts[2][kWarps];
  __shared__ uint32_t found_digit, found_rem, found_count;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t r = blockIdx.x;
  const T* w_row = w + r * in;

  // 1. clear the bits, load |W| (checking W) and check this block's slices of the norms
  int32_t bad = check_slice(norms, T_ * in, kBadNorms);
  if (null != nullptr) bad |= check_slice(null, T_ * in, kBadNullNorms);
  for (int64_t i = tid; i < words; i += kThreads) row_bits[i] = 0u;
  if (kRowInSmem) {
    for (int64_t j = tid; j < in; j += kThreads) {
      const T v = w_row[j];
      if (!finite_weight(v)) bad |= kBadWeight;
      abs_row[j] = fabsf(to_float(v));
    }
  } else if (k == 0u) {  // no selection pass reads the row: check it here
    for (int64_t j = tid; j < in; j += kThreads) {
      if (!finite_weight(w_row[j])) bad |= kBadWeight;
    }
  }
  if (tid == 0) found_digit = found_rem = found_count = 0u;
  __syncthreads();

  auto abs_w = [&](int64_t j) -> float {
    if (kRowInSmem) return abs_row[j];
    return fabsf(to_float(w_row[j]));
  };

  for (int64_t t = 0; k > 0u && t < T_; ++t) {
    const float* nm = norms + t * in;

    // 2. radix select of the k-th largest key
    uint32_t prefix = 0u, prefix_mask = 0u, rem = k, count = 0u;
    for (int shift = 24; shift >= 0; shift -= 8) {
      hist[tid] = 0u;
      __syncthreads();
      for (int64_t base = 0; base < in; base += kThreads) {
        const int64_t j = base + tid;
        uint32_t digit = kBins;  // no bin: out of range or off the prefix
        if (j < in) {
          if (!kRowInSmem && t == 0 && shift == 24 && !finite_weight(w_row[j])) bad |= kBadWeight;
          const uint32_t key = order_key(__fmul_rn(abs_w(j), __ldg(nm + j)), flip);
          if ((key & prefix_mask) == prefix) digit = (key >> shift) & 0xffu;
        }
        const unsigned peers = __match_any_sync(0xffffffffu, digit);
        if (digit < kBins && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], static_cast<uint32_t>(__popc(peers)));
      }
      __syncthreads();
      // bins from the top: thread tid holds bin 255 - tid
      const uint32_t c = hist[kBins - 1 - tid];
      const uint32_t above_incl = block_inclusive_scan(c, scan_scratch);
      const uint32_t above_excl = above_incl - c;
      if (above_excl < rem && rem <= above_incl) {
        found_digit = static_cast<uint32_t>(kBins - 1 - tid);
        found_rem = rem - above_excl;
        found_count = c;
      }
      __syncthreads();
      prefix |= found_digit << shift;
      prefix_mask |= 0xffu << shift;
      rem = found_rem;
      count = found_count;
      if (count == rem) break;  // the whole bin is taken: the threshold prefix suffices
    }
    // keys whose masked value > prefix: taken; == prefix: the first `rem` of them in column order
    const bool partial = count != rem;

    // 3. marking
    const float* nn = null == nullptr ? nullptr : null + t * in;
    uint32_t taken_before = 0u;
    int buf = 0;
    for (int64_t base = 0; base < in; base += kThreads) {
      const int64_t j = base + tid;
      bool beyond = false, tied = false;
      float a = 0.0f, s = 0.0f;
      if (j < in) {
        a = abs_w(j);
        s = __fmul_rn(a, __ldg(nm + j));
        const uint32_t masked = order_key(s, flip) & prefix_mask;
        beyond = masked > prefix;
        tied = masked == prefix;
      }
      bool take = beyond || (tied && !partial);
      if (partial) {  // block-uniform
        const unsigned ballot = __ballot_sync(0xffffffffu, tied);
        const uint32_t rank = static_cast<uint32_t>(__popc(ballot & ((1u << lane) - 1u)));
        if (lane == 0) tied_counts[buf][warp] = static_cast<uint32_t>(__popc(ballot));
        __syncthreads();
        uint32_t before = taken_before, chunk = 0u;
        for (int v = 0; v < kWarps; ++v) {
          const uint32_t n = tied_counts[buf][v];
          if (v < warp) before += n;
          chunk += n;
        }
        take = take || (tied && before + rank < rem);
        taken_before += chunk;
        buf ^= 1;  // the next chunk writes the other buffer; the sync above orders the reuse
      }
      if (take && nn != nullptr) take = s > __fmul_rn(a, __ldg(nn + j));
      const unsigned word = __ballot_sync(0xffffffffu, take);
      if (lane == 0 && word != 0u) row_bits[(base >> 5) + warp] |= word;
    }
    // hist/found_* are rewritten only after the next pass's first __syncthreads
  }
  __syncthreads();

  // 4. packed bytes: byte c = bits 8(c % 4) .. of word c / 4
  const int64_t nbytes = (in + 7) / 8;
  uint8_t* out_row = mask + r * nbytes;
  for (int64_t c = tid; c < nbytes; c += kThreads) {
    out_row[c] = static_cast<uint8_t>(row_bits[c >> 2] >> (8 * (c & 3)));
  }

  // 5. flags: one integer atomicOr per warp that saw a non-finite value
  bad = __reduce_or_sync(0xffffffffu, bad);
  if (lane == 0 && bad != 0) atomicOr(flags, bad);
}

template <typename T, bool kRowInSmem>
const void* kernel_ptr() {
  return reinterpret_cast<const void*>(wanda_mask_kernel<T, kRowInSmem>);
}

template <typename T, bool kRowInSmem>
void launch(const void* w, int64_t out, int64_t in, const float* norms, const float* null, int64_t T_, int64_t k,
            bool largest, uint8_t* mask, int32_t* flags, const SmemPlan& plan, int device, cudaStream_t stream) {
  // raised for any dynamic size, not only when opt_in says it must be (csrc/cuda_device.h)
  allow_dynamic_smem(kernel_ptr<T, kRowInSmem>(), device, plan.dynamic_bytes, kOp);
  wanda_mask_kernel<T, kRowInSmem><<<static_cast<unsigned>(out), kThreads, plan.dynamic_bytes, stream>>>(
      static_cast<const T*>(w), in, norms, null, T_, static_cast<uint32_t>(k), largest ? 0u : 0xffffffffu, mask,
      flags);
  check(cudaGetLastError(), kOp, "kernel launch");
}

template <typename T>
void dispatch(const void* w, int64_t out, int64_t in, const float* norms, const float* null, int64_t T_, int64_t k,
              bool largest, uint8_t* mask, int32_t* flags, cudaStream_t stream) {
  const int device = current_device(kOp);
  const SmemPlan plan = plan_wanda_smem(in, static_smem(kernel_ptr<T, true>(), device),
                                        static_smem(kernel_ptr<T, false>(), device), device_info(device).optin_smem,
                                        smem_fallback_forced());
  if (plan.variant == 0) {
    launch<T, true>(w, out, in, norms, null, T_, k, largest, mask, flags, plan, device, stream);
  } else if (plan.variant == 1) {
    launch<T, false>(w, out, in, norms, null, T_, k, largest, mask, flags, plan, device, stream);
  } else {
    throw std::invalid_argument(std::string(kOp) + ": in_features=" + std::to_string(in) + " is too large");
  }
}

}  // namespace

void wanda_static_smem_report(int device, std::vector<std::pair<std::string, int64_t>>& out) {
  out.emplace_back("wanda_mask<float32,row>", static_smem(kernel_ptr<float, true>(), device));
  out.emplace_back("wanda_mask<float32,bits>", static_smem(kernel_ptr<float, false>(), device));
  out.emplace_back("wanda_mask<float64,row>", static_smem(kernel_ptr<double, true>(), device));
  out.emplace_back("wanda_mask<float64,bits>", static_smem(kernel_ptr<double, false>(), device));
  out.emplace_back("wanda_mask<float16,row>", static_smem(kernel_ptr<__half, true>(), device));
  out.emplace_back("wanda_mask<float16,bits>", static_smem(kernel_ptr<__half, false>(), device));
  out.emplace_back("wanda_mask<bfloat16,row>", static_smem(kernel_ptr<__nv_bfloat16, true>(), device));
  out.emplace_back("wanda_mask<bfloat16,bits>", static_smem(kernel_ptr<__nv_bfloat16, false>(), device));
}

}  // namespace cuda

void wanda_mask_cuda(const void* w, Dtype dtype, int64_t out, int64_t in, const float* norms, const float* null,
                     int64_t T, int64_t k, bool largest, uint8_t* mask, int32_t* flags, std::uintptr_t stream) {
  using namespace cuda;
  if (out < 0 || in < 0 || T < 1) {
    throw std::invalid_argument("wanda_mask_cuda: bad shape: out=" + std::to_string(out) + ", in=" +
                                std::to_string(in) + ", T=" + std::to_string(T));
  }
  if (in > 0xffffffffLL || out > 0x7fffffffLL) throw std::invalid_argument("wanda_mask_cuda: shape too large");
  if (k < 0 || k > in) {
    throw std::invalid_argument("wanda_mask_cuda: k=" + std::to_string(k) + " outside [0, " + std::to_string(in) + "]");
  }
  if (out == 0 || in == 0) return;
  if (w == nullptr || norms == nullptr || mask == nullptr || flags == nullptr) {
    throw std::invalid_argument("wanda_mask_cuda: null pointer");
  }
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case Dtype::Float32: return dispatch<float>(w, out, in, norms, null, T, k, largest, mask, flags, s);
    case Dtype::Float64: return dispatch<double>(w, out, in, norms, null, T, k, largest, mask, flags, s);
    case Dtype::Float16: return dispatch<__half>(w, out, in, norms, null, T, k, largest, mask, flags, s);
    case Dtype::BFloat16: return dispatch<__nv_bfloat16>(w, out, in, norms, null, T, k, largest, mask, flags, s);
  }
  throw std::invalid_argument("wanda_mask_cuda: bad dtype");
}

}  // namespace memcore
