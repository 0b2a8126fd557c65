// Input validation shared by the CPU and CUDA implementations. Every message names the argument
// and what is wrong with it, so a user calling torch.ops.mosx.* directly gets the same clear errors
// as one going through the Python API.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace mosx {

inline void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be a 2-D [N, L] tensor, got ",
              logits.dim(), "-D with shape ", logits.sizes());
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kDouble || st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
              ": logits must be float64, float32, float16 or bfloat16, got ", st);
}

// Structure of offsets (dtype, device, size). The values are checked where they can be read
// without a device sync: on the CPU by check_offsets_values, on CUDA by mosx.Groups in Python.
inline void check_offsets_meta(const at::Tensor& logits, const at::Tensor& offsets,
                               const char* op) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 2, op,
              ": offsets must be a 1-D int64 tensor of K + 1 >= 2 entries, got shape ",
              offsets.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong, op, ": offsets must be int64, got ",
              offsets.scalar_type());
  TORCH_CHECK(offsets.device() == logits.device(), op, ": offsets are on ", offsets.device(),
              " but logits are on ", logits.device());
}

// Offsets must start at 0, end at L, and give every group an others slot plus >= 1 class.
inline void check_offsets_values(const int64_t* o, int64_t num_groups, int64_t num_logits,
                                 const char* op) {
  TORCH_CHECK(o[0] == 0, op, ": offsets[0] must be 0, got ", o[0]);
  for (int64_t k = 0; k < num_groups; ++k) {
    TORCH_CHECK(o[k + 1] - o[k] >= 2, op, ": group ", k, " spans logits [", o[k], ", ", o[k + 1],
                "), it needs an others slot and at least one class (offsets must increase by >= 2)");
  }
  TORCH_CHECK(o[num_groups] == num_logits, op, ": offsets end at ", o[num_groups],
              " but logits have ", num_logits, " columns; the groups must cover every logit");
}

inline void check_same_device(const at::Tensor& a, const char* name, const at::Tensor& logits,
                              const char* op) {
  TORCH_CHECK(a.device() == logits.device(), op, ": ", name, " is on ", a.device(),
              " but logits are on ", logits.device());
}

// Targets for group_cross_entropy: [M, N] class ids or [M, N, K] per-group labels, int64.
inline void check_targets(const at::Tensor& logits, const at::Tensor& offsets,
                          const at::Tensor& targets, const at::Tensor& class_logit,
                          const char* op) {
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ",
              targets.scalar_type());
  check_same_device(targets, "targets", logits, op);
  const int64_t n = logits.size(0), k = offsets.numel() - 1;
  TORCH_CHECK(targets.dim() == 2 || targets.dim() == 3, op,
              ": targets must be [M, N] class ids or [M, N, K] per-group labels, got shape ",
              targets.sizes());
  TORCH_CHECK(targets.size(0) == 1 || targets.size(0) == 2, op,
              ": targets must hold 1 target set (or 2 for mixup), got ", targets.size(0));
  TORCH_CHECK(targets.size(1) == n, op, ": targets have ", targets.size(1),
              " rows but logits have ", n);
  if (targets.dim() == 3) {
    TORCH_CHECK(targets.size(2) == k, op, ": per-group labels have ", targets.size(2),
                " columns but there are ", k, " groups");
  } else {
    TORCH_CHECK(class_logit.dim() == 1 && class_logit.scalar_type() == at::kLong, op,
                ": class_logit must be a 1-D int64 tensor");
    check_same_device(class_logit, "class_logit", logits, op);
  }
}

}  // namespace mosx
