// Row plumbing shared by the CPU kernels of the group-softmax op families (softmax_cpu.cpp,
// score_predict_cpu.cpp, cross_entropy_cpu.cpp): the row input (RowIn), the table of per-row
// functions of the compiled variants (RowOps, defined in row_variants.cpp), the validated host
// copy of the offsets, and the row loop with its 16-bit conversions (for_each_row).
//
// Rows are split across threads with at::parallel_for (OpenMP in the build). Each row is read
// once into L1 (converted to float for half inputs), and every group slice is reduced there. The
// per-row math lives in row_ops.h, compiled twice for float (baseline and AVX2+FMA, chosen at load
// time) and once for double, all in row_variants.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../host_utils.h"

namespace mosx {
namespace cpu {

// One input row of an op. For bf16 / fp16 input also its 16-bit patterns and the table of exp(v)
// for every 16-bit value v (bits and exp_table null for 32/64-bit input). A 16-bit row is either
// widened up front (x set) or, for the reductions that mostly read the table, widened slice by
// slice into `scratch` when a slice needs real values (x null); see slice_values in row_ops.h.
template <typename real>
struct RowIn {
  const real* x;
  const uint16_t* bits;
  const float* exp_table;
  bool is_half;          // fp16 (else bf16) bits
  real* scratch;         // [L]
  real* group_scratch;   // [3 K]: per-group values of the row
  int64_t* group_index;  // [K]
  const char* ahead;     // the input row read next (this one when none): to prefetch
};

// The row functions of one variant (row_ops.h), so the drivers are written once.
template <typename real>
struct RowOps {
  using In = const RowIn<real>&;
  real (*score)(In, const int64_t*, int64_t, int64_t*, real*);
  void (*score_backward)(real, const real*, const int64_t*, int64_t, int64_t, real, real*);
  void (*predict)(In, const int64_t*, int64_t, int64_t*, real*, int64_t*);
  void (*softmax)(In, const int64_t*, int64_t, bool, real*);
  void (*softmax_backward)(const real*, const real*, const int64_t*, int64_t, bool, real*);
  void (*lse)(In, const int64_t*, int64_t, real*);
  void (*scaled_softmax)(const real*, int64_t, real, real, real*);
  void (*bf16_to_real)(const uint16_t*, int64_t, real*);
  void (*half_to_real)(const uint16_t*, int64_t, real*);
  real (*value)(In, int64_t);
};

// The float table of the variant this CPU runs (AVX2 or baseline, see row_variants.cpp) and the
// double one.
const RowOps<float>& float_row_ops();
const RowOps<double>& double_row_ops();

template <typename real>
inline const RowOps<real>& row_ops() {
  if constexpr (std::is_same_v<real, float>) {
    return float_row_ops();
  } else {
    return double_row_ops();
  }
}

// "avx2" or "baseline": which float variant runs.
std::string cpu_kernels();

// Validated host copy of the offsets (checks.h has the rules).
inline std::vector<int64_t> host_offsets(const at::Tensor& logits, const at::Tensor& offsets,
                                         const char* op) {
  check_logits(logits, op);
  check_offsets_meta(logits, offsets, op);
  const at::Tensor o = offsets.contiguous();
  std::vector<int64_t> v(o.const_data_ptr<int64_t>(), o.const_data_ptr<int64_t>() + o.numel());
  check_offsets_values(v.data(), static_cast<int64_t>(v.size()) - 1, logits.size(1), op);
  return v;
}

// Enough rows per task to amortise the thread hand-off.
inline int64_t grain_rows(int64_t num_logits) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(num_logits, 1));
}

// exp(v) for every bf16 (or fp16) bit pattern v, built on first use (256 KiB): 16-bit inputs
// read their exps from it instead of computing them.
template <typename T16>
inline const float* exp_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t v = 0; v < 65536; ++v) {
      const float x = static_cast<float>(T16(static_cast<uint16_t>(v), T16::from_bits()));
      t[v] = static_cast<float>(std::exp(static_cast<double>(x)));
    }
    return t;
  }();
  return table.data();
}

template <typename scalar_t>
inline const float* exp_table_for() {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
    return exp_table<scalar_t>();
  } else {
    return nullptr;
  }
}

// Row i of x as `real` values: the row itself when no conversion is needed, else a converted
// copy in buf (vectorised for bf16 / fp16).
template <typename scalar_t, typename real>
inline const real* load_row(const scalar_t* x, int64_t row_stride, int64_t i, int64_t n,
                            real* buf) {
  const scalar_t* src = x + i * row_stride;
  if constexpr (std::is_same_v<scalar_t, real>) {
    return src;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    row_ops<real>().bf16_to_real(reinterpret_cast<const uint16_t*>(src), n, buf);
    return buf;
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    row_ops<real>().half_to_real(reinterpret_cast<const uint16_t*>(src), n, buf);
    return buf;
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<real>(src[j]);
    return buf;
  }
}

// Destination for an [L]-row result: the output row when no conversion is needed, else buf;
// store_row converts buf into the output row.
template <typename scalar_t, typename real>
inline real* row_dest(scalar_t* y, int64_t i, int64_t n, real* buf) {
  if constexpr (std::is_same_v<scalar_t, real>) {
    return y + i * n;
  } else {
    return buf;
  }
}

template <typename scalar_t, typename real>
inline void store_row(scalar_t* y, int64_t i, int64_t n, const real* buf) {
  if constexpr (!std::is_same_v<scalar_t, real>) {
    scalar_t* dst = y + i * n;
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(buf[j]);
  }
}

// Calls fn(i, in, dst) for every row i of x (num_groups groups), rows split across threads. `in`
// is row i (see RowIn; `widen` = false leaves 16-bit rows to be widened slice by slice, for the
// forward reductions); `dst` is where an [L] result for row i goes (y's row itself, or a buffer
// that is converted into it afterwards), or null when y is null (ops without an [N, L] output).
template <typename scalar_t, typename F>
inline void for_each_row(const at::Tensor& x, int64_t num_groups, scalar_t* y, const F& fn,
                         bool widen = true) {
  using real = acc_type_t<scalar_t>;
  const int64_t N = x.size(0), L = x.size(1), rs = x.stride(0);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const float* table = exp_table_for<scalar_t>();
  widen = widen || !table;
  at::parallel_for(0, N, grain_rows(L), [&](int64_t begin, int64_t end) {
    // The row's scratch, then 3 K per-group values; K per-group positions.
    std::vector<real> in(L + 3 * num_groups), out(y ? L : 0);
    std::vector<int64_t> index(num_groups);
    for (int64_t i = begin; i < end; ++i) {
      const RowIn<real> row{widen ? load_row(xp, rs, i, L, in.data()) : nullptr,
                            table ? reinterpret_cast<const uint16_t*>(xp + i * rs) : nullptr,
                            table,
                            std::is_same_v<scalar_t, c10::Half>,
                            in.data(),
                            in.data() + L,
                            index.data(),
                            reinterpret_cast<const char*>(xp + (i + 1 < end ? i + 1 : i) * rs)};
      real* dst = y ? row_dest(y, i, L, out.data()) : nullptr;
      fn(i, row, dst);
      if (y) store_row(y, i, L, dst);
    }
  });
}

}  // namespace cpu
}  // namespace mosx
