// A SIMT emulator for mosx's CUDA device code on the CPU (a test tool, never part of the library).
//
// tools/cuda_emu/build.py compiles csrc/cuda/*.cu as C++ with this header forced in first
// (-include) and MOSX_CUDA_EMULATION defined, into a torch library "mosx_emu" whose ops run the
// real host code and the real kernels on CPU tensors. Each CUDA thread of a block is a fiber
// (ucontext); one OS thread runs the blocks of a launch one after another. What it checks that a
// plain read of the code cannot:
//  * __syncthreads: a thread waits until every live thread of its block arrives; a barrier that
//    some threads have left the kernel for, or a warp that waits at a barrier while other lanes
//    wait in a shuffle, is reported (CUDA would hang or be undefined).
//  * warp intrinsics (__shfl*_sync, __ballot_sync, __match_any_sync, __syncwarp): resolved only
//    when every lane named in the mask has arrived at the same intrinsic; a lane that has exited
//    or waits elsewhere is reported as divergence.
//  * between those points the threads run in a random order (seeded: MOSX_EMU_SEED), so a read
//    of shared memory that a missing barrier leaves unordered sees stale data in some schedules.
//  * cp.async copies land late: at the wait that guarantees them, or earlier at random, never
//    before their group is committed; shared memory starts every block filled with 0xFF bytes.
//  * launches: dynamic shared memory above 48 KiB needs cudaFuncSetAttribute first, and never
//    above the device's opt-in limit (MOSX_EMU_SMEM_OPTIN, default an H100/H200's 232448 bytes);
//    at most 1024 threads per block.
// Out-of-bounds reads and writes of global or shared memory are caught when the library is
// built with AddressSanitizer (build.py --asan): every tensor and every block's shared memory is
// its own heap allocation of the exact size; 16-byte copies and stores check their alignment.
// Not modelled: timing; the memory model beyond barriers and warp ops (the code between two sync
// points of a thread runs at once, so a missing atomic or an interleaving inside it is never
// seen: racecheck on a GPU is still needed); __launch_bounds__ and registers; the GPU's
// approximate intrinsics (__expf is expf here).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace mosx_emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

enum class State { Runnable, Barrier, WarpOp, Done };
enum class Op { ShflIdx, ShflXor, ShflUp, ShflDown, Ballot, MatchAny, SyncWarp };

inline const char* op_name(Op op) {
  switch (op) {
    case Op::ShflIdx:
      return "__shfl_sync";
    case Op::ShflXor:
      return "__shfl_xor_sync";
    case Op::ShflUp:
      return "__shfl_up_sync";
    case Op::ShflDown:
      return "__shfl_down_sync";
    case Op::Ballot:
      return "__ballot_sync";
    case Op::MatchAny:
      return "__match_any_sync";
    case Op::SyncWarp:
      return "__syncwarp";
  }
  return "?";
}

struct Copy {
  void* dst;
  const void* src;
};

// Fiber switches. On x86-64 (without AddressSanitizer, which needs to see the switches) a
// six-register switch; elsewhere swapcontext, which also saves the signal mask (two system calls
// per switch, several times slower).
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__) && !defined(MOSX_EMU_UCONTEXT)
#define MOSX_EMU_FAST_SWITCH 1
// Saves the callee-saved registers on the current stack, stores its pointer in *from, and
// resumes the stack `to` (made by fiber_stack or saved by an earlier switch).
__attribute__((naked, noinline)) static void fiber_switch(void** /*from*/, void* /*to*/) {
  asm volatile(
      "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
      "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
      "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret");
}
#endif

struct Thread {
  ucontext_t ctx;
  void* sp = nullptr;  // MOSX_EMU_FAST_SWITCH: the saved stack pointer
  std::unique_ptr<char[]> stack;
  Dim3 tid;
  State state = State::Done;
  Op op = Op::SyncWarp;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
  std::vector<Copy> open;                // cp.async issued, group not committed yet
  std::deque<std::vector<Copy>> groups;  // committed groups still in flight
};

