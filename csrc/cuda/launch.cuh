// Host side shared by the CUDA op files: argument checks, the offsets the kernels read, the
// launch geometry (one resident wave from the occupancy API, cached per kernel), and which
// kernel path runs (MOSX_CUDA_KERNELS=chunked forces the chunked fallback, read once).
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
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <utility>

#include "../checks.h"
#include "../host_utils.h"
#include "common.cuh"

namespace mosx {
namespace cuda_detail {

// Whether the register-row ("fast") kernels may run: false when the environment sets
// MOSX_CUDA_KERNELS=chunked (read once per process). Both paths give the same results.
inline bool fast_kernels_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("MOSX_CUDA_KERNELS");
    return !(v != nullptr && std::strcmp(v, "chunked") == 0);
  }();
  return enabled;
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

}  // namespace cuda_detail
}  // namespace mosx
