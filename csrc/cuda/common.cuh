// Device code shared by the CUDA kernels of the group-softmax op family (softmax_cuda.cu,
// score_predict_cuda.cu, cross_entropy_cuda.cu): scalar helpers, warp reductions, the staging of
// the group offsets, the chunked row loader, the online (max, sum) state of a group, and the
// group-choice rules (NaN, ties, near-tie recheck) that make CUDA give the CPU's answers.
//
// Semantics (the same on both devices and as mosx.reference):
//  * A group's softmax is computed from its shift m (the max, ignoring NaN) and its sum
//    s = sum exp(x - m): p_j = exp(x_j - m) / s, never exp(x_j - lse) from an lse rounded to the
//    accumulation type. A NaN or +inf in the slice makes s NaN; a slice of only -inf has s == 0;
//    either way every probability of the group is NaN, as in torch.softmax.
//  * Score (-min_k p_others^k) and prediction (max_k of the group's best class probability):
//    the first group whose value is NaN wins; otherwise the extreme value, the first group on
//    ties. The prediction of a NaN group is its first class. Within a group the predicted class
//    is the first largest non-NaN class logit.
//  * Ties between bit-identical groups: the fast reductions sum a group in an order that depends
//    on where the group sits in the row (lane, chunk), so identical groups may differ in the last
//    bits. When another group's value is within near_tol of the winner's, the row is decided again
//    from canonical per-group sums (canonical_group: lane j sums the group's entries j, j + 32, ...
//    from global memory, then a fixed butterfly), which depend only on the group's own values:
//    identical groups then tie exactly and the first one wins.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../host_utils.h"

namespace mosx {
namespace cuda_detail {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kOffsetsInSmem = 2048;  // up to this many offsets (K + 1) are kept in shared memory
// Complete groups of at most kSmall logits are reduced by one lane each (chunked kernels); so are
// groups of up to kMedium logits when at least kMediumLanes of the 32 groups in view are that small.
constexpr int kSmall = 16;
constexpr int kMedium = 128;
constexpr int kMediumLanes = 16;
constexpr int kNone = INT_MAX;     // "no group / no position yet"
constexpr int kChunkBytes = 4096;  // per-warp shared buffer for one input (chunked kernels)

template <typename acc_t>
constexpr int chunk_size() {
  return kChunkBytes / static_cast<int>(sizeof(acc_t));
}

// ---------------------------------------------------------------------------------------------
// Scalar helpers (float / double overloads).

__device__ __forceinline__ float nan_of(float) { return __int_as_float(0x7fffffff); }
__device__ __forceinline__ double nan_of(double) {
  return __longlong_as_double(0x7ff8000000000000LL);
}
__device__ __forceinline__ float inf_of(float) { return __int_as_float(0x7f800000); }
__device__ __forceinline__ double inf_of(double) {
  return __longlong_as_double(0x7ff0000000000000LL);
}
// Start value of a running max: finite, so that "x - max" is never -inf - -inf.
__device__ __forceinline__ float lowest_of(float) { return -FLT_MAX; }
__device__ __forceinline__ double lowest_of(double) { return -DBL_MAX; }
__device__ __forceinline__ float vmax(float a, float b) { return fmaxf(a, b); }  // ignores NaN
__device__ __forceinline__ double vmax(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float vmin(float a, float b) { return fminf(a, b); }  // ignores NaN
__device__ __forceinline__ double vmin(double a, double b) { return fmin(a, b); }
// exp inside sums (arguments <= 0, dominant terms near 0): the hardware approximation.
__device__ __forceinline__ float exp_sum(float x) { return __expf(x); }
__device__ __forceinline__ double exp_sum(double x) { return exp(x); }
// exp of values that are returned to the user (and of the rescaling factors): the accurate one.
__device__ __forceinline__ float exp_out(float x) { return expf(x); }
__device__ __forceinline__ double exp_out(double x) { return exp(x); }
__device__ __forceinline__ float log_of(float x) { return logf(x); }
__device__ __forceinline__ double log_of(double x) { return log(x); }
__device__ __forceinline__ float abs_of(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_of(double x) { return fabs(x); }

template <typename scalar_t>
__device__ __forceinline__ auto to_acc(scalar_t v) {
  return static_cast<acc_type_t<scalar_t>>(v);
}

// Reductions over aligned groups of W lanes (W = 32: the whole warp). Every lane of the warp
// must call them (full-mask shuffles); xor offsets below W keep each group to itself.
template <int W = 32, typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int d = W / 2; d > 0; d >>= 1) v = vmax(v, __shfl_xor_sync(kFull, v, d));
  return v;
}

// xor butterfly: every lane ends with identical bits (float addition is commutative).
template <int W = 32, typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int d = W / 2; d > 0; d >>= 1) v += __shfl_xor_sync(kFull, v, d);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Group offsets: a clamped int32 copy in shared memory, or clamped reads of the global int64
// tensor when there are too many groups (the host clamps those and makes them non-decreasing).

struct Offsets {
  const int* s;
  const int64_t* g;
  int K;
  int L;
  __device__ __forceinline__ int operator[](int k) const {
    if (s != nullptr) return s[k];
    if (k <= 0) return 0;
    if (k >= K) return L;
    const int64_t v = g[k];
    return static_cast<int>(v < 0 ? 0 : (v > L ? L : v));
  }
};

// Called by every thread of the block before the row loop. The staged copy is clamped to [0, L]
// and made non-decreasing (running max), so even invalid offsets give disjoint groups: no two
// lanes ever write the same shared-memory element.
__device__ inline Offsets setup_offsets(const int64_t* offsets, int K, int L, int* smem_offsets) {
  if (smem_offsets != nullptr) {
    for (int k = threadIdx.x; k <= K; k += blockDim.x) {
      int64_t v = offsets[k];
      v = v < 0 ? 0 : (v > L ? L : v);
      if (k == 0) v = 0;
      if (k == K) v = L;
      smem_offsets[k] = static_cast<int>(v);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      int carry = 0;
      for (int base = 0; base <= K; base += 32) {
        const int k = base + lane;
        int v = k <= K ? smem_offsets[k] : 0;
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
          const int o = __shfl_up_sync(kFull, v, d);
          if (lane >= d) v = max(v, o);
        }
        v = max(v, carry);
        if (k <= K) smem_offsets[k] = v;
        carry = __shfl_sync(kFull, v, 31);
      }
    }
    __syncthreads();
  }
  return Offsets{smem_offsets, offsets, K, L};
}

