// Per-row building blocks of the group-softmax CPU kernels, written once in terms of `real`.
//
// This file is included several times by row_variants.cpp, each time inside its own
// namespace that defines `real` (float or double) and, for float, under a different
// `#pragma GCC target` (baseline x86-64 and AVX2+FMA), so the same source is compiled into a
// portable and an AVX2 variant picked at run time. It therefore has no include guard and includes
// nothing itself. The reductions it builds on (row_reduce.h, portable, or row_reduce_avx2.h) are
// vectorised by the compiler (`omp simd`, `mosx_exp` branch-free for float) or by hand.
// Each including namespace defines mosx_exp (exact IEEE special cases) and mosx_exp_nonpos (for
// arguments <= 0 or -inf only: cheaper, used by the portable sum once a slice is known finite).
//
// Semantics follow torch.softmax: a slice holding NaN, +inf, or only -inf gives NaN.
// NaN rule of score and prediction (docs/semantics.md, the same on every device and in
// mosx.reference): the first group whose softmax is NaN wins, and its prediction is its first
// class (logit o_k + 1) with probability NaN; the score is NaN with that group as min_group.

// sum of exp(x[j] - m) over x[0..n) whose max is m: the fast path for a finite slice, else an
// exact blocked sum (NaN, inf and -inf behave as in std::exp).
static inline real sum_exp_shifted(const real* x, int64_t n, real m, bool finite) {
  if (finite) return sum_exp_nonpos(x, n, m);
  return blocked_sum(x, n, [m](real v) { return mosx_exp(v - m); });
}

// sum of exp(v) over 16-bit values v[0..n) (bf16 or fp16 bits), read from `table`, the exp of
// every 16-bit value: one load and one add per entry instead of an exp. Four partial sums per
// block of 1024 keep the rounding error small for wide groups.
static inline float sum_exp_table(const uint16_t* v, int64_t n, const float* table) {
  float s = 0;
  for (int64_t j0 = 0; j0 < n; j0 += 1024) {
    const int64_t j1 = j0 + 1024 < n ? j0 + 1024 : n;
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) {
      a0 += table[v[j]];
      a1 += table[v[j + 1]];
      a2 += table[v[j + 2]];
      a3 += table[v[j + 3]];
    }
    for (; j < j1; ++j) a0 += table[v[j]];
    s += (a0 + a1) + (a2 + a3);
  }
  return s;
}

// The slice [start, start + n) of a row as real values: a pointer into the row, or, for a 16-bit
// row not widened up front, the slice widened into the row's scratch buffer.
static inline const real* slice_values(const RowIn<real>& in, int64_t start, int64_t n) {
  if (in.x) return in.x + start;
  real* dst = in.scratch + start;
  if (in.is_half) {
    half_to_real(in.bits + start, n, dst);
  } else {
    bf16_to_real(in.bits + start, n, dst);
  }
  return dst;
}

// Entry j of a row as a real value.
static inline real row_value(const RowIn<real>& in, int64_t j) {
  return in.x ? in.x[j] : *slice_values(in, j, 1);
}

// Unshifted sums s[k] of exp(x) of every group of a float row and e0[k], the exp of each group's
// first entry, from one sweep (row_exp_sums). False for double rows, for 16-bit rows (their
// per-group sums read the exp table), in the portable variant, and for rows with some |x| > 87,
// inf or NaN: the callers then take slice_max_sum per group.
static inline bool sweep_sums(const RowIn<real>& in, const int64_t* o, int64_t num_groups, real* s,
                              real* e0) {
  if constexpr (std::is_same_v<real, float>) {
    if (in.x && !in.bits) return row_exp_sums(in.x, o, num_groups, s, e0, in.ahead);
  }
  return false;
}

// Whether an unshifted sum of exps is kept (shift 0): moderate, as in slice_max_sum.
static inline bool unshifted_ok(real s) { return s >= real(1e-17) && s <= real(1e30); }

