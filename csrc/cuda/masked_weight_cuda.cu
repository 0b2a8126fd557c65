// CUDA kernels of the masked-weight op family (UMAP learned weight masks); same semantics as
// csrc/cpu/masked_weight_cpu.cpp:
//   masked_weight:          w_eff = where(mask, w, 0), mask = top-k |score| of the layer
//   masked_weight_backward: grad_scores = grad * w * sign(scores), grad_weight = where(mask, grad, 0)
// The threshold (T, c) is selected on the device by a radix select (below; MOSX_MASK_SELECT=aten
// switches to the ATen selection of masked_weight_select.cpp) and read by the kernels from
// device memory: no host sync per step.
// The elementwise passes are memory-bound grid-stride loops on the current stream.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../masked_weight.h"

namespace mosx {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;

inline unsigned int num_blocks(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(b < kMaxBlocks ? b : kMaxBlocks);
}

// |x| as ordered bits, exactly as the CPU kernel and the selection compute them.
template <typename scalar_t>
__device__ __forceinline__ int64_t abs_bits(scalar_t x) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return static_cast<int64_t>(static_cast<unsigned long long>(__double_as_longlong(x)) &
                                0x7fffffffffffffffULL);
  } else {
    return static_cast<int64_t>(__float_as_uint(static_cast<float>(x)) & 0x7fffffffU);
  }
}

// ---------------------------------------------------------------------------------------------
// Radix select of (T, c) on the device. Every entry i has the distinct virtual key
// (hi = |score| bits, lo = n - 1 - i); the mask keeps the k largest keys, so ties in |score| go to
// the lower index. 8-bit digits from the top: 4 (float64: 8) passes over hi, then 4 over lo, each
// a histogram of the digit over the entries whose higher digits equal the prefix chosen so far,
// followed by a one-thread pick of the digit that holds the need-th largest key. The lo passes
// only run when the k-th largest |score| has ties that are not all kept; otherwise the state's
// done flag makes them return at once. No host synchronisation: the state lives on the device.
//
// State (uint64 x kStateSize): [0] hi prefix, [1] lo prefix, [2] need (rank from the top among
// the entries matching the prefix), [3] done, [8..263] the histogram of the current pass.
constexpr int kStateSize = 8 + 256;

template <typename scalar_t>
__global__ void radix_hist_kernel(const scalar_t* __restrict__ s, int64_t n,
                                  unsigned long long* __restrict__ st, unsigned long long mask_hi,
                                  unsigned int mask_lo, int shift, bool is_lo) {
  if (st[3] != 0) return;
  __shared__ unsigned int h[256];
  for (int b = threadIdx.x; b < 256; b += blockDim.x) h[b] = 0;
  __syncthreads();
  const unsigned long long prefix_hi = st[0] & mask_hi;
  const unsigned int prefix_lo = static_cast<unsigned int>(st[1]) & mask_lo;
  const unsigned int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  // The loop bound is uniform over the block, so whole warps take part in __match_any_sync.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < n; base += stride) {
    const int64_t i = base + threadIdx.x;
    int digit = -1;
    if (i < n) {
      const unsigned long long u = static_cast<unsigned long long>(abs_bits(s[i]));
      const unsigned int lo = static_cast<unsigned int>(n - 1 - i);
      if ((u & mask_hi) == prefix_hi && (lo & mask_lo) == prefix_lo) {
        digit =
            static_cast<int>(((is_lo ? static_cast<unsigned long long>(lo) : u) >> shift) & 0xff);
      }
    }
    // Warp-aggregated increments: most entries share the top digits (the exponent).
    const unsigned int peers = __match_any_sync(0xffffffffu, digit);
    if (digit >= 0 && lane == static_cast<unsigned int>(__ffs(peers) - 1)) {
      atomicAdd(&h[digit], static_cast<unsigned int>(__popc(peers)));
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b < 256; b += blockDim.x) {
    if (h[b] != 0) atomicAdd(&st[8 + b], static_cast<unsigned long long>(h[b]));
  }
}

