// CPU kernels of the group-softmax op family: softmax / log-softmax and their backward, the MOS
// score and its backward, group prediction, and the group cross-entropy forward and backward.
//
// Rows are split across threads with at::parallel_for (OpenMP in the build). Each row is read
// once into L1 (converted to float for half inputs), and every group slice is reduced there. The
// per-row math lives in row_ops.h, compiled twice for float (baseline and AVX2+FMA, chosen at load
// time) and once for double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <limits>
#include <type_traits>
#include <vector>

#include "../checks.h"

namespace mosx {
namespace {

// ---------------------------------------------------------------------------------------------
// exp for float that the compiler can vectorise: Cody-Waite range reduction to [-ln2/2, ln2/2]
// and a degree-6 polynomial (about 1 ulp). Branch-free; NaN and +/-inf behave like std::exp
// except that results below FLT_MIN flush to 0. Defined in each target namespace below so the
// AVX2 copy inlines into the AVX2 loops.
#define MOSX_DEFINE_FAST_EXP                                                            \
  /* exp of xc in [-87, 88] (no NaN): the reduction and the polynomial. */              \
  static inline float exp_in_range(float xc) {                                          \
    const float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;            \
    const float r = (xc - k * 0.693359375f) - k * -2.12194440e-4f;                      \
    float p = 1.9875691500e-4f;                                                         \
    p = p * r + 1.3981999507e-3f;                                                       \
    p = p * r + 8.3334519073e-3f;                                                       \
    p = p * r + 4.1665795894e-2f;                                                       \
    p = p * r + 1.6666665459e-1f;                                                       \
    p = p * r + 5.0000001201e-1f;                                                       \
    p = p * r * r + r + 1.0f;                                                           \
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;                         \
    return p * __builtin_bit_cast(float, bits);                                         \
  }                                                                                     \
  static inline float mosx_exp(float x) {                                               \
    float xc = x < -87.0f ? -87.0f : x;                                                 \
    xc = xc > 88.0f ? 88.0f : xc;                                                       \
    xc = x != x ? 0.0f : xc;                                                            \
    float y = exp_in_range(xc);                                                         \
    y = x < -87.0f ? 0.0f : y;                                                          \
    y = x > 88.0f ? std::numeric_limits<float>::infinity() : y;                         \
    return x != x ? x : y;                                                              \
  }                                                                                     \
  /* exp for x <= 0 or x = -inf (no NaN, no +inf): one clamp, one select. */            \
  static inline float mosx_exp_nonpos(float x) {                                        \
    const float y = exp_in_range(x > -87.0f ? x : -87.0f);                              \
    return x > -87.0f ? y : 0.0f;                                                       \
  }

// One input row of an op. For bf16 / fp16 input also its 16-bit patterns and the table of exp(v)
// for every 16-bit value v (bits and exp_table null for 32/64-bit input). A 16-bit row is either
// widened up front (x set) or, for the reductions that mostly read the table, widened slice by
// slice into `scratch` when a slice needs real values (x null); see slice_values in row_ops.h.
template <typename real>
struct RowIn {
  const real* x;
  const uint16_t* bits;
  const float* exp_table;
  bool is_half;  // fp16 (else bf16) bits
  real* scratch;         // [L]
  real* group_scratch;   // [3 K]: per-group values of the row
  int64_t* group_index;  // [K]
  const char* ahead;     // the input row read next (this one when none): to prefetch
};

namespace f32_base {
using real = float;
MOSX_DEFINE_FAST_EXP
#include "blocked_sum.h"
#include "row_reduce.h"
#include "row_ops.h"
}  // namespace f32_base

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define MOSX_HAVE_AVX2_VARIANT 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace f32_avx2 {
using real = float;
MOSX_DEFINE_FAST_EXP
#include "blocked_sum.h"
#include "row_reduce_avx2.h"
#include "row_ops.h"
}  // namespace f32_avx2
#pragma GCC pop_options
#endif

namespace f64 {
using real = double;
static inline double mosx_exp(double x) { return std::exp(x); }
static inline double mosx_exp_nonpos(double x) { return std::exp(x); }
#include "blocked_sum.h"
#include "row_reduce.h"
#include "row_ops.h"
}  // namespace f64

// The row functions of one variant, so the drivers below are written once.
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

#define MOSX_ROW_OPS(NS)                                                                    \
  {NS::row_score,   NS::row_score_backward, NS::row_predict,          NS::row_softmax,     \
   NS::row_softmax_backward, NS::row_lse,   NS::slice_scaled_softmax, NS::bf16_to_real,    \
   NS::half_to_real, NS::row_value}

// The AVX2 variant when the CPU has it, unless MOSX_CPU_KERNELS=baseline asks for the portable one
// (to test it, or to compare).
bool use_avx2() {
#ifdef MOSX_HAVE_AVX2_VARIANT
  static const bool use = [] {
    const char* want = std::getenv("MOSX_CPU_KERNELS");
    return !(want && std::string(want) == "baseline") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return use;
#else
  return false;
#endif
}

std::string cpu_kernels() { return use_avx2() ? "avx2" : "baseline"; }

const RowOps<float>& float_ops() {
  static const RowOps<float> base = MOSX_ROW_OPS(f32_base);
#ifdef MOSX_HAVE_AVX2_VARIANT
  static const RowOps<float> avx2 = MOSX_ROW_OPS(f32_avx2);
  return use_avx2() ? avx2 : base;
#else
  return base;
#endif
}

template <typename real>
const RowOps<real>& row_ops();
template <>
const RowOps<float>& row_ops<float>() {
  return float_ops();
}
template <>
const RowOps<double>& row_ops<double>() {
  static const RowOps<double> ops = MOSX_ROW_OPS(f64);
  return ops;
}

// ---------------------------------------------------------------------------------------------
// Shared plumbing.

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The kernels need unit stride along L; any row stride is fine.
at::Tensor unit_inner_stride(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

// Validated host copy of the offsets.
std::vector<int64_t> host_offsets(const at::Tensor& logits, const at::Tensor& offsets,
                                  const char* op) {
  check_logits(logits, op);
  check_offsets_meta(logits, offsets, op);
  const at::Tensor o = offsets.contiguous();
  std::vector<int64_t> v(o.data_ptr<int64_t>(), o.data_ptr<int64_t>() + o.numel());
  check_offsets_values(v.data(), static_cast<int64_t>(v.size()) - 1, logits.size(1), op);
  return v;
}

// Enough rows per task to amortise the thread hand-off.
int64_t grain_rows(int64_t num_logits) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(num_logits, 1));
}

// exp(v) for every bf16 (or fp16) bit pattern v, built on first use (256 KiB): 16-bit inputs
// read their exps from it instead of computing them.
template <typename T16>
const float* exp_table() {
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
const float* exp_table_for() {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
    return exp_table<scalar_t>();
  } else {
    return nullptr;
  }
}

// Row i of x as `real` values: the row itself when no conversion is needed, else a converted
// copy in buf (vectorised for bf16 / fp16).
template <typename scalar_t, typename real>
const real* load_row(const scalar_t* x, int64_t row_stride, int64_t i, int64_t n, real* buf) {
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
real* row_dest(scalar_t* y, int64_t i, int64_t n, real* buf) {
  if constexpr (std::is_same_v<scalar_t, real>) {
    return y + i * n;
  } else {
    return buf;
  }
}

template <typename scalar_t, typename real>
void store_row(scalar_t* y, int64_t i, int64_t n, const real* buf) {
  if constexpr (!std::is_same_v<scalar_t, real>) {
    scalar_t* dst = y + i * n;
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(buf[j]);
  }
}

#define MOSX_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Calls fn(i, in, dst) for every row i of x (num_groups groups), rows split across threads. `in`
// is row i (see RowIn; `widen` = false leaves 16-bit rows to be widened slice by slice, for the
// forward reductions); `dst` is where an [L] result for row i goes (y's row itself, or a buffer
// that is converted into it afterwards), or null when y is null (ops without an [N, L] output).
template <typename scalar_t, typename F>
void for_each_row(const at::Tensor& x, int64_t num_groups, scalar_t* y, const F& fn,
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
                            table, std::is_same_v<scalar_t, c10::Half>, in.data(),
                            in.data() + L, index.data(),
                            reinterpret_cast<const char*>(xp + (i + 1 < end ? i + 1 : i) * rs)};
      real* dst = y ? row_dest(y, i, L, out.data()) : nullptr;
      fn(i, row, dst);
      if (y) store_row(y, i, L, dst);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// group_softmax / group_log_softmax

at::Tensor group_softmax_cpu(const at::Tensor& logits_in, const at::Tensor& offsets, bool log) {
  const auto o = host_offsets(logits_in, offsets, "mosx.group_softmax");
  const at::Tensor x = unit_inner_stride(logits_in);
  const int64_t N = x.size(0), L = x.size(1), K = static_cast<int64_t>(o.size()) - 1;
  at::Tensor y = at::empty({N, L}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return y;
  MOSX_DISPATCH_FLOATS(x.scalar_type(), "mosx.group_softmax", [&] {
    using real = acc_type_t<scalar_t>;
    const auto& ops = row_ops<real>();
    for_each_row(x, K, y.mutable_data_ptr<scalar_t>(), [&](int64_t, const RowIn<real>& row, real* dst) {
      ops.softmax(row, o.data(), K, log, dst);
    });
  });
  return y;
}

at::Tensor group_softmax_backward_cpu(const at::Tensor& grad_in, const at::Tensor& out_in,
                                      const at::Tensor& offsets, bool log) {
  const char* op = "mosx.group_softmax_backward";
  const auto o = host_offsets(out_in, offsets, op);
  TORCH_CHECK(grad_in.sizes() == out_in.sizes(), op, ": grad_out has shape ", grad_in.sizes(),
              " but the softmax output has shape ", out_in.sizes());
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

// ---------------------------------------------------------------------------------------------
// MOS score

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_softmax_score_cpu(
    const at::Tensor& logits_in, const at::Tensor& offsets) {
  const auto o = host_offsets(logits_in, offsets, "mosx.group_softmax_score");
  const at::Tensor x = unit_inner_stride(logits_in);
  const int64_t N = x.size(0), L = x.size(1), K = static_cast<int64_t>(o.size()) - 1;
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
    for_each_row(x, K, static_cast<scalar_t*>(nullptr), [&](int64_t i, const RowIn<real>& row, real*) {
      sp[i] = ops.score(row, o.data(), K, gp + i, lp + i);
    }, /*widen=*/false);
  });
  return {score, min_group, min_lse};
}

at::Tensor group_softmax_score_backward_cpu(const at::Tensor& grad_score,
                                            const at::Tensor& logits_in,
                                            const at::Tensor& offsets,
                                            const at::Tensor& min_group_in,
                                            const at::Tensor& min_lse_in) {
  const char* op = "mosx.group_softmax_score_backward";
  const auto o = host_offsets(logits_in, offsets, op);
  const at::Tensor x = unit_inner_stride(logits_in);
  const int64_t N = x.size(0), L = x.size(1), K = static_cast<int64_t>(o.size()) - 1;
  TORCH_CHECK(grad_score.dim() == 1 && grad_score.size(0) == N && min_group_in.numel() == N &&
                  min_lse_in.numel() == N,
              op, ": grad_score, min_group and min_lse must all be [N] = [", N, "]");
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
    for_each_row(x, K, gx.mutable_data_ptr<scalar_t>(), [&](int64_t i, const RowIn<real>& in, real* dst) {
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
    for_each_row(x, K, static_cast<scalar_t*>(nullptr), [&](int64_t i, const RowIn<real>& row, real*) {
      int64_t pos;
      ops.predict(row, o.data(), K, &pos, pp + i, gp + i);
      cp[i] = lcp[pos];
    }, /*widen=*/false);
  });
  return {cls, prob, group};
}

// ---------------------------------------------------------------------------------------------
// Group cross-entropy

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
      TORCH_CHECK(lab >= 0 && lab <= n_k, op, ": per-group label ", lab, " at row ", i,
                  ", group ", k, " is out of range [0, ", n_k, "] (0 = others) and is not ",
                  "ignore_index (", ignore_index, ")");
      return o[k] + lab;
    }
    const int64_t c = t[m * N + i];
    if (c == ignore_index) return -1;
    TORCH_CHECK(c >= 0 && c < C, op, ": target class ", c, " at row ", i,
                " is out of range [0, ", C, ") and is not ignore_index (", ignore_index, ")");
    const int64_t pos = class_logit[c];
    TORCH_CHECK(pos >= 0 && pos < L, op, ": class_logit[", c, "] = ", pos,
                " is not a logit position in [0, ", L, ")");
    // The target's own group labels it; every other group labels it "others".
    return (pos >= o[k] && pos < o[k + 1]) ? pos : o[k];
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
    for_each_row(x, K, static_cast<scalar_t*>(nullptr), [&](int64_t i, const RowIn<real>& in, real*) {
      real* lse_row = lsep + i * K;
      ops.lse(in, o.data(), K, lse_row);
      for (int64_t m = 0; m < M; ++m) {
        real* loss_row = lossp + (m * N + i) * K;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t s = slot(m, i, k);
          loss_row[k] = s < 0 ? real(0) : lse_row[k] - ops.value(in, s);
        }
      }
    }, /*widen=*/false);
  });
  return {losses, lse};
}