// Whether two groups' probabilities are equal up to a few float roundings. The sweep rounds each
// group's sum in lanes set by where the group starts in a vector, so two groups with identical
// logits can differ in the last bit; score and prediction, which give ties to the first group,
// then take that row again from the per-group sums, where identical groups sum identically (and
// where the result is exactly what the sweep-free path gives). Rare on real data.
static inline bool near_equal(real p, real best) {
  return std::abs(p - best) <= real(4e-6) * std::abs(best);
}

// Shift m and sum s of exp(x - m) of the slice [start, start + n) of a row: its log-sum-exp is
// m + log(s), and the softmax probability of an entry x_j is exp(x_j - m) / s (no log needed).
static inline void slice_max_sum(const RowIn<real>& in, int64_t start, int64_t n, real* m_out,
                                 real* s_out) {
  // Shift 0 first, one pass and no max: the sum of exp(x) from the table (16-bit input) or
  // computed (float input). Kept when that sum is moderate (no NaN, no inf, every x below about
  // 69) and not so small that flushed tiny exps could matter (every x below about -39): then it
  // is as accurate as the shifted sum. Else (and for double) the shifted sum below.
  if constexpr (std::is_same_v<real, float>) {
    const float s = in.bits ? sum_exp_table(in.bits + start, n, in.exp_table)
                            : sum_exp_unshifted(in.x + start, n);
    if (unshifted_ok(s)) {
      *m_out = 0;
      *s_out = s;
      return;
    }
  }
  const real* x = slice_values(in, start, n);
  real m, probe;
  slice_max_probe(x, n, &m, &probe);
  // Finite slices (the normal case) take the cheap exp for arguments <= 0; a NaN, +inf, or only
  // -inf takes the exact path and gives NaN, like softmax.
  *m_out = m;
  *s_out = sum_exp_shifted(x, n, m, probe == probe);
}

// log-sum-exp of the slice [start, start + n) of a row.
static inline real slice_lse(const RowIn<real>& in, int64_t start, int64_t n) {
  real m, s;
  slice_max_sum(in, start, n, &m, &s);
  return m + std::log(s);
}

// lse[k] for every group of one row.
static inline void row_lse(const RowIn<real>& in, const int64_t* o, int64_t num_groups, real* lse) {
  real* s = in.group_scratch;
  const bool swept = sweep_sums(in, o, num_groups, s, s + num_groups);
  for (int64_t k = 0; k < num_groups; ++k) {
    lse[k] = swept && unshifted_ok(s[k]) ? std::log(s[k]) : slice_lse(in, o[k], o[k + 1] - o[k]);
  }
}

// y[j] = c * exp(x[j] - lse) over one slice: softmax, scaled. Used by every backward pass.
static inline void slice_scaled_softmax(const real* x, int64_t n, real lse, real c, real* y) {
  if (lse == lse) {
    // lse is finite or +inf only if every x is finite or -inf, and then x - lse <= 0.
    scaled_exp(x, n, lse, c, y);
  } else {
    for (int64_t j = 0; j < n; ++j) y[j] = c * lse;  // NaN slice stays NaN
  }
}

// The group whose probability p[k] is the smallest (largest when `largest`), the first on ties;
// a NaN wins, as in torch.min / torch.max. near_tie: another group's p is near_equal to the best
// one met before it, which a swept row decides again on per-group sums.
template <bool largest>
static inline int64_t pick_group(const real* p, int64_t num_groups, bool* near_tie) {
  int64_t best = 0;
  *near_tie = false;
  for (int64_t k = 1; k < num_groups && p[best] == p[best]; ++k) {
    *near_tie = *near_tie || near_equal(p[k], p[best]);
    if ((largest ? p[k] > p[best] : p[k] < p[best]) || p[k] != p[k]) best = k;
  }
  return best;
}

