// The register-row ("fast") tier of the CUDA kernels: rows of at most kFastMaxPer * 32 logits
// (plus the alignment shift) and at most kFastMaxGroups groups, in which every row shares one
// 16-byte alignment shift (host-checked: 16-byte multiple row stride).
//
// One warp per row, a grid-stride loop over rows (one resident wave):
//  * lane l holds the row positions t * 32V + l * V + j - shift (tile t = 0 .. NV - 1, j < V,
//    V = 16 bytes / element): one 16-byte load per tile, all NV of them issued before any is
//    used; the few vectors that cross the row's edges use scalar loads, so no byte outside the
//    row is read.
//  * the loads of the warp's next row are issued into `raw` right after the current row's
//    values are converted, so they are in flight while this row reduces.
//  * per group (a warp-uniform loop over K, bounded by L through the tiles): one max pass and
//    one exp-sum pass over the registers, each visiting only the tiles the group intersects
//    (a warp-uniform test), the per-element range test only in the group's first and last tile.
//  * loops are bounded by NV (the tier is the smallest that holds L + shift).
#pragma once

#include "common.cuh"

namespace mosx {
namespace cuda_detail {

constexpr int kFastMaxGroups = 32;
// Values per lane of the three tiers: rows up to 256, 1024 and 2048 positions (L + shift).
constexpr int kFastTiers[3] = {8, 32, 64};

template <typename scalar_t, int PER>
struct FastRow {
  using acc_t = acc_type_t<scalar_t>;
  static constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
  static constexpr int NV = PER / V;
  static constexpr int TILE = 32 * V;
  static_assert(PER % V == 0 && NV >= 1, "a tier holds whole vectors");

  uint4 raw[NV];   // the loads of the next row (in flight)
  acc_t v[NV][V];  // the current row, converted

  // Issue the loads of row xr (shift = its alignment, the same for every row).
  __device__ __forceinline__ void load(const scalar_t* __restrict__ xr, int shift, int L,
                                       int lane) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
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
    m = warp_max(m);
    if (want_arg) warp_arg(av, ap);
    // the lane that holds position lo
    x0 = __shfl_sync(kFull, first, ((lo + shift) % TILE) / V);
    acc_t s = 0;
    for_range(lo, hi, shift, lane, [&](int i, int j, int) { s += exp_sum(v[i][j] - m); });
    s = warp_sum(s);
    return {m, s};
  }
};

// The grid-stride loop of a fast kernel: body(row, fr) for every row of this warp, with the next
// row's loads in flight during body.
template <typename scalar_t, int PER, class Body>
__device__ __forceinline__ void fast_row_loop(const scalar_t* __restrict__ x, int64_t N, int L,
                                              int64_t rs, int shift, int lane, Body&& body) {
  FastRow<scalar_t, PER> fr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row < N) fr.load(x + row * rs, shift, L, lane);
  for (; row < N; row += stride) {
    fr.convert();
    const int64_t next = row + stride;
    if (next < N) fr.load(x + next * rs, shift, L, lane);
    body(row, fr);
  }
}

// The tier (values per lane) for rows of L logits at alignment shift, or 0 when the fast path
// does not apply (double rows are limited to the first two tiers: registers).
inline int fast_tier(int L, int K, int shift, size_t element_size) {
  if (shift < 0 || K > kFastMaxGroups) return 0;
  const int per = (L + shift + 31) / 32;
  const int tiers = element_size == 8 ? 2 : 3;
  for (int t = 0; t < tiers; ++t)
    if (per <= kFastTiers[t]) return kFastTiers[t];
  return 0;
}

// Launch a fast kernel template instantiated for the tier: LAUNCH(PER) is a macro-free lambda
// taking std::integral_constant<int, PER>.
template <class F>
inline void with_fast_tier(int per, F&& f) {
  switch (per) {
    case 8:
      f(std::integral_constant<int, 8>());
      break;
    case 32:
      f(std::integral_constant<int, 32>());
      break;
    default:
      f(std::integral_constant<int, 64>());
      break;
  }
}

}  // namespace cuda_detail
}  // namespace mosx
