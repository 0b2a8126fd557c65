// CUDA kernels of the group-softmax op family (same semantics as csrc/cpu/group_softmax_cpu.cpp).
//
// Design (the ops are memory-bound: the floor is one read of the logits, plus one write of the
// gradient / probabilities where there is an [N, L] output):
//  * One warp per row, 4 warps per block, a grid-stride loop over rows, so batch 1 and 1M rows
//    use the same kernels and the group offsets are staged into shared memory once per block.
//  * A row is streamed in chunks of 4 KiB of accumulation-type values (1024 floats, 512 doubles).
//    Each chunk is read with coalesced 16-byte vector loads (per-row alignment shift, so rows
//    of any stride and any start address still vectorise; the few elements at the row edges
//    use scalar loads), converted to float (double for float64) into a per-warp shared buffer.
//  * Within a chunk the warp visits the groups that intersect it, 32 at a time (lane j takes
//    group g + j):
//      - a group that lies entirely in the chunk and is small (<= 16 logits, or <= 128 when most
//        groups in view are) is reduced by its lane alone (hundreds of small groups cost one pass
//        of the warp, not one warp reduction each);
//      - every other group is reduced by the whole warp: lane-strided max, then sum of exp, each
//        finished by an xor-butterfly shuffle reduction (every lane ends with identical bits).
//        A group that crosses into the next chunk carries its (max, sum) [and argmax / others
//        logit] to it, so any row width works with one read.
//    This keeps every element on the fast path (one max, one exp, one add, no per-element
//    group bookkeeping) and is uniform across the warp except for the small-group lanes.
//  * Reductions are per-group log-sum-exp only: the score and the prediction never materialise
//    probabilities; the cross-entropy backward recomputes softmax from the saved per-group lse.
//    group_softmax(_backward) keep per-group lse / sums in an [N, K] scratch tensor between
//    the reduction pass and the write pass (the row is re-read from shared memory when it fits
//    in one chunk, from global memory otherwise).
//  * Deterministic: no atomics; every reduction has a fixed order; ties and NaNs are resolved by
//    total orders (first group / first index wins, NaN wins as in torch.max).
//  * Safe with bad input that cannot be checked without a device sync: offsets are clamped to
//    [0, L] and made non-decreasing, and every loop and index is bounded, so invalid offsets give
//    garbage, never an out-of-bounds access or a shared-memory race; invalid target labels give
//    NaN losses / gradients instead of errors.
//  * int64 row indexing (N * L > 2^31 works); L itself must fit in int32.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/cummax.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <atomic>
#include <cfloat>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../checks.h"

