// The register-row ("fast") tier of the CUDA kernels: rows of at most 2048 positions (L plus the
// alignment shift) and at most kFastMaxGroups groups, in which every row shares one 16-byte
// alignment shift (host-checked: 16-byte multiple row stride).
//
// LANES lanes per row (32: a warp per row; 8 or 16: four or two rows per warp for short rows), a
// grid-stride loop over the warp's rows (one resident wave):
//  * lane l (of the row's LANES) holds the row positions t * LANES*V + l * V + j - shift (tile
//    t = 0 .. NV - 1, j < V, V = 16 bytes / element): one 16-byte load per tile, all NV of them
//    issued before any is used; the few vectors that cross the row's edges use scalar loads, so
//    no byte outside the row is read.
//  * the loads of the warp's next rows are issued into `raw` right after the current rows'
//    values are converted, so they are in flight while these rows reduce.
//  * per group (a warp-uniform loop over K, bounded by L through the tiles): one max pass and
//    one exp-sum pass over the registers, each visiting only the tiles the group intersects
//    (a warp-uniform test), the per-element range test only in the group's first and last tile;
//    the reductions stay within the row's LANES lanes.
//  * loops are bounded by NV (the tier is the smallest that holds L + shift).
// With several rows per warp every lane runs every row slot of the loop (the shuffles need the
// whole warp); a slot past the last row has `active` false, loads nothing and writes nothing.
#pragma once

#include "common.cuh"

namespace mosx {
namespace cuda_detail {

constexpr int kFastMaxGroups = 32;

// A register tier: `lanes` lanes per row holding `per` values each (rows up to lanes * per
// positions, L + shift). The five tiers: 8 x 8 (64 positions, four rows per warp), 16 x 8 (128,
// two rows per warp), 32 x 8 (256), 32 x 32 (1024) and 32 x 64 (2048; not for float64).
struct FastTier {
  int lanes = 0, per = 0;
};
constexpr FastTier kFastTiers[5] = {{8, 8}, {16, 8}, {32, 8}, {32, 32}, {32, 64}};

template <typename scalar_t, int PER, int LANES = 32>
struct FastRow {
  using acc_t = acc_type_t<scalar_t>;
  static constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
  static constexpr int NV = PER / V;
  static constexpr int TILE = LANES * V;
  static_assert(PER % V == 0 && NV >= 1, "a tier holds whole vectors");
  static_assert(LANES == 8 || LANES == 16 || LANES == 32, "a row takes 8, 16 or 32 lanes");

  uint4 raw[NV];   // the loads of the next row (in flight)
  acc_t v[NV][V];  // the current row, converted

  // Issue the loads of row xr (shift = its alignment, the same for every row); lane is the lane
  // within the row's LANES. An inactive slot (no row) loads zeros.
  __device__ __forceinline__ void load(const scalar_t* __restrict__ xr, int shift, int L, int lane,
                                       bool active = true) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      if (!active) {
        raw[i] = make_uint4(0u, 0u, 0u, 0u);
        continue;
      }
      const int q = i * TILE + lane * V - shift;
      if (q >= 0 && q + V <= L) {
        raw[i] = *reinterpret_cast<const uint4*>(xr + q);
      } else {
        scalar_t tmp[V];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int qq = q + j;
          tmp[j] = (qq >= 0 && qq < L) ? xr[qq] : scalar_t(0);
        }
        memcpy(&raw[i], tmp, sizeof(uint4));
      }
    }
  }

  __device__ __forceinline__ void convert() {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      scalar_t tmp[V];
      memcpy(tmp, &raw[i], sizeof(uint4));
#pragma unroll
      for (int j = 0; j < V; ++j) v[i][j] = static_cast<acc_t>(tmp[j]);
    }
  }

  // Write the row's values (converted to scalar_t) to yr, whose rows share this alignment shift.
  __device__ __forceinline__ void store(scalar_t* __restrict__ yr, int shift, int L,
                                        int lane) const {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int q = i * TILE + lane * V - shift;
      if (q >= 0 && q + V <= L) {
        scalar_t tmp[V];
#pragma unroll
        for (int j = 0; j < V; ++j) tmp[j] = static_cast<scalar_t>(v[i][j]);
        uint4 r;
        memcpy(&r, tmp, sizeof(uint4));
        store16(yr + q, r);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int qq = q + j;
          if (qq >= 0 && qq < L) yr[qq] = static_cast<scalar_t>(v[i][j]);
        }
      }
    }
  }

  // f(i, j, pos) for each of this lane's values whose position lies in [lo, hi) (i, j are
  // compile-time after unrolling, so v[i][j] stays in a register).
  template <class F>
  __device__ __forceinline__ static void for_range(int lo, int hi, int shift, int lane, F&& f) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int t0 = i * TILE - shift;
      if (t0 < hi && t0 + TILE > lo) {  // warp-uniform
        const bool full = t0 >= lo && t0 + TILE <= hi;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int pos = t0 + lane * V + j;
          if (full || (pos >= lo && pos < hi)) f(i, j, pos);
        }
      }
    }
  }

  // (m, s) of the group [lo, hi) and its first value x0 (all lanes get identical bits). With
  // want_arg also the first arg-max (av, ap) of the class values (positions > lo).
  template <bool want_arg>
  __device__ __forceinline__ Lse<acc_t> group(int lo, int hi, int shift, int lane, acc_t& x0,
                                              acc_t& av, int& ap) const {
    acc_t m = lowest_of(acc_t(0)), first = 0;
    av = -inf_of(acc_t(0));
    ap = kNone;
    for_range(lo, hi, shift, lane, [&](int i, int j, int pos) {
      const acc_t x = v[i][j];
      m = vmax(m, x);
      if (pos == lo) first = x;
      if (want_arg && pos != lo) arg_update(x, pos, av, ap);
    });
    m = warp_max<LANES>(m);
    if (want_arg) warp_arg<LANES>(av, ap);
    // the lane (of this row's LANES) that holds position lo
    x0 = __shfl_sync(kFull, first, ((lo + shift) % TILE) / V, LANES);
    acc_t s = 0;
    for_range(lo, hi, shift, lane, [&](int i, int j, int) { s += exp_sum(v[i][j] - m); });
    s = warp_sum<LANES>(s);
    return {m, s};
  }
};