// One thread: choose the digit, update prefix and need, clear the histogram. first_need > 0 on
// the first pass (the state starts zeroed). Writes (T, c) when the selection is complete.
__global__ void radix_pick_kernel(unsigned long long* __restrict__ st, int shift, bool is_lo,
                                  bool last_hi, bool last, long long first_need, int64_t n,
                                  int64_t* __restrict__ t_out, int64_t* __restrict__ c_out) {
  if (st[3] == 0) {
    long long need = first_need > 0 ? first_need : static_cast<long long>(st[2]);
    int d = 255;
    for (; d > 0 && static_cast<long long>(st[8 + d]) < need; --d) {
      need -= static_cast<long long>(st[8 + d]);
    }
    const long long count = static_cast<long long>(st[8 + d]);
    st[is_lo ? 1 : 0] |= static_cast<unsigned long long>(d) << shift;
    st[2] = static_cast<unsigned long long>(need);
    if (last_hi && count == need) {  // every entry tied at T is kept: no index cut needed
      st[3] = 1;
      *t_out = static_cast<int64_t>(st[0]);
      *c_out = n - 1;
    } else if (last) {
      st[3] = 1;
      *t_out = static_cast<int64_t>(st[0]);
      *c_out = n - 1 - static_cast<int64_t>(st[1]);
    }
  }
  for (int b = 0; b < 256; ++b) st[8 + b] = 0;
}

int multiprocessor_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> select_threshold_cuda(const at::Tensor& s, int64_t k) {
  const int64_t n = s.numel();
  const auto long_opts = s.options().dtype(at::kLong);
  auto t = at::empty({}, long_opts);
  auto c = at::empty({}, long_opts);
  if (k >= n) {
    t.fill_(-1);
    c.fill_(0);
    return {t, c};
  }
  auto state = at::zeros({kStateSize}, long_opts);
  auto* st = reinterpret_cast<unsigned long long*>(state.mutable_data_ptr<int64_t>());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  static thread_local int cached_device = -1, cached_sms = 0;
  if (cached_device != s.get_device()) {
    cached_device = s.get_device();
    cached_sms = multiprocessor_count(cached_device);
  }
  // Enough blocks to fill the GPU, each thread covering several entries.
  const int64_t want = (n + kThreads * 8 - 1) / (kThreads * 8);
  const unsigned int blocks =
      static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(want, 4 * cached_sms)));
  constexpr int hi_bits = std::is_same_v<scalar_t, double> ? 64 : 32;
  bool first = true;
  for (int pass_lo = 0; pass_lo < 2; ++pass_lo) {
    const int bits = pass_lo ? 32 : hi_bits;
    for (int shift = bits - 8; shift >= 0; shift -= 8) {
      // Digits above `shift` must match the prefix: the hi mask covers them on hi passes and all
      // of hi on lo passes; the lo mask likewise.
      const int above = shift + 8;
      unsigned long long mask_hi;
      unsigned int mask_lo;
      if (!pass_lo) {
        mask_hi = above >= 64 ? 0ull : (~0ull << above);
        mask_lo = 0u;
      } else {
        mask_hi = ~0ull;
        mask_lo = above >= 32 ? 0u : (~0u << above);
      }
      radix_hist_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          s.const_data_ptr<scalar_t>(), n, st, mask_hi, mask_lo, shift, pass_lo == 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      radix_pick_kernel<<<1, 1, 0, stream>>>(
          st, shift, pass_lo == 1, !pass_lo && shift == 0, pass_lo && shift == 0, first ? k : 0, n,
          t.mutable_data_ptr<int64_t>(), c.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      first = false;
    }
  }
  return {t, c};
}

// Selection backend: the radix select above, or ATen's (MOSX_MASK_SELECT=aten) as a fallback.
bool use_aten_select() {
  static const bool aten = [] {
    const char* v = std::getenv("MOSX_MASK_SELECT");
    return v != nullptr && std::string(v) == "aten";
  }();
  return aten;
}

