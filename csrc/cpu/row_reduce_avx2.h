// AVX2+FMA+F16C versions of the row and slice reductions of row_reduce.h, for float: the max (with
// a probe for NaN/inf), the sums of exp(x - m) and of exp(x), the one-sweep per-group sums of a
// whole row, c * exp(x - m) over a slice, the first-on-ties argmax, and the widening of bf16 /
// fp16 rows. Included inside the f32_avx2 namespace of row_variants.cpp under
// `#pragma GCC target("avx2,fma,f16c")`.
//
// Written by hand because the compiler's version of the exp-sum keeps one accumulator, so the
// long FMA chain of each exp is latency-bound; independent vectors per step keep the FMA pipes
// busy, and the power of two comes straight from the rounding constant's bits.

// Lanes [0, rem) set: the last, partial vector of a slice.
static inline __m256i tail_mask(int64_t rem) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rem)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The max of x[0..n) and a probe that is NaN iff the slice holds a NaN or an inf (x - x).
static inline void slice_max_probe(const float* x, int64_t n, float* max_out, float* probe_out) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m0 = ninf, m1 = ninf, p0 = _mm256_setzero_ps(), p1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + 8);
    m0 = _mm256_max_ps(m0, a);
    m1 = _mm256_max_ps(m1, b);
    p0 = _mm256_add_ps(p0, _mm256_sub_ps(a, a));
    p1 = _mm256_add_ps(p1, _mm256_sub_ps(b, b));
  }
  for (; j < n; j += 8) {
    const __m256i mask = tail_mask(n - j);  // all lanes set for a full vector
    const __m256 a = _mm256_maskload_ps(x + j, mask);
    m0 = _mm256_max_ps(m0, _mm256_blendv_ps(ninf, a, _mm256_castsi256_ps(mask)));
    p0 = _mm256_add_ps(p0, _mm256_sub_ps(a, a));  // masked-off lanes load 0
  }
  *max_out = hmax(_mm256_max_ps(m0, m1));
  *probe_out = hsum(_mm256_add_ps(p0, p1));
}

// exp of N vectors d[i] with d in [-87, 88] (outside it the power of two wraps and the result is
// garbage; NaN stays NaN). Cody-Waite reduction to |r| <= ln2/2 with one float constant for ln2,
// then 1 + r + r^2 q(r) with q a degree-3 minimax fit, and 2^k straight from the rounding
// constant's bits. At most 4.0e-7 relative error, measured against double exp at 23M points of
// [-87, 87] and at every float of [-87.4, -85.3] and [86, 88.02] (the rounding error of ln2 in
// float, 1.9e-9, grows with |k| <= 127 to 2.4e-7 of it):
// below torch's own float32 softmax error in the MOS score. The N dependency chains are written
// stage by stage, side by side, an order GCC keeps, so that both FMA pipes stay fed (N = 2 in
// the hot loops).
template <int N>
__attribute__((always_inline)) static inline void exp_in_range_ps(const __m256 (&d)[N],
                                                                  __m256 (&e)[N]) {
  const __m256 magic = _mm256_set1_ps(12583039.0f);  // 1.5 * 2^23 + 127: rounds, and biases k
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f), ln2 = _mm256_set1_ps(-0.69314718f);
  const __m256 c[4] = {_mm256_set1_ps(8.3146328e-3f), _mm256_set1_ps(4.1890655e-2f),
                       _mm256_set1_ps(1.6667092e-1f), _mm256_set1_ps(4.9999228e-1f)};
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 t[N], r[N], p[N];
  for (int i = 0; i < N; ++i) t[i] = _mm256_fmadd_ps(d[i], log2e, magic);
  for (int i = 0; i < N; ++i) r[i] = _mm256_fmadd_ps(_mm256_sub_ps(t[i], magic), ln2, d[i]);
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(c[0], r[i], c[1]);
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(p[i], r[i], c[2]);
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(p[i], r[i], c[3]);
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(p[i], r[i], one);
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(p[i], r[i], one);
  // The low mantissa bits of t hold k + 127: shifted into the exponent field they are 2^k.
  for (int i = 0; i < N; ++i) {
    const __m256i two_k = _mm256_slli_epi32(_mm256_castps_si256(t[i]), 23);
    e[i] = _mm256_mul_ps(p[i], _mm256_castsi256_ps(two_k));
  }
}

