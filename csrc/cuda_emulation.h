// A CPU stand-in for the part of the CUDA programming model fastdit's kernels use, so that the
// very source of csrc/*.cu runs on a machine without a GPU (tests/ops/test_cuda_emulation.py
// compiles it with g++ -DFASTDIT_CUDA_EMULATION and compares it with the reference ops).
//
// Model: launches run one at a time (as on one stream), each runs its blocks one after another,
// and the threads of a block are real OS threads, so __syncthreads is a barrier over them and
// __shfl_xor_sync a barrier over one warp with a value exchange. Because one block runs at a
// time, a function-local `static` array is exactly a block's __shared__ array, and dynamic
// shared memory is one buffer per launch.
//
// What it checks beyond the arithmetic: every 16-byte vector access is 16-byte aligned, launch
// configurations are valid (grid > 0, 1..1024 threads, <= 48 KiB dynamic shared memory without an
// opt-in), shuffles use full warps and full masks. It says nothing about speed, coalescing or
// races that need real concurrency between blocks: those need the GPU tests.
#pragma once

#ifndef FASTDIT_CUDA_EMULATION
#error "cuda_emulation.h is for the CPU build of csrc/ (-DFASTDIT_CUDA_EMULATION) only"
#endif

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <barrier>
#ifdef __linux__
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one at a time, so one static array per call site is the running block's.
#define __shared__ static
// Errors of a launch are raised by the launch itself (see run_grid).
#define C10_CUDA_KERNEL_LAUNCH_CHECK()

using cudaStream_t = void*;

// 16-bit float types: c10's, which round to nearest even like __float2half_rn / __float2bfloat16_rn.
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
struct __half2 {
  __half x, y;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline float __half2float(__half v) { return static_cast<float>(v); }
inline __half __float2half_rn(float v) { return __half(v); }
inline float __bfloat162float(__nv_bfloat16 v) { return static_cast<float>(v); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__half(lo), __half(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__nv_bfloat16(lo), __nv_bfloat16(hi)}; }

// Only 4-byte aligned here: a misaligned 16-byte access is reported by check_aligned16 instead of
// faulting the test process.
struct uint4 {
  unsigned int x, y, z, w;
};

inline unsigned int __float_as_uint(float v) {
  unsigned int bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}
inline float rsqrtf(float v) { return 1.f / std::sqrt(v); }

struct Dim3 {
  unsigned int x = 0, y = 1, z = 1;
};
inline thread_local Dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace fastdit::emulation {

constexpr int kWarp = 32;
constexpr size_t kMaxDynamicShared = 48 * 1024;  // without cudaFuncSetAttribute, which no kernel uses

// One launch's state, shared by the threads of its (one running) block.
struct Launch {
  explicit Launch(unsigned int threads, size_t dynamic_shared_bytes)
      : block_barrier(threads), slots(threads), dynamic_shared((dynamic_shared_bytes + 15) / 16 + 1) {
    for (unsigned int first = 0; first < threads; first += kWarp) {
      const auto lanes = static_cast<std::ptrdiff_t>(std::min<unsigned int>(kWarp, threads - first));
      warp_barriers.push_back(std::make_unique<std::barrier<>>(lanes));
    }
  }
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<uint64_t> slots;  // one shuffle value per thread
  std::vector<uint4> dynamic_shared;
  std::mutex error_mutex;
  std::string error;  // the first problem seen; raised after the launch

  void report(const std::string& what) {
    const std::lock_guard<std::mutex> lock(error_mutex);
    if (error.empty()) error = what;
  }
};

inline thread_local Launch* current = nullptr;

inline void check_aligned16(const void* p, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    current->report(std::string("misaligned 16-byte access at ") + file + ":" + std::to_string(line));
  }
}

inline void* dynamic_shared() { return current->dynamic_shared.data(); }

// Runs body() as the kernel of every thread of every block, blocks in order.
inline void run_grid(unsigned int grid, unsigned int threads, size_t dynamic_shared_bytes,
                     const std::function<void()>& body) {
  TORCH_CHECK(grid > 0, "CUDA emulation: invalid configuration argument (grid of 0 blocks)");
  TORCH_CHECK(threads > 0 && threads <= 1024, "CUDA emulation: invalid configuration argument (", threads,
              " threads per block)");
  TORCH_CHECK(dynamic_shared_bytes <= kMaxDynamicShared, "CUDA emulation: ", dynamic_shared_bytes,
              " bytes of dynamic shared memory need cudaFuncSetAttribute");
  // One launch at a time, like one stream: the static __shared__ arrays belong to the running block.
  static std::mutex one_launch;
  const std::lock_guard<std::mutex> serial(one_launch);
  Launch launch(threads, dynamic_shared_bytes);
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (unsigned int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
#ifdef __linux__
      // Emulated threads at the lowest priority: a block's hundreds of runnable threads would
      // otherwise take all but a sliver of the cores from every other process (a parallel test run's
      // other workers); the block still gets whatever those leave.
      setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 19);
#endif
      current = &launch;
      threadIdx = Dim3{t, 0, 0};
      blockDim = Dim3{threads, 1, 1};
      gridDim = Dim3{grid, 1, 1};
      for (unsigned int b = 0; b < grid; ++b) {
        blockIdx = Dim3{b, 0, 0};
        body();
        launch.block_barrier.arrive_and_wait();  // the next block reuses the shared arrays
      }
      current = nullptr;
    });
  }
  for (std::thread& w : workers) w.join();
  TORCH_CHECK(launch.error.empty(), "CUDA emulation: ", launch.error);
}

// kernel<<<grid, threads, shared, stream>>>(args...) becomes launch(grid, threads, shared, kernel)(args...).
template <typename... Params>
auto launch(int64_t grid, int64_t threads, size_t dynamic_shared_bytes, void (*kernel)(Params...)) {
  return [=](auto... args) {
    run_grid(static_cast<unsigned int>(grid), static_cast<unsigned int>(threads), dynamic_shared_bytes,
             [&] { kernel(args...); });
  };
}

}  // namespace fastdit::emulation

inline void __syncthreads() { fastdit::emulation::current->block_barrier.arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 8 bytes");
  using fastdit::emulation::kWarp;
  auto& launch = *fastdit::emulation::current;
  const unsigned int t = threadIdx.x, warp = t / kWarp, lane = t % kWarp;
  if (mask != 0xffffffffu || blockDim.x % kWarp != 0) {
    launch.report("__shfl_xor_sync needs full warps and a full mask here");
  }
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  launch.slots[t] = bits;
  launch.warp_barriers[warp]->arrive_and_wait();
  const unsigned int partner = warp * kWarp + ((lane ^ static_cast<unsigned int>(lane_mask)) % kWarp);
  const uint64_t theirs = launch.slots[partner < blockDim.x ? partner : t];
  launch.warp_barriers[warp]->arrive_and_wait();  // nobody overwrites a slot before it is read
  T out;
  std::memcpy(&out, &theirs, sizeof(T));
  return out;
}
