// The shared-memory row ("block") tier of the CUDA kernels: one block of kBlockThreads threads
// per row, for the rows the register tier (fast_rows.cuh) cannot hold: wider than 2048
// positions, more than 32 groups, or rows that do not all share one alignment shift.
//
//  * The whole row is copied into shared memory with cp.async (16-byte copies that bypass the
//    registers, every one of them in flight at once), double-buffered: the block's next row is
//    in flight while this one reduces. The two partial vectors at a row's edges are loaded into
//    registers and written to shared memory after this row's work, so they never stall it.
//  * The groups are cut into segments of at most kSegment logits (a table built once per block:
//    the offsets are the same for every row). Phase 1: one thread per segment computes its
//    (max, sum) serially (and, for the prediction, its first arg-max in the same pass as the max).
//    Phase 2: a group's segments are merged in segment order, by one thread (groups of at most
//    kSerialSegments segments) or one warp (the wider groups, listed once per block). Every order of
//    operations depends only on the group's size, never on the row, the block or the timing:
//    the results are bitwise reproducible, and the near-tie recheck (common.cuh) still makes
//    bit-identical groups tie exactly.
//  * The op then reads the per-group (m, s) from shared memory (and the softmax rewrites the
//    staged row in place and stores it with 16-byte stores). The score and the prediction pick
//    their group with every warp (groups strided over the block's threads), then merge the
//    warps' picks (block_merge).
// Applies where the layout of block_layout fits in the device's shared memory and K + 1 is at
// most kOffsetsInSmem.
#pragma once

#include "common.cuh"

namespace mosx {
namespace cuda_detail {

constexpr int kBlockThreads = 256;
constexpr int kBlockWarps = kBlockThreads / 32;
// Logits per segment: odd, so that the threads of a warp reading their segments' i-th entries
// (63 elements apart) hit different shared-memory banks.
constexpr int kSegment = 63;
// Groups of up to this many segments are merged by one thread, wider ones by a warp.
constexpr int kSerialSegments = 8;
// Bytes of one warp's pick (Pick<largest, acc_t>, common.cuh) in shared memory.
constexpr int kPickBytes = 32;

__host__ __device__ constexpr size_t align16(size_t b) { return (b + 15) / 16 * 16; }

// Shared-memory layout of a block-tier kernel (byte offsets; the same on host and device).
struct BlockLayout {
  int K, L, max_segments, max_wide, row_elems;
  size_t offs, seg_first, seg_group, seg_m, seg_s, seg_av, seg_ap, grp_m, grp_s, grp_av, grp_ap,
      wide, picks, rows, bytes;
};

// Segments of a group of n logits.
__host__ __device__ constexpr int segments_of(int n) {
  return n <= 0 ? 0 : (n + kSegment - 1) / kSegment;
}

// esize / asize: bytes of an input element and of the accumulation type. The segment count is
// bounded without reading the offsets: sum_g ceil(n_g / kSegment) <= L / kSegment + K; a wide
// group (more than kSerialSegments segments) has more than kSerialSegments * kSegment logits.
__host__ __device__ inline BlockLayout block_layout(int K, int L, int esize, int asize,
                                                    bool want_arg) {
  BlockLayout b{};
  b.K = K;
  b.L = L;
  b.max_segments = L / kSegment + K;
  b.max_wide = min(K, L / (kSerialSegments * kSegment + 1));
  const int V = 16 / esize;
  b.row_elems = (L + V - 1 + V - 1) / V * V;  // a row at any alignment shift, whole vectors
  const size_t S = static_cast<size_t>(b.max_segments), G = static_cast<size_t>(K);
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t here = at;
    at = align16(at + bytes);
    return here;
  };
  b.offs = take((G + 1) * sizeof(int));
  b.seg_first = take((G + 1) * sizeof(int));
  b.seg_group = take(S * sizeof(int));
  b.seg_m = take(S * asize);
  b.seg_s = take(S * asize);
  b.seg_av = take(want_arg ? S * asize : 0);
  b.seg_ap = take(want_arg ? S * sizeof(int) : 0);
  b.grp_m = take(G * asize);
  b.grp_s = take(G * asize);
  b.grp_av = take(want_arg ? G * asize : 0);
  b.grp_ap = take(want_arg ? G * sizeof(int) : 0);
  b.wide = take((static_cast<size_t>(b.max_wide) + 1) * sizeof(int));  // the count, then the list
  b.picks = take(static_cast<size_t>(kBlockWarps) * kPickBytes);
  b.rows = take(2 * static_cast<size_t>(b.row_elems) * esize);
  b.bytes = at;
  return b;
}

// ---------------------------------------------------------------------------------------------
// cp.async (sm_80 and newer; a plain copy through the registers before).

// MOSX_CUDA_EMULATION: tools/cuda_emu runs this code on the CPU, with copies that land late.
__device__ __forceinline__ void copy16_async(void* smem_dst, const void* gmem_src) {
#if defined(MOSX_CUDA_EMULATION)
  ::mosx_emu::copy16_async(smem_dst, gmem_src);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem_src) : "memory");
