// Portable versions of the slice reductions every row op starts from, written in terms of `real`:
// the max (with a probe for NaN/inf), the sums of exp(x - m) and of exp(x), and the widening of
// bf16 / fp16 rows. The float AVX2 variant includes row_reduce_avx2.h instead; both define the
// same functions.
// Included inside a namespace like row_ops.h (no include guard, includes nothing).

// The max of x[0..n) and a probe that is NaN iff the slice holds a NaN or an inf (x * 0).
static inline void slice_max_probe(const real* x, int64_t n, real* max_out, real* probe_out) {
  real m = -std::numeric_limits<real>::infinity(), probe = 0;
#pragma omp simd reduction(max : m) reduction(+ : probe)
  for (int64_t j = 0; j < n; ++j) {
    m = x[j] > m ? x[j] : m;
    probe += x[j] * real(0);
  }
  *max_out = m;
  *probe_out = probe;
}

// sum of exp(x[j] - m) over a finite slice whose max is m.
static inline real sum_exp_nonpos(const real* x, int64_t n, real m) {
  return blocked_sum(x, n, [m](real v) { return mosx_exp_nonpos(v - m); });
}

// sum of exp(x[j]) over x[0..n), unshifted: NaN or inf when the slice holds one or when an exp
// overflows; exps below float's range count as 0.
static inline real sum_exp_unshifted(const real* x, int64_t n) {
  return blocked_sum(x, n, [](real v) { return mosx_exp(v); });
}

// Per-group sums of exp(x) of a row in one sweep (see row_reduce_avx2.h): not done here, where
// the per-group loops the compiler vectorises do the same work; false sends the caller there.
static inline bool row_exp_sums(const real*, const int64_t*, int64_t, real*, real*, const char*) {
  return false;
}

// y[j] = c * exp(x[j] - m) over x[0..n).
static inline void scaled_exp(const real* x, int64_t n, real m, real c, real* y) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] = c * mosx_exp(x[j] - m);
}

// A row of bf16 / fp16 bit patterns widened to `real`.
static inline void bf16_to_real(const uint16_t* v, int64_t n, real* out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j)
    out[j] = static_cast<real>(__builtin_bit_cast(float, static_cast<uint32_t>(v[j]) << 16));
}

static inline void half_to_real(const uint16_t* v, int64_t n, real* out) {
  for (int64_t j = 0; j < n; ++j)
    out[j] = static_cast<real>(static_cast<float>(c10::Half(v[j], c10::Half::from_bits())));
}

// Position of the largest of x[0..n) (n >= 1), the first on ties; NaNs are passed over.
static inline int64_t slice_argmax(const real* x, int64_t n) {
  int64_t arg = 0;
  for (int64_t j = 1; j < n; ++j) arg = x[j] > x[arg] || x[arg] != x[arg] ? j : arg;
  return arg;
}