namespace mosx {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kOffsetsInSmem = 2048;  // up to this many offsets (K + 1) are kept in shared memory
// Complete groups of at most kSmall logits are reduced by one lane each; so are groups of up to
// kMedium logits when at least kMediumLanes of the 32 groups in view are that small (then the
// warp is busy anyway, and one warp reduction per group would cost more than the serial loop).
constexpr int kSmall = 16;
constexpr int kMedium = 128;
constexpr int kMediumLanes = 16;
constexpr int kNone = INT_MAX;        // "no group / no position yet"
constexpr int kChunkBytes = 4096;     // per-warp shared buffer for one input

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename acc_t>
constexpr int chunk_size() {
  return kChunkBytes / static_cast<int>(sizeof(acc_t));
}

// ---------------------------------------------------------------------------------------------
// Scalar helpers (float / double overloads).

__device__ __forceinline__ float nan_of(float) { return __int_as_float(0x7fffffff); }
__device__ __forceinline__ double nan_of(double) { return __longlong_as_double(0x7ff8000000000000LL); }
__device__ __forceinline__ float inf_of(float) { return __int_as_float(0x7f800000); }
__device__ __forceinline__ double inf_of(double) { return __longlong_as_double(0x7ff0000000000000LL); }
// Start value of a running max: finite, so that "x - max" is never -inf - -inf.
__device__ __forceinline__ float lowest_of(float) { return -FLT_MAX; }
__device__ __forceinline__ double lowest_of(double) { return -DBL_MAX; }
__device__ __forceinline__ float vmax(float a, float b) { return fmaxf(a, b); }  // ignores NaN
__device__ __forceinline__ double vmax(double a, double b) { return fmax(a, b); }
// exp inside sums (arguments <= 0, dominant terms near 0): the hardware approximation.
__device__ __forceinline__ float exp_sum(float x) { return __expf(x); }
__device__ __forceinline__ double exp_sum(double x) { return exp(x); }
// exp of values that are returned to the user: the accurate one.
__device__ __forceinline__ float exp_out(float x) { return expf(x); }
__device__ __forceinline__ double exp_out(double x) { return exp(x); }
__device__ __forceinline__ float log_of(float x) { return logf(x); }
__device__ __forceinline__ double log_of(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v = vmax(v, __shfl_xor_sync(kFull, v, d));
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(kFull, v, d);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Group offsets: a clamped int32 copy in shared memory, or clamped reads of the global int64
// tensor when there are too many groups.

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
// lanes ever write the same shared-memory element. (The host does the same for the global path.)
__device__ Offsets setup_offsets(const int64_t* offsets, int K, int L, int* smem_offsets) {
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
// Moving chunks between global memory and the per-warp shared buffer.
//
// A chunk covers row positions [p0, p0 + CH) with p0 = c * CH - grid_shift, where grid_shift is
// the misalignment (in elements) of the row start w.r.t. 16 bytes, so that the vector slots of
// an input with the same shift are 16-byte aligned. Positions outside [0, L) are not touched
// (loaded as 0, never used).

template <typename scalar_t>
__device__ __forceinline__ int row_shift(const scalar_t* p) {
  constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
  return static_cast<int>((reinterpret_cast<uintptr_t>(p) / sizeof(scalar_t)) % V);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_chunk(acc_t* buf, const scalar_t* __restrict__ row,
                                            int shift, int grid_shift, int p0, int L, int lane) {
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

// A 16-byte global store. Written in PTX because, next to the scalar edge path, nvcc splits a
// plain uint4 store into four 4-byte stores.
__device__ __forceinline__ void store16(void* p, uint4 v) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(__cvta_generic_to_global(p)),
               "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
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

// ---------------------------------------------------------------------------------------------
// Online log-sum-exp state of a (partial) group: running max m (starts at the lowest finite
// value) and sum s of exp(x - m). Semantics as torch.softmax: NaN or +inf anywhere makes s NaN;
// a group of only -inf keeps s == 0, which finalises to NaN.

template <typename acc_t>
struct Lse {
  acc_t m, s;
};

template <typename acc_t>
__device__ __forceinline__ Lse<acc_t> lse_identity() {
  return {lowest_of(acc_t(0)), acc_t(0)};
}

template <typename acc_t>
__device__ __forceinline__ acc_t lse_finalize(Lse<acc_t> st) {
  return st.s == acc_t(0) ? nan_of(acc_t(0)) : st.m + log_of(st.s);
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
  if (merge) s += carry.s * exp_sum(carry.m - m);
  return {m, s};
}

// ---------------------------------------------------------------------------------------------
// Arg-max of the non-others logits of a group, matching the CPU's sequential scan
// (arg = first class slot; arg = j when x[j] > x[arg]): the first position of the largest
// non-NaN value, except that a NaN in the first class slot sticks (stored as +inf, which no
// later value beats). Order-free merge: larger value, then smaller position.

template <typename acc_t>
__device__ __forceinline__ void arg_update(acc_t v, int q, int first_class, acc_t& av, int& ap) {
  if (v != v) {
    if (q != first_class) return;
    v = inf_of(acc_t(0));
  }
  if (v > av || (v == av && q < ap)) {
    av = v;
    ap = q;
  }
}

template <typename acc_t>
__device__ __forceinline__ void arg_merge(acc_t v, int q, acc_t& av, int& ap) {
  if (v > av || (v == av && q < ap)) {
    av = v;
    ap = q;
  }
}

template <typename acc_t>
__device__ __forceinline__ void warp_arg(acc_t& av, int& ap) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) {
    const acc_t ov = __shfl_xor_sync(kFull, av, d);
    const int op = __shfl_xor_sync(kFull, ap, d);
    arg_merge(ov, op, av, ap);
  }
}

// Total orders for choosing a group: NaN first (lowest group), then the extreme value, then the
// lowest group. Equivalent to the CPU's first-wins loops that stop at the first NaN.
template <typename acc_t>
__device__ __forceinline__ bool better_min(acc_t p, int g, acc_t bp, int bg) {
  const bool pn = p != p, bn = bp != bp;
  if (pn || bn) return pn && (!bn || g < bg);
  return p < bp || (p == bp && g < bg);
}

template <typename acc_t>
__device__ __forceinline__ bool better_max(acc_t p, int g, acc_t bp, int bg) {
  const bool pn = p != p, bn = bp != bp;
  if (pn || bn) return pn && (!bn || g < bg);
  return p > bp || (p == bp && g < bg);
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

__device__ __forceinline__ int ce_slot(const CeTargets& T, const Offsets& off, int m, int64_t row,
                                       int g, int class_pos, int L) {
  const int lo = off[g], hi = off[g + 1];
  int slot;
  if (T.per_group) {
    const int64_t lab = T.t[(m * T.N + row) * off.K + g];
    if (lab == T.ignore_index) return -1;
    if (lab < 0 || lab > static_cast<int64_t>(hi - lo - 1)) return -2;
    slot = lo + static_cast<int>(lab);
  } else {
    if (class_pos < 0) return class_pos;
    slot = (class_pos >= lo && class_pos < hi) ? class_pos : lo;
  }
  return (slot >= 0 && slot < L) ? slot : -2;
}

// Shared-memory layout of a block: kWarps * nin chunk buffers, then the offsets.
template <typename acc_t>
__device__ __forceinline__ acc_t* warp_buffer(unsigned char* smem, int nin) {
  return reinterpret_cast<acc_t*>(smem) + (threadIdx.x / 32) * nin * chunk_size<acc_t>();
}

template <typename acc_t>
__device__ __forceinline__ int* smem_offsets(unsigned char* smem, int nin, bool in_smem) {
  return in_smem ? reinterpret_cast<int*>(smem + kWarps * nin * kChunkBytes) : nullptr;
}

#define MOSX_ROW_LOOP(N)                                                                  \
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; row < (N); \
       row += static_cast<int64_t>(gridDim.x) * kWarps)

// ---------------------------------------------------------------------------------------------
// Kernels.

// MOS score: -min_k exp(x[o_k] - lse_k), its group and lse.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    score_kernel(const scalar_t* __restrict__ x, int64_t N, int L, int64_t rs,
                 const int64_t* __restrict__ offsets, int K, bool offs_in_smem,
                 acc_type<scalar_t>* __restrict__ score, int64_t* __restrict__ min_group,
                 acc_type<scalar_t>* __restrict__ min_lse) {
  using acc_t = acc_type<scalar_t>;
  constexpr int CH = chunk_size<acc_t>();
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x % 32;
  acc_t* buf = warp_buffer<acc_t>(smem, 1);
  const Offsets off = setup_offsets(offsets, K, L, smem_offsets<acc_t>(smem, 1, offs_in_smem));
  MOSX_ROW_LOOP(N) {
    const scalar_t* xr = x + row * rs;
    const int shift = row_shift(xr);
    acc_t best_p = inf_of(acc_t(0)), best_lse = 0;
    int best_g = kNone;
    auto consider = [&](int g, acc_t x0, Lse<acc_t> st) {
      const acc_t lse = lse_finalize(st);
      const acc_t p = exp_out(x0 - lse);
      if (better_min(p, g, best_p, best_g)) {
        best_p = p;
        best_g = g;
        best_lse = lse;
      }
    };
    Lse<acc_t> carry = lse_identity<acc_t>();
    acc_t carry_x0 = 0;
    int g = 0;
    for (int p0 = -shift; p0 < L; p0 += CH) {
      stage_chunk(buf, xr, shift, shift, p0, L, lane);
      g = for_each_group(
          off, g, max(p0, 0), min(p0 + CH, L), lane,
          [&](int gg, int lo, int hi) { consider(gg, buf[lo - p0], serial_lse(buf, p0, lo, hi)); },
          [&](int gg, int a, int b, bool starts, bool ends) {
            const Lse<acc_t> st = coop_lse(buf, p0, a, b, lane, !starts, carry);
            const acc_t x0 = starts ? buf[a - p0] : carry_x0;
            if (ends) {
              consider(gg, x0, st);
            } else {
              carry = st;
              carry_x0 = x0;
            }
          });
    }
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) {
      const acc_t op = __shfl_xor_sync(kFull, best_p, d);
      const int og = __shfl_xor_sync(kFull, best_g, d);
      const acc_t ol = __shfl_xor_sync(kFull, best_lse, d);
      if (better_min(op, og, best_p, best_g)) {
        best_p = op;
        best_g = og;
        best_lse = ol;
      }
    }
    if (lane == 0) {
      score[row] = -best_p;
      min_group[row] = best_g == kNone ? 0 : best_g;
      min_lse[row] = best_g == kNone ? acc_t(0) : best_lse;
    }
  }
}

// Group prediction: per group the first arg-max of the non-others logits and its probability;
// the most probable group wins.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    predict_kernel(const scalar_t* __restrict__ x, int64_t N, int L, int64_t rs,
                   const int64_t* __restrict__ offsets, int K, bool offs_in_smem,
                   const int64_t* __restrict__ logit_class, int64_t* __restrict__ cls,
                   acc_type<scalar_t>* __restrict__ prob, int64_t* __restrict__ group) {
  using acc_t = acc_type<scalar_t>;
  constexpr int CH = chunk_size<acc_t>();
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x % 32;
  acc_t* buf = warp_buffer<acc_t>(smem, 1);
  const Offsets off = setup_offsets(offsets, K, L, smem_offsets<acc_t>(smem, 1, offs_in_smem));
  const acc_t ninf = -inf_of(acc_t(0));
  MOSX_ROW_LOOP(N) {
    const scalar_t* xr = x + row * rs;
    const int shift = row_shift(xr);
    acc_t best_p = ninf;
    int best_g = kNone, best_pos = 0;
    auto consider = [&](int g, int first_class, acc_t av, int ap, Lse<acc_t> st) {
      const acc_t lse = lse_finalize(st);
      const acc_t p = ap == kNone ? nan_of(acc_t(0)) : exp_out(av - lse);
      if (better_max(p, g, best_p, best_g)) {
        best_p = p;
        best_g = g;
        best_pos = ap == kNone ? first_class : ap;
      }
    };
    Lse<acc_t> carry = lse_identity<acc_t>();
    acc_t carry_av = ninf;
    int carry_ap = kNone;
    int g = 0;
    for (int p0 = -shift; p0 < L; p0 += CH) {
      stage_chunk(buf, xr, shift, shift, p0, L, lane);
      g = for_each_group(
          off, g, max(p0, 0), min(p0 + CH, L), lane,
          [&](int gg, int lo, int hi) {
            acc_t av = ninf;
            int ap = kNone;
            for (int q = lo + 1; q < hi; ++q) arg_update(buf[q - p0], q, lo + 1, av, ap);
            consider(gg, lo + 1, av, ap, serial_lse(buf, p0, lo, hi));
          },
          [&](int gg, int a, int b, bool starts, bool ends) {
            const Lse<acc_t> st = coop_lse(buf, p0, a, b, lane, !starts, carry);
            const int first_class = off[gg] + 1;
            acc_t av = ninf;
            int ap = kNone;
            for (int q = max(a, first_class) + lane; q < b; q += 32)
              arg_update(buf[q - p0], q, first_class, av, ap);
            warp_arg(av, ap);
            if (!starts) arg_merge(carry_av, carry_ap, av, ap);
            if (ends) {
              consider(gg, first_class, av, ap, st);
            } else {
              carry = st;
              carry_av = av;
              carry_ap = ap;
            }
          });
    }
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) {
      const acc_t op = __shfl_xor_sync(kFull, best_p, d);
      const int og = __shfl_xor_sync(kFull, best_g, d);
      const int opos = __shfl_xor_sync(kFull, best_pos, d);
      if (better_max(op, og, best_p, best_g)) {
        best_p = op;
        best_g = og;
        best_pos = opos;
      }
    }
    if (lane == 0) {
      int pos = best_g == kNone ? 1 : best_pos;
      pos = pos < 0 ? 0 : (pos >= L ? L - 1 : pos);
      cls[row] = logit_class[pos];
      prob[row] = best_p;
      group[row] = best_g == kNone ? 0 : best_g;
    }
  }
}