inline int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

struct Runtime {
  static constexpr size_t kStack = 256 * 1024;
  std::vector<Thread> threads;
  ucontext_t sched;
  void* sched_sp = nullptr;
  int current = -1;
  Dim3 block_idx, block_dim, grid_dim;
  struct AlignedDelete {
    void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(16)); }
  };
  std::unique_ptr<unsigned char[], AlignedDelete> smem;
  size_t smem_bytes = 0;
  std::mt19937_64 rng{static_cast<uint64_t>(env_int("MOSX_EMU_SEED", 1))};
  std::function<void()> body;
  std::exception_ptr failure;
  std::map<const void*, int> smem_allowed;  // cudaFuncAttributeMaxDynamicSharedMemorySize

  // The modelled device.
  int sms() const { return env_int("MOSX_EMU_SMS", 3); }
  int smem_optin() const { return env_int("MOSX_EMU_SMEM_OPTIN", 232448); }
  int blocks_per_sm_cap() const { return env_int("MOSX_EMU_BLOCKS_PER_SM", 2); }
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline Thread& self() { return rt().threads[static_cast<size_t>(rt().current)]; }

[[noreturn]] inline void fail(const std::string& what) {
  std::ostringstream os;
  os << "cuda_emu: " << what << " (block " << rt().block_idx.x << " of " << rt().grid_dim.x << ", "
     << rt().block_dim.x << " threads)";
  throw std::runtime_error(os.str());
}

inline void yield() {
  Runtime& r = rt();
  Thread& t = self();
#ifdef MOSX_EMU_FAST_SWITCH
  fiber_switch(&t.sp, r.sched_sp);
#else
  swapcontext(&t.ctx, &r.sched);
#endif
}

inline void land(std::vector<Copy>& group) {
  for (const Copy& c : group) std::memcpy(c.dst, c.src, 16);
  group.clear();
}

// ---------------------------------------------------------------------------------------------
// What the device code calls.

inline void syncthreads() {
  self().state = State::Barrier;
  yield();
}

inline uint64_t warp_op(Op op, unsigned mask, uint64_t value, int arg = 0, int width = 32) {
  Thread& t = self();
  t.op = op;
  t.mask = mask;
  t.value = value;
  t.arg = arg;
  t.width = width;
  t.state = State::WarpOp;
  yield();
  return self().result;
}

