// Host side shared by the CUDA op files: argument checks, the offsets the kernels read, the
// launch geometry (one resident wave from the occupancy API, cached per kernel), and which
// kernel path runs: the register tier, the block tier or the chunked fallback
// (MOSX_CUDA_KERNELS=chunked forces the fallback, read once).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/cummax.h>
#include <c10/cuda/CUDAException.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>

#include "../checks.h"
#include "../host_utils.h"
#include "block_rows.cuh"
#include "common.cuh"
#include "fast_rows.cuh"

namespace mosx {
namespace cuda_detail {

// Whether the register-row and block-row ("fast") kernels may run: false when the environment
// sets MOSX_CUDA_KERNELS=chunked (read once per process). Every path gives the same results.
inline bool fast_kernels_enabled() {
  auto read = [] {
    const char* v = std::getenv("MOSX_CUDA_KERNELS");
    return !(v != nullptr && std::strcmp(v, "chunked") == 0);
  };
#if defined(MOSX_CUDA_EMULATION)  // tools/cuda_emu: one process tests both paths
  return read();
#else
  static const bool enabled = read();
  return enabled;
#endif
}

// Resident blocks per SM of `kernel` at this block size and dynamic shared memory, times the
// SMs: the grid of one full wave. Cached per (kernel, device, shared memory).
inline int64_t one_wave_blocks(const void* kernel, int threads, size_t smem) {
  struct Key {
    const void* k;
    int dev;
    size_t smem;
    bool operator==(const Key& o) const { return k == o.k && dev == o.dev && smem == o.smem; }
  };
  struct Hash {
    size_t operator()(const Key& k) const {
      return std::hash<const void*>()(k.k) ^ (std::hash<size_t>()(k.smem) * 31u) ^
             static_cast<size_t>(k.dev);
    }
  };
  static std::mutex mu;
  static std::unordered_map<Key, int64_t, Hash> cache;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const Key key{kernel, dev, smem};
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int per_sm = 0, sms = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t blocks = std::max<int64_t>(1, static_cast<int64_t>(per_sm) * sms);
  std::lock_guard<std::mutex> lock(mu);
  cache.emplace(key, blocks);
  return blocks;
}

// Grid for `rows` rows at `rows_per_block` rows per block, at most one resident wave.
inline int grid_for(const void* kernel, int threads, size_t smem, int64_t rows,
                    int64_t rows_per_block) {
  const int64_t want = (rows + rows_per_block - 1) / rows_per_block;
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({want, one_wave_blocks(kernel, threads, smem), INT_MAX})));
}

struct LaunchPlan {
  size_t smem;
  bool offs_in_smem;
};

// Per (kernel, device): allow `bytes` of dynamic shared memory (needed past 48 KiB); once each.
inline void allow_dynamic_smem(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> allowed;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  size_t& have = allowed[{kernel, dev}];
  if (have >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  have = bytes;
}

// The most dynamic shared memory one block of the current device may use.
inline size_t max_block_smem() {
  int dev = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return static_cast<size_t>(bytes);
}

// Offsets as the kernels read them: contiguous; with more groups than fit in shared memory,
// also clamped to [0, L] and made non-decreasing here (the kernels do it in shared memory).
inline at::Tensor kernel_offsets(const at::Tensor& offsets, int64_t L) {
  if (offsets.numel() <= kOffsetsInSmem) return offsets.contiguous();
  return std::get<0>(at::cummax(at::clamp(offsets, 0, L), 0)).contiguous();
}

// Dynamic shared memory of a chunked kernel with `nin` staged inputs.
inline LaunchPlan plan_chunked(int64_t K, int nin) {
  LaunchPlan p;
  p.offs_in_smem = K + 1 <= kOffsetsInSmem;
  p.smem = static_cast<size_t>(kWarps) * nin * kChunkBytes +
           (p.offs_in_smem ? static_cast<size_t>(K + 1) * sizeof(int) : 0);
  return p;
}

// Checks shared by every op; returns (L, K). Offsets values are validated by mosx.Groups in
// Python (reading them here would need a device sync); the kernels clamp them.
inline std::pair<int, int> check_common(const at::Tensor& logits, const at::Tensor& offsets,
                                        const char* op) {
  check_logits(logits, op);
  check_offsets_meta(logits, offsets, op);
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor here, got ", logits.device());
  const int64_t L = logits.size(1), K = offsets.numel() - 1;
  TORCH_CHECK(L >= 2 * K, op, ": logits have ", L, " columns but ", K, " groups need at least ",
              2 * K, " (an others slot and a class each)");
  TORCH_CHECK(L <= INT_MAX - 2 * kChunkBytes, op, ": logits have ", L,
              " columns; at most 2^31 - 8193 are supported");
  return {static_cast<int>(L), static_cast<int>(K)};
}

inline void check_aligned(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.const_data_ptr()) % t.element_size() == 0, op, ": ",
              name, " data pointer is not aligned to its element size");
}