// ---------------------------------------------------------------------------------------------
// Alignment and 16-byte stores.

template <typename scalar_t>
__device__ __forceinline__ int row_shift(const scalar_t* p) {
  constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
  return static_cast<int>((reinterpret_cast<uintptr_t>(p) / sizeof(scalar_t)) % V);
}

// A 16-byte global store. Written in PTX because, next to the scalar edge path, nvcc splits a
// plain uint4 store into four 4-byte stores.
__device__ __forceinline__ void store16(void* p, uint4 v) {
#if defined(MOSX_CUDA_EMULATION)  // tools/cuda_emu: the device code on the CPU
  ::mosx_emu::check_aligned16(p, "store16");
  *reinterpret_cast<uint4*>(p) = v;
#else
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(__cvta_generic_to_global(p)),
               "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// Online (max, sum) state of a (partial) group: running max m (starts at the lowest finite value)
// and sum s of exp(x - m). NaN or +inf anywhere makes s NaN; a group of only -inf keeps s == 0.

template <typename acc_t>
struct Lse {
  acc_t m, s;
};

template <typename acc_t>
__device__ __forceinline__ Lse<acc_t> lse_identity() {
  return {lowest_of(acc_t(0)), acc_t(0)};
}

// The log-sum-exp m + log(s) (what the backward passes and the lse outputs need); NaN for s == 0.
template <typename acc_t>
__device__ __forceinline__ acc_t lse_finalize(Lse<acc_t> st) {
  return st.s == acc_t(0) ? nan_of(acc_t(0)) : st.m + log_of(st.s);
}

// Probability exp(x - m) / s of an entry x of the group (NaN for a NaN group).
template <typename acc_t>
__device__ __forceinline__ acc_t lse_prob(acc_t x, Lse<acc_t> st) {
  return exp_out(x - st.m) / st.s;
}

// ---------------------------------------------------------------------------------------------
// Arg-max of the non-others logits of a group: the first position of the largest non-NaN value
// (NaNs are skipped: a group holding one is NaN as a whole, and its prediction is its first class,
// set by the caller). Order-free merge: larger value, then smaller position.

template <typename acc_t>
__device__ __forceinline__ void arg_update(acc_t v, int q, acc_t& av, int& ap) {
  if (v > av || (v == av && q < ap)) {  // false for a NaN v
    av = v;
    ap = q;
  }
}

template <int W = 32, typename acc_t>
__device__ __forceinline__ void warp_arg(acc_t& av, int& ap) {
#pragma unroll
  for (int d = W / 2; d > 0; d >>= 1) {
    const acc_t ov = __shfl_xor_sync(kFull, av, d);
    const int op = __shfl_xor_sync(kFull, ap, d);
    arg_update(ov, op, av, ap);
  }
}

// Total orders for choosing a group: NaN first (lowest group), then the extreme value, then the
// lowest group. Equivalent to the CPU's first-wins loops that stop at the first NaN.
template <bool largest, typename acc_t>
__device__ __forceinline__ bool better(acc_t p, int g, acc_t bp, int bg) {
  const bool pn = p != p, bn = bp != bp;
  if (pn || bn) return pn && (!bn || g < bg);
  return (largest ? p > bp : p < bp) || (p == bp && g < bg);
}

// Relative distance under which two groups' values count as a near-tie. It bounds, with a wide
// margin, how far the fast reductions can move a group's sum from the canonical one: per lane at
// most kMedium sequential adds (lane-serial groups) or L / 32 of them, the butterfly, and one
// rescale per chunk, each one rounding of the accumulation type.
template <typename acc_t>
__device__ __forceinline__ acc_t near_tol(int L) {
  const acc_t u = sizeof(acc_t) == 8 ? acc_t(1.1102230246251565e-16) : acc_t(5.9604645e-08);
  return (acc_t(384) + acc_t(L) * acc_t(0.125)) * u;
}

template <typename acc_t>
__device__ __forceinline__ bool near_equal(acc_t p, acc_t best, acc_t tol) {
  const acc_t tiny = sizeof(acc_t) == 8 ? acc_t(DBL_MIN) : acc_t(FLT_MIN);
  return abs_of(p - best) <= tol * vmax(abs_of(p), abs_of(best)) + tiny;
}

// The best group seen so far plus the best value among the other groups (p2, value order only),
// so that a near-tie can be detected after the row. aux is carried along with the best.
template <bool largest, typename acc_t>
struct Pick {
  acc_t p, p2, aux;
  int g, pos;
  __device__ __forceinline__ void init() {
    p = largest ? -inf_of(acc_t(0)) : inf_of(acc_t(0));
    p2 = p;
    aux = 0;
    g = kNone;
    pos = 0;
  }
  // value-only "closer to the winner" (NaN is ignored: a NaN winner never needs a recheck)
  __device__ __forceinline__ static acc_t closer(acc_t a, acc_t b) {
    return largest ? vmax(a, b) : vmin(a, b);
  }
  // Each group must be offered at most once per lane (or identically in every lane).
  __device__ __forceinline__ void offer(acc_t q, int qg, acc_t qaux, int qpos) {
    if (better<largest>(q, qg, p, g)) {
      if (g != kNone) p2 = closer(p2, p);
      p = q;
      g = qg;
      aux = qaux;
      pos = qpos;
    } else {
      p2 = closer(p2, q);
    }
  }
  // Merge with the other lanes' picks. A group reduced by the whole warp is in every lane's pick
  // with identical values; it is counted once.
  __device__ __forceinline__ void warp_merge() {
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) {
      const acc_t op = __shfl_xor_sync(kFull, p, d);
      const acc_t op2 = __shfl_xor_sync(kFull, p2, d);
      const acc_t oaux = __shfl_xor_sync(kFull, aux, d);
      const int og = __shfl_xor_sync(kFull, g, d);
      const int opos = __shfl_xor_sync(kFull, pos, d);
      acc_t n2 = closer(p2, op2);
      if (og != g && og != kNone && g != kNone) {
        n2 = closer(n2, better<largest>(op, og, p, g) ? p : op);
      }
      // The pick itself: the better of the two (the same in both lanes of the pair).
      if (better<largest>(op, og, p, g)) {
        p = op;
        g = og;
        aux = oaux;
        pos = opos;
      }
      p2 = n2;
    }
  }
  __device__ __forceinline__ bool near_tie(acc_t tol) const {
    return g != kNone && p == p && near_equal(p2, p, tol);
  }
};