template <typename T>
uint64_t bits_of(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a large type");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

inline void check_aligned16(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    fail(std::string(what) + " of 16 bytes at a misaligned address");
}

inline void copy16_async(void* dst, const void* src) {
  check_aligned16(dst, "cp.async (shared side)");
  check_aligned16(src, "cp.async (global side)");
  self().open.push_back({dst, src});
}

inline void copy_async_commit() {
  Thread& t = self();
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}

inline void copy_async_wait(int pending) {
  Thread& t = self();
  while (static_cast<int>(t.groups.size()) > pending) {
    land(t.groups.front());
    t.groups.pop_front();
  }
}

inline unsigned char* dynamic_smem() { return rt().smem.get(); }

// ---------------------------------------------------------------------------------------------
// The scheduler.

inline void fiber_entry(int index);

#ifdef MOSX_EMU_FAST_SWITCH
// The first frame of a fiber: runs the kernel, then hands the stack back for good.
[[noreturn]] inline void fiber_start() {
  fiber_entry(rt().current);
  fiber_switch(&self().sp, rt().sched_sp);
  __builtin_unreachable();
}

// A new fiber's stack as fiber_switch leaves one: six zero registers, then fiber_start as the
// return address, with the 16-byte alignment of a function entry.
inline void* fiber_stack(char* base, size_t size) {
  auto top = reinterpret_cast<uintptr_t>(base + size) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;  // fiber_start's (never used) return address
  *--sp = reinterpret_cast<void*>(&fiber_start);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  return sp;
}
#endif

inline void fiber_entry(int index) {
  Runtime& r = rt();
  try {
    r.body();
  } catch (...) {
    if (!r.failure) r.failure = std::current_exception();
  }
  Thread& t = r.threads[static_cast<size_t>(index)];
  for (auto& g : t.groups) land(g);  // the hardware completes them before the block retires
  t.groups.clear();
  t.open.clear();
  t.state = State::Done;
  // returning resumes uc_link, the scheduler (ucontext) or fiber_start's last switch
}

inline std::string describe_states(size_t n) {
  std::ostringstream os;
  const char* names[] = {"running", "at __syncthreads", "in a warp op", "exited"};
  for (size_t w = 0; w * 32 < n; ++w) {
    os << "\n  warp " << w << ":";
    for (size_t i = w * 32; i < std::min(n, w * 32 + 32); ++i) {
      const Thread& t = rt().threads[i];
      os << " " << (i - w * 32) << "=" << names[static_cast<int>(t.state)];
      if (t.state == State::WarpOp) os << "(" << op_name(t.op) << ")";
    }
  }
  return os.str();
}

// Resolve the warp ops whose every named lane has arrived; false if some are stuck.
inline bool resolve_warp_ops(size_t n) {
  Runtime& r = rt();
  bool any = false;
  for (size_t base = 0; base < n; base += 32) {
    const size_t lanes = std::min<size_t>(32, n - base);
    const unsigned exists = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    for (size_t i = base; i < base + lanes; ++i) {
      Thread& t = r.threads[i];
      if (t.state != State::WarpOp) continue;
      const unsigned mask = t.mask & exists;
      if (((mask >> (i - base)) & 1u) == 0)
        fail(std::string(op_name(t.op)) + " by a lane outside its own mask");
      bool ready = true;
      for (size_t j = 0; j < lanes; ++j) {
        if (((mask >> j) & 1u) == 0) continue;
        const Thread& o = r.threads[base + j];
        if (o.state == State::Done)
          fail(std::string(op_name(t.op)) + " names lane " + std::to_string(j) + " of warp " +
               std::to_string(base / 32) + ", which has exited" + describe_states(n));
        if (o.state != State::WarpOp) {
          ready = false;
          break;
        }
        if (o.op != t.op || o.mask != t.mask || o.width != t.width)
          fail(std::string("divergent warp ops: ") + op_name(t.op) + " and " + op_name(o.op) +
               " (or other masks / widths) in warp " + std::to_string(base / 32) +
               describe_states(n));
      }
      if (!ready) continue;
      uint64_t ballot = 0;
      for (size_t j = 0; j < lanes; ++j)
        if (((mask >> j) & 1u) != 0 && r.threads[base + j].value != 0) ballot |= 1ull << j;
      for (size_t j = 0; j < lanes; ++j) {
        if (((mask >> j) & 1u) == 0) continue;
        Thread& me = r.threads[base + j];
        const int w = me.width, lane = static_cast<int>(j), seg = lane & ~(w - 1);
        int src = lane;
        switch (me.op) {
          case Op::ShflIdx:
            src = seg + (me.arg & (w - 1));
            break;
          case Op::ShflXor:
            src = lane ^ me.arg;
            if (src >= seg + w) src = lane;
            break;
          case Op::ShflUp:
            src = (lane - seg) >= me.arg ? lane - me.arg : lane;
            break;
          case Op::ShflDown:
            src = (lane - seg) + me.arg < w ? lane + me.arg : lane;
            break;
          default:
            break;
        }
        if (me.op == Op::Ballot) {
          me.result = ballot;
        } else if (me.op == Op::MatchAny) {
          uint64_t same = 0;
          for (size_t k = 0; k < lanes; ++k)
            if (((mask >> k) & 1u) != 0 && r.threads[base + k].value == me.value) same |= 1ull << k;
          me.result = same;
        } else if (me.op != Op::SyncWarp) {
          if (src < 0 || src >= static_cast<int>(lanes) || ((mask >> src) & 1u) == 0)
            fail(std::string(op_name(me.op)) + " reads lane " + std::to_string(src) +
                 ", which is not in the mask");
          me.result = r.threads[base + static_cast<size_t>(src)].value;
        }
      }
      for (size_t j = 0; j < lanes; ++j)
        if (((mask >> j) & 1u) != 0) r.threads[base + j].state = State::Runnable;
      any = true;
    }
  }
  return any;
}

inline void run_block(size_t n) {
  Runtime& r = rt();
  // Shared memory holds leftovers on a GPU: a fill pattern per block (MOSX_EMU_FILL=<byte> fixes
  // it), so that a stale read gives -1, a large value, zero or garbage in some run.
  static const unsigned char kFills[] = {0xff, 0x7f, 0x00, 0xa5};
  const int fill_env = env_int("MOSX_EMU_FILL", -1);
  const unsigned char fill =
      fill_env >= 0 ? static_cast<unsigned char>(fill_env) : kFills[r.rng() % 4];
  std::fill(r.smem.get(), r.smem.get() + r.smem_bytes, fill);
  for (size_t i = 0; i < n; ++i) {
    Thread& t = r.threads[i];
    if (!t.stack) t.stack.reset(new char[Runtime::kStack]);
    t.tid = Dim3{static_cast<unsigned>(i), 0, 0};
    t.state = State::Runnable;
    t.open.clear();
    t.groups.clear();
#ifdef MOSX_EMU_FAST_SWITCH
    t.sp = fiber_stack(t.stack.get(), Runtime::kStack);
#else
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack.get();
    t.ctx.uc_stack.ss_size = Runtime::kStack;
    t.ctx.uc_link = &r.sched;
    makecontext(&t.ctx, reinterpret_cast<void (*)()>(&fiber_entry), 1, static_cast<int>(i));
#endif
  }
  std::vector<int> order;
  std::uniform_int_distribution<int> coin(0, 3);
  // Two schedules, a coin per block (MOSX_EMU_SCHED=0 or 1 forces one): rounds (every runnable
  // thread runs to its next sync point, in random order: the warps stay level) or warp-greedy
  // (one random warp runs until all its lanes wait, then another: warps drift apart between
  // barriers as they may on a GPU, which exposes a missing barrier between accesses that are a
  // different number of warp ops into the phase).
  const int sched = env_int("MOSX_EMU_SCHED", -1);
  const bool greedy = sched == 1 || (sched < 0 && (r.rng() & 1) != 0);
  const size_t nw = (n + 31) / 32;
  auto warp_runnable = [&](size_t w) {
    for (size_t i = w * 32; i < std::min(n, w * 32 + 32); ++i)
      if (r.threads[i].state == State::Runnable) return true;
    return false;
  };
  long cur_warp = -1;
  std::vector<long> ws;
  for (;;) {
    order.clear();
    if (greedy) {
      if (cur_warp < 0 || !warp_runnable(static_cast<size_t>(cur_warp))) {
        ws.clear();
        for (size_t w = 0; w < nw; ++w)
          if (warp_runnable(w)) ws.push_back(static_cast<long>(w));
        cur_warp = ws.empty() ? -1 : ws[r.rng() % ws.size()];
      }
      if (cur_warp >= 0) {
        const size_t lo = static_cast<size_t>(cur_warp) * 32;
        for (size_t i = lo; i < std::min(n, lo + 32); ++i)
          if (r.threads[i].state == State::Runnable) order.push_back(static_cast<int>(i));
      }
    } else {
      for (size_t i = 0; i < n; ++i)
        if (r.threads[i].state == State::Runnable) order.push_back(static_cast<int>(i));
    }
    std::shuffle(order.begin(), order.end(), r.rng);
    for (int i : order) {
      r.current = i;
#ifdef MOSX_EMU_FAST_SWITCH
      fiber_switch(&r.sched_sp, r.threads[static_cast<size_t>(i)].sp);
#else
      swapcontext(&r.sched, &r.threads[static_cast<size_t>(i)].ctx);
#endif
      r.current = -1;
      if (r.failure) std::rethrow_exception(r.failure);
      Thread& t = r.threads[static_cast<size_t>(i)];
      if (!t.groups.empty() && coin(r.rng) == 0) {  // a copy group may land early
        land(t.groups.front());
        t.groups.pop_front();
      }
    }
    if (!order.empty()) {
      resolve_warp_ops(n);
      continue;
    }
    if (resolve_warp_ops(n)) continue;
    size_t done = 0, barrier = 0;
    for (size_t i = 0; i < n; ++i) {
      done += r.threads[i].state == State::Done;
      barrier += r.threads[i].state == State::Barrier;
    }
    if (done == n) return;
    if (barrier + done == n) {
      if (done != 0)
        fail("__syncthreads after some threads of the block exited" + describe_states(n));
      for (size_t i = 0; i < n; ++i) r.threads[i].state = State::Runnable;
      continue;
    }
    fail("deadlock: no thread can go on" + describe_states(n));
  }
}

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  unsigned grid, block;
  size_t smem;

  template <typename... A>
  void operator()(A&&... a) const {
    Runtime& r = rt();
    const void* key = reinterpret_cast<const void*>(kernel);
    if (grid < 1 || block < 1 || block > 1024)
      fail("invalid launch: grid " + std::to_string(grid) + ", block " + std::to_string(block));
    const auto allowed = r.smem_allowed.find(key);
    const size_t limit = allowed != r.smem_allowed.end() ? static_cast<size_t>(allowed->second)
                                                         : static_cast<size_t>(48 * 1024);
    if (smem > limit)
      fail("launch with " + std::to_string(smem) + " bytes of dynamic shared memory; the kernel " +
           "may use " + std::to_string(limit) + " (cudaFuncSetAttribute)");
    std::tuple<std::decay_t<P>...> args(std::forward<A>(a)...);
    r.body = [&] { std::apply(kernel, args); };
    r.failure = nullptr;
    r.smem.reset(new (std::align_val_t(16)) unsigned char[std::max<size_t>(smem, 1)]);
    r.smem_bytes = smem;
    if (r.threads.size() < block) r.threads.resize(block);
    r.block_dim = Dim3{block, 1, 1};
    r.grid_dim = Dim3{grid, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {
      r.block_idx = Dim3{b, 0, 0};
      run_block(block);
    }
    r.body = nullptr;
  }
};

template <typename... P, typename G, typename B>
Launch<P...> launch(void (*kernel)(P...), G grid, B block, size_t smem = 0,
                    cudaStream_t = nullptr) {
  return Launch<P...>{kernel, static_cast<unsigned>(grid), static_cast<unsigned>(block), smem};
}

// ---------------------------------------------------------------------------------------------
// The CUDA runtime calls of the host code, against the modelled device.

inline cudaError_t GetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}