at::Tensor group_cross_entropy_backward_cpu(const at::Tensor& grad_losses_in,
                                            const at::Tensor& logits_in,
                                            const at::Tensor& offsets,
                                            const at::Tensor& targets_in,
                                            const at::Tensor& class_logit_in,
                                            const at::Tensor& lse_in, int64_t ignore_index) {
  const char* op = "mosx.group_cross_entropy_backward";
  const auto o = host_offsets(logits_in, offsets, op);
  check_targets(logits_in, offsets, targets_in, class_logit_in, op);
  const at::Tensor x = unit_inner_stride(logits_in);
  const int64_t N = x.size(0), L = x.size(1), K = static_cast<int64_t>(o.size()) - 1;
  const int64_t M = targets_in.size(0);
  TORCH_CHECK(grad_losses_in.dim() == 3 && grad_losses_in.size(0) == M &&
                  grad_losses_in.size(1) == N && grad_losses_in.size(2) == K,
              op, ": grad_losses must be [M, N, K] = [", M, ", ", N, ", ", K, "], got ",
              grad_losses_in.sizes());
  TORCH_CHECK(lse_in.dim() == 2 && lse_in.size(0) == N && lse_in.size(1) == K, op,
              ": lse must be [N, K] = [", N, ", ", K, "], got ", lse_in.sizes());
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
    for_each_row(x, K, gx.mutable_data_ptr<scalar_t>(), [&](int64_t i, const RowIn<real>& in, real* dst) {
      const real* row = in.x;
      for (int64_t k = 0; k < K; ++k) {
        // d loss_mk / d x = softmax_k(x) - onehot(slot_mk) on slice k, for unignored entries.
        int64_t slots[2];
        real coef[2], total = 0;
        for (int64_t m = 0; m < M; ++m) {
          slots[m] = slot(m, i, k);
          coef[m] = slots[m] < 0 ? real(0) : gp[(m * N + i) * K + k];
          total += coef[m];
        }
        const int64_t start = o[k];
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
  m.impl("group_softmax", &group_softmax_cpu);
  m.impl("group_softmax_backward", &group_softmax_backward_cpu);
  m.impl("group_softmax_score", &group_softmax_score_cpu);
  m.impl("group_softmax_score_backward", &group_softmax_score_backward_cpu);
  m.impl("group_predict", &group_predict_cpu);
  m.impl("group_cross_entropy", &group_cross_entropy_cpu);
  m.impl("group_cross_entropy_backward", &group_cross_entropy_backward_cpu);
}

// No tensor arguments, so no device to dispatch on: one kernel for every key.
TORCH_LIBRARY_IMPL(mosx, CompositeExplicitAutograd, m) { m.impl("_cpu_kernels", &cpu_kernels); }

}  // namespace mosx