#else
  *reinterpret_cast<uint4*>(smem_dst) = *reinterpret_cast<const uint4*>(gmem_src);
#endif
}

__device__ __forceinline__ void copy_async_commit() {
#if defined(MOSX_CUDA_EMULATION)
  ::mosx_emu::copy_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Wait until at most `pending` of this thread's committed copy groups are still in flight.
template <int pending>
__device__ __forceinline__ void copy_async_wait() {
#if defined(MOSX_CUDA_EMULATION)
  ::mosx_emu::copy_async_wait(pending);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(pending) : "memory");
#endif
}

// The edge vectors of a staged row (its first and last 16-byte slots, when they hold fewer than V
// of its logits) that this thread loaded into registers: they are written to shared memory only
// after the current row's work, so that waiting for them never stalls the block.
template <typename scalar_t>
struct RowEdges {
  static constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
  scalar_t first[V], last[V];
  int first_vec = -1, last_vec = -1;

  __device__ __forceinline__ void store(scalar_t* buf) const {
    if (first_vec >= 0) {
#pragma unroll
      for (int j = 0; j < V; ++j) buf[first_vec * V + j] = first[j];
    }
    if (last_vec >= 0) {
#pragma unroll
      for (int j = 0; j < V; ++j) buf[last_vec * V + j] = last[j];
    }
  }
};