inline cudaError_t DeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMultiProcessorCount) {
    *v = rt().sms();
  } else if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) {
    *v = rt().smem_optin();
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

inline cudaError_t OccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void*, int threads,
                                                             size_t smem) {
  const int by_threads = 2048 / std::max(threads, 1);
  const int by_smem = static_cast<int>(233472 / (smem + 1024));
  *n = std::max(0, std::min({by_threads, by_smem, rt().blocks_per_sm_cap()}));
  if (static_cast<int>(smem) > rt().smem_optin()) *n = 0;
  return cudaSuccess;
}

inline cudaError_t FuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value > rt().smem_optin()) return cudaErrorInvalidValue;
  rt().smem_allowed[kernel] = value;
  return cudaSuccess;
}

struct Guard {
  explicit Guard(c10::Device) {}
};

inline cudaStream_t stream() { return nullptr; }

inline void check(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "cuda_emu: ", what, " failed (error ", static_cast<int>(e), ")");
}

}  // namespace mosx_emu

// ---------------------------------------------------------------------------------------------
// The names the device and host code use.

#undef C10_CUDA_CHECK
#define C10_CUDA_CHECK(EXPR) ::mosx_emu::check((EXPR), #EXPR)
#undef C10_CUDA_KERNEL_LAUNCH_CHECK
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
#define cudaGetDevice ::mosx_emu::GetDevice
#define cudaDeviceGetAttribute ::mosx_emu::DeviceGetAttribute
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor \
  ::mosx_emu::OccupancyMaxActiveBlocksPerMultiprocessor
