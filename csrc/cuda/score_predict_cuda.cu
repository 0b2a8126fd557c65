// CUDA kernels of the MOS score (forward and backward) and the group prediction. Semantics: see
// common.cuh (the same as csrc/cpu and mosx.reference). Three paths (plan_rows, launch.cuh):
//  * register (fast_rows.cuh): rows held in registers, a warp per row (two or four rows per warp
//    for rows of at most 128 or 64 positions); rows up to 2048 logits with at most 32 groups and
//    one alignment shift for every row;
//  * block (block_rows.cuh): block per row, the row copied to shared memory by cp.async, groups
//    reduced segment by segment; wider rows and many groups;
//  * chunked (common.cuh): any row, staged through shared memory in 4 KiB chunks, warp per row;
//    the fallback, and the only path with MOSX_CUDA_KERNELS=chunked.
// All decide near-ties again from canonical per-group sums, so bit-identical groups tie exactly.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "common.cuh"
#include "fast_rows.cuh"
#include "launch.cuh"

namespace mosx {
namespace cuda_detail {
namespace {

// ---------------------------------------------------------------------------------------------
// Chunked kernels.

// MOS score: -min_k p_others^k with p_others = exp(x[o_k] - m_k) / s_k; its group and lse.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    score_kernel(const scalar_t* __restrict__ x, int64_t N, int L, int64_t rs,
                 const int64_t* __restrict__ offsets, int K, bool offs_in_smem,
                 acc_type_t<scalar_t>* __restrict__ score, int64_t* __restrict__ min_group,
                 acc_type_t<scalar_t>* __restrict__ min_lse) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int CH = chunk_size<acc_t>();
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x % 32;
  acc_t* buf = warp_buffer<acc_t>(smem, 1);
  const Offsets off = setup_offsets(offsets, K, L, smem_offsets<acc_t>(smem, 1, offs_in_smem));
  const acc_t tol = near_tol<acc_t>(L);
  MOSX_ROW_LOOP(N) {
    const scalar_t* xr = x + row * rs;
    const int shift = row_shift(xr);
    Pick<false, acc_t> best;
    best.init();
    auto consider = [&](int g, acc_t x0, Lse<acc_t> st) {
      best.offer(lse_prob(x0, st), g, lse_finalize(st), 0);
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
    best.warp_merge();
    if (best.near_tie(tol)) best = canonical_score<scalar_t, acc_t>(xr, off, lane);
    if (lane == 0) {
      score[row] = -best.p;
      min_group[row] = best.g == kNone ? 0 : best.g;
      min_lse[row] = best.g == kNone ? acc_t(0) : best.aux;
    }
  }
}

// Group prediction: per group the first arg-max of the class logits and its probability
// exp(x - m) / s; the most probable group wins (a NaN group first, at its first class).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    predict_kernel(const scalar_t* __restrict__ x, int64_t N, int L, int64_t rs,
                   const int64_t* __restrict__ offsets, int K, bool offs_in_smem,
                   const int64_t* __restrict__ logit_class, int64_t* __restrict__ cls,
                   acc_type_t<scalar_t>* __restrict__ prob, int64_t* __restrict__ group) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int CH = chunk_size<acc_t>();
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x % 32;
  acc_t* buf = warp_buffer<acc_t>(smem, 1);
  const Offsets off = setup_offsets(offsets, K, L, smem_offsets<acc_t>(smem, 1, offs_in_smem));
  const acc_t ninf = -inf_of(acc_t(0));
  const acc_t tol = near_tol<acc_t>(L);
  MOSX_ROW_LOOP(N) {
    const scalar_t* xr = x + row * rs;
    const int shift = row_shift(xr);
    Pick<true, acc_t> best;
    best.init();
    auto consider = [&](int g, int first_class, acc_t av, int ap, Lse<acc_t> st) {
      const acc_t p = ap == kNone ? nan_of(acc_t(0)) : lse_prob(av, st);
      best.offer(p, g, acc_t(0), p != p ? first_class : ap);
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
            for (int q = lo + 1; q < hi; ++q) arg_update(buf[q - p0], q, av, ap);
            consider(gg, lo + 1, av, ap, serial_lse(buf, p0, lo, hi));
          },
          [&](int gg, int a, int b, bool starts, bool ends) {
            const Lse<acc_t> st = coop_lse(buf, p0, a, b, lane, !starts, carry);
            const int first_class = off[gg] + 1;
            acc_t av = ninf;
            int ap = kNone;
            for (int q = max(a, first_class) + lane; q < b; q += 32)
              arg_update(buf[q - p0], q, av, ap);
            warp_arg(av, ap);
            if (!starts) arg_update(carry_av, carry_ap, av, ap);
            if (ends) {
              consider(gg, first_class, av, ap, st);
            } else {
              carry = st;
              carry_av = av;
              carry_ap = ap;
            }
          });
    }
    best.warp_merge();
    if (best.near_tie(tol)) best = canonical_predict<scalar_t, acc_t>(xr, off, lane);
    if (lane == 0) {
      int pos = best.g == kNone ? 1 : best.pos;
      pos = pos < 0 ? 0 : (pos >= L ? L - 1 : pos);
      cls[row] = logit_class[pos];
      prob[row] = best.p;
      group[row] = best.g == kNone ? 0 : best.g;
    }
  }
}

