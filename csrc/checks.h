// Input validation shared by the CPU and CUDA implementations. Every message names the argument
// and what is wrong with it, so a user calling torch.ops.mosx.* directly gets the same clear errors
// as one going through the Python API.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace mosx {

inline void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be a 2-D [N, L] tensor, got ", logits.dim(),
              "-D with shape ", logits.sizes());
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kDouble || st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
              ": logits must be float64, float32, float16 or bfloat16, got ", st);
}

// What is checked where (docs/semantics.md, "Validation"): every op checks here the structure of
// every argument (rank, shape, dtype, device) without reading tensor data, so nothing here ever
// synchronises a CUDA device. Values are read only where they are on the host: the CPU kernels
// check the offsets (check_offsets_values), the targets, min_group and class_logit entries they
// read; for CUDA tensors mosx.Groups checks the offsets in Python before they are copied to the
// device. Mixed meta / real arguments never reach these kernels: the dispatcher sends them to
// the fake kernels of mosx/ops.py, which check the devices too.

// Structure of offsets (dtype, device, size).
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

// Offsets must start at 0, end at L, and give every group an others slot plus >= 1 class:
// 0 = o[0], o[k] + 2 <= o[k+1] <= L. Written so that no comparison can overflow whatever the
// values (o[k+1] - o[k] wraps in int64 for values near +/-2^63): o[k] is known to lie in
// [0, L] when group k is checked, o[k+1] is compared with L first and o[k+1] - 2 is formed only
// for o[k+1] >= 2.
inline void check_offsets_values(const int64_t* o, int64_t num_groups, int64_t num_logits,
                                 const char* op) {
  TORCH_CHECK(o[0] == 0, op, ": offsets[0] must be 0, got ", o[0]);
  for (int64_t k = 0; k < num_groups; ++k) {
    TORCH_CHECK(o[k + 1] <= num_logits, op, ": offsets[", k + 1, "] = ", o[k + 1],
                " is past the end of the logits (", num_logits, " columns)");
    TORCH_CHECK(o[k + 1] >= 2 && o[k] <= o[k + 1] - 2, op, ": group ", k, " spans logits [", o[k],
                ", ", o[k + 1], "), it needs an others slot and at least one class ",
                "(offsets must increase by >= 2)");
  }
  TORCH_CHECK(o[num_groups] == num_logits, op, ": offsets end at ", o[num_groups],
              " but logits have ", num_logits, " columns; the groups must cover every logit");
}

inline bool is_float_type(at::ScalarType st) {
  return st == at::kDouble || st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
}

inline void check_same_device(const at::Tensor& a, const char* name, const at::Tensor& logits,
                              const char* op) {
  TORCH_CHECK(a.device() == logits.device(), op, ": ", name, " is on ", a.device(),
              " but logits are on ", logits.device());
}

// A floating tensor of the given shape on the logits' device (the backward ops' saved and
// incoming tensors).
inline void check_float_arg(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                            const at::Tensor& logits, const char* op) {
  check_same_device(t, name, logits, op);
  TORCH_CHECK(is_float_type(t.scalar_type()), op, ": ", name,
              " must be float64, float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// An int64 tensor of the given shape on the logits' device.
inline void check_long_arg(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                           const at::Tensor& logits, const char* op) {
  check_same_device(t, name, logits, op);
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// Targets for group_cross_entropy: [M, N] class ids or [M, N, K] per-group labels, int64; for
// class ids also class_logit [C] = [L - K] (class id -> logit position). Their values are
// checked where the CPU kernels read them (TargetSlots); CUDA kernels give NaN instead.
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
                ": class_logit must be a 1-D int64 tensor, got ", class_logit.scalar_type(), " ",
                class_logit.sizes());
    check_same_device(class_logit, "class_logit", logits, op);
    TORCH_CHECK(class_logit.size(0) == logits.size(1) - k, op, ": class_logit has ",
                class_logit.size(0), " entries but there are L - K = ", logits.size(1) - k,
                " classes");
  }
}

}  // namespace mosx
