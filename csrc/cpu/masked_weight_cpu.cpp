// CPU kernels of the masked-weight op family (UMAP learned weight masks):
//   masked_weight:          w_eff = where(mask, w, 0), mask = top-k |score| of the layer
//   masked_weight_backward: straight-through gradients
//                           grad_scores = grad * w * sign(scores)   (sign(0) = 0)
//                           grad_weight = where(mask, grad, 0)
// The threshold comes from masked_weight_threshold (one selection, masked_weight.h); the
// elementwise passes split the flat layer across threads with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../masked_weight.h"

namespace mosx {
namespace {

constexpr int64_t kGrain = 1 << 15;

// |x| as ordered bits: float32 bits (after conversion) for 16/32-bit types, float64 bits otherwise.
template <typename scalar_t>
inline int64_t abs_bits(scalar_t x) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    uint64_t u;
    std::memcpy(&u, &x, sizeof(u));
    return static_cast<int64_t>(u & 0x7fffffffffffffffULL);
  } else {
    const float f = static_cast<float>(x);
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    return static_cast<int64_t>(u & 0x7fffffffU);
  }
}

std::tuple<at::Tensor, at::Tensor> masked_weight_cpu(const at::Tensor& weight,
                                                     const at::Tensor& scores, double keep) {
  check_masked_weight_inputs(weight, scores, keep, "masked_weight");
  const auto w = weight.contiguous();
  const auto s = scores.contiguous();
  auto out = at::empty_like(w, at::MemoryFormat::Contiguous);
  auto mask = at::empty(w.sizes(), w.options().dtype(at::kBool));
  const int64_t n = w.numel();
  if (n == 0) return {out, mask};
  const auto [t_tensor, c_tensor] = masked_weight_threshold(s, masked_weight_keep_count(n, keep));
  const int64_t t = t_tensor.item<int64_t>(), c = c_tensor.item<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "masked_weight_cpu", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    bool* mp = mask.mutable_data_ptr<bool>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = abs_bits(sp[i]);
        const bool kept = b > t || (b == t && i <= c);
        mp[i] = kept;
        op[i] = kept ? wp[i] : scalar_t(0);
      }
    });
  });
  return {out, mask};
}

std::vector<at::Tensor> masked_weight_backward_cpu(const at::Tensor& grad, const at::Tensor& weight,
                                                   const at::Tensor& scores, const at::Tensor& mask,
                                                   bool scores_grad, bool weight_grad) {
  check_masked_weight_backward_inputs(grad, weight, scores, mask, "masked_weight_backward");
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "masked_weight_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const bool* mp = m.const_data_ptr<bool>();
    scalar_t* gsp = scores_grad ? gs.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gwp = weight_grad ? gw.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      if (gsp) {
        for (int64_t i = begin; i < end; ++i) {
          const acc_t sv = static_cast<acc_t>(sp[i]);
          const acc_t sgn = static_cast<acc_t>((sv > acc_t(0)) - (sv < acc_t(0)));
          gsp[i] = static_cast<scalar_t>(static_cast<acc_t>(gp[i]) * static_cast<acc_t>(wp[i]) * sgn);
        }
      }
      if (gwp) {
        for (int64_t i = begin; i < end; ++i) gwp[i] = mp[i] ? gp[i] : scalar_t(0);
      }
    });
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(mosx, CPU, m) {
  m.impl("masked_weight", &masked_weight_cpu);
  m.impl("masked_weight_backward", &masked_weight_backward_cpu);
}

}  // namespace mosx
