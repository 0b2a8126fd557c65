// CPU kernels of the masked-weight op family (UMAP learned weight masks):
//   masked_weight:          w_eff = where(mask, w, 0), mask = top-k |score| of the layer
//   masked_weight_backward: straight-through gradients
//                           grad_scores = grad * w * sign(scores)   (sign(0) = 0)
//                           grad_weight = where(mask, grad, 0)
// The threshold comes from a radix select over the score bits (select_threshold_cpu below, rule
// in masked_weight.h); all passes split the flat layer across threads with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
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

// Radix select of the threshold (T, c) of masked_weight.h, straight from the scores: 8-bit digits
// of the |score| bits from the top (4 passes for 32-bit keys, 8 for float64), each pass a
// histogram over the entries that share the digits chosen so far (per-chunk histograms, summed in
// chunk order: deterministic). After the last pass T is the k-th largest bit pattern and `need`
// the number of entries equal to T that the mask keeps; c is the index of the need-th of them.
template <typename scalar_t>
std::pair<int64_t, int64_t> select_threshold_cpu(const scalar_t* s, int64_t n, int64_t k) {
  using U = std::conditional_t<std::is_same_v<scalar_t, double>, uint64_t, uint32_t>;
  if (k >= n) return {-1, 0};
  constexpr int kBits = 8 * sizeof(U);
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  std::vector<int64_t> hist(static_cast<size_t>(chunks) * 256);
  U prefix = 0, prefix_mask = 0;
  int64_t need = k;  // rank, from the top, among the entries matching the prefix
  int64_t count_eq = 0;
  for (int shift = kBits - 8; shift >= 0; shift -= 8) {
    std::fill(hist.begin(), hist.end(), 0);
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t ch = cb; ch < ce; ++ch) {
        int64_t* h = hist.data() + ch * 256;
        const int64_t end = std::min(n, (ch + 1) * kGrain);
        for (int64_t i = ch * kGrain; i < end; ++i) {
          const U u = static_cast<U>(abs_bits(s[i]));
          if ((u & prefix_mask) == prefix) ++h[(u >> shift) & 0xff];
        }
      }
    });
    int64_t total[256] = {0};
    for (int64_t ch = 0; ch < chunks; ++ch)
      for (int d = 0; d < 256; ++d) total[d] += hist[ch * 256 + d];
    int d = 255;
    for (; d > 0 && total[d] < need; --d) need -= total[d];
    count_eq = total[d];
    prefix |= static_cast<U>(d) << shift;
    prefix_mask |= static_cast<U>(0xff) << shift;
  }
  const int64_t t = static_cast<int64_t>(prefix);
  if (need == count_eq) return {t, n - 1};  // every tie is kept (the usual case: one entry)
  int64_t seen = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (abs_bits(s[i]) == t && ++seen == need) return {t, i};
  }
  TORCH_INTERNAL_ASSERT(false, "masked_weight: radix select lost count of the ties");
  return {t, n - 1};
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
  const int64_t k = masked_weight_keep_count(n, keep);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "masked_weight_cpu",
                                  [&] {
                                    const scalar_t* wp = w.const_data_ptr<scalar_t>();
                                    const scalar_t* sp = s.const_data_ptr<scalar_t>();
                                    const auto [t, c] = select_threshold_cpu(sp, n, k);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, w.scalar_type(), "masked_weight_backward_cpu", [&] {
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
              gsp[i] = static_cast<scalar_t>(static_cast<acc_t>(gp[i]) * static_cast<acc_t>(wp[i]) *
                                             sgn);
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

TORCH_LIBRARY_IMPL(mosx, CompositeExplicitAutograd, m) {
  m.impl("_masked_weight_threshold", [](const at::Tensor& scores, int64_t k) {
    TORCH_CHECK(scores.numel() >= 1 && k >= 1 && k <= scores.numel(),
                "_masked_weight_threshold: need 1 <= k <= numel");
    return masked_weight_threshold(scores.contiguous(), k);
  });
}

TORCH_LIBRARY_IMPL(mosx, CPU, m) {
  m.impl("masked_weight", &masked_weight_cpu);
  m.impl("masked_weight_backward", &masked_weight_backward_cpu);
}

}  // namespace mosx