// MOS score of one row: -min_k exp(x[o_k] - lse_k). Reports the first group attaining the
// minimum and its lse (what the backward needs). A NaN probability wins, as in torch.max.
static inline real row_score(const RowIn<real>& in, const int64_t* o, int64_t num_groups,
                             int64_t* min_group, real* min_lse) {
  // Per group: its sum s_k and shift m_k, and p_k = exp(x_0 - m_k) / s_k, which starts out as
  // the sweep's exp(x_0).
  real* s = in.group_scratch;
  real* p = s + num_groups;
  real* m = p + num_groups;
  bool swept = sweep_sums(in, o, num_groups, s, p);
  while (true) {
    for (int64_t k = 0; k < num_groups; ++k) {
      if (swept && unshifted_ok(s[k])) {
        m[k] = 0;
        p[k] = p[k] / s[k];
      } else {
        slice_max_sum(in, o[k], o[k + 1] - o[k], &m[k], &s[k]);
        p[k] = mosx_exp(row_value(in, o[k]) - m[k]) / s[k];  // p_others = exp(x_0 - lse)
      }
    }
    bool near_tie;
    const int64_t k = pick_group<false>(p, num_groups, &near_tie);
    if (swept && near_tie) {  // see near_equal: decide the tie on the per-group sums
      swept = false;
      continue;
    }
    *min_group = k;
    *min_lse = m[k] + std::log(s[k]);
    return -p[k];
  }
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
// probability exp(x - lse_k); the group with the largest probability wins (first on ties). A
// group whose softmax is NaN (a NaN or +inf in its slice, or only -inf) has probability NaN and
// wins, the first such group, at its first class whatever its logits (slice_argmax is not
// consulted then). Reports the winning logit position, its probability and the group.
static inline void row_predict(const RowIn<real>& in, const int64_t* o, int64_t num_groups,
                               int64_t* best_pos, real* best_prob, int64_t* best_group) {
  // First every group's sum s_k, shift m_k and v_k = x_arg - m_k, then the exps of all v_k in
  // one go (a vector exp, not one scalar exp per group).
  real* sums = in.group_scratch;
  real* v = sums + num_groups;
  real* e = v + num_groups;
  int64_t* arg = in.group_index;
  bool swept = sweep_sums(in, o, num_groups, sums, e);
  while (true) {
    for (int64_t k = 0; k < num_groups; ++k) {
      const int64_t start = o[k], n = o[k + 1] - o[k];
      real m = 0;
      if (!(swept && unshifted_ok(sums[k]))) slice_max_sum(in, start, n, &m, &sums[k]);
      const real* x = slice_values(in, start, n);
      arg[k] = n > 1 ? 1 + slice_argmax(x + 1, n - 1) : 1;
      v[k] = x[arg[k]] - m;
    }
    scaled_exp(v, num_groups, real(0), real(1), e);
    for (int64_t k = 0; k < num_groups; ++k) e[k] = e[k] / sums[k];  // the probabilities
    bool near_tie;
    const int64_t group = pick_group<true>(e, num_groups, &near_tie);
    if (swept && near_tie) {  // see near_equal: decide the tie on the per-group sums
      swept = false;
      continue;
    }
    // A NaN probability means the group's softmax is NaN (s_k is NaN: no finite s_k >= 1 gives
    // NaN here): the rule's first class, not the argmax of its logits.
    *best_pos = o[group] + (e[group] != e[group] ? 1 : arg[group]);
    *best_prob = e[group];
    *best_group = group;
    return;
  }
}

// Group softmax (log_softmax when log) of one row into y. Written from the slice's (m, s), not
// from one rounded lse, so the largest entries keep full float accuracy as in torch.softmax.
static inline void row_softmax(const RowIn<real>& in, const int64_t* o, int64_t num_groups,
                               bool log, real* y) {
  for (int64_t k = 0; k < num_groups; ++k) {
    const int64_t start = o[k], n = o[k + 1] - o[k];
    real m, s;
    slice_max_sum(in, start, n, &m, &s);
    const real* x = slice_values(in, start, n);
    real* out = y + start;
    if (log) {
      // lse = c + log(s_c) with c an integer next to lse: x - c is (nearly) exact for the
      // largest entries and log(s_c) is small, so y rounds like torch's (x - max) - log(sum).
      const real c = std::nearbyint(m + std::log(s));
      const real log_sc = std::log(s * std::exp(m - c));
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] = (x[j] - c) - log_sc;
    } else {
      scaled_exp(x, n, m, real(1) / s, out);
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
