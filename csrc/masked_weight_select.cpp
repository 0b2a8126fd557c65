// Threshold selection of the masked-weight op: which k of a layer's n scores the mask keeps.
// Device-agnostic ATen code shared by the CPU and CUDA kernels (rule in masked_weight.h).
// One k-th value selection (at::kthvalue: quickselect on the CPU, radix select on CUDA), never
// a sort, and no host synchronisation.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/full.h>
#include <ATen/ops/kthvalue.h>

#include <limits>

#include "masked_weight.h"

namespace mosx {

std::tuple<at::Tensor, at::Tensor> masked_weight_threshold(const at::Tensor& scores, int64_t k) {
  const int64_t n = scores.numel();
  TORCH_CHECK(n >= 1 && k >= 1 && k <= n, "masked_weight_threshold: need 1 <= k <= n, got k = ", k,
              ", n = ", n);
  const auto long_opts = scores.options().dtype(at::kLong);
  if (k == n) {  // keep everything: every bit pattern is > -1
    return {at::full({}, -1, long_opts), at::full({}, 0, long_opts)};
  }
  const auto flat = scores.reshape({-1});
  // The k-th largest is the (n - k + 1)-th smallest.
  const int64_t rank = n - k + 1;
  if (scores.scalar_type() != at::kDouble) {
    // 32-bit |score| bits and the index fit one int64 key: bits * 2^32 + (n - 1 - i).
    // Keys are distinct, so exactly k of them are >= the k-th largest key, and among equal
    // bits the lower index has the larger key: the tie rule falls out of one selection.
    const auto bits = flat.to(at::kFloat).view(at::kInt).bitwise_and(0x7fffffff).to(at::kLong);
    const auto low = at::arange(n - 1, -1, -1, long_opts);  // n - 1 - i
    const auto keys = bits.mul(kMaskedWeightMaxNumel).add_(low);
    const auto kth = std::get<0>(at::kthvalue(keys, rank));
    // kth = T * 2^32 + (n - 1 - c), with 0 <= n - 1 - c < 2^32.
    auto t = kth.div(kMaskedWeightMaxNumel, "floor");
    auto c = kth.remainder(kMaskedWeightMaxNumel).neg_().add_(n - 1);
    return {t, c};
  }
  // float64: 63 bits of |score| leave no room for the index. Select the k-th largest bits, then
  // take the first `need` ties in index order: c is the index of the need-th tie.
  const auto bits = flat.view(at::kLong).bitwise_and(std::numeric_limits<int64_t>::max());
  auto t = std::get<0>(at::kthvalue(bits, rank));
  const auto need = bits.gt(t).sum().neg_().add_(k);      // >= 1 by construction
  const auto tie_rank = bits.eq(t).cumsum(0, at::kLong);  // ties at or before i
  auto c = tie_rank.lt(need).sum();                       // first i reaching need
  return {t, c};
}

}  // namespace mosx