template <typename scalar_t>
__global__ void masked_weight_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ s,
                                     const int64_t* __restrict__ t_ptr,
                                     const int64_t* __restrict__ c_ptr, scalar_t* __restrict__ out,
                                     bool* __restrict__ mask, int64_t n) {
  const int64_t t = *t_ptr, c = *c_ptr;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const int64_t b = abs_bits(s[i]);
    const bool kept = b > t || (b == t && i <= c);
    mask[i] = kept;
    out[i] = kept ? w[i] : scalar_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void masked_weight_backward_kernel(const scalar_t* __restrict__ g,
                                              const scalar_t* __restrict__ w,
                                              const scalar_t* __restrict__ s,
                                              const bool* __restrict__ m, scalar_t* __restrict__ gs,
                                              scalar_t* __restrict__ gw, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const scalar_t gi = g[i];
    if (gs != nullptr) {
      const acc_t sv = static_cast<acc_t>(s[i]);
      const acc_t sgn = static_cast<acc_t>((sv > acc_t(0)) - (sv < acc_t(0)));
      gs[i] = static_cast<scalar_t>(static_cast<acc_t>(gi) * static_cast<acc_t>(w[i]) * sgn);
    }
    if (gw != nullptr) gw[i] = m[i] ? gi : scalar_t(0);
  }
}

std::tuple<at::Tensor, at::Tensor> masked_weight_cuda(const at::Tensor& weight,
                                                      const at::Tensor& scores, double keep) {
  check_masked_weight_inputs(weight, scores, keep, "masked_weight");
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto w = weight.contiguous();
  const auto s = scores.contiguous();
  auto out = at::empty_like(w, at::MemoryFormat::Contiguous);
  auto mask = at::empty(w.sizes(), w.options().dtype(at::kBool));
  const int64_t n = w.numel();
  if (n == 0) return {out, mask};
  const int64_t k = masked_weight_keep_count(n, keep);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, w.scalar_type(), "masked_weight_cuda", [&] {
        const auto [t, c] = use_aten_select() ? masked_weight_threshold(s, k)
                                              : select_threshold_cuda<scalar_t>(s, k);
        masked_weight_kernel<scalar_t><<<num_blocks(n), kThreads, 0, stream>>>(
            w.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(),
            c.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(),
            mask.mutable_data_ptr<bool>(), n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {out, mask};
}

std::vector<at::Tensor> masked_weight_backward_cuda(const at::Tensor& grad,
                                                    const at::Tensor& weight,
                                                    const at::Tensor& scores,
                                                    const at::Tensor& mask, bool scores_grad,
                                                    bool weight_grad) {
  check_masked_weight_backward_inputs(grad, weight, scores, mask, "masked_weight_backward");
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto g = grad.contiguous();
  const auto w = weight.contiguous();
  const auto s = scores.contiguous();
  const auto m = mask.contiguous();
  std::vector<at::Tensor> result;
  at::Tensor gs, gw;
  if (scores_grad) result.push_back(gs = at::empty_like(w, at::MemoryFormat::Contiguous));
  if (weight_grad) result.push_back(gw = at::empty_like(w, at::MemoryFormat::Contiguous));
  const int64_t n = w.numel();
  if (n == 0 || result.empty()) return result;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, w.scalar_type(), "masked_weight_backward_cuda", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        masked_weight_backward_kernel<scalar_t, acc_t><<<num_blocks(n), kThreads, 0, stream>>>(
            g.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
            s.const_data_ptr<scalar_t>(), m.const_data_ptr<bool>(),
            scores_grad ? gs.mutable_data_ptr<scalar_t>() : nullptr,
            weight_grad ? gw.mutable_data_ptr<scalar_t>() : nullptr, n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(mosx, CUDA, m) {
  m.impl("masked_weight", &masked_weight_cuda);
  m.impl("masked_weight_backward", &masked_weight_backward_cuda);
}

}  // namespace mosx
