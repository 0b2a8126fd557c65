// CPU kernels of the group cross-entropy forward and backward, for class-id or per-group-label
// targets and 1 or 2 (mixup) target sets (row math in row_ops.h: row_lse, slice_scaled_softmax).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "row_helpers.h"

namespace mosx {
namespace cpu {
namespace {

// Logit position of the target of (target set m, row i, group k), or -1 when ignored.
struct TargetSlots {
  const int64_t* t;
  const int64_t* class_logit;
  const int64_t* o;
  int64_t N, K, C, L, ignore_index;
  bool per_group;
  const char* op;

  int64_t operator()(int64_t m, int64_t i, int64_t k) const {
    if (per_group) {
      const int64_t lab = t[(m * N + i) * K + k];
      if (lab == ignore_index) return -1;
      const int64_t n_k = o[k + 1] - o[k] - 1;
      TORCH_CHECK(lab >= 0 && lab <= n_k, op, ": per-group label ", lab, " at row ", i, ", group ",
                  k, " is out of range [0, ", n_k, "] (0 = others) and is not ", "ignore_index (",
                  ignore_index, ")");
      return o[k] + lab;
    }
    const int64_t c = t[m * N + i];
    if (c == ignore_index) return -1;
    TORCH_CHECK(c >= 0 && c < C, op, ": target class ", c, " at row ", i, " is out of range [0, ",
                C, ") and is not ignore_index (", ignore_index, ")");
    const int64_t pos = class_logit[c];
    TORCH_CHECK(pos >= 0 && pos < L, op, ": class_logit[", c, "] = ", pos,
                " is not a logit position in [0, ", L, ")");
    if (pos < o[k] || pos >= o[k + 1]) return o[k];  // another group's class: "others" here
    TORCH_CHECK(pos != o[k], op, ": class_logit[", c, "] = ", pos, " is the others slot of group ",
                k, ", not a class logit");
    return pos;  // the target's own group labels it
  }
};

TargetSlots make_slots(const at::Tensor& t, const at::Tensor& cl, const std::vector<int64_t>& o,
                       int64_t N, int64_t L, int64_t ignore_index, const char* op) {
  const bool per_group = t.dim() == 3;
  return TargetSlots{t.const_data_ptr<int64_t>(),
                     per_group ? nullptr : cl.const_data_ptr<int64_t>(),
                     o.data(),
                     N,
                     static_cast<int64_t>(o.size()) - 1,
                     per_group ? 0 : cl.numel(),
                     L,
                     ignore_index,
                     per_group,
                     op};
}

std::tuple<at::Tensor, at::Tensor> group_cross_entropy_cpu(const at::Tensor& logits_in,
                                                           const at::Tensor& offsets,
                                                           const at::Tensor& targets_in,
                                                           const at::Tensor& class_logit_in,
                                                           int64_t ignore_index) {
  const char* op = "mosx.group_cross_entropy";
  const auto o = host_offsets(logits_in, offsets, op);
  check_targets(logits_in, offsets, targets_in, class_logit_in, op);
  const at::Tensor x = unit_inner_stride(logits_in);
  const at::Tensor t = targets_in.contiguous(), cl = class_logit_in.contiguous();
  const int64_t N = x.size(0), L = x.size(1), K = static_cast<int64_t>(o.size()) - 1;
  const int64_t M = t.size(0);
  const auto acc = x.options().dtype(acc_dtype(x));
  at::Tensor losses = at::empty({M, N, K}, acc);
  at::Tensor lse = at::empty({N, K}, acc);
  if (N == 0) return {losses, lse};
  const TargetSlots slot = make_slots(t, cl, o, N, L, ignore_index, op);
  MOSX_DISPATCH_FLOATS(x.scalar_type(), "mosx.group_cross_entropy", [&] {
    using real = acc_type_t<scalar_t>;
    const auto& ops = row_ops<real>();
    real* lossp = losses.mutable_data_ptr<real>();
    real* lsep = lse.mutable_data_ptr<real>();
    for_each_row(
        x, K, static_cast<scalar_t*>(nullptr),
        [&](int64_t i, const RowIn<real>& in, real*) {
          real* lse_row = lsep + i * K;
          ops.lse(in, o.data(), K, lse_row);
          for (int64_t m = 0; m < M; ++m) {
            real* loss_row = lossp + (m * N + i) * K;
            for (int64_t k = 0; k < K; ++k) {
              const int64_t s = slot(m, i, k);
              loss_row[k] = s < 0 ? real(0) : lse_row[k] - ops.value(in, s);
            }
          }
        },
        /*widen=*/false);
  });
  return {losses, lse};
}

at::Tensor group_cross_entropy_backward_cpu(const at::Tensor& grad_losses_in,
                                            const at::Tensor& logits_in, const at::Tensor& offsets,
                                            const at::Tensor& targets_in,
                                            const at::Tensor& class_logit_in,
                                            const at::Tensor& lse_in, int64_t ignore_index) {
  const char* op = "mosx.group_cross_entropy_backward";
  const auto o = host_offsets(logits_in, offsets, op);
  check_targets(logits_in, offsets, targets_in, class_logit_in, op);
  const at::Tensor x = unit_inner_stride(logits_in);
  const int64_t N = x.size(0), L = x.size(1), K = static_cast<int64_t>(o.size()) - 1;
  const int64_t M = targets_in.size(0);
  check_float_arg(grad_losses_in, "grad_losses", {M, N, K}, x, op);
  check_float_arg(lse_in, "lse", {N, K}, x, op);
  const at::Tensor t = targets_in.contiguous(), cl = class_logit_in.contiguous();
  const at::Tensor g = grad_losses_in.to(acc_dtype(x)).contiguous();
  const at::Tensor lse = lse_in.to(acc_dtype(x)).contiguous();
  at::Tensor gx = at::empty({N, L}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return gx;
  const TargetSlots slot = make_slots(t, cl, o, N, L, ignore_index, op);
  MOSX_DISPATCH_FLOATS(x.scalar_type(), "mosx", [&] {
    using real = acc_type_t<scalar_t>;
    const auto& ops = row_ops<real>();
    const real* gp = g.const_data_ptr<real>();
    const real* lsep = lse.const_data_ptr<real>();
    for_each_row(
        x, K, gx.mutable_data_ptr<scalar_t>(), [&](int64_t i, const RowIn<real>& in, real* dst) {
          const real* row = in.x;
          for (int64_t k = 0; k < K; ++k) {
            // d loss_mk / d x = softmax_k(x) - onehot(slot_mk) on slice k, for unignored entries.
            int64_t slots[2];
            real coef[2], total = 0;
            bool counted = false;
            for (int64_t m = 0; m < M; ++m) {
              slots[m] = slot(m, i, k);
              coef[m] = slots[m] < 0 ? real(0) : gp[(m * N + i) * K + k];
              total += coef[m];
              counted = counted || slots[m] >= 0;
            }
            const int64_t start = o[k];
            if (!counted) {  // ignored in every target set: gradient 0, even on a NaN slice
              for (int64_t j = start; j < o[k + 1]; ++j) dst[j] = real(0);
              continue;
            }
            ops.scaled_softmax(row + start, o[k + 1] - start, lsep[i * K + k], total, dst + start);
            for (int64_t m = 0; m < M; ++m) {
              if (slots[m] >= 0) dst[slots[m]] -= coef[m];
            }
          }
        });
  });
  return gx;
}
}  // namespace

TORCH_LIBRARY_IMPL(mosx, CPU, m) {
  m.impl("group_cross_entropy", &group_cross_entropy_cpu);
  m.impl("group_cross_entropy_backward", &group_cross_entropy_backward_cpu);
}

}  // namespace cpu
}  // namespace mosx
