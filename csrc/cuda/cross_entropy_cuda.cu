// CUDA kernels of the group cross-entropy (class ids or per-group labels, ignore_index, mixup
// with M = 2 target sets in one pass) and its backward. Semantics: see common.cuh; a loss is
// (m - x_t) + log(s) from the group's own (m, s); the saved lse is m + log(s).
// Paths (plan_rows, launch.cuh), for the forward and the backward: register rows (fast_rows.cuh),
// block rows (block_rows.cuh), chunked (common.cuh) otherwise and with MOSX_CUDA_KERNELS=chunked.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.cuh"
#include "fast_rows.cuh"
#include "launch.cuh"

namespace mosx {
namespace cuda_detail {
namespace {

// Losses and lse of group g of one row (one lane calls it per group).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void ce_finish(const scalar_t* __restrict__ xr, const CeTargets& T,
                                          const Offsets& off, int64_t row, int g, int L,
                                          const int* class_pos, Lse<acc_t> st,
                                          acc_t* __restrict__ losses, acc_t* __restrict__ lse_out) {
  const int64_t N = T.N, K = off.K;
  lse_out[row * K + g] = lse_finalize(st);
  const int lo = off[g], hi = off[g + 1];
  for (int m = 0; m < T.M; ++m) {
    const int slot = ce_slot(T, lo, hi, off.K, m, row, g, class_pos[m], L);
    losses[(m * N + row) * K + g] = ce_loss(xr, slot, st);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_kernel(const scalar_t* __restrict__ x, int64_t N, int L, int64_t rs,
                         const int64_t* __restrict__ offsets, int K, bool offs_in_smem, CeTargets T,
                         acc_type_t<scalar_t>* __restrict__ losses,
                         acc_type_t<scalar_t>* __restrict__ lse_out) {
  using acc_t = acc_type_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x % 32;
  acc_t* buf = warp_buffer<acc_t>(smem, 1);
  const Offsets off = setup_offsets(offsets, K, L, smem_offsets<acc_t>(smem, 1, offs_in_smem));
  MOSX_ROW_LOOP(N) {
    const scalar_t* xr = x + row * rs;
    const int shift = row_shift(xr);
    int class_pos[2] = {0, 0};
    for (int m = 0; m < T.M; ++m) class_pos[m] = ce_class_pos(T, m, row, L);
    row_group_ms(xr, shift, L, buf, off, lane, [&](int g, Lse<acc_t> st) {
      ce_finish(xr, T, off, row, g, L, class_pos, st, losses, lse_out);
    });
  }
}

// Cross-entropy backward from the saved per-group lse:
//   gx = sum_m coef_m * softmax_k(x) - sum_m coef_m * onehot(slot_mk) on every slice k.
// The constants of one (row, group), the same for every path: coef_m = grad[m, row, g] for the
// target sets whose slot is not ignored; an invalid label (slot -2) makes the group's gradient
// NaN; a group ignored in every target set gets 0, even on a NaN slice.
template <typename acc_t>
struct CeGrad {
  acc_t total, lse, coef[2];
  int slot[2];
  bool counted;
  // The gradient at position q of the group, whose logit is x.
  __device__ __forceinline__ acc_t at(acc_t x, int q) const {
    acc_t v = counted ? total * exp_out(x - lse) : acc_t(0);
    if (q == slot[0]) v -= coef[0];
    if (q == slot[1]) v -= coef[1];
    return v;
  }
};

template <typename acc_t>
__device__ __forceinline__ CeGrad<acc_t> ce_grad(const CeTargets& T, const Offsets& off,
                                                 int64_t row, int g, int L, const int* class_pos,
                                                 const acc_t* __restrict__ grad,
                                                 const acc_t* __restrict__ lse_in) {
  const int64_t N = T.N, K = off.K;
  const int lo = off[g], hi = off[g + 1];
  CeGrad<acc_t> c{acc_t(0), lse_in[row * K + g], {acc_t(0), acc_t(0)}, {-1, -1}, false};
  for (int m = 0; m < T.M; ++m) {
    const int s = ce_slot(T, lo, hi, off.K, m, row, g, class_pos[m], L);
    if (s == -2) {
      c.total = nan_of(acc_t(0));
      c.counted = true;
    } else if (s >= 0) {
      c.counted = true;
      c.slot[m] = s;
      c.coef[m] = grad[(m * N + row) * K + g];
      c.total += c.coef[m];
    }
  }
  return c;
}
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_backward_kernel(const acc_type_t<scalar_t>* __restrict__ grad,
                                  const scalar_t* __restrict__ x, int64_t N, int L, int64_t rs,
                                  const int64_t* __restrict__ offsets, int K, bool offs_in_smem,
                                  CeTargets T, const acc_type_t<scalar_t>* __restrict__ lse_in,
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
    int class_pos[2] = {0, 0};
    for (int m = 0; m < T.M; ++m) class_pos[m] = ce_class_pos(T, m, row, L);
    // Per-group constants, then the elementwise gradient of [lo, hi) positions of the chunk.
    auto apply = [&](int g, int first, int end, int step, int p0) {
      const CeGrad<acc_t> cg = ce_grad(T, off, row, g, L, class_pos, grad, lse_in);
      for (int q = first; q < end; q += step) buf[q - p0] = cg.at(buf[q - p0], q);
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

// Fast forward: per group (m, s) from the registers; lane 0 writes the group's losses and lse.
template <typename scalar_t, int PER, int LANES>
__global__ void __launch_bounds__(kThreads)
    fast_cross_entropy_kernel(const scalar_t* __restrict__ x, int64_t N, int L, int64_t rs,
                              int shift, const int64_t* __restrict__ offsets, int K, CeTargets T,
                              acc_type_t<scalar_t>* __restrict__ losses,
                              acc_type_t<scalar_t>* __restrict__ lse_out) {
  using acc_t = acc_type_t<scalar_t>;
  using Row = FastRow<scalar_t, PER, LANES>;
  extern __shared__ int fast_offsets[];
  const Offsets off = setup_offsets(offsets, K, L, fast_offsets);
  fast_row_loop<scalar_t, PER, LANES>(x, N, L, rs, shift, [&](const RowSlot& r, const Row& fr) {
    const scalar_t* xr = x + r.row * rs;
    int class_pos[2] = {0, 0};
    if (r.leader())
      for (int m = 0; m < T.M; ++m) class_pos[m] = ce_class_pos(T, m, r.row, L);
    for (int g = 0; g < K; ++g) {
      const int lo = off[g], hi = off[g + 1];
      if (lo >= hi) continue;
      acc_t x0, av;
      int ap;
      const Lse<acc_t> st = fr.template group<false>(lo, hi, shift, r.lane, x0, av, ap);
      if (r.leader()) ce_finish(xr, T, off, r.row, g, L, class_pos, st, losses, lse_out);
    }
  });
}

// Block forward: thread g (of the block) writes group g's losses and lse.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    block_cross_entropy_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t rs,
                               const int64_t* __restrict__ offsets, BlockLayout lay, CeTargets T,
                               acc_type_t<scalar_t>* __restrict__ losses,
                               acc_type_t<scalar_t>* __restrict__ lse_out) {
  extern __shared__ __align__(16) unsigned char smem[];
  BlockRows<scalar_t, false> br;
  br.setup(smem, lay, offsets);
  const int L = lay.L;
  block_row_loop(br, x, N, rs, [&](int64_t row, scalar_t*, int) {
    if (threadIdx.x >= br.K) return;
    int class_pos[2] = {0, 0};
    for (int m = 0; m < T.M; ++m) class_pos[m] = ce_class_pos(T, m, row, L);
    for (int g = threadIdx.x; g < br.K; g += blockDim.x) {
      if (br.off[g] >= br.off[g + 1]) continue;
      ce_finish(x + row * rs, T, br.off, row, g, L, class_pos, br.stats(g), losses, lse_out);
    }
  });
}

// Fast backward: the row's gradient computed in the registers from the saved lse.
template <typename scalar_t, int PER, int LANES>
__global__ void __launch_bounds__(kThreads)
    fast_cross_entropy_backward_kernel(const acc_type_t<scalar_t>* __restrict__ grad,
                                       const scalar_t* __restrict__ x, int64_t N, int L, int64_t rs,
                                       int shift, const int64_t* __restrict__ offsets, int K,
                                       CeTargets T, const acc_type_t<scalar_t>* __restrict__ lse_in,
                                       scalar_t* __restrict__ gx) {
  using acc_t = acc_type_t<scalar_t>;
  using Row = FastRow<scalar_t, PER, LANES>;
  extern __shared__ int fast_offsets[];
  const Offsets off = setup_offsets(offsets, K, L, fast_offsets);
  fast_row_loop<scalar_t, PER, LANES>(x, N, L, rs, shift, [&](const RowSlot& r, Row& fr) {
    if (!r.active) return;  // no shuffles below
    int class_pos[2] = {0, 0};
    for (int m = 0; m < T.M; ++m) class_pos[m] = ce_class_pos(T, m, r.row, L);
    for (int g = 0; g < K; ++g) {
      const int lo = off[g], hi = off[g + 1];
      if (lo >= hi) continue;
      const CeGrad<acc_t> cg = ce_grad(T, off, r.row, g, L, class_pos, grad, lse_in);
      Row::for_range(lo, hi, shift, r.lane,
                     [&](int i, int j, int pos) { fr.v[i][j] = cg.at(fr.v[i][j], pos); });
    }
    fr.store(gx + r.row * L, shift, L, r.lane);
  });
}

// Block backward: each segment's thread rewrites its logits in the staged row with their
// gradient (no reduction: the lse is saved), then 16-byte stores.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    block_cross_entropy_backward_kernel(const acc_type_t<scalar_t>* __restrict__ grad,
                                        const scalar_t* __restrict__ x, int64_t N, int64_t rs,
                                        const int64_t* __restrict__ offsets, BlockLayout lay,
                                        CeTargets T,
                                        const acc_type_t<scalar_t>* __restrict__ lse_in,
                                        scalar_t* __restrict__ gx) {
  using acc_t = acc_type_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  BlockRows<scalar_t, false> br;
  br.setup(smem, lay, offsets);
  const int L = lay.L;
  block_row_loop<false>(br, x, N, rs, [&](int64_t row, scalar_t* buf, int shift) {
    scalar_t* xs = buf + shift;
    int class_pos[2] = {0, 0};
    for (int m = 0; m < T.M; ++m) class_pos[m] = ce_class_pos(T, m, row, L);
    for (int j = threadIdx.x; j < br.segments; j += blockDim.x) {
      int g, lo, hi;
      br.segment(j, g, lo, hi);
      const CeGrad<acc_t> cg = ce_grad(T, br.off, row, g, L, class_pos, grad, lse_in);
      for (int q = lo; q < hi; ++q)
        xs[q] = static_cast<scalar_t>(cg.at(static_cast<acc_t>(xs[q]), q));
    }
    __syncthreads();
    store_row(gx + row * L, buf, shift, L);
  });
}

// ---------------------------------------------------------------------------------------------
// Host side.

CeTargets make_targets(const at::Tensor& t, const at::Tensor& cl, int64_t N, int64_t ignore_index) {
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
  if (N == 0) {
    note_no_launch();
    return {losses, lse};
  }
  check_aligned(x, "logits", op);
  const CeTargets T = make_targets(t, cl, N, ignore_index);
  const int shift = uniform_shift(x);
  const RowPlan plan = plan_rows(x, L, K, true, false);
  note_path(plan);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MOSX_DISPATCH_FLOATS(x.scalar_type(), "mosx.group_cross_entropy", [&] {
    using acc_t = acc_type_t<scalar_t>;
    if (plan.path == Path::Register) {
      with_fast_tier(plan.tier, [&](auto per, auto lanes) {
        constexpr int PER = decltype(per)::value, LANES = decltype(lanes)::value;
        if constexpr (sizeof(scalar_t) == 8 && PER > 32) {
          TORCH_CHECK(false, op, ": internal error: no float64 fast tier ", PER);
        } else {
          auto* k = &fast_cross_entropy_kernel<scalar_t, PER, LANES>;
          const size_t smem = static_cast<size_t>(K + 1) * sizeof(int);
          const int blocks =
              grid_for(reinterpret_cast<const void*>(k), kThreads, smem, N, kWarps * (32 / LANES));
          k<<<blocks, kThreads, smem, stream>>>(x.const_data_ptr<scalar_t>(), N, L, x.stride(0),
                                                shift, offsets.const_data_ptr<int64_t>(), K, T,
                                                losses.mutable_data_ptr<acc_t>(),
                                                lse.mutable_data_ptr<acc_t>());
        }
      });
    } else if (plan.path == Path::Block) {
      auto* k = &block_cross_entropy_kernel<scalar_t>;
      const int blocks = block_grid(reinterpret_cast<const void*>(k), plan.block, N);
      k<<<blocks, kBlockThreads, plan.block.bytes, stream>>>(
          x.const_data_ptr<scalar_t>(), N, x.stride(0), offsets.const_data_ptr<int64_t>(),
          plan.block, T, losses.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>());
    } else {
      const LaunchPlan p = plan_chunked(K, 1);
      auto* k = &cross_entropy_kernel<scalar_t>;
      const int blocks = grid_for(reinterpret_cast<const void*>(k), kThreads, p.smem, N, kWarps);
      k<<<blocks, kThreads, p.smem, stream>>>(
          x.const_data_ptr<scalar_t>(), N, L, x.stride(0), offsets.const_data_ptr<int64_t>(), K,
          p.offs_in_smem, T, losses.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>());
    }
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
  check_float_arg(grad_losses_in, "grad_losses", {M, N, K}, x, op);  // as on the CPU
  check_float_arg(lse_in, "lse", {N, K}, x, op);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor offsets = kernel_offsets(offsets_in, L);
  const at::Tensor t = targets_in.contiguous();
  const at::Tensor cl = targets_in.dim() == 3 ? class_logit_in : class_logit_in.contiguous();
  const at::Tensor g = grad_losses_in.to(acc_dtype(x)).contiguous();
  const at::Tensor lse = lse_in.to(acc_dtype(x)).contiguous();
  at::Tensor gx = at::empty({N, L}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) {
    note_no_launch();
    return gx;
  }
  check_aligned(x, "logits", op);
  const CeTargets T = make_targets(t, cl, N, ignore_index);
  const int shift = uniform_shift(x);
  const RowPlan plan = plan_rows(x, L, K, uniform_shift(gx) == shift, false);
  note_path(plan);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MOSX_DISPATCH_FLOATS(x.scalar_type(), "mosx.group_cross_entropy_backward", [&] {
    using acc_t = acc_type_t<scalar_t>;
    if (plan.path == Path::Register) {
      with_fast_tier(plan.tier, [&](auto per, auto lanes) {
        constexpr int PER = decltype(per)::value, LANES = decltype(lanes)::value;
        if constexpr (sizeof(scalar_t) == 8 && PER > 32) {
          TORCH_CHECK(false, op, ": internal error: no float64 fast tier ", PER);
        } else {
          auto* k = &fast_cross_entropy_backward_kernel<scalar_t, PER, LANES>;
          const size_t smem = static_cast<size_t>(K + 1) * sizeof(int);
          const int blocks =
              grid_for(reinterpret_cast<const void*>(k), kThreads, smem, N, kWarps * (32 / LANES));
          k<<<blocks, kThreads, smem, stream>>>(
              g.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), N, L, x.stride(0), shift,
              offsets.const_data_ptr<int64_t>(), K, T, lse.const_data_ptr<acc_t>(),
              gx.mutable_data_ptr<scalar_t>());
        }
      });
    } else if (plan.path == Path::Block) {
      auto* k = &block_cross_entropy_backward_kernel<scalar_t>;
      const int blocks = block_grid(reinterpret_cast<const void*>(k), plan.block, N);
      k<<<blocks, kBlockThreads, plan.block.bytes, stream>>>(
          g.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), N, x.stride(0),
          offsets.const_data_ptr<int64_t>(), plan.block, T, lse.const_data_ptr<acc_t>(),
          gx.mutable_data_ptr<scalar_t>());
    } else {
      const LaunchPlan p = plan_chunked(K, 1);
      auto* k = &cross_entropy_backward_kernel<scalar_t>;
      const int blocks = grid_for(reinterpret_cast<const void*>(k), kThreads, p.smem, N, kWarps);
      k<<<blocks, kThreads, p.smem, stream>>>(
          g.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), N, L, x.stride(0),
          offsets.const_data_ptr<int64_t>(), K, p.offs_in_smem, T, lse.const_data_ptr<acc_t>(),
          gx.mutable_data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace
}  // namespace cuda_detail

TORCH_LIBRARY_IMPL(mosx, CUDA, m) {
  m.impl("group_cross_entropy", &cuda_detail::group_cross_entropy_cuda);
  m.impl("group_cross_entropy_backward", &cuda_detail::group_cross_entropy_backward_cuda);
}

}  // namespace mosx
