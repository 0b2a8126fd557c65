// Shared pieces of the masked-weight op family (UMAP learned weight masks): input checks, the
// keep count, and the threshold selection. Included by the CPU and the CUDA kernels; the
// selection itself is host code (ATen calls) defined in masked_weight_select.cpp, so nvcc never
// compiles it.
//
// Ranking rule (README "Masked weights"): the mask keeps exactly k = clamp(round(keep * n), 1, n)
// of the n entries of a layer, those with the largest |score|. |score| is compared through its
// bit pattern with the sign bit cleared (float32 bits for float32/float16/bfloat16 scores,
// float64 bits for float64), which is the numeric order for numbers and puts NaN above +inf.
// Ties are broken by the flat row-major index: among equal |score| the lower index is kept.
// The selection returns two int64 scalars (T, c) on the scores' device such that entry i is kept
// iff  bits_i > T  or  (bits_i == T and i <= c).  Nothing is copied to the host, so the CUDA path
// never synchronises.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <tuple>

namespace mosx {

// Tie-break indices must fit the 32 low bits of the selection key.
constexpr int64_t kMaskedWeightMaxNumel = int64_t(1) << 32;

inline void check_masked_weight_inputs(const at::Tensor& weight, const at::Tensor& scores,
                                       double keep, const char* op) {
  const auto st = weight.scalar_type();
  TORCH_CHECK(st == at::kDouble || st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
              ": weight must be float64, float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(scores.scalar_type() == st, op, ": scores must have the weight's dtype ", st,
              ", got ", scores.scalar_type());
  TORCH_CHECK(scores.sizes() == weight.sizes(), op, ": scores have shape ", scores.sizes(),
              " but the weight has shape ", weight.sizes(), "; they must match");
  TORCH_CHECK(scores.device() == weight.device(), op, ": scores are on ", scores.device(),
              " but the weight is on ", weight.device());
  TORCH_CHECK(std::isfinite(keep) && keep > 0.0 && keep <= 1.0, op,
              ": keep must be a fraction in (0, 1], got ", keep);
  TORCH_CHECK(weight.numel() < kMaskedWeightMaxNumel, op,
              ": a masked layer may hold at most 2^32 - 1 "
              "weights, got ",
              weight.numel());
}

// Number of entries kept: round half up, at least one, at most all (0 for an empty layer).
inline int64_t masked_weight_keep_count(int64_t n, double keep) {
  if (n == 0) return 0;
  int64_t k = static_cast<int64_t>(std::floor(keep * static_cast<double>(n) + 0.5));
  return k < 1 ? 1 : (k > n ? n : k);
}

// (T, c) of the rule above for contiguous scores keeping k of n >= 1 entries; int64 0-d tensors
// on the scores' device. Defined in masked_weight_select.cpp.
std::tuple<at::Tensor, at::Tensor> masked_weight_threshold(const at::Tensor& scores, int64_t k);

inline void check_masked_weight_backward_inputs(const at::Tensor& grad, const at::Tensor& weight,
                                                const at::Tensor& scores, const at::Tensor& mask,
                                                const char* op) {
  check_masked_weight_inputs(weight, scores, 1.0, op);
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type(), op,
              ": grad must have the weight's dtype ", weight.scalar_type(), ", got ",
              grad.scalar_type());
  TORCH_CHECK(grad.sizes() == weight.sizes(), op, ": grad has shape ", grad.sizes(),
              " but the weight has shape ", weight.sizes());
  TORCH_CHECK(grad.device() == weight.device(), op, ": grad is on ", grad.device(),
              " but the weight is on ", weight.device());
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.sizes() == weight.sizes(), op, ": mask has shape ", mask.sizes(),
              " but the weight has shape ", weight.sizes());
  TORCH_CHECK(mask.device() == weight.device(), op, ": mask is on ", mask.device(),
              " but the weight is on ", weight.device());
}

}  // namespace mosx
