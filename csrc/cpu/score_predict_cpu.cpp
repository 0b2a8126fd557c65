// CPU kernels of the MOS score (and its backward) and of the group prediction (row math in
// row_ops.h: row_score, row_score_backward, row_predict).
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_softmax_score_cpu(const at::Tensor& logits_in,
                                                                       const at::Tensor& offsets) {
  const auto o = host_offsets(logits_in, offsets, "mosx.group_softmax_score");
  const at::Tensor x = unit_inner_stride(logits_in);
  const int64_t N = x.size(0), K = static_cast<int64_t>(o.size()) - 1;
  const auto acc = x.options().dtype(acc_dtype(x));
  at::Tensor score = at::empty({N}, acc);
  at::Tensor min_group = at::empty({N}, x.options().dtype(at::kLong));
  at::Tensor min_lse = at::empty({N}, acc);
  if (N == 0) return {score, min_group, min_lse};
  MOSX_DISPATCH_FLOATS(x.scalar_type(), "mosx.group_softmax_score", [&] {
    using real = acc_type_t<scalar_t>;
    const auto& ops = row_ops<real>();
    real* sp = score.mutable_data_ptr<real>();
    int64_t* gp = min_group.mutable_data_ptr<int64_t>();
    real* lp = min_lse.mutable_data_ptr<real>();
    for_each_row(
        x, K, static_cast<scalar_t*>(nullptr),
        [&](int64_t i, const RowIn<real>& row, real*) {
          sp[i] = ops.score(row, o.data(), K, gp + i, lp + i);
        },
        /*widen=*/false);
  });
  return {score, min_group, min_lse};
}

at::Tensor group_softmax_score_backward_cpu(const at::Tensor& grad_score,
                                            const at::Tensor& logits_in, const at::Tensor& offsets,
                                            const at::Tensor& min_group_in,
                                            const at::Tensor& min_lse_in) {
  const char* op = "mosx.group_softmax_score_backward";
  const auto o = host_offsets(logits_in, offsets, op);
  const at::Tensor x = unit_inner_stride(logits_in);
  const int64_t N = x.size(0), L = x.size(1), K = static_cast<int64_t>(o.size()) - 1;
  check_float_arg(grad_score, "grad_score", {N}, x, op);
  check_long_arg(min_group_in, "min_group", {N}, x, op);
  check_float_arg(min_lse_in, "min_lse", {N}, x, op);
  const at::Tensor g = grad_score.to(acc_dtype(x)).contiguous();
  const at::Tensor mg = min_group_in.contiguous(), ml = min_lse_in.to(acc_dtype(x)).contiguous();
  at::Tensor gx = at::empty({N, L}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return gx;
  MOSX_DISPATCH_FLOATS(x.scalar_type(), "mosx", [&] {
    using real = acc_type_t<scalar_t>;
    const auto& ops = row_ops<real>();
    const real* gp = g.const_data_ptr<real>();
    const int64_t* mgp = mg.const_data_ptr<int64_t>();
    const real* mlp = ml.const_data_ptr<real>();
    for_each_row(x, K, gx.mutable_data_ptr<scalar_t>(),
                 [&](int64_t i, const RowIn<real>& in, real* dst) {
                   const real* row = in.x;
                   TORCH_CHECK(mgp[i] >= 0 && mgp[i] < K, op, ": min_group[", i, "] = ", mgp[i],
                               " is not a group index in [0, ", K, ")");
                   ops.score_backward(gp[i], row, o.data(), L, mgp[i], mlp[i], dst);
                 });
  });
  return gx;
}

// ---------------------------------------------------------------------------------------------
// Group prediction

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_predict_cpu(const at::Tensor& logits_in,
                                                                 const at::Tensor& offsets,
                                                                 const at::Tensor& logit_class_in) {
  const char* op = "mosx.group_predict";
  const auto o = host_offsets(logits_in, offsets, op);
  const at::Tensor x = unit_inner_stride(logits_in);
  const int64_t N = x.size(0), L = x.size(1), K = static_cast<int64_t>(o.size()) - 1;
  TORCH_CHECK(logit_class_in.dim() == 1 && logit_class_in.size(0) == L &&
                  logit_class_in.scalar_type() == at::kLong,
              op, ": logit_class must be an int64 tensor of shape [L] = [", L, "], got ",
              logit_class_in.scalar_type(), " ", logit_class_in.sizes());
  check_same_device(logit_class_in, "logit_class", x, op);
  const at::Tensor lc = logit_class_in.contiguous();
  at::Tensor cls = at::empty({N}, x.options().dtype(at::kLong));
  at::Tensor prob = at::empty({N}, x.options().dtype(acc_dtype(x)));
  at::Tensor group = at::empty({N}, x.options().dtype(at::kLong));
  if (N == 0) return {cls, prob, group};
  MOSX_DISPATCH_FLOATS(x.scalar_type(), "mosx", [&] {
    using real = acc_type_t<scalar_t>;
    const auto& ops = row_ops<real>();
    const int64_t* lcp = lc.const_data_ptr<int64_t>();
    int64_t* cp = cls.mutable_data_ptr<int64_t>();
    real* pp = prob.mutable_data_ptr<real>();
    int64_t* gp = group.mutable_data_ptr<int64_t>();
    for_each_row(
        x, K, static_cast<scalar_t*>(nullptr),
        [&](int64_t i, const RowIn<real>& row, real*) {
          int64_t pos;
          ops.predict(row, o.data(), K, &pos, pp + i, gp + i);
          cp[i] = lcp[pos];
        },
        /*widen=*/false);
  });
  return {cls, prob, group};
}
}  // namespace

TORCH_LIBRARY_IMPL(mosx, CPU, m) {
  m.impl("group_softmax_score", &group_softmax_score_cpu);
  m.impl("group_softmax_score_backward", &group_softmax_score_backward_cpu);
  m.impl("group_predict", &group_predict_cpu);
}

}  // namespace cpu
}  // namespace mosx