// Canonical (max, sum) of the group [lo, hi) of a row, read from global memory, and (want_arg)
// the first arg-max of its class logits (positions lo + 1 ..): the order of every operation
// depends only on the group's own values, never on where the group sits. All lanes call it and
// get identical results.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Lse<acc_t> canonical_group(const scalar_t* __restrict__ xr, int lo,
                                                      int hi, int lane, bool want_arg, acc_t& av,
                                                      int& ap) {
  acc_t m = lowest_of(acc_t(0));
  av = -inf_of(acc_t(0));
  ap = kNone;
  for (int q = lo + lane; q < hi; q += 32) {
    const acc_t v = static_cast<acc_t>(xr[q]);
    m = vmax(m, v);
    if (want_arg && q > lo) arg_update(v, q, av, ap);
  }
  m = warp_max(m);
  if (want_arg) warp_arg(av, ap);
  acc_t s = 0;
  for (int q = lo + lane; q < hi; q += 32) s += exp_sum(static_cast<acc_t>(xr[q]) - m);
  s = warp_sum(s);
  return {m, s};
}

// Score of one row decided canonically: every group from canonical_group, the first group
// attaining the smallest others-probability (a NaN wins). Returns the pick (aux = lse).
template <typename scalar_t, typename acc_t>
__device__ inline Pick<false, acc_t> canonical_score(const scalar_t* __restrict__ xr,
                                                     const Offsets& off, int lane) {
  Pick<false, acc_t> best;
  best.init();
  for (int g = 0; g < off.K; ++g) {
    const int lo = off[g], hi = off[g + 1];
    if (lo >= hi) continue;
    acc_t av;
    int ap;
    const Lse<acc_t> st = canonical_group(xr, lo, hi, lane, false, av, ap);
    const acc_t p = lse_prob(static_cast<acc_t>(xr[lo]), st);
    if (better<false>(p, g, best.p, best.g)) {
      best.p = p;
      best.g = g;
      best.aux = lse_finalize(st);
    }
  }
  return best;
}

