// CUDA kernels of the masked-weight op family (UMAP learned weight masks); same semantics as
// csrc/cpu/masked_weight_cpu.cpp:
//   masked_weight:          w_eff = where(mask, w, 0), mask = top-k |score| of the layer
//   masked_weight_backward: grad_scores = grad * w * sign(scores), grad_weight = where(mask, grad, 0)
// The threshold (T, c) is selected on the device by masked_weight_threshold (host ATen code in
// masked_weight_select.cpp) and read by the kernels from device memory: no host sync per step.
// The elementwise passes are memory-bound grid-stride loops on the current stream.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>
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

template <typename scalar_t>
__global__ void masked_weight_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ s,
                                     const int64_t* __restrict__ t_ptr,
                                     const int64_t* __restrict__ c_ptr, scalar_t* __restrict__ out,
                                     bool* __restrict__ mask, int64_t n) {
  const int64_t t = *t_ptr, c = *c_ptr;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
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
                                              const bool* __restrict__ m,
                                              scalar_t* __restrict__ gs, scalar_t* __restrict__ gw,
                                              int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
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
  const auto [t, c] = masked_weight_threshold(s, masked_weight_keep_count(n, keep));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "masked_weight_cuda", [&] {
    masked_weight_kernel<scalar_t><<<num_blocks(n), kThreads, 0, stream>>>(
        w.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(),
        c.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), mask.mutable_data_ptr<bool>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mask};
}

std::vector<at::Tensor> masked_weight_backward_cuda(const at::Tensor& grad, const at::Tensor& weight,
                                                    const at::Tensor& scores, const at::Tensor& mask,
                                                    bool scores_grad, bool weight_grad) {
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "masked_weight_backward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    masked_weight_backward_kernel<scalar_t, acc_t><<<num_blocks(n), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
        m.const_data_ptr<bool>(), scores_grad ? gs.mutable_data_ptr<scalar_t>() : nullptr,
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
