// CUDA kernels of the group softmax / log-softmax and its backward. Semantics: see common.cuh;
// every probability is exp(x - m) * (1 / s) and every log-probability (x - m) - log(s), from the
// group's own (m, s) (as on the CPU), not from an lse rounded to the accumulation type.
// Paths (plan_rows, launch.cuh) for the forward: register rows (fast_rows.cuh) where the input
// and output rows share one alignment shift, block rows (block_rows.cuh: the row rewritten in
// shared memory, then 16-byte stores), chunked (common.cuh) otherwise; the backward and every
// op with MOSX_CUDA_KERNELS=chunked run chunked.
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

// ---------------------------------------------------------------------------------------------
// Chunked kernels. The forward keeps per group (m, log s) or (m, 1 / s) in an [N, K, 2] scratch
// between the reduction pass and the write pass (the row is re-read from shared memory when it
// fits in one chunk, from global memory otherwise).

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    softmax_kernel(const scalar_t* __restrict__ x, int64_t N, int L, int64_t rs,
                   const int64_t* __restrict__ offsets, int K, bool offs_in_smem, bool log,
                   acc_type_t<scalar_t>* __restrict__ scratch, scalar_t* __restrict__ y) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int CH = chunk_size<acc_t>();
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x % 32;
  acc_t* buf = warp_buffer<acc_t>(smem, 1);
  const Offsets off = setup_offsets(offsets, K, L, smem_offsets<acc_t>(smem, 1, offs_in_smem));
  MOSX_ROW_LOOP(N) {
    const scalar_t* xr = x + row * rs;
    scalar_t* yr = y + row * L;
    acc_t* ab = scratch + row * 2 * K;
    const int shift = row_shift(xr), yshift = row_shift(yr);
    row_group_ms(xr, shift, L, buf, off, lane, [&](int g, Lse<acc_t> st) {
      ab[2 * g] = st.m;
      ab[2 * g + 1] = log ? log_of(st.s) : acc_t(1) / st.s;
    });
    __syncwarp();                            // every group's (m, s) visible to every lane
    const bool one_chunk = L + shift <= CH;  // then buf still holds the row
    auto value = [&](int g, acc_t v) {
      const acc_t d = v - ab[2 * g];
      return log ? d - ab[2 * g + 1] : exp_out(d) * ab[2 * g + 1];
    };
    int g = 0;
    for (int p0 = -shift; p0 < L; p0 += CH) {
      if (!one_chunk) stage_chunk(buf, xr, shift, shift, p0, L, lane);
      g = for_each_group(
          off, g, max(p0, 0), min(p0 + CH, L), lane,
          [&](int gg, int lo, int hi) {
            for (int q = lo; q < hi; ++q) buf[q - p0] = value(gg, buf[q - p0]);
          },
          [&](int gg, int a, int b, bool, bool) {
            for (int q = a + lane; q < b; q += 32) buf[q - p0] = value(gg, buf[q - p0]);
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
                            bool offs_in_smem, bool log, acc_type_t<scalar_t>* __restrict__ scratch,
                            scalar_t* __restrict__ gx) {
  using acc_t = acc_type_t<scalar_t>;
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

// ---------------------------------------------------------------------------------------------
// Fast forward: the row stays in registers from the load to the store.

template <typename scalar_t, int PER, int LANES>
__global__ void __launch_bounds__(kThreads)
    fast_softmax_kernel(const scalar_t* __restrict__ x, int64_t N, int L, int64_t rs, int shift,
                        const int64_t* __restrict__ offsets, int K, bool log,
                        scalar_t* __restrict__ y) {
  using acc_t = acc_type_t<scalar_t>;
  using Row = FastRow<scalar_t, PER, LANES>;
  extern __shared__ int fast_offsets[];
  const Offsets off = setup_offsets(offsets, K, L, fast_offsets);
  fast_row_loop<scalar_t, PER, LANES>(x, N, L, rs, shift, [&](const RowSlot& r, Row& fr) {
    for (int g = 0; g < K; ++g) {
      const int lo = off[g], hi = off[g + 1];
      if (lo >= hi) continue;
      acc_t x0, av;
      int ap;
      const Lse<acc_t> st = fr.template group<false>(lo, hi, shift, r.lane, x0, av, ap);
      const acc_t a = st.m, b = log ? log_of(st.s) : acc_t(1) / st.s;
      Row::for_range(lo, hi, shift, r.lane, [&](int i, int j, int) {
        const acc_t d = fr.v[i][j] - a;
        fr.v[i][j] = log ? d - b : exp_out(d) * b;
      });
    }
    if (r.active) fr.store(y + r.row * L, shift, L, r.lane);
  });
}

// Block forward: each segment's thread rewrites its logits in the staged row, which is then
// stored with 16-byte stores.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    block_softmax_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t rs,
                         const int64_t* __restrict__ offsets, BlockLayout lay, bool log,
                         scalar_t* __restrict__ y) {
  using acc_t = acc_type_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  BlockRows<scalar_t, false> br;
  br.setup(smem, lay, offsets);
  const int L = lay.L;
  block_row_loop(br, x, N, rs, [&](int64_t row, scalar_t* buf, int shift) {
    scalar_t* ys = buf + shift;
    for (int j = threadIdx.x; j < br.segments; j += blockDim.x) {
      int g, lo, hi;
      br.segment(j, g, lo, hi);
      const Lse<acc_t> st = br.stats(g);
      const acc_t a = st.m, b = log ? log_of(st.s) : acc_t(1) / st.s;
      for (int q = lo; q < hi; ++q) {
        const acc_t d = static_cast<acc_t>(ys[q]) - a;
        ys[q] = static_cast<scalar_t>(log ? d - b : exp_out(d) * b);
      }
    }
    __syncthreads();
    store_row(y + row * L, buf, shift, L);
  });
}

// ---------------------------------------------------------------------------------------------
// Host side.

at::Tensor group_softmax_cuda(const at::Tensor& logits_in, const at::Tensor& offsets_in, bool log) {
  const char* op = "mosx.group_softmax";
  const auto [L, K] = check_common(logits_in, offsets_in, op);
  c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor x = unit_inner_stride(logits_in);
  const at::Tensor offsets = kernel_offsets(offsets_in, L);
  const int64_t N = x.size(0);
  at::Tensor y = at::empty({N, L}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) {
    note_no_launch();
    return y;
  }
  check_aligned(x, "logits", op);
  const int shift = uniform_shift(x);
  const RowPlan plan = plan_rows(x, L, K, uniform_shift(y) == shift, false);
  note_path(plan);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MOSX_DISPATCH_FLOATS(x.scalar_type(), "mosx.group_softmax", [&] {
    using acc_t = acc_type_t<scalar_t>;
    if (plan.path == Path::Register) {
      with_fast_tier(plan.tier, [&](auto per, auto lanes) {
        constexpr int PER = decltype(per)::value, LANES = decltype(lanes)::value;
        if constexpr (sizeof(scalar_t) == 8 && PER > 32) {
          TORCH_CHECK(false, op, ": internal error: no float64 fast tier ", PER);
        } else {
          auto* k = &fast_softmax_kernel<scalar_t, PER, LANES>;
          const size_t smem = static_cast<size_t>(K + 1) * sizeof(int);
          const int blocks =
              grid_for(reinterpret_cast<const void*>(k), kThreads, smem, N, kWarps * (32 / LANES));
          k<<<blocks, kThreads, smem, stream>>>(x.const_data_ptr<scalar_t>(), N, L, x.stride(0),
                                                shift, offsets.const_data_ptr<int64_t>(), K, log,
                                                y.mutable_data_ptr<scalar_t>());
        }
      });
    } else if (plan.path == Path::Block) {
      auto* k = &block_softmax_kernel<scalar_t>;
      const int blocks = block_grid(reinterpret_cast<const void*>(k), plan.block, N);
      k<<<blocks, kBlockThreads, plan.block.bytes, stream>>>(
          x.const_data_ptr<scalar_t>(), N, x.stride(0), offsets.const_data_ptr<int64_t>(),
          plan.block, log, y.mutable_data_ptr<scalar_t>());
    } else {
      at::Tensor scratch = at::empty({N, 2 * K}, x.options().dtype(acc_dtype(x)));
      const LaunchPlan p = plan_chunked(K, 1);
      auto* k = &softmax_kernel<scalar_t>;
      const int blocks = grid_for(reinterpret_cast<const void*>(k), kThreads, p.smem, N, kWarps);
      k<<<blocks, kThreads, p.smem, stream>>>(
          x.const_data_ptr<scalar_t>(), N, L, x.stride(0), offsets.const_data_ptr<int64_t>(), K,
          p.offs_in_smem, log, scratch.mutable_data_ptr<acc_t>(), y.mutable_data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor group_softmax_backward_cuda(const at::Tensor& grad_in, const at::Tensor& out_in,
                                       const at::Tensor& offsets_in, bool log) {
  const char* op = "mosx.group_softmax_backward";
  const auto [L, K] = check_common(out_in, offsets_in, op);
  check_float_arg(grad_in, "grad_out", out_in.sizes(), out_in, op);  // as on the CPU
  TORCH_CHECK(grad_in.scalar_type() == out_in.scalar_type(), op, ": grad_out is ",
              grad_in.scalar_type(), " but the softmax output is ", out_in.scalar_type());
  c10::cuda::CUDAGuard guard(out_in.device());
  const at::Tensor g = grad_in.contiguous(), y = out_in.contiguous();
  const at::Tensor offsets = kernel_offsets(offsets_in, L);
  const int64_t N = y.size(0);
  at::Tensor gx = at::empty({N, L}, y.options());
  if (N == 0) return gx;
  check_aligned(g, "grad_out", op);
  check_aligned(y, "out", op);
  at::Tensor scratch = at::empty({N, K}, y.options().dtype(acc_dtype(y)));
  const LaunchPlan p = plan_chunked(K, 2);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MOSX_DISPATCH_FLOATS(y.scalar_type(), "mosx.group_softmax_backward", [&] {
    using acc_t = acc_type_t<scalar_t>;
    auto* k = &softmax_backward_kernel<scalar_t>;
    const int blocks = grid_for(reinterpret_cast<const void*>(k), kThreads, p.smem, N, kWarps);
    k<<<blocks, kThreads, p.smem, stream>>>(
        g.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), N, L,
        offsets.const_data_ptr<int64_t>(), K, p.offs_in_smem, log,
        scratch.mutable_data_ptr<acc_t>(), gx.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace
}  // namespace cuda_detail

TORCH_LIBRARY_IMPL(mosx, CUDA, m) {
  m.impl("group_softmax", &cuda_detail::group_softmax_cuda);
  m.impl("group_softmax_backward", &cuda_detail::group_softmax_backward_cuda);
}

}  // namespace mosx