// Per-group log-sum-exp of every row. finish(row, g, lse) runs in one lane per group.
// Used by the cross-entropy forward (writes losses and lse) and the softmax forward (lse only).
template <typename scalar_t, typename acc_t, class Finish>
__device__ __forceinline__ void row_group_lse(const scalar_t* xr, int shift, int L, acc_t* buf,
                                              const Offsets& off, int lane, Finish&& finish) {
  constexpr int CH = chunk_size<acc_t>();
  Lse<acc_t> carry = lse_identity<acc_t>();
  int g = 0;
  for (int p0 = -shift; p0 < L; p0 += CH) {
    stage_chunk(buf, xr, shift, shift, p0, L, lane);
    g = for_each_group(
        off, g, max(p0, 0), min(p0 + CH, L), lane,
        [&](int gg, int lo, int hi) { finish(gg, lse_finalize(serial_lse(buf, p0, lo, hi))); },
        [&](int gg, int a, int b, bool starts, bool ends) {
          const Lse<acc_t> st = coop_lse(buf, p0, a, b, lane, !starts, carry);
          if (ends) {
            if (lane == 0) finish(gg, lse_finalize(st));
          } else {
            carry = st;
          }
        });
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_kernel(const scalar_t* __restrict__ x, int64_t N, int L, int64_t rs,
                         const int64_t* __restrict__ offsets, int K, bool offs_in_smem,
                         CeTargets T, acc_type<scalar_t>* __restrict__ losses,
                         acc_type<scalar_t>* __restrict__ lse_out) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x % 32;
  acc_t* buf = warp_buffer<acc_t>(smem, 1);
  const Offsets off = setup_offsets(offsets, K, L, smem_offsets<acc_t>(smem, 1, offs_in_smem));
  MOSX_ROW_LOOP(N) {
    const scalar_t* xr = x + row * rs;
    const int shift = row_shift(xr);
    int class_pos[2] = {0, 0};
    for (int m = 0; m < T.M; ++m) class_pos[m] = ce_class_pos(T, m, row, L);
    row_group_lse(xr, shift, L, buf, off, lane, [&](int g, acc_t lse) {
      lse_out[row * K + g] = lse;
      for (int m = 0; m < T.M; ++m) {
        const int slot = ce_slot(T, off, m, row, g, class_pos[m], L);
        const acc_t loss = slot == -1   ? acc_t(0)
                           : slot == -2 ? nan_of(acc_t(0))
                                        : lse - static_cast<acc_t>(xr[slot]);
        losses[(m * N + row) * K + g] = loss;
      }
    });
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    softmax_kernel(const scalar_t* __restrict__ x, int64_t N, int L, int64_t rs,
                   const int64_t* __restrict__ offsets, int K, bool offs_in_smem, bool log,
                   acc_type<scalar_t>* __restrict__ scratch, scalar_t* __restrict__ y) {
  using acc_t = acc_type<scalar_t>;
  constexpr int CH = chunk_size<acc_t>();
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x % 32;
  acc_t* buf = warp_buffer<acc_t>(smem, 1);
  const Offsets off = setup_offsets(offsets, K, L, smem_offsets<acc_t>(smem, 1, offs_in_smem));
  MOSX_ROW_LOOP(N) {
    const scalar_t* xr = x + row * rs;
    scalar_t* yr = y + row * L;
    acc_t* lse = scratch + row * K;
    const int shift = row_shift(xr), yshift = row_shift(yr);
    row_group_lse(xr, shift, L, buf, off, lane, [&](int g, acc_t v) { lse[g] = v; });
    __syncwarp();  // lse of every group visible to every lane
    const bool one_chunk = L + shift <= CH;  // then buf still holds the row
    int g = 0;
    for (int p0 = -shift; p0 < L; p0 += CH) {
      if (!one_chunk) stage_chunk(buf, xr, shift, shift, p0, L, lane);
      g = for_each_group(
          off, g, max(p0, 0), min(p0 + CH, L), lane,
          [&](int gg, int lo, int hi) {
            const acc_t l = lse[gg];
            for (int q = lo; q < hi; ++q) {
              const acc_t v = buf[q - p0] - l;
              buf[q - p0] = log ? v : exp_out(v);
            }
          },
          [&](int gg, int a, int b, bool, bool) {
            const acc_t l = lse[gg];
            for (int q = a + lane; q < b; q += 32) {
              const acc_t v = buf[q - p0] - l;
              buf[q - p0] = log ? v : exp_out(v);
            }
          });
      store_chunk(yr, yshift, shift, buf, p0, L, lane);
    }
  }
}

// Backward of the group softmax given its output y and the incoming gradient go:
//   softmax:     gx = y * (go - sum(go * y))       log_softmax: gx = go - exp(y) * sum(go)
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    softmax_backward_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ y,
                            int64_t N, int L, const int64_t* __restrict__ offsets, int K,
                            bool offs_in_smem, bool log, acc_type<scalar_t>* __restrict__ scratch,
                            scalar_t* __restrict__ gx) {
  using acc_t = acc_type<scalar_t>;
  constexpr int CH = chunk_size<acc_t>();
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x % 32;
  acc_t* ybuf = warp_buffer<acc_t>(smem, 2);
  acc_t* gbuf = ybuf + CH;
  const Offsets off = setup_offsets(offsets, K, L, smem_offsets<acc_t>(smem, 2, offs_in_smem));
  MOSX_ROW_LOOP(N) {
    const scalar_t* yr = y + row * L;
    const scalar_t* gr = go + row * L;
    scalar_t* gxr = gx + row * L;
    acc_t* sums = scratch + row * K;
    const int shift = row_shift(yr), gshift = row_shift(gr), oshift = row_shift(gxr);
    auto term = [&](int e) { return log ? gbuf[e] : gbuf[e] * ybuf[e]; };
    acc_t carry = 0;
    int g = 0;
    for (int p0 = -shift; p0 < L; p0 += CH) {
      stage_chunk(ybuf, yr, shift, shift, p0, L, lane);
      stage_chunk(gbuf, gr, gshift, shift, p0, L, lane);
      g = for_each_group(
          off, g, max(p0, 0), min(p0 + CH, L), lane,
          [&](int gg, int lo, int hi) {
            acc_t s = 0;
            for (int q = lo; q < hi; ++q) s += term(q - p0);
            sums[gg] = s;
          },
          [&](int gg, int a, int b, bool starts, bool ends) {
            acc_t s = 0;
            for (int q = a + lane; q < b; q += 32) s += term(q - p0);
            s = warp_sum(s);
            if (!starts) s = carry + s;
            if (ends) {
              if (lane == 0) sums[gg] = s;
            } else {
              carry = s;
            }
          });
    }
    __syncwarp();
    const bool one_chunk = L + shift <= CH;
    g = 0;
    for (int p0 = -shift; p0 < L; p0 += CH) {
      if (!one_chunk) {
        stage_chunk(ybuf, yr, shift, shift, p0, L, lane);
        stage_chunk(gbuf, gr, gshift, shift, p0, L, lane);
      }
      auto apply = [&](int e, acc_t s) {
        ybuf[e] = log ? gbuf[e] - exp_out(ybuf[e]) * s : ybuf[e] * (gbuf[e] - s);
      };
      g = for_each_group(
          off, g, max(p0, 0), min(p0 + CH, L), lane,
          [&](int gg, int lo, int hi) {
            const acc_t s = sums[gg];
            for (int q = lo; q < hi; ++q) apply(q - p0, s);
          },
          [&](int gg, int a, int b, bool, bool) {
            const acc_t s = sums[gg];
            for (int q = a + lane; q < b; q += 32) apply(q - p0, s);
          });
      store_chunk(gxr, oshift, shift, ybuf, p0, L, lane);
    }
  }
}

// Gradient of the score: only the arg-min group's slice is non-zero,
// d(-p0)/dx_j = c * exp(x_j - lse) - c [j == others slot], c = grad * p0.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    score_backward_kernel(const acc_type<scalar_t>* __restrict__ grad,
                          const scalar_t* __restrict__ x, int64_t N, int L, int64_t rs,
                          const int64_t* __restrict__ offsets, int K, bool offs_in_smem,
                          const int64_t* __restrict__ min_group,
                          const acc_type<scalar_t>* __restrict__ min_lse,
                          scalar_t* __restrict__ gx) {
  using acc_t = acc_type<scalar_t>;
  constexpr int CH = chunk_size<acc_t>();
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x % 32;
  acc_t* buf = warp_buffer<acc_t>(smem, 1);
  const Offsets off = setup_offsets(offsets, K, L, smem_offsets<acc_t>(smem, 1, offs_in_smem));
  MOSX_ROW_LOOP(N) {
    const scalar_t* xr = x + row * rs;
    scalar_t* gxr = gx + row * L;
    const int shift = row_shift(xr), oshift = row_shift(gxr);
    const int64_t k = min_group[row];
    const bool valid = k >= 0 && k < K;
    const int lo = valid ? off[static_cast<int>(k)] : 0;
    const int hi = valid ? off[static_cast<int>(k) + 1] : L;
    const acc_t lse = min_lse[row];
    acc_t c = nan_of(acc_t(0));  // an invalid group index poisons the row (the CPU raises)
    if (valid && lo < L) c = grad[row] * exp_out(static_cast<acc_t>(xr[lo]) - lse);
    for (int p0 = -shift; p0 < L; p0 += CH) {
      if (p0 + CH > lo && p0 < hi) {
        stage_chunk(buf, xr, shift, shift, p0, L, lane);
        for (int e = lane; e < CH; e += 32) {
          const int q = p0 + e;
          acc_t v = 0;
          if (q >= lo && q < hi) {
            v = c * exp_out(buf[e] - lse);
            if (q == lo) v -= c;
          }
          buf[e] = valid ? v : nan_of(acc_t(0));
        }
      } else {
        __syncwarp();
        for (int e = lane; e < CH; e += 32) buf[e] = acc_t(0);
      }
      store_chunk(gxr, oshift, shift, buf, p0, L, lane);
    }
  }
}

// Cross-entropy backward from the saved per-group lse:
//   gx = sum_m coef_m * softmax_k(x) - sum_m coef_m * onehot(slot_mk) on every slice k.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_backward_kernel(const acc_type<scalar_t>* __restrict__ grad,
                                  const scalar_t* __restrict__ x, int64_t N, int L, int64_t rs,
                                  const int64_t* __restrict__ offsets, int K, bool offs_in_smem,
                                  CeTargets T, const acc_type<scalar_t>* __restrict__ lse_in,
                                  scalar_t* __restrict__ gx) {
  using acc_t = acc_type<scalar_t>;
  constexpr int CH = chunk_size<acc_t>();
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x % 32;
  acc_t* buf = warp_buffer<acc_t>(smem, 1);
  const Offsets off = setup_offsets(offsets, K, L, smem_offsets<acc_t>(smem, 1, offs_in_smem));
  MOSX_ROW_LOOP(N) {
    const scalar_t* xr = x + row * rs;
    scalar_t* gxr = gx + row * L;
    const int shift = row_shift(xr), oshift = row_shift(gxr);
    int class_pos[2] = {0, 0};
    for (int m = 0; m < T.M; ++m) class_pos[m] = ce_class_pos(T, m, row, L);
    // Per-group constants, then the elementwise gradient of [lo, hi) positions of the chunk.
    auto apply = [&](int g, int first, int end, int step, int p0) {
      const acc_t lse = lse_in[row * K + g];
      acc_t total = 0, coef[2] = {0, 0};
      int slot[2] = {-1, -1};
      for (int m = 0; m < T.M; ++m) {
        const int s = ce_slot(T, off, m, row, g, class_pos[m], L);
        if (s == -2) {
          total = nan_of(acc_t(0));
        } else if (s >= 0) {
          slot[m] = s;
          coef[m] = grad[(m * N + row) * K + g];
          total += coef[m];
        }
      }
      for (int q = first; q < end; q += step) {
        acc_t v = total * exp_out(buf[q - p0] - lse);
        if (q == slot[0]) v -= coef[0];
        if (q == slot[1]) v -= coef[1];
        buf[q - p0] = v;
      }
    };
    int g = 0;
    for (int p0 = -shift; p0 < L; p0 += CH) {
      stage_chunk(buf, xr, shift, shift, p0, L, lane);
      g = for_each_group(
          off, g, max(p0, 0), min(p0 + CH, L), lane,
          [&](int gg, int lo, int hi) { apply(gg, lo, hi, 1, p0); },
          [&](int gg, int a, int b, bool, bool) { apply(gg, a + lane, b, 32, p0); });
      store_chunk(gxr, oshift, shift, buf, p0, L, lane);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor unit_inner_stride(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

int num_sms() {
  static std::atomic<int> cache[64];
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 0 && dev < 64) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (dev >= 0 && dev < 64) cache[dev].store(sms, std::memory_order_relaxed);
  return sms;
}

struct LaunchPlan {
  int blocks;
  size_t smem;
  bool offs_in_smem;
};

// Offsets as the kernels read them: contiguous; with more groups than fit in shared memory,
// also clamped to [0, L] and made non-decreasing here (the kernels do it in shared memory).
at::Tensor kernel_offsets(const at::Tensor& offsets, int64_t L) {
  if (offsets.numel() <= kOffsetsInSmem) return offsets.contiguous();
  return std::get<0>(at::cummax(at::clamp(offsets, 0, L), 0)).contiguous();
}

LaunchPlan plan_launch(int64_t N, int64_t K, int nin) {
  LaunchPlan p;
  p.offs_in_smem = K + 1 <= kOffsetsInSmem;
  p.smem = static_cast<size_t>(kWarps) * nin * kChunkBytes +
           (p.offs_in_smem ? static_cast<size_t>(K + 1) * sizeof(int) : 0);
  const int64_t max_blocks = static_cast<int64_t>(num_sms()) * (2048 / kThreads);
  p.blocks = static_cast<int>(std::max<int64_t>(1, std::min((N + kWarps - 1) / kWarps, max_blocks)));
  return p;
}

// Checks shared by every op; returns (L, K). Offsets values are validated by mosx.Groups in
// Python (reading them here would need a device sync); the kernels clamp them.
std::pair<int, int> check_common(const at::Tensor& logits, const at::Tensor& offsets,
                                 const char* op) {
  check_logits(logits, op);
  check_offsets_meta(logits, offsets, op);
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor here, got ", logits.device());
  const int64_t L = logits.size(1), K = offsets.numel() - 1;
  TORCH_CHECK(L >= 2 * K, op, ": logits have ", L, " columns but ", K,
              " groups need at least ", 2 * K, " (an others slot and a class each)");
  TORCH_CHECK(L <= INT_MAX - 2 * kChunkBytes, op, ": logits have ", L,
              " columns; at most 2^31 - 8193 are supported");
  return {static_cast<int>(L), static_cast<int>(K)};
}

void check_aligned(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.const_data_ptr()) % t.element_size() == 0, op, ": ",
              name, " data pointer is not aligned to its element size");
}

#define MOSX_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

at::Tensor group_softmax_cuda(const at::Tensor& logits_in, const at::Tensor& offsets_in,
                              bool log) {
  const char* op = "mosx.group_softmax";
  const auto [L, K] = check_common(logits_in, offsets_in, op);
  c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor x = unit_inner_stride(logits_in);
  const at::Tensor offsets = kernel_offsets(offsets_in, L);
  const int64_t N = x.size(0);
  at::Tensor y = at::empty({N, L}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return y;
  check_aligned(x, "logits", op);
  at::Tensor scratch = at::empty({N, K}, x.options().dtype(acc_dtype(x)));
  const LaunchPlan p = plan_launch(N, K, 1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MOSX_DISPATCH_FLOATS(x.scalar_type(), "mosx.group_softmax", [&] {
    using acc_t = acc_type<scalar_t>;
    softmax_kernel<scalar_t><<<p.blocks, kThreads, p.smem, stream>>>(
        x.const_data_ptr<scalar_t>(), N, L, x.stride(0), offsets.const_data_ptr<int64_t>(), K,
        p.offs_in_smem, log, scratch.mutable_data_ptr<acc_t>(), y.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor group_softmax_backward_cuda(const at::Tensor& grad_in, const at::Tensor& out_in,
                                       const at::Tensor& offsets_in, bool log) {
  const char* op = "mosx.group_softmax_backward";
  const auto [L, K] = check_common(out_in, offsets_in, op);
  TORCH_CHECK(grad_in.sizes() == out_in.sizes(), op, ": grad_out has shape ", grad_in.sizes(),
              " but the softmax output has shape ", out_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == out_in.scalar_type(), op, ": grad_out is ",
              grad_in.scalar_type(), " but the softmax output is ", out_in.scalar_type());
  check_same_device(grad_in, "grad_out", out_in, op);
  c10::cuda::CUDAGuard guard(out_in.device());
  const at::Tensor g = grad_in.contiguous(), y = out_in.contiguous();
  const at::Tensor offsets = kernel_offsets(offsets_in, L);
  const int64_t N = y.size(0);
  at::Tensor gx = at::empty({N, L}, y.options());
  if (N == 0) return gx;
  check_aligned(g, "grad_out", op);
  check_aligned(y, "out", op);
  at::Tensor scratch = at::empty({N, K}, y.options().dtype(acc_dtype(y)));
  const LaunchPlan p = plan_launch(N, K, 2);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MOSX_DISPATCH_FLOATS(y.scalar_type(), "mosx.group_softmax_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    softmax_backward_kernel<scalar_t><<<p.blocks, kThreads, p.smem, stream>>>(
        g.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), N, L,
        offsets.const_data_ptr<int64_t>(), K, p.offs_in_smem, log,
        scratch.mutable_data_ptr<acc_t>(), gx.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_softmax_score_cuda(
    const at::Tensor& logits_in, const at::Tensor& offsets_in) {
  const char* op = "mosx.group_softmax_score";
  const auto [L, K] = check_common(logits_in, offsets_in, op);
  c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor x = unit_inner_stride(logits_in);
  const at::Tensor offsets = kernel_offsets(offsets_in, L);
  const int64_t N = x.size(0);
  const auto acc = x.options().dtype(acc_dtype(x));
  at::Tensor score = at::empty({N}, acc);
  at::Tensor min_group = at::empty({N}, x.options().dtype(at::kLong));
  at::Tensor min_lse = at::empty({N}, acc);
  if (N == 0) return {score, min_group, min_lse};
  check_aligned(x, "logits", op);
  const LaunchPlan p = plan_launch(N, K, 1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MOSX_DISPATCH_FLOATS(x.scalar_type(), "mosx.group_softmax_score", [&] {
    using acc_t = acc_type<scalar_t>;
    score_kernel<scalar_t><<<p.blocks, kThreads, p.smem, stream>>>(
        x.const_data_ptr<scalar_t>(), N, L, x.stride(0), offsets.const_data_ptr<int64_t>(), K,
        p.offs_in_smem, score.mutable_data_ptr<acc_t>(), min_group.mutable_data_ptr<int64_t>(),
        min_lse.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {score, min_group, min_lse};
}

at::Tensor group_softmax_score_backward_cuda(const at::Tensor& grad_score,
                                             const at::Tensor& logits_in,
                                             const at::Tensor& offsets_in,
                                             const at::Tensor& min_group_in,
                                             const at::Tensor& min_lse_in) {
  const char* op = "mosx.group_softmax_score_backward";
  const auto [L, K] = check_common(logits_in, offsets_in, op);
  const at::Tensor x = unit_inner_stride(logits_in);
  const int64_t N = x.size(0);
  TORCH_CHECK(grad_score.dim() == 1 && grad_score.size(0) == N && min_group_in.numel() == N &&
                  min_lse_in.numel() == N,
              op, ": grad_score, min_group and min_lse must all be [N] = [", N, "]");
  TORCH_CHECK(min_group_in.scalar_type() == at::kLong, op, ": min_group must be int64, got ",
              min_group_in.scalar_type());
  check_same_device(grad_score, "grad_score", x, op);
  check_same_device(min_group_in, "min_group", x, op);
  check_same_device(min_lse_in, "min_lse", x, op);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor offsets = kernel_offsets(offsets_in, L);
  const at::Tensor g = grad_score.to(acc_dtype(x)).contiguous();
  const at::Tensor mg = min_group_in.contiguous(), ml = min_lse_in.to(acc_dtype(x)).contiguous();
  at::Tensor gx = at::empty({N, L}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return gx;
  check_aligned(x, "logits", op);
  const LaunchPlan p = plan_launch(N, K, 1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MOSX_DISPATCH_FLOATS(x.scalar_type(), "mosx.group_softmax_score_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    score_backward_kernel<scalar_t><<<p.blocks, kThreads, p.smem, stream>>>(
        g.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), N, L, x.stride(0),
        offsets.const_data_ptr<int64_t>(), K, p.offs_in_smem, mg.const_data_ptr<int64_t>(),
        ml.const_data_ptr<acc_t>(), gx.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_predict_cuda(
    const at::Tensor& logits_in, const at::Tensor& offsets_in, const at::Tensor& logit_class_in) {
  const char* op = "mosx.group_predict";
  const auto [L, K] = check_common(logits_in, offsets_in, op);
  TORCH_CHECK(logit_class_in.dim() == 1 && logit_class_in.size(0) == L &&
                  logit_class_in.scalar_type() == at::kLong,
              op, ": logit_class must be an int64 tensor of shape [L] = [", L, "], got ",
              logit_class_in.scalar_type(), " ", logit_class_in.sizes());
  check_same_device(logit_class_in, "logit_class", logits_in, op);
  c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor x = unit_inner_stride(logits_in);
  const at::Tensor offsets = kernel_offsets(offsets_in, L), lc = logit_class_in.contiguous();
  const int64_t N = x.size(0);
  at::Tensor cls = at::empty({N}, x.options().dtype(at::kLong));
  at::Tensor prob = at::empty({N}, x.options().dtype(acc_dtype(x)));
  at::Tensor group = at::empty({N}, x.options().dtype(at::kLong));
  if (N == 0) return {cls, prob, group};
  check_aligned(x, "logits", op);
  const LaunchPlan p = plan_launch(N, K, 1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MOSX_DISPATCH_FLOATS(x.scalar_type(), "mosx.group_predict", [&] {
    using acc_t = acc_type<scalar_t>;
    predict_kernel<scalar_t><<<p.blocks, kThreads, p.smem, stream>>>(
        x.const_data_ptr<scalar_t>(), N, L, x.stride(0), offsets.const_data_ptr<int64_t>(), K,
        p.offs_in_smem, lc.const_data_ptr<int64_t>(), cls.mutable_data_ptr<int64_t>(),
        prob.mutable_data_ptr<acc_t>(), group.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {cls, prob, group};
}

CeTargets make_targets(const at::Tensor& t, const at::Tensor& cl, int64_t N,
                       int64_t ignore_index) {
  const bool per_group = t.dim() == 3;
  return CeTargets{t.const_data_ptr<int64_t>(),
                   per_group ? nullptr : cl.const_data_ptr<int64_t>(),
                   N,
                   per_group ? 0 : cl.numel(),
                   ignore_index,
                   static_cast<int>(t.size(0)),
                   per_group};
}

std::tuple<at::Tensor, at::Tensor> group_cross_entropy_cuda(const at::Tensor& logits_in,
                                                            const at::Tensor& offsets_in,
                                                            const at::Tensor& targets_in,
                                                            const at::Tensor& class_logit_in,
                                                            int64_t ignore_index) {
  const char* op = "mosx.group_cross_entropy";
  const auto [L, K] = check_common(logits_in, offsets_in, op);
  check_targets(logits_in, offsets_in, targets_in, class_logit_in, op);
  c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor x = unit_inner_stride(logits_in);
  const at::Tensor offsets = kernel_offsets(offsets_in, L);
  const at::Tensor t = targets_in.contiguous();
  const at::Tensor cl = targets_in.dim() == 3 ? class_logit_in : class_logit_in.contiguous();
  const int64_t N = x.size(0), M = t.size(0);
  const auto acc = x.options().dtype(acc_dtype(x));
  at::Tensor losses = at::empty({M, N, K}, acc);
  at::Tensor lse = at::empty({N, K}, acc);
  if (N == 0) return {losses, lse};
  check_aligned(x, "logits", op);
  const CeTargets T = make_targets(t, cl, N, ignore_index);
  const LaunchPlan p = plan_launch(N, K, 1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MOSX_DISPATCH_FLOATS(x.scalar_type(), "mosx.group_cross_entropy", [&] {
    using acc_t = acc_type<scalar_t>;
    cross_entropy_kernel<scalar_t><<<p.blocks, kThreads, p.smem, stream>>>(
        x.const_data_ptr<scalar_t>(), N, L, x.stride(0), offsets.const_data_ptr<int64_t>(), K,
        p.offs_in_smem, T, losses.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {losses, lse};
}

at::Tensor group_cross_entropy_backward_cuda(const at::Tensor& grad_losses_in,
                                             const at::Tensor& logits_in,
                                             const at::Tensor& offsets_in,
                                             const at::Tensor& targets_in,
                                             const at::Tensor& class_logit_in,
                                             const at::Tensor& lse_in, int64_t ignore_index) {
  const char* op = "mosx.group_cross_entropy_backward";
  const auto [L, K] = check_common(logits_in, offsets_in, op);
  check_targets(logits_in, offsets_in, targets_in, class_logit_in, op);
  const at::Tensor x = unit_inner_stride(logits_in);
  const int64_t N = x.size(0), M = targets_in.size(0);
  TORCH_CHECK(grad_losses_in.dim() == 3 && grad_losses_in.size(0) == M &&
                  grad_losses_in.size(1) == N && grad_losses_in.size(2) == K,
              op, ": grad_losses must be [M, N, K] = [", M, ", ", N, ", ", K, "], got ",
              grad_losses_in.sizes());
  TORCH_CHECK(lse_in.dim() == 2 && lse_in.size(0) == N && lse_in.size(1) == K, op,
              ": lse must be [N, K] = [", N, ", ", K, "], got ", lse_in.sizes());
  check_same_device(grad_losses_in, "grad_losses", x, op);
  check_same_device(lse_in, "lse", x, op);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor offsets = kernel_offsets(offsets_in, L);
  const at::Tensor t = targets_in.contiguous();
  const at::Tensor cl = targets_in.dim() == 3 ? class_logit_in : class_logit_in.contiguous();
  const at::Tensor g = grad_losses_in.to(acc_dtype(x)).contiguous();
  const at::Tensor lse = lse_in.to(acc_dtype(x)).contiguous();
  at::Tensor gx = at::empty({N, L}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return gx;
  check_aligned(x, "logits", op);
  const CeTargets T = make_targets(t, cl, N, ignore_index);
  const LaunchPlan p = plan_launch(N, K, 1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MOSX_DISPATCH_FLOATS(x.scalar_type(), "mosx.group_cross_entropy_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    cross_entropy_backward_kernel<scalar_t><<<p.blocks, kThreads, p.smem, stream>>>(
        g.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), N, L, x.stride(0),
        offsets.const_data_ptr<int64_t>(), K, p.offs_in_smem, T, lse.const_data_ptr<acc_t>(),
        gx.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(mosx, CUDA, m) {
  m.impl("group_softmax", &group_softmax_cuda);
  m.impl("group_softmax_backward", &group_softmax_backward_cuda);
  m.impl("group_softmax_score", &group_softmax_score_cuda);
  m.impl("group_softmax_score_backward", &group_softmax_score_backward_cuda);
  m.impl("group_predict", &group_predict_cuda);
  m.impl("group_cross_entropy", &group_cross_entropy_cuda);
  m.impl("group_cross_entropy_backward", &group_cross_entropy_backward_cuda);
}

}  // namespace mosx
