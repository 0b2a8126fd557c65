// CPU kernels of the group softmax / log-softmax and their backward (row math in row_ops.h).
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

at::Tensor group_softmax_cpu(const at::Tensor& logits_in, const at::Tensor& offsets, bool log) {
  const auto o = host_offsets(logits_in, offsets, "mosx.group_softmax");
  const at::Tensor x = unit_inner_stride(logits_in);
  const int64_t N = x.size(0), L = x.size(1), K = static_cast<int64_t>(o.size()) - 1;
  at::Tensor y = at::empty({N, L}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return y;
  MOSX_DISPATCH_FLOATS(x.scalar_type(), "mosx.group_softmax", [&] {
    using real = acc_type_t<scalar_t>;
    const auto& ops = row_ops<real>();
    for_each_row(x, K, y.mutable_data_ptr<scalar_t>(),
                 [&](int64_t, const RowIn<real>& row, real* dst) {
                   ops.softmax(row, o.data(), K, log, dst);
                 });
  });
  return y;
}

at::Tensor group_softmax_backward_cpu(const at::Tensor& grad_in, const at::Tensor& out_in,
                                      const at::Tensor& offsets, bool log) {
  const char* op = "mosx.group_softmax_backward";
  const auto o = host_offsets(out_in, offsets, op);
  check_float_arg(grad_in, "grad_out", out_in.sizes(), out_in, op);
  TORCH_CHECK(grad_in.scalar_type() == out_in.scalar_type(), op, ": grad_out is ",
              grad_in.scalar_type(), " but the softmax output is ", out_in.scalar_type());
  const at::Tensor g = grad_in.contiguous(), y = out_in.contiguous();
  const int64_t N = y.size(0), L = y.size(1), K = static_cast<int64_t>(o.size()) - 1;
  at::Tensor gx = at::empty({N, L}, y.options());
  if (N == 0) return gx;
  MOSX_DISPATCH_FLOATS(y.scalar_type(), "mosx", [&] {
    using real = acc_type_t<scalar_t>;
    const auto& ops = row_ops<real>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(L), [&](int64_t begin, int64_t end) {
      std::vector<real> gbuf(L), ybuf(L), out(L);
      for (int64_t i = begin; i < end; ++i) {
        const real* grow = load_row(gp, L, i, L, gbuf.data());
        const real* yrow = load_row(yp, L, i, L, ybuf.data());
        real* dst = row_dest(gxp, i, L, out.data());
        ops.softmax_backward(grow, yrow, o.data(), K, log, dst);
        store_row(gxp, i, L, dst);
      }
    });
  });
  return gx;
}
}  // namespace

TORCH_LIBRARY_IMPL(mosx, CPU, m) {
  m.impl("group_softmax", &group_softmax_cpu);
  m.impl("group_softmax_backward", &group_softmax_backward_cpu);
}

}  // namespace cpu
}  // namespace mosx