// Alignment shift (elements past a 16-byte boundary) of row 0 of a 2-D tensor, or -1 when the
// rows do not all share it (a row stride that is not a multiple of 16 bytes).
inline int uniform_shift(const at::Tensor& t) {
  const int64_t es = t.element_size();
  if (t.size(0) > 1 && (t.stride(0) * es) % 16 != 0) return -1;
  return static_cast<int>((reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16) / es);
}

// Which kernels run for a forward op (or the cross-entropy backward) on rows of L logits in K
// groups:
//  * register (fast_rows.cuh): every row shares one alignment shift (and, for the ops that write
//    rows, so does the output: register_ok), at most kFastMaxGroups groups, L + shift within the widest tier (rows of
//    at most 64 or 128 positions share a warp four or two to a warp);
//  * block (block_rows.cuh): otherwise, for rows of at least kBlockMinLogits logits, K + 1 <=
//    kOffsetsInSmem and the layout within the device's shared memory;
//  * chunked (common.cuh): everything else, and every row with MOSX_CUDA_KERNELS=chunked.
enum class Path { Register, Block, Chunked };

struct RowPlan {
  Path path = Path::Chunked;
  FastTier tier;      // register tier: lanes per row, values per lane
  BlockLayout block;  // block tier: its shared-memory layout
};

constexpr int kBlockMinLogits = 1024;  // shorter rows waste most of a block's threads

inline RowPlan plan_rows(const at::Tensor& x, int L, int K, bool register_ok, bool want_arg) {
  RowPlan p;
  if (!fast_kernels_enabled()) return p;
  if (register_ok) {
    p.tier = fast_tier(L, K, uniform_shift(x), x.element_size());
    if (p.tier.per > 0) {
      p.path = Path::Register;
      return p;
    }
  }
  if (L >= kBlockMinLogits && K + 1 <= kOffsetsInSmem) {
    const int asize = x.scalar_type() == at::kDouble ? 8 : 4;
    p.block = block_layout(K, L, static_cast<int>(x.element_size()), asize, want_arg);
    if (p.block.bytes <= max_block_smem()) p.path = Path::Block;
  }
  return p;
}

// The path of the last tiered op on this thread (forwards, cross-entropy backward):
// "register:<lanes>x<values per lane>", "block", "chunked", or "none" when it launched nothing;
// so that a test can check that its shapes reach the path it means to test.
inline std::string& last_path() {
  static thread_local std::string p;
  return p;
}

// An op that launched nothing (an empty batch) notes "none", not the path of an earlier one.
inline void note_no_launch() { last_path() = "none"; }

inline void note_path(const RowPlan& p) {
  last_path() = p.path == Path::Register
                    ? "register:" + std::to_string(p.tier.lanes) + "x" + std::to_string(p.tier.per)
                : p.path == Path::Block ? std::string("block")
                                        : std::string("chunked");
}

// Grid of a block-tier kernel: one block per row, at most one resident wave.
inline int block_grid(const void* kernel, const BlockLayout& b, int64_t rows) {
  allow_dynamic_smem(kernel, b.bytes);
  return grid_for(kernel, kBlockThreads, b.bytes, rows, 1);
}

}  // namespace cuda_detail
}  // namespace mosx
