// The compiled variants of the per-row functions (row_ops.h over row_reduce.h or
// row_reduce_avx2.h): float baseline, float AVX2+FMA+F16C (where GCC can target it), and double,
// each in its own namespace, and the tables (RowOps, row_helpers.h) the op files call them
// through. The float variant is chosen once, from the CPU's features and MOSX_CPU_KERNELS.
#include <ATen/core/Tensor.h>
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
#include <limits>
#include <string>
#include <type_traits>

#include "row_helpers.h"

namespace mosx {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// exp for float that the compiler can vectorise: Cody-Waite range reduction to [-ln2/2, ln2/2]
// and a degree-6 polynomial (about 1 ulp). Branch-free; NaN and +/-inf behave like std::exp
// except that results below FLT_MIN flush to 0. Defined in each target namespace below so the
// AVX2 copy inlines into the AVX2 loops.
#define MOSX_DEFINE_FAST_EXP                                                 \
  /* exp of xc in [-87, 88] (no NaN): the reduction and the polynomial. */   \
  static inline float exp_in_range(float xc) {                               \
    const float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; \
    const float r = (xc - k * 0.693359375f) - k * -2.12194440e-4f;           \
    float p = 1.9875691500e-4f;                                              \
    p = p * r + 1.3981999507e-3f;                                            \
    p = p * r + 8.3334519073e-3f;                                            \
    p = p * r + 4.1665795894e-2f;                                            \
    p = p * r + 1.6666665459e-1f;                                            \
    p = p * r + 5.0000001201e-1f;                                            \
    p = p * r * r + r + 1.0f;                                                \
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;              \
    return p * __builtin_bit_cast(float, bits);                              \
  }                                                                          \
  static inline float mosx_exp(float x) {                                    \
    float xc = x < -87.0f ? -87.0f : x;                                      \
    xc = xc > 88.0f ? 88.0f : xc;                                            \
    xc = x != x ? 0.0f : xc;                                                 \
    float y = exp_in_range(xc);                                              \
    y = x < -87.0f ? 0.0f : y;                                               \
    y = x > 88.0f ? std::numeric_limits<float>::infinity() : y;              \
    return x != x ? x : y;                                                   \
  }                                                                          \
  /* exp for x <= 0 or x = -inf (no NaN, no +inf): one clamp, one select. */ \
  static inline float mosx_exp_nonpos(float x) {                             \
    const float y = exp_in_range(x > -87.0f ? x : -87.0f);                   \
    return x > -87.0f ? y : 0.0f;                                            \
  }

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

#define MOSX_ROW_OPS(NS)     \
  {NS::row_score,            \
   NS::row_score_backward,   \
   NS::row_predict,          \
   NS::row_softmax,          \
   NS::row_softmax_backward, \
   NS::row_lse,              \
   NS::slice_scaled_softmax, \
   NS::bf16_to_real,         \
   NS::half_to_real,         \
   NS::row_value}

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

}  // namespace

const RowOps<float>& float_row_ops() {
  static const RowOps<float> base = MOSX_ROW_OPS(f32_base);
#ifdef MOSX_HAVE_AVX2_VARIANT
  static const RowOps<float> avx2 = MOSX_ROW_OPS(f32_avx2);
  return use_avx2() ? avx2 : base;
#else
  return base;
#endif
}

const RowOps<double>& double_row_ops() {
  static const RowOps<double> ops = MOSX_ROW_OPS(f64);
  return ops;
}

std::string cpu_kernels() { return use_avx2() ? "avx2" : "baseline"; }

// No tensor arguments, so no device to dispatch on: one kernel for every key.
TORCH_LIBRARY_IMPL(mosx, CompositeExplicitAutograd, m) { m.impl("_cpu_kernels", &cpu_kernels); }

}  // namespace cpu
}  // namespace mosx