// exp(d) for any d, clamped to [-87, 88] first (NaN kept): exp(-87) = 1.6e-38 stands in for
// anything smaller, invisible in the sums below, and exp(88) = 1.7e38 for anything larger, which
// the callers' range checks catch.
static inline __m256 exp_clamped_ps(__m256 d) {
  // max/min return their second operand when either is NaN: a NaN d stays NaN.
  const __m256 lo = _mm256_set1_ps(-87.0f), hi = _mm256_set1_ps(88.0f);
  const __m256 in[1] = {_mm256_min_ps(hi, _mm256_max_ps(lo, d))};
  __m256 out[1];
  exp_in_range_ps(in, out);
  return out[0];
}

// sum of term(x[j]) over x[0..n), two vectors per step (four left the compiler short of
// registers: it spilled the accumulators, about 5% slower); blocks of 1024 keep the float
// rounding of the lane sums small for wide groups. The tail is read with a masked load.
template <typename Term>
static inline float lane_sum(const float* x, int64_t n, const Term& term) {
  float s = 0;
  for (int64_t j0 = 0; j0 < n; j0 += 1024) {
    const int64_t j1 = j0 + 1024 < n ? j0 + 1024 : n;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t j = j0;
    for (; j + 16 <= j1; j += 16) {
      a0 = _mm256_add_ps(a0, term(_mm256_loadu_ps(x + j)));
      a1 = _mm256_add_ps(a1, term(_mm256_loadu_ps(x + j + 8)));
    }
    for (; j < j1; j += 8) {
      const __m256i mask = tail_mask(j1 - j);
      const __m256 e = term(_mm256_maskload_ps(x + j, mask));
      a0 = _mm256_add_ps(a0, _mm256_and_ps(e, _mm256_castsi256_ps(mask)));
    }
    s += hsum(_mm256_add_ps(a0, a1));
  }
  return s;
}

template <bool shifted>
static inline float sum_exp_avx2(const float* x, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  return lane_sum(x, n,
                  [&](__m256 v) { return exp_clamped_ps(shifted ? _mm256_sub_ps(v, vm) : v); });
}

// Where row_exp_sums stands: the group being summed, where it ends, its partial lane sums.
struct SweepPos {
  int64_t k, end;
  __m256 acc;
};

// Adds the vector e of the exps of [j, j + 8), inside which one or more groups end: the lanes of
// each group go to its sum, and the first lane of each new group is its e0. (The state travels in
// a struct: captured by reference in a lambda instead, GCC kept the hot loop's sums in memory.)
__attribute__((always_inline)) static inline void sweep_group_ends(SweepPos& at, __m256 e,
                                                                   int64_t j, const int64_t* o,
                                                                   int64_t num_groups, float* s,
                                                                   float* e0) {
  while (at.end < j + 8) {
    const int lane = static_cast<int>(at.end - j);  // first lane of the next group
    const __m256 below = _mm256_castsi256_ps(tail_mask(lane));
    s[at.k] = hsum(_mm256_add_ps(at.acc, _mm256_and_ps(e, below)));
    at.acc = _mm256_setzero_ps();
    e = _mm256_andnot_ps(below, e);
    if (++at.k == num_groups) return;
    e0[at.k] = _mm256_cvtss_f32(_mm256_permutevar8x32_ps(e, _mm256_set1_epi32(lane)));
    at.end = o[at.k + 1];
  }
  at.acc = _mm256_add_ps(at.acc, e);
}