// Prediction of one row decided canonically (pos = the winning logit position).
template <typename scalar_t, typename acc_t>
__device__ inline Pick<true, acc_t> canonical_predict(const scalar_t* __restrict__ xr,
                                                      const Offsets& off, int lane) {
  Pick<true, acc_t> best;
  best.init();
  for (int g = 0; g < off.K; ++g) {
    const int lo = off[g], hi = off[g + 1];
    if (lo >= hi) continue;
    acc_t av;
    int ap;
    const Lse<acc_t> st = canonical_group(xr, lo, hi, lane, true, av, ap);
    const acc_t p = ap == kNone ? nan_of(acc_t(0)) : lse_prob(av, st);
    if (better<true>(p, g, best.p, best.g)) {
      best.p = p;
      best.g = g;
      best.pos = p != p ? lo + 1 : ap;
    }
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy targets: logit position of the target of (target set m, row, group g); -1 when
// ignored, -2 when the label is invalid (the loss / gradient of that group becomes NaN).

struct CeTargets {
  const int64_t* t;            // [M, N] class ids or [M, N, K] per-group labels
  const int64_t* class_logit;  // [C], class ids only
  int64_t N;
  int64_t C;
  int64_t ignore_index;
  int M;
  bool per_group;
};

// Class-id targets: the logit position of the row's class (or -1 / -2), same for all groups.
__device__ __forceinline__ int ce_class_pos(const CeTargets& T, int m, int64_t row, int L) {
  if (T.per_group) return 0;
  const int64_t c = T.t[m * T.N + row];
  if (c == T.ignore_index) return -1;
  if (c < 0 || c >= T.C) return -2;
  const int64_t pos = T.class_logit[c];
  return (pos < 0 || pos >= L) ? -2 : static_cast<int>(pos);
}

__device__ __forceinline__ int ce_slot(const CeTargets& T, int lo, int hi, int K, int m,
                                       int64_t row, int g, int class_pos, int L) {
  int slot;
  if (T.per_group) {
    const int64_t lab = T.t[(m * T.N + row) * K + g];
    if (lab == T.ignore_index) return -1;
    if (lab < 0 || lab > static_cast<int64_t>(hi - lo - 1)) return -2;
    slot = lo + static_cast<int>(lab);
  } else {
    if (class_pos < 0) return class_pos;
    slot = (class_pos >= lo && class_pos < hi) ? class_pos : lo;
  }
  return (slot >= 0 && slot < L) ? slot : -2;
}

// Loss of one (target set, group) from the group's (m, s): lse - x_t = (m - x_t) + log(s).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t ce_loss(const scalar_t* __restrict__ xr, int slot, Lse<acc_t> st) {
  if (slot == -1) return acc_t(0);
  if (slot == -2 || st.s == acc_t(0)) return nan_of(acc_t(0));
  return (st.m - static_cast<acc_t>(xr[slot])) + log_of(st.s);
}

// ---------------------------------------------------------------------------------------------
// Chunked kernels: moving chunks between global memory and the per-warp shared buffer, and
// visiting the groups of one chunk.
//
// A chunk covers row positions [p0, p0 + CH) with p0 = c * CH - grid_shift, where grid_shift is
// the misalignment (in elements) of the row start w.r.t. 16 bytes, so that the vector slots of
// an input with the same shift are 16-byte aligned. Positions outside [0, L) are not touched
// (loaded as 0, never used).

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_chunk(acc_t* buf, const scalar_t* __restrict__ row, int shift,
                                            int grid_shift, int p0, int L, int lane) {
  constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
  constexpr int CH = chunk_size<acc_t>();
  static_assert(CH % V == 0, "chunk must hold whole vectors");
  __syncwarp();  // the previous chunk's readers are done with buf
  if (shift == grid_shift) {
    for (int v = lane; v < CH / V; v += 32) {
      const int q = p0 + v * V;
      acc_t* dst = buf + v * V;
      if (q >= 0 && q + V <= L) {
        const uint4 raw = *reinterpret_cast<const uint4*>(row + q);
        scalar_t vals[V];
        memcpy(vals, &raw, sizeof(raw));
#pragma unroll
        for (int j = 0; j < V; ++j) dst[j] = static_cast<acc_t>(vals[j]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int qq = q + j;
          dst[j] = (qq >= 0 && qq < L) ? static_cast<acc_t>(row[qq]) : acc_t(0);
        }
      }
    }
  } else {
    for (int e = lane; e < CH; e += 32) {
      const int q = p0 + e;
      buf[e] = (q >= 0 && q < L) ? static_cast<acc_t>(row[q]) : acc_t(0);
    }
  }
  __syncwarp();
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_chunk(scalar_t* __restrict__ row, int shift, int grid_shift,
                                            const acc_t* buf, int p0, int L, int lane) {
  constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
  constexpr int CH = chunk_size<acc_t>();
  __syncwarp();  // every lane's results are in buf
  if (shift == grid_shift) {
    for (int v = lane; v < CH / V; v += 32) {
      const int q = p0 + v * V;
      const acc_t* src = buf + v * V;
      if (q >= 0 && q + V <= L) {
        scalar_t vals[V];
#pragma unroll
        for (int j = 0; j < V; ++j) vals[j] = static_cast<scalar_t>(src[j]);
        uint4 raw;
        memcpy(&raw, vals, sizeof(raw));
        store16(row + q, raw);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int qq = q + j;
          if (qq >= 0 && qq < L) row[qq] = static_cast<scalar_t>(src[j]);
        }
      }
    }
  } else {
    for (int e = lane; e < CH; e += 32) {
      const int q = p0 + e;
      if (q >= 0 && q < L) row[q] = static_cast<scalar_t>(buf[e]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Visiting the groups of one chunk.
//
// Calls small_fn(g, lo, hi) in a single lane for each group [lo, hi) that lies entirely in the
// chunk [c0, c1) and is small (kSmall / kMedium above), and coop_fn(g, a, b, starts, ends) in all lanes
// (uniform arguments) for every other group intersecting the chunk, in increasing group order;
// [a, b) is the group's part in this chunk, starts/ends tell whether its first/last logit is in
// it. g is the first group to look at; returns the first group of the next chunk (the last one
// of this chunk when it continues past c1). Bounded for any offsets.
template <class SmallFn, class CoopFn>
__device__ __forceinline__ int for_each_group(const Offsets& off, int g, int c0, int c1, int lane,
                                              SmallFn&& small_fn, CoopFn&& coop_fn) {
  const int K = off.K;
  int last = -1;
  while (g < K && off[g] < c1) {
    const int gj = g + lane;
    bool in = false, medium = false;
    int lo = 0, hi = 0;
    if (gj < K) {
      lo = off[gj];
      hi = off[gj + 1];
      in = lo < c1 && hi > c0;
      medium = in && lo >= c0 && hi <= c1 && hi - lo <= kMedium;
    }
    const unsigned in_mask = __ballot_sync(kFull, in);
    const bool many = __popc(__ballot_sync(kFull, medium)) >= kMediumLanes;
    const bool small = medium && (many || hi - lo <= kSmall);
    if (small) small_fn(gj, lo, hi);
    unsigned coop = __ballot_sync(kFull, in && !small);
    while (coop != 0) {
      const int j = __ffs(coop) - 1;
      coop &= coop - 1;
      const int gg = g + j;
      const int glo = off[gg], ghi = off[gg + 1];
      coop_fn(gg, max(glo, c0), min(ghi, c1), glo >= c0, ghi <= c1);
    }
    if (in_mask == 0) {  // only with invalid offsets
      g += 1;
      continue;
    }
    last = g + 31 - __clz(in_mask);
    g = last + 1;
  }
  return (last >= 0 && off[last + 1] > c1) ? last : g;
}

// One lane, positions [lo, hi) of the chunk starting at p0.
template <typename acc_t>
__device__ __forceinline__ Lse<acc_t> serial_lse(const acc_t* buf, int p0, int lo, int hi) {
  acc_t m = lowest_of(acc_t(0));
  for (int q = lo; q < hi; ++q) m = vmax(m, buf[q - p0]);
  acc_t s = 0;
  for (int q = lo; q < hi; ++q) s += exp_sum(buf[q - p0] - m);
  return {m, s};
}

// The whole warp, positions [a, b), continuing `carry` when merge is set.
template <typename acc_t>
__device__ __forceinline__ Lse<acc_t> coop_lse(const acc_t* buf, int p0, int a, int b, int lane,
                                               bool merge, Lse<acc_t> carry) {
  acc_t m = lowest_of(acc_t(0));
  for (int q = a + lane; q < b; q += 32) m = vmax(m, buf[q - p0]);
  m = warp_max(m);
  if (merge) m = vmax(m, carry.m);
  acc_t s = 0;
  for (int q = a + lane; q < b; q += 32) s += exp_sum(buf[q - p0] - m);
  s = warp_sum(s);
  if (merge) s += carry.s * exp_out(carry.m - m);
  return {m, s};
}

// Per-group (m, s) of one row, chunk by chunk. finish(g, st) runs in one lane per group. Used by
// the cross-entropy forward and the softmax forward (chunked kernels).
template <typename scalar_t, typename acc_t, class Finish>
__device__ __forceinline__ void row_group_ms(const scalar_t* xr, int shift, int L, acc_t* buf,
                                             const Offsets& off, int lane, Finish&& finish) {
  constexpr int CH = chunk_size<acc_t>();
  Lse<acc_t> carry = lse_identity<acc_t>();
  int g = 0;
  for (int p0 = -shift; p0 < L; p0 += CH) {
    stage_chunk(buf, xr, shift, shift, p0, L, lane);
    g = for_each_group(
        off, g, max(p0, 0), min(p0 + CH, L), lane,
        [&](int gg, int lo, int hi) { finish(gg, serial_lse(buf, p0, lo, hi)); },
        [&](int gg, int a, int b, bool starts, bool ends) {
          const Lse<acc_t> st = coop_lse(buf, p0, a, b, lane, !starts, carry);
          if (ends) {
            if (lane == 0) finish(gg, st);
          } else {
            carry = st;
          }
        });
  }
}

// Shared-memory layout of a chunked kernel's block: kWarps * nin chunk buffers, then the offsets.
template <typename acc_t>
__device__ __forceinline__ acc_t* warp_buffer(unsigned char* smem, int nin) {
  return reinterpret_cast<acc_t*>(smem) + (threadIdx.x / 32) * nin * chunk_size<acc_t>();
}

template <typename acc_t>
__device__ __forceinline__ int* smem_offsets(unsigned char* smem, int nin, bool in_smem) {
  return in_smem ? reinterpret_cast<int*>(smem + kWarps * nin * kChunkBytes) : nullptr;
}

#define MOSX_ROW_LOOP(N)                                                                      \
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; row < (N); \
       row += static_cast<int64_t>(gridDim.x) * kWarps)

}  // namespace cuda_detail
}  // namespace mosx