// Gradient of the score: only the arg-min group's slice is non-zero,
// d(-p0)/dx_j = c * exp(x_j - lse) - c [j == others slot], c = grad * p0.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    score_backward_kernel(const acc_type_t<scalar_t>* __restrict__ grad,
                          const scalar_t* __restrict__ x, int64_t N, int L, int64_t rs,
                          const int64_t* __restrict__ offsets, int K, bool offs_in_smem,
                          const int64_t* __restrict__ min_group,
                          const acc_type_t<scalar_t>* __restrict__ min_lse,
                          scalar_t* __restrict__ gx) {
  using acc_t = acc_type_t<scalar_t>;
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

// ---------------------------------------------------------------------------------------------
// Fast kernels (register rows).

template <typename scalar_t, int PER, int LANES>
__global__ void __launch_bounds__(kThreads)
    fast_score_kernel(const scalar_t* __restrict__ x, int64_t N, int L, int64_t rs, int shift,
                      const int64_t* __restrict__ offsets, int K,
                      acc_type_t<scalar_t>* __restrict__ score, int64_t* __restrict__ min_group,
                      acc_type_t<scalar_t>* __restrict__ min_lse) {
  using acc_t = acc_type_t<scalar_t>;
  using Row = FastRow<scalar_t, PER, LANES>;
  extern __shared__ int fast_offsets[];
  const Offsets off = setup_offsets(offsets, K, L, fast_offsets);
  const acc_t tol = near_tol<acc_t>(L);
  fast_row_loop<scalar_t, PER, LANES>(x, N, L, rs, shift, [&](const RowSlot& r, const Row& fr) {
    Pick<false, acc_t> best;
    best.init();
    for (int g = 0; g < K; ++g) {
      const int lo = off[g], hi = off[g + 1];
      if (lo >= hi) continue;
      acc_t x0, av;
      int ap;
      const Lse<acc_t> st = fr.template group<false>(lo, hi, shift, r.lane, x0, av, ap);
      best.offer(lse_prob(x0, st), g, lse_finalize(st), 0);
    }
    recheck_near_ties<LANES>(best, best.near_tie(tol), r, [&](int64_t row) {
      return canonical_score<scalar_t, acc_t>(x + row * rs, off, r.warp_lane);
    });
    if (r.leader()) {
      score[r.row] = -best.p;
      min_group[r.row] = best.g == kNone ? 0 : best.g;
      min_lse[r.row] = best.g == kNone ? acc_t(0) : best.aux;
    }
  });
}

template <typename scalar_t, int PER, int LANES>
__global__ void __launch_bounds__(kThreads)
    fast_predict_kernel(const scalar_t* __restrict__ x, int64_t N, int L, int64_t rs, int shift,
                        const int64_t* __restrict__ offsets, int K,
                        const int64_t* __restrict__ logit_class, int64_t* __restrict__ cls,
                        acc_type_t<scalar_t>* __restrict__ prob, int64_t* __restrict__ group) {
  using acc_t = acc_type_t<scalar_t>;
  using Row = FastRow<scalar_t, PER, LANES>;
  extern __shared__ int fast_offsets[];
  const Offsets off = setup_offsets(offsets, K, L, fast_offsets);
  const acc_t tol = near_tol<acc_t>(L);
  fast_row_loop<scalar_t, PER, LANES>(x, N, L, rs, shift, [&](const RowSlot& r, const Row& fr) {
    Pick<true, acc_t> best;
    best.init();
    for (int g = 0; g < K; ++g) {
      const int lo = off[g], hi = off[g + 1];
      if (lo >= hi) continue;
      acc_t x0, av;
      int ap;
      const Lse<acc_t> st = fr.template group<true>(lo, hi, shift, r.lane, x0, av, ap);
      const acc_t p = ap == kNone ? nan_of(acc_t(0)) : lse_prob(av, st);
      best.offer(p, g, acc_t(0), p != p ? lo + 1 : ap);
    }
    recheck_near_ties<LANES>(best, best.near_tie(tol), r, [&](int64_t row) {
      return canonical_predict<scalar_t, acc_t>(x + row * rs, off, r.warp_lane);
    });
    if (r.leader()) {
      int pos = best.g == kNone ? 1 : best.pos;
      pos = pos < 0 ? 0 : (pos >= L ? L - 1 : pos);
      cls[r.row] = logit_class[pos];
      prob[r.row] = best.p;
      group[r.row] = best.g == kNone ? 0 : best.g;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Block kernels (a row per block in shared memory). Thread t offers groups t, t + kBlockThreads,
// ...; the warps' picks are merged into warp 0 (block_merge), which rechecks near-ties and writes.

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    block_score_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t rs,
                       const int64_t* __restrict__ offsets, BlockLayout lay,
                       acc_type_t<scalar_t>* __restrict__ score, int64_t* __restrict__ min_group,
                       acc_type_t<scalar_t>* __restrict__ min_lse) {
  using acc_t = acc_type_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  BlockRows<scalar_t, false> br;
  br.setup(smem, lay, offsets);
  const acc_t tol = near_tol<acc_t>(lay.L);
  block_row_loop(br, x, N, rs, [&](int64_t row, scalar_t* buf, int shift) {
    Pick<false, acc_t> best;
    best.init();
    for (int g = threadIdx.x; g < br.K; g += kBlockThreads) {
      const int lo = br.off[g], hi = br.off[g + 1];
      if (lo >= hi) continue;
      const Lse<acc_t> st = br.stats(g);
      best.offer(lse_prob(static_cast<acc_t>(buf[shift + lo]), st), g, lse_finalize(st), 0);
    }
    best.warp_merge();
    block_merge(best, br.picks);
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x;
    if (best.near_tie(tol)) best = canonical_score<scalar_t, acc_t>(x + row * rs, br.off, lane);
    if (lane == 0) {
      score[row] = -best.p;
      min_group[row] = best.g == kNone ? 0 : best.g;
      min_lse[row] = best.g == kNone ? acc_t(0) : best.aux;
    }
  });
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    block_predict_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t rs,
                         const int64_t* __restrict__ offsets, BlockLayout lay,
                         const int64_t* __restrict__ logit_class, int64_t* __restrict__ cls,
                         acc_type_t<scalar_t>* __restrict__ prob, int64_t* __restrict__ group) {
  using acc_t = acc_type_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  BlockRows<scalar_t, true> br;
  br.setup(smem, lay, offsets);
  const int L = lay.L;
  const acc_t tol = near_tol<acc_t>(L);
  block_row_loop(br, x, N, rs, [&](int64_t row, scalar_t*, int) {
    Pick<true, acc_t> best;
    best.init();
    for (int g = threadIdx.x; g < br.K; g += kBlockThreads) {
      const int lo = br.off[g], hi = br.off[g + 1];
      if (lo >= hi) continue;
      const int ap = br.grp_ap[g];
      const acc_t p = ap == kNone ? nan_of(acc_t(0)) : lse_prob(br.grp_av[g], br.stats(g));
      best.offer(p, g, acc_t(0), p != p ? lo + 1 : ap);
    }
    best.warp_merge();
    block_merge(best, br.picks);
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x;
    if (best.near_tie(tol)) best = canonical_predict<scalar_t, acc_t>(x + row * rs, br.off, lane);
    if (lane == 0) {
      int pos = best.g == kNone ? 1 : best.pos;
      pos = pos < 0 ? 0 : (pos >= L ? L - 1 : pos);
      cls[row] = logit_class[pos];
      prob[row] = best.p;
      group[row] = best.g == kNone ? 0 : best.g;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Host side.

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
  if (N == 0) {
    note_no_launch();
    return {score, min_group, min_lse};
  }
  check_aligned(x, "logits", op);
  const int shift = uniform_shift(x);
  const RowPlan plan = plan_rows(x, L, K, true, false);
  note_path(plan);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MOSX_DISPATCH_FLOATS(x.scalar_type(), "mosx.group_softmax_score", [&] {
    using acc_t = acc_type_t<scalar_t>;
    if (plan.path == Path::Register) {
      with_fast_tier(plan.tier, [&](auto per, auto lanes) {
        constexpr int PER = decltype(per)::value, LANES = decltype(lanes)::value;
        if constexpr (sizeof(scalar_t) == 8 && PER > 32) {
          TORCH_CHECK(false, op, ": internal error: no float64 fast tier ", PER);
        } else {
          auto* k = &fast_score_kernel<scalar_t, PER, LANES>;
          const size_t smem = static_cast<size_t>(K + 1) * sizeof(int);
          const int blocks =
              grid_for(reinterpret_cast<const void*>(k), kThreads, smem, N, kWarps * (32 / LANES));
          k<<<blocks, kThreads, smem, stream>>>(
              x.const_data_ptr<scalar_t>(), N, L, x.stride(0), shift,
              offsets.const_data_ptr<int64_t>(), K, score.mutable_data_ptr<acc_t>(),
              min_group.mutable_data_ptr<int64_t>(), min_lse.mutable_data_ptr<acc_t>());
        }
      });
    } else if (plan.path == Path::Block) {
      auto* k = &block_score_kernel<scalar_t>;
      const int blocks = block_grid(reinterpret_cast<const void*>(k), plan.block, N);
      k<<<blocks, kBlockThreads, plan.block.bytes, stream>>>(
          x.const_data_ptr<scalar_t>(), N, x.stride(0), offsets.const_data_ptr<int64_t>(),
          plan.block, score.mutable_data_ptr<acc_t>(), min_group.mutable_data_ptr<int64_t>(),
          min_lse.mutable_data_ptr<acc_t>());
    } else {
      const LaunchPlan p = plan_chunked(K, 1);
      auto* k = &score_kernel<scalar_t>;
      const int blocks = grid_for(reinterpret_cast<const void*>(k), kThreads, p.smem, N, kWarps);
      k<<<blocks, kThreads, p.smem, stream>>>(
          x.const_data_ptr<scalar_t>(), N, L, x.stride(0), offsets.const_data_ptr<int64_t>(), K,
          p.offs_in_smem, score.mutable_data_ptr<acc_t>(), min_group.mutable_data_ptr<int64_t>(),
          min_lse.mutable_data_ptr<acc_t>());
    }
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
  check_float_arg(grad_score, "grad_score", {N}, x, op);  // as on the CPU
  check_long_arg(min_group_in, "min_group", {N}, x, op);
  check_float_arg(min_lse_in, "min_lse", {N}, x, op);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor offsets = kernel_offsets(offsets_in, L);
  const at::Tensor g = grad_score.to(acc_dtype(x)).contiguous();
  const at::Tensor mg = min_group_in.contiguous(), ml = min_lse_in.to(acc_dtype(x)).contiguous();
  at::Tensor gx = at::empty({N, L}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return gx;
  check_aligned(x, "logits", op);
  const LaunchPlan p = plan_chunked(K, 1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MOSX_DISPATCH_FLOATS(x.scalar_type(), "mosx.group_softmax_score_backward", [&] {
    using acc_t = acc_type_t<scalar_t>;
    auto* k = &score_backward_kernel<scalar_t>;
    const int blocks = grid_for(reinterpret_cast<const void*>(k), kThreads, p.smem, N, kWarps);
    k<<<blocks, kThreads, p.smem, stream>>>(
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
  if (N == 0) {
    note_no_launch();
    return {cls, prob, group};
  }
  check_aligned(x, "logits", op);
  const int shift = uniform_shift(x);
  const RowPlan plan = plan_rows(x, L, K, true, true);
  note_path(plan);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MOSX_DISPATCH_FLOATS(x.scalar_type(), "mosx.group_predict", [&] {
    using acc_t = acc_type_t<scalar_t>;
    if (plan.path == Path::Register) {
      with_fast_tier(plan.tier, [&](auto per, auto lanes) {
        constexpr int PER = decltype(per)::value, LANES = decltype(lanes)::value;
        if constexpr (sizeof(scalar_t) == 8 && PER > 32) {
          TORCH_CHECK(false, op, ": internal error: no float64 fast tier ", PER);
        } else {
          auto* k = &fast_predict_kernel<scalar_t, PER, LANES>;
          const size_t smem = static_cast<size_t>(K + 1) * sizeof(int);
          const int blocks =
              grid_for(reinterpret_cast<const void*>(k), kThreads, smem, N, kWarps * (32 / LANES));
          k<<<blocks, kThreads, smem, stream>>>(
              x.const_data_ptr<scalar_t>(), N, L, x.stride(0), shift,
              offsets.const_data_ptr<int64_t>(), K, lc.const_data_ptr<int64_t>(),
              cls.mutable_data_ptr<int64_t>(), prob.mutable_data_ptr<acc_t>(),
              group.mutable_data_ptr<int64_t>());
        }
      });
    } else if (plan.path == Path::Block) {
      auto* k = &block_predict_kernel<scalar_t>;
      const int blocks = block_grid(reinterpret_cast<const void*>(k), plan.block, N);
      k<<<blocks, kBlockThreads, plan.block.bytes, stream>>>(
          x.const_data_ptr<scalar_t>(), N, x.stride(0), offsets.const_data_ptr<int64_t>(),
          plan.block, lc.const_data_ptr<int64_t>(), cls.mutable_data_ptr<int64_t>(),
          prob.mutable_data_ptr<acc_t>(), group.mutable_data_ptr<int64_t>());
    } else {
      const LaunchPlan p = plan_chunked(K, 1);
      auto* k = &predict_kernel<scalar_t>;
      const int blocks = grid_for(reinterpret_cast<const void*>(k), kThreads, p.smem, N, kWarps);
      k<<<blocks, kThreads, p.smem, stream>>>(
          x.const_data_ptr<scalar_t>(), N, L, x.stride(0), offsets.const_data_ptr<int64_t>(), K,
          p.offs_in_smem, lc.const_data_ptr<int64_t>(), cls.mutable_data_ptr<int64_t>(),
          prob.mutable_data_ptr<acc_t>(), group.mutable_data_ptr<int64_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {cls, prob, group};
}

// "fast" (register or block rows where they apply, chunked elsewhere) or "chunked" (forced by
// MOSX_CUDA_KERNELS=chunked); lets the tests check which path a process runs.
std::string cuda_kernels() { return fast_kernels_enabled() ? "fast" : "chunked"; }

// The path the last tiered op (a forward or the cross-entropy backward) of this thread ran on a
// CUDA tensor (see note_path).
std::string cuda_last_path() { return last_path(); }

// Bytes of shared memory a block-tier kernel needs for rows of num_logits logits in num_groups
// groups of this dtype (want_arg: the prediction's layout). The block tier runs only where this
// is at most the device's opt-in shared memory per block; tests use it to sit on that limit.
int64_t cuda_block_smem_bytes(int64_t num_groups, int64_t num_logits, c10::ScalarType dtype,
                              bool want_arg) {
  TORCH_CHECK(num_groups >= 1 && num_groups + 1 <= kOffsetsInSmem && num_logits >= 2 * num_groups &&
                  num_logits <= INT_MAX - 2 * kChunkBytes,
              "mosx._cuda_block_smem_bytes: no block-tier layout for ", num_groups, " groups of ",
              num_logits, " logits");
  TORCH_CHECK(
      dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
      "mosx._cuda_block_smem_bytes: dtype must be float64, float32, float16 or bfloat16, "
      "got ",
      dtype);
  const int esize = static_cast<int>(c10::elementSize(dtype));
  const int asize = dtype == at::kDouble ? 8 : 4;
  return static_cast<int64_t>(block_layout(static_cast<int>(num_groups),
                                           static_cast<int>(num_logits), esize, asize, want_arg)
                                  .bytes);
}

}  // namespace
}  // namespace cuda_detail

TORCH_LIBRARY_IMPL(mosx, CUDA, m) {
  m.impl("group_softmax_score", &cuda_detail::group_softmax_score_cuda);
  m.impl("group_softmax_score_backward", &cuda_detail::group_softmax_score_backward_cuda);
  m.impl("group_predict", &cuda_detail::group_predict_cuda);
}

TORCH_LIBRARY_FRAGMENT(mosx, m) {
  // Which CUDA kernel path this process runs: "fast" or "chunked" (MOSX_CUDA_KERNELS=chunked).
  m.def("_cuda_kernels() -> str");
  // The path of this thread's last tiered CUDA op (a forward or the cross-entropy backward):
  // "register:<lanes>x<values per lane>", "block", "chunked", or "none" for an empty batch (for
  // tests and tools/gpu_check.sh).
  m.def("_cuda_last_path() -> str");
  // Shared-memory bytes of the block tier's layout (tests sit on the device's limit with it).
  m.def(
      "_cuda_block_smem_bytes(int num_groups, int num_logits, ScalarType dtype, bool want_arg) -> "
      "int");
}

TORCH_LIBRARY_IMPL(mosx, CompositeExplicitAutograd, m) {
  m.impl("_cuda_kernels", &cuda_detail::cuda_kernels);
  m.impl("_cuda_last_path", &cuda_detail::cuda_last_path);
  m.impl("_cuda_block_smem_bytes", &cuda_detail::cuda_block_smem_bytes);
}

}  // namespace mosx
