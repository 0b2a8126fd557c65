// Blocked sum shared by the row kernels of every variant, written in terms of `real`. Included
// first inside each variant's namespace in row_variants.cpp (no include guard, includes
// nothing), like row_reduce.h and row_ops.h.

// sum of term(x[j]) over x[0..n): short vector partial sums over blocks of 256 keep the rounding
// error near that of a pairwise sum for wide groups (thousands of classes) at no extra cost.
template <typename Term>
static inline real blocked_sum(const real* x, int64_t n, const Term& term) {
  real s = 0;
  for (int64_t j0 = 0; j0 < n; j0 += 256) {
    const int64_t j1 = j0 + 256 < n ? j0 + 256 : n;
    real part = 0;
#pragma omp simd reduction(+ : part)
    for (int64_t j = j0; j < j1; ++j) part += term(x[j]);
    s += part;
  }
  return s;
}