// Per-group sums of exp(x) of a float row in one sweep over the row, s[k], and the exp of every
// group's first (others) entry, e0[k]. One long loop over whole vectors instead of one short loop
// per group: no per-group tails, no separate exp for the others entries. The exps skip the clamp;
// the largest |x| is kept on the side as integer bits (two cheap integer ops per vector), and the
// result is false (s and e0 then meaningless) when some |x| > 87, an inf or a NaN is in the row:
// the caller then takes the per-group path, which handles them. `ahead` is the row read next,
// prefetched line by line along the sweep: a row is 4 KiB for ImageNet's 1008 logits and the
// hardware prefetcher stops at page ends (on a Zen 1 this took the streaming sweep from about 15
// to 12.5 cycles per 8 logits).
static inline bool row_exp_sums(const float* x, const int64_t* o, int64_t num_groups, float* s,
                                float* e0, const char* ahead) {
  const int64_t L = o[num_groups];
  const __m256i abs_bits = _mm256_set1_epi32(0x7fffffff);
  __m256i big = _mm256_setzero_si256();  // the largest |x| so far, as bits
  auto track = [&](__m256 a, __m256 b) {
    const __m256i abs_a = _mm256_and_si256(_mm256_castps_si256(a), abs_bits);
    const __m256i abs_b = _mm256_and_si256(_mm256_castps_si256(b), abs_bits);
    big = _mm256_max_epu32(big, _mm256_max_epu32(abs_a, abs_b));
  };
  SweepPos at{0, o[1], _mm256_setzero_ps()};
  // The current group's lane sums: acc over the current block of 1024 logits, block over the
  // group's earlier blocks (two levels keep the rounding of groups of many thousand classes small).
  __m256 acc = at.acc, block = acc;
  int64_t j = 0;
  for (; j + 16 <= L; j += 16) {
    if ((j & 1023) == 0) {
      block = _mm256_add_ps(block, acc);
      acc = _mm256_setzero_ps();
    }
    _mm_prefetch(ahead + 4 * j, _MM_HINT_T0);  // one cache line of the next row per step
    const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + 8);
    track(a, b);
    const __m256 in[2] = {a, b};
    __m256 e[2];
    exp_in_range_ps(in, e);
    if (j + 16 <= at.end) {  // both vectors inside the current group: the common case
      acc = _mm256_add_ps(acc, _mm256_add_ps(e[0], e[1]));
    } else {
      at.acc = _mm256_add_ps(block, acc);
      block = _mm256_setzero_ps();
      sweep_group_ends(at, e[0], j, o, num_groups, s, e0);
      sweep_group_ends(at, e[1], j + 8, o, num_groups, s, e0);
      acc = at.acc;
    }
  }
  at.acc = _mm256_add_ps(block, acc);
  if (j < L) {  // up to 15 entries left: masked loads (lanes past L read 0 and are not summed)
    const __m256i ma = tail_mask(L - j), mb = tail_mask(L - j - 8);
    const __m256 a = _mm256_maskload_ps(x + j, ma), b = _mm256_maskload_ps(x + j + 8, mb);
    track(a, b);
    const __m256 in[2] = {a, b};
    __m256 e[2];
    exp_in_range_ps(in, e);
    sweep_group_ends(at, e[0], j, o, num_groups, s, e0);
    if (j + 8 < L) sweep_group_ends(at, e[1], j + 8, o, num_groups, s, e0);
  }
  if (at.k < num_groups) s[at.k] = hsum(at.acc);   // the last group ended at L, with a vector
  const __m256 first[1] = {_mm256_set1_ps(x[0])};  // the same arithmetic as the sweep's lane 0
  __m256 e_first[1];
  exp_in_range_ps(first, e_first);
  e0[0] = _mm256_cvtss_f32(e_first[0]);
  const __m256i over = _mm256_cmpgt_epi32(big, _mm256_set1_epi32(0x42ae0000));  // |x| > 87.0f
  return _mm256_testz_si256(over, over);
}

