// Per-row building blocks of the group-softmax CPU kernels, written once in terms of `real`.
//
// This file is included several times by group_softmax_cpu.cpp, each time inside its own
// namespace that defines `real` (float or double) and, for float, under a different
// `#pragma GCC target` (baseline x86-64 and AVX2+FMA), so the same source is compiled into a
// portable and an AVX2 variant picked at run time. It therefore has no include guard and includes
// nothing itself. The loops are simple enough for the compiler to vectorise (`omp simd`
// reductions; `mosx_exp` is branch-free for float), which is where the speed comes from.
// Each including namespace defines mosx_exp (exact IEEE special cases) and mosx_exp_nonpos (for
// arguments <= 0 or -inf only: cheaper, used once a slice is known to be finite).
//
// Semantics follow torch.softmax: a slice holding NaN, +inf, or only -inf gives NaN.

// Blocked sum of exp(x[j] - m): short vector partial sums keep the float rounding error near
// that of a pairwise sum for wide groups (thousands of classes) at no extra cost.
static inline real sum_exp_shifted(const real* x, int64_t n, real m, bool finite) {
  real s = 0;
  for (int64_t j0 = 0; j0 < n; j0 += 256) {
    const int64_t j1 = j0 + 256 < n ? j0 + 256 : n;
    real part = 0;
    if (finite) {
#pragma omp simd reduction(+ : part)
      for (int64_t j = j0; j < j1; ++j) part += mosx_exp_nonpos(x[j] - m);
    } else {
#pragma omp simd reduction(+ : part)
      for (int64_t j = j0; j < j1; ++j) part += mosx_exp(x[j] - m);
    }
    s += part;
  }
  return s;
}

// log-sum-exp of one slice x[0..n).
static inline real slice_lse(const real* x, int64_t n) {
  // One pass for the max and a probe that is NaN iff the slice holds a NaN or an inf (x * 0).
  // Finite slices (the normal case) then take the cheap exp for arguments <= 0.
  real m = -std::numeric_limits<real>::infinity(), probe = 0;
#pragma omp simd reduction(max : m) reduction(+ : probe)
  for (int64_t j = 0; j < n; ++j) {
    m = x[j] > m ? x[j] : m;
    probe += x[j] * real(0);
  }
  // Non-finite slices take the exact path: a NaN, +inf, or only -inf gives NaN like softmax.
  const real s = sum_exp_shifted(x, n, m, probe == probe);
  return m + std::log(s);
}

// lse[k] for every group of one row.
static inline void row_lse(const real* x, const int64_t* o, int64_t num_groups, real* lse) {
  for (int64_t k = 0; k < num_groups; ++k) lse[k] = slice_lse(x + o[k], o[k + 1] - o[k]);
}

// y[j] = c * exp(x[j] - lse) over one slice: softmax, scaled. Used by every backward pass.
static inline void slice_scaled_softmax(const real* x, int64_t n, real lse, real c, real* y) {
  if (lse == lse) {
    // lse is finite or +inf only if every x is finite or -inf, and then x - lse <= 0.
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = c * mosx_exp_nonpos(x[j] - lse);
  } else {
    for (int64_t j = 0; j < n; ++j) y[j] = c * lse;  // NaN slice stays NaN
  }
}

// MOS score of one row: -min_k exp(x[o_k] - lse_k). Reports the first group attaining the
// minimum and its lse (what the backward needs). A NaN probability wins, as in torch.max.
static inline real row_score(const real* x, const int64_t* o, int64_t num_groups,
                             int64_t* min_group, real* min_lse) {
  real best = std::numeric_limits<real>::infinity();
  int64_t best_k = 0;
  real best_lse = 0;
  bool seen_nan = false;
  for (int64_t k = 0; k < num_groups && !seen_nan; ++k) {
    const real lse = slice_lse(x + o[k], o[k + 1] - o[k]);
    const real p = std::exp(x[o[k]] - lse);
    if (p < best || p != p) {
      best = p;
      best_k = k;
      best_lse = lse;
      seen_nan = p != p;
    }
  }
  *min_group = best_k;
  *min_lse = best_lse;
  return -best;
}

// Gradient of row_score for one row: only the arg-min group's slice is non-zero.
// d(-p0)/dx_j = p0 * (p_j - [j == 0]) over that slice.
static inline void row_score_backward(real g, const real* x, const int64_t* o, int64_t num_logits,
                                      int64_t k, real lse, real* gx) {
  for (int64_t j = 0; j < num_logits; ++j) gx[j] = 0;
  const int64_t start = o[k], n = o[k + 1] - o[k];
  const real c = g * std::exp(x[start] - lse);
  slice_scaled_softmax(x + start, n, lse, c, gx + start);
  gx[start] -= c;
}

// Group prediction of one row: in every group the largest non-others logit (first on ties), its
// probability exp(x - lse_k); the group with the largest probability wins (first on ties, NaN
// wins as in torch.max). Reports the winning logit position, its probability and the group.
static inline void row_predict(const real* x, const int64_t* o, int64_t num_groups,
                               int64_t* best_pos, real* best_prob, int64_t* best_group) {
  real best = -std::numeric_limits<real>::infinity();
  int64_t pos = o[0] + 1, group = 0;
  bool seen_nan = false;
  for (int64_t k = 0; k < num_groups && !seen_nan; ++k) {
    const int64_t start = o[k], n = o[k + 1] - o[k];
    const real lse = slice_lse(x + start, n);
    int64_t arg = 1;
    for (int64_t j = 2; j < n; ++j) arg = x[start + j] > x[start + arg] ? j : arg;
    const real p = std::exp(x[start + arg] - lse);
    if (p > best || p != p || k == 0) {
      best = p;
      pos = start + arg;
      group = k;
      seen_nan = p != p;
    }
  }
  *best_pos = pos;
  *best_prob = best;
  *best_group = group;
}

// Group softmax (log_softmax when log) of one row into y.
static inline void row_softmax(const real* x, const int64_t* o, int64_t num_groups, bool log,
                               real* y) {
  for (int64_t k = 0; k < num_groups; ++k) {
    const int64_t start = o[k], n = o[k + 1] - o[k];
    const real lse = slice_lse(x + start, n);
    if (log) {
#pragma omp simd
      for (int64_t j = start; j < start + n; ++j) y[j] = x[j] - lse;
    } else {
      slice_scaled_softmax(x + start, n, lse, real(1), y + start);
    }
  }
}

// Backward of row_softmax given its output y and the incoming gradient g:
//   softmax:     gx = y * (g - sum(g * y))       log_softmax: gx = g - exp(y) * sum(g)
static inline void row_softmax_backward(const real* g, const real* y, const int64_t* o,
                                        int64_t num_groups, bool log, real* gx) {
  for (int64_t k = 0; k < num_groups; ++k) {
    const int64_t start = o[k], end = o[k + 1];
    real s = 0;
    if (log) {
#pragma omp simd reduction(+ : s)
      for (int64_t j = start; j < end; ++j) s += g[j];
#pragma omp simd
      for (int64_t j = start; j < end; ++j) gx[j] = g[j] - mosx_exp(y[j]) * s;
    } else {
#pragma omp simd reduction(+ : s)
      for (int64_t j = start; j < end; ++j) s += g[j] * y[j];
#pragma omp simd
      for (int64_t j = start; j < end; ++j) gx[j] = y[j] * (g[j] - s);
    }
  }
}