#define cudaFuncSetAttribute ::mosx_emu::FuncSetAttribute

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __align__
#define __align__(n) alignas(n)
// build.py rewrites every __shared__ declaration; one it missed must not compile silently into a
// per-thread array.
#undef __shared__
#define __shared__ MOSX_EMU_unrewritten_shared_declaration

#define threadIdx (::mosx_emu::self().tid)
#define blockIdx (::mosx_emu::rt().block_idx)
#define blockDim (::mosx_emu::rt().block_dim)
#define gridDim (::mosx_emu::rt().grid_dim)

inline void __syncthreads() { ::mosx_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::mosx_emu::warp_op(::mosx_emu::Op::SyncWarp, mask, 0);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::mosx_emu::from_bits<T>(
      ::mosx_emu::warp_op(::mosx_emu::Op::ShflIdx, mask, ::mosx_emu::bits_of(v), src, width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::mosx_emu::from_bits<T>(
      ::mosx_emu::warp_op(::mosx_emu::Op::ShflXor, mask, ::mosx_emu::bits_of(v), lane_mask, width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::mosx_emu::from_bits<T>(::mosx_emu::warp_op(
      ::mosx_emu::Op::ShflUp, mask, ::mosx_emu::bits_of(v), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::mosx_emu::from_bits<T>(::mosx_emu::warp_op(
      ::mosx_emu::Op::ShflDown, mask, ::mosx_emu::bits_of(v), static_cast<int>(delta), width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(::mosx_emu::warp_op(::mosx_emu::Op::Ballot, mask, pred != 0));
}
template <typename T>
unsigned __match_any_sync(unsigned mask, T v) {
  return static_cast<unsigned>(
      ::mosx_emu::warp_op(::mosx_emu::Op::MatchAny, mask, ::mosx_emu::bits_of(v)));
}

// The device's integer and float min / max overloads.
#define MOSX_EMU_MINMAX(T)                         \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
MOSX_EMU_MINMAX(int)
MOSX_EMU_MINMAX(unsigned)
MOSX_EMU_MINMAX(long)
MOSX_EMU_MINMAX(unsigned long)
MOSX_EMU_MINMAX(long long)
MOSX_EMU_MINMAX(unsigned long long)
#undef MOSX_EMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline float __int_as_float(int v) {
  return ::mosx_emu::from_bits<float>(static_cast<uint32_t>(v));
}
inline int __float_as_int(float v) { return static_cast<int>(::mosx_emu::bits_of(v)); }
inline unsigned __float_as_uint(float v) { return static_cast<unsigned>(::mosx_emu::bits_of(v)); }
inline double __longlong_as_double(long long v) {
  return ::mosx_emu::from_bits<double>(static_cast<uint64_t>(v));
}
inline long long __double_as_longlong(double v) {
  return static_cast<long long>(::mosx_emu::bits_of(v));
}
inline float __expf(float x) { return std::exp(x); }

// One OS thread runs every fiber and none yields inside these: plain read-modify-writes.
template <typename T, typename U>
T atomicAdd(T* p, U v) {
  const T old = *p;
  *p = static_cast<T>(old + static_cast<T>(v));
  return old;
}