// y[j] = c * exp(x[j] - m) over x[0..n) (softmax from its shift m, a softmax gradient from the
// lse), with mosx_exp's special cases: below -87 gives 0, above 88 gives inf, NaN stays NaN.
static inline void scaled_exp(const float* x, int64_t n, float m, float c, float* y) {
  const __m256 vm = _mm256_set1_ps(m), vc = _mm256_set1_ps(c);
  const __m256 lo = _mm256_set1_ps(-87.0f), hi = _mm256_set1_ps(88.0f);
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  // min/max keep a NaN d (their second operand).
  auto clamp = [&](__m256 d) { return _mm256_min_ps(hi, _mm256_max_ps(lo, d)); };
  auto term = [&](__m256 d, __m256 e) {
    e = _mm256_andnot_ps(_mm256_cmp_ps(d, lo, _CMP_LT_OQ), e);
    return _mm256_mul_ps(vc, _mm256_blendv_ps(e, inf, _mm256_cmp_ps(d, hi, _CMP_GT_OQ)));
  };
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 d[2] = {_mm256_sub_ps(_mm256_loadu_ps(x + j), vm),
                         _mm256_sub_ps(_mm256_loadu_ps(x + j + 8), vm)};
    const __m256 dc[2] = {clamp(d[0]), clamp(d[1])};
    __m256 e[2];
    exp_in_range_ps(dc, e);
    _mm256_storeu_ps(y + j, term(d[0], e[0]));
    _mm256_storeu_ps(y + j + 8, term(d[1], e[1]));
  }
  for (; j < n; j += 8) {
    const __m256i mask = tail_mask(n - j);
    const __m256 d[1] = {_mm256_sub_ps(_mm256_maskload_ps(x + j, mask), vm)};
    const __m256 dc[1] = {clamp(d[0])};
    __m256 e[1];
    exp_in_range_ps(dc, e);
    _mm256_maskstore_ps(y + j, mask, term(d[0], e[0]));
  }
}

// sum of exp(x[j] - m) over a finite slice whose max is m.
static inline float sum_exp_nonpos(const float* x, int64_t n, float m) {
  return sum_exp_avx2<true>(x, n, m);
}

// sum of exp(x[j]) over x[0..n), unshifted: NaN when the slice holds a NaN; the caller's range
// check rejects the sum when any x is outside [-87, 69] and could matter.
static inline float sum_exp_unshifted(const float* x, int64_t n) {
  return sum_exp_avx2<false>(x, n, 0.0f);
}

// A row of bf16 / fp16 bit patterns widened to float, eight at a time (F16C for fp16).
static inline void bf16_to_real(const uint16_t* v, int64_t n, float* out) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i w =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + j)));
    _mm256_storeu_ps(out + j, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  for (; j < n; ++j) out[j] = __builtin_bit_cast(float, static_cast<uint32_t>(v[j]) << 16);
}

static inline void half_to_real(const uint16_t* v, int64_t n, float* out) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(out + j,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + j))));
  for (; j < n; ++j) out[j] = _cvtsh_ss(v[j]);
}

// Position of the largest of x[0..n) (n >= 1), the first on ties; NaNs are passed over. Eight
// lanes each keep their first maximum; the lanes are then merged by value, then by position.
static inline int64_t slice_argmax(const float* x, int64_t n) {
  int64_t arg = 0;
  float best_v = x[0];
  int64_t j = 0;
  if (n >= 16 && n <= std::numeric_limits<int32_t>::max()) {
    __m256 best = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256i best_i = _mm256_set1_epi32(-1);
    __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (; j + 8 <= n; j += 8) {
      const __m256 v = _mm256_loadu_ps(x + j);
      const __m256 gt = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
      best = _mm256_blendv_ps(best, v, gt);
      best_i = _mm256_blendv_epi8(best_i, idx, _mm256_castps_si256(gt));
      idx = _mm256_add_epi32(idx, _mm256_set1_epi32(8));
    }
    alignas(32) float bv[8];
    alignas(32) int32_t bi[8];
    _mm256_store_ps(bv, best);
    _mm256_store_si256(reinterpret_cast<__m256i*>(bi), best_i);
    int32_t lane_arg = -1;
    for (int l = 0; l < 8; ++l) {
      if (bi[l] < 0) continue;  // this lane saw only -inf or NaN
      if (lane_arg < 0 || bv[l] > best_v || (bv[l] == best_v && bi[l] < lane_arg)) {
        best_v = bv[l];
        lane_arg = bi[l];
      }
    }
    if (lane_arg < 0) {  // no lane moved: fall back to the scalar rule over the whole slice
      j = 0;
      best_v = x[0];
    } else {
      arg = lane_arg;
    }
  }
  if (j == 0) j = 1;
  for (; j < n; ++j) {
    if (x[j] > best_v || best_v != best_v) {
      best_v = x[j];
      arg = j;
    }
  }
  return arg;
}