// Copy row xr (L logits) into buf so that position q lands at buf[q + shift], shift = the row's
// elements past a 16-byte boundary: the vectors wholly inside the row by cp.async, the (at most
// two) at its edges into `edges` (zeros outside the row), for edges.store(buf) later.
template <typename scalar_t>
__device__ __forceinline__ void stage_row(scalar_t* buf, const scalar_t* __restrict__ xr, int L,
                                          RowEdges<scalar_t>& edges) {
  constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
  const int shift = row_shift(xr);
  const int nvec = (L + shift + V - 1) / V;
  edges.first_vec = edges.last_vec = -1;
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
    const int q = v * V - shift;
    if (q >= 0 && q + V <= L) {
      copy16_async(buf + v * V, xr + q);
    } else if (v == 0) {  // constant indices: the values stay in registers
      edges.first_vec = v;
#pragma unroll
      for (int j = 0; j < V; ++j)
        edges.first[j] = (q + j >= 0 && q + j < L) ? xr[q + j] : scalar_t(0);
    } else {
      edges.last_vec = v;
#pragma unroll
      for (int j = 0; j < V; ++j)
        edges.last[j] = (q + j >= 0 && q + j < L) ? xr[q + j] : scalar_t(0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The per-block state: the segment table and the per-segment / per-group statistics.

template <typename scalar_t, bool want_arg>
struct BlockRows {
  using acc_t = acc_type_t<scalar_t>;
  Offsets off;
  const int* seg_first;  // [K + 1]: the segments of group g are [seg_first[g], seg_first[g + 1])
  int* seg_group;        // [segments]: the group of each segment
  acc_t *seg_m, *seg_s, *seg_av;
  int* seg_ap;
  acc_t *grp_m, *grp_s, *grp_av;  // per group: (m, s); want_arg: the first arg-max of its classes
  int* grp_ap;
  const int* wide;  // wide[0]: the number of wide groups; wide[1 ..]: those groups, in order
  void* picks;      // kBlockWarps picks (block_merge)
  scalar_t* rows;   // two row buffers of row_elems elements
  int row_elems, segments, K, L;

  // Carve the layout and build the tables (called by every thread of the block, once).
  __device__ void setup(unsigned char* smem, const BlockLayout& b, const int64_t* offsets) {
    K = b.K;
    L = b.L;
    row_elems = b.row_elems;
    int* offs = reinterpret_cast<int*>(smem + b.offs);
    off = setup_offsets(offsets, K, L, offs);  // clamped, non-decreasing; ends __syncthreads
    int* first = reinterpret_cast<int*>(smem + b.seg_first);
    seg_first = first;
    seg_group = reinterpret_cast<int*>(smem + b.seg_group);
    seg_m = reinterpret_cast<acc_t*>(smem + b.seg_m);
    seg_s = reinterpret_cast<acc_t*>(smem + b.seg_s);
    seg_av = reinterpret_cast<acc_t*>(smem + b.seg_av);
    seg_ap = reinterpret_cast<int*>(smem + b.seg_ap);
    grp_m = reinterpret_cast<acc_t*>(smem + b.grp_m);
    grp_s = reinterpret_cast<acc_t*>(smem + b.grp_s);
    grp_av = reinterpret_cast<acc_t*>(smem + b.grp_av);
    grp_ap = reinterpret_cast<int*>(smem + b.grp_ap);
    rows = reinterpret_cast<scalar_t*>(smem + b.rows);
    int* wide_list = reinterpret_cast<int*>(smem + b.wide);
    wide = wide_list;
    picks = smem + b.picks;
    // Warp 0: first[g + 1] = sum of the segment counts of groups 0..g, and the wide groups in
    // order (at most max_wide: the offsets are clamped and non-decreasing; the min is a guard).
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      int carry = 0, n_wide = 0;
      for (int base = 0; base < K; base += 32) {
        const int k = base + lane;
        int v = k < K ? segments_of(offs[k + 1] - offs[k]) : 0;
        const bool is_wide = v > kSerialSegments;
        const unsigned wide_lanes = __ballot_sync(kFull, is_wide);
        const int at = n_wide + __popc(wide_lanes & ((1u << lane) - 1u));
        if (is_wide && at < b.max_wide) wide_list[1 + at] = k;
        n_wide += __popc(wide_lanes);
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
          const int o = __shfl_up_sync(kFull, v, d);
          if (lane >= d) v += o;
        }
        if (k < K) first[k + 1] = carry + v;
        carry += __shfl_sync(kFull, v, 31);
      }
      if (lane == 0) {
        first[0] = 0;
        wide_list[0] = min(n_wide, b.max_wide);
      }
    }
    __syncthreads();
    // The offsets are clamped to [0, L] and non-decreasing, so the count is within the bound;
    // the min is a second guard.
    segments = min(seg_first[K], b.max_segments);
    for (int g = threadIdx.x; g < K; g += blockDim.x) {
      const int j1 = min(seg_first[g + 1], segments);
      for (int j = seg_first[g]; j < j1; ++j) seg_group[j] = g;
    }
    __syncthreads();
  }

  // Positions [lo, hi) of segment j (of group g).
  __device__ __forceinline__ void segment(int j, int& g, int& lo, int& hi) const {
    g = seg_group[j];
    lo = off[g] + (j - seg_first[g]) * kSegment;
    hi = min(lo + kSegment, off[g + 1]);
  }

  // Phases 1 and 2 on the staged row xs (xs[q] = position q); ends with __syncthreads, after
  // which grp_m / grp_s (and grp_av / grp_ap) hold every non-empty group's statistics.
  __device__ void reduce(const scalar_t* xs) {
    for (int j = threadIdx.x; j < segments; j += blockDim.x) {
      int g, lo, hi;
      segment(j, g, lo, hi);
      acc_t m = lowest_of(acc_t(0));
      acc_t av = -inf_of(acc_t(0));
      int ap = kNone;
      const int cls0 =
          off[g] + 1;  // class logits only: the group's first position is its others slot
      for (int q = lo; q < hi; ++q) {
        const acc_t v = static_cast<acc_t>(xs[q]);
        m = vmax(m, v);
        if (want_arg && q >= cls0) arg_update(v, q, av, ap);
      }
      acc_t s = 0;
      for (int q = lo; q < hi; ++q) s += exp_sum(static_cast<acc_t>(xs[q]) - m);
      seg_m[j] = m;
      seg_s[j] = s;
      if (want_arg) {
        seg_av[j] = av;
        seg_ap[j] = ap;
      }
    }
    __syncthreads();
    for (int g = threadIdx.x; g < K; g += blockDim.x) {
      const int j0 = seg_first[g], j1 = min(seg_first[g + 1], segments);
      if (j1 - j0 > kSerialSegments || j0 >= j1) continue;
      acc_t m = lowest_of(acc_t(0));
      for (int j = j0; j < j1; ++j) m = vmax(m, seg_m[j]);
      acc_t s = 0;
      for (int j = j0; j < j1; ++j) s += seg_s[j] * exp_out(seg_m[j] - m);
      grp_m[g] = m;
      grp_s[g] = s;
      if (want_arg) {
        acc_t av = -inf_of(acc_t(0));
        int ap = kNone;
        for (int j = j0; j < j1; ++j) arg_update(seg_av[j], seg_ap[j], av, ap);
        grp_av[g] = av;
        grp_ap[g] = ap;
      }
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n_wide = wide[0];
    for (int i = warp; i < n_wide; i += kBlockWarps) {  // warp-uniform
      const int g = wide[1 + i];
      const int j0 = seg_first[g], j1 = min(seg_first[g + 1], segments);
      if (j1 - j0 <= kSerialSegments) continue;  // the serial loop's rule, never two writers
      acc_t m = lowest_of(acc_t(0));
      for (int j = j0 + lane; j < j1; j += 32) m = vmax(m, seg_m[j]);
      m = warp_max(m);
      acc_t s = 0;
      for (int j = j0 + lane; j < j1; j += 32) s += seg_s[j] * exp_out(seg_m[j] - m);
      s = warp_sum(s);
      acc_t av = -inf_of(acc_t(0));
      int ap = kNone;
      if (want_arg) {
        for (int j = j0 + lane; j < j1; j += 32) arg_update(seg_av[j], seg_ap[j], av, ap);
        warp_arg(av, ap);
      }
      if (lane == 0) {
        grp_m[g] = m;
        grp_s[g] = s;
        if (want_arg) {
          grp_av[g] = av;
          grp_ap[g] = ap;
        }
      }
    }
    __syncthreads();
  }

  __device__ __forceinline__ Lse<acc_t> stats(int g) const { return {grp_m[g], grp_s[g]}; }
};

// Merge the picks of the block's warps (each already warp_merge'd) into warp 0, whose lanes then
// all hold the block's pick; the other warps' `best` is left as it was. Every thread calls it
// (it holds a barrier); `picks` is the layout's picks region.
template <bool largest, typename acc_t>
__device__ __forceinline__ void block_merge(Pick<largest, acc_t>& best, void* picks) {
  static_assert(sizeof(Pick<largest, acc_t>) <= kPickBytes, "a pick outgrew its shared slot");
  auto* slot = reinterpret_cast<Pick<largest, acc_t>*>(picks);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) slot[warp] = best;
  __syncthreads();
  if (warp == 0) {
    if (lane < kBlockWarps) {
      best = slot[lane];
    } else {
      best.init();
    }
    best.warp_merge();
  }
}

// The grid-stride loop of a block-tier kernel: body(row, buf, shift) for every row of this block,
// where buf is the staged row's buffer and shift the row's alignment shift (position q is at
// buf[q + shift]), with the block's next row in flight. body runs in every thread after
// reduce() (skipped with reduce = false: a backward that has its statistics saved); it may
// __syncthreads, and may rewrite the row in buf.
template <bool reduce = true, typename scalar_t, bool want_arg, class Body>
__device__ __forceinline__ void block_row_loop(BlockRows<scalar_t, want_arg>& br,
                                               const scalar_t* __restrict__ x, int64_t N,
                                               int64_t rs, Body&& body) {
  int64_t row = blockIdx.x;
  int cur = 0;
  RowEdges<scalar_t> edges;
  if (row < N) {
    stage_row(br.rows, x + row * rs, br.L, edges);
    edges.store(br.rows);
  }
  copy_async_commit();
  for (; row < N; row += gridDim.x) {
    const int64_t next = row + gridDim.x;
    scalar_t* other = br.rows + (cur ^ 1) * br.row_elems;
    // The other buffer's last readers finished before the previous iteration's last barrier.
    if (next < N) stage_row(other, x + next * rs, br.L, edges);
    copy_async_commit();
    copy_async_wait<1>();  // this row's copies have landed (the next row's may be in flight)
    __syncthreads();
    scalar_t* buf = br.rows + cur * br.row_elems;
    const int shift = row_shift(x + row * rs);
    if (reduce) br.reduce(buf + shift);
    body(row, buf, shift);
    if (next < N) edges.store(other);  // the next row's edges (visible after the barrier)
    __syncthreads();                   // every reader of buf and of the statistics is done
    cur ^= 1;
  }
  copy_async_wait<0>();
}

// Write the staged row (positions at buf + shift_x) to yr (L elements): 16-byte stores where yr
// has the same alignment shift, element stores otherwise. Every thread of the block calls it.
template <typename scalar_t>
__device__ __forceinline__ void store_row(scalar_t* __restrict__ yr, const scalar_t* buf,
                                          int shift_x, int L) {
  constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
  if (row_shift(yr) == shift_x) {
    const int nvec = (L + shift_x + V - 1) / V;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int q = v * V - shift_x;
      if (q >= 0 && q + V <= L) {
        store16(yr + q, *reinterpret_cast<const uint4*>(buf + v * V));
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int qq = q + j;
          if (qq >= 0 && qq < L) yr[qq] = buf[v * V + j];
        }
      }
    }
  } else {
    for (int q = threadIdx.x; q < L; q += blockDim.x) yr[q] = buf[q + shift_x];
  }
}

}  // namespace cuda_detail
}  // namespace mosx