// One row slot of a warp: its row, whether that row exists, the lane within the row's LANES
// (`lane`, for FastRow) and within the warp (`warp_lane`, for the whole-warp helpers).
struct RowSlot {
  int64_t row;
  int64_t first_row;  // the row of slot 0 of this warp (the warp's rows are first_row + slot)
  int slot;           // 0 .. 32 / LANES - 1
  int lane, warp_lane;
  bool active;
  __device__ __forceinline__ bool leader() const { return active && lane == 0; }
};

// The grid-stride loop of a fast kernel: body(slot, fr) for every row slot of this warp (every
// lane runs every slot; see RowSlot::active), with the next rows' loads in flight during body.
template <typename scalar_t, int PER, int LANES, class Body>
__device__ __forceinline__ void fast_row_loop(const scalar_t* __restrict__ x, int64_t N, int L,
                                              int64_t rs, int shift, Body&& body) {
  constexpr int R = 32 / LANES;  // rows per warp
  FastRow<scalar_t, PER, LANES> fr;
  const int warp_lane = threadIdx.x % 32, slot = warp_lane / LANES, lane = warp_lane % LANES;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps * R;
  int64_t base = (static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32) * R;
  if (base < N) fr.load(x + (base + slot) * rs, shift, L, lane, base + slot < N);
  for (; base < N; base += stride) {  // warp-uniform
    fr.convert();
    const int64_t next = base + stride;
    if (next < N) fr.load(x + (next + slot) * rs, shift, L, lane, next + slot < N);
    body(RowSlot{base + slot, base, slot, lane, warp_lane, base + slot < N}, fr);
  }
}

// Decide again, from canonical sums, the rows whose pick is a near-tie: canon(row) is a
// whole-warp helper (canonical_score / canonical_predict), so with several rows per warp the
// warp visits the tied rows one after the other.
template <int LANES, class P, class Canon>
__device__ __forceinline__ void recheck_near_ties(P& best, bool near, const RowSlot& r,
                                                  Canon&& canon) {
  if constexpr (LANES == 32) {
    if (near) best = canon(r.row);  // uniform: every lane holds the same pick
  } else {
    unsigned tied = __ballot_sync(kFull, near && r.leader());
    while (tied != 0) {
      const int s = (__ffs(tied) - 1) / LANES;
      tied &= tied - 1;
      const P b = canon(r.first_row + s);
      if (r.slot == s) best = b;
    }
  }
}

// The register tier for rows of L logits at alignment shift, or {0, 0} when it does not apply
// (float64 rows are limited to 1024 positions: registers).
inline FastTier fast_tier(int L, int K, int shift, size_t element_size) {
  if (shift < 0 || K > kFastMaxGroups) return {};
  for (const FastTier& t : kFastTiers)
    if (L + shift <= t.lanes * t.per && !(element_size == 8 && t.per > 32)) return t;
  return {};
}

// Run f(std::integral_constant<int, PER>, std::integral_constant<int, LANES>) for the tier.
template <class F>
inline void with_fast_tier(FastTier t, F&& f) {
  using std::integral_constant;
  if (t.lanes == 8) {
    f(integral_constant<int, 8>(), integral_constant<int, 8>());
  } else if (t.lanes == 16) {
    f(integral_constant<int, 8>(), integral_constant<int, 16>());
  } else if (t.per == 8) {
    f(integral_constant<int, 8>(), integral_constant<int, 32>());
  } else if (t.per == 32) {
    f(integral_constant<int, 32>(), integral_constant<int, 32>());
  } else {
    f(integral_constant<int, 64>(), integral_constant<int, 32>());
  }
}

}  // namespace cuda_detail
}  // namespace mosx
