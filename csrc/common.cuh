// Helpers shared by fastdit's CUDA kernels: dtype conversion, 16-byte vectors, packed-batch lookup,
// and the few runtime calls that differ in the CPU emulation build (-DFASTDIT_CUDA_EMULATION, see
// cuda_emulation.h), where the same kernels run on CPU tensors for the tests.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#ifdef FASTDIT_CUDA_EMULATION
#include "cuda_emulation.h"
// The op implementations register for this dispatch key and take tensors of this device.
#define FASTDIT_DISPATCH_KEY CPU
// kernel<<<grid, threads, shared, stream>>>: the kernel (templated names keep their commas) comes last.
#define FASTDIT_LAUNCH(grid, threads, shared, stream, ...) \
  (static_cast<void>(stream), ::fastdit::emulation::launch(grid, threads, shared, __VA_ARGS__))
#define FASTDIT_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::fastdit::emulation::dynamic_shared())
#define FASTDIT_CHECK_ALIGNED16(p) ::fastdit::emulation::check_aligned16(p, __FILE__, __LINE__)
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FASTDIT_DISPATCH_KEY CUDA
#define FASTDIT_LAUNCH(grid, threads, shared, stream, ...) __VA_ARGS__<<<grid, threads, shared, stream>>>
#define FASTDIT_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#define FASTDIT_CHECK_ALIGNED16(p)
#endif

namespace fastdit {

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// N elements of T moved as one 16-byte access when N * sizeof(T) == 16 (the caller checked the
// alignment), element by element otherwise.
template <typename T, int N>
struct Vec {
  T v[N];
  __device__ __forceinline__ void load(const T* __restrict__ p) {
    if constexpr (N * sizeof(T) == 16) {
      FASTDIT_CHECK_ALIGNED16(p);
      *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(p);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] = p[i];
    }
  }
  __device__ __forceinline__ void store(T* __restrict__ p) const {
    if constexpr (N * sizeof(T) == 16) {
      FASTDIT_CHECK_ALIGNED16(p);
      *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(v);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) p[i] = v[i];
    }
  }
};

// N fp32 values at p into registers: 16-byte loads when N is a multiple of 4 (the caller checked
// the alignment), one by one otherwise.
template <int N>
__device__ __forceinline__ void load_floats(const float* __restrict__ p, float (&out)[N]) {
  constexpr int kChunk = N % 4 == 0 ? 4 : 1;
#pragma unroll
  for (int i = 0; i < N; i += kChunk) {
    Vec<float, kChunk> v;
    v.load(p + i);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) out[i + j] = v.v[j];
  }
}

// Two floats rounded to T and packed in one 32-bit word (T is 16-bit).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// One 16-byte global store of four words; the caller guarantees 16-byte alignment. Written as
// PTX because NVVM split the equivalent uint4 store of rope3d into four 4-byte stores in the
// sm_90a build (st.global.u32 x 4 in the PTX), whatever the C++ spelling.
__device__ __forceinline__ void store_global_v4(void* p, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
#ifdef FASTDIT_CUDA_EMULATION
  FASTDIT_CHECK_ALIGNED16(p);
  const uint32_t words[4] = {a, b, c, d};
  std::memcpy(p, words, sizeof(words));
#else
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
#endif
}

// Round N floats to T and store them with one 16-byte access when N * sizeof(T) == 16.
template <typename T, int N>
__device__ __forceinline__ void store_rounded(T* __restrict__ p, const float (&f)[N]) {
  if constexpr (N * sizeof(T) == 16 && sizeof(T) == 2) {
    store_global_v4(p, pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]), pack2<T>(f[6], f[7]));
  } else if constexpr (N * sizeof(T) == 16) {
    store_global_v4(p, __float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = from_float<T>(f[i]);
  }
}

// Sample of a packed row: the b with cu_seqlens[b] <= row < cu_seqlens[b + 1] (binary search;
// with empty samples the last sample starting at or before row, which is the one that holds it).
__device__ __forceinline__ int64_t sample_of_row(const int32_t* __restrict__ cu_seqlens, int64_t num_samples,
                                                 int64_t row) {
  int64_t lo = 0, hi = num_samples - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (static_cast<int64_t>(cu_seqlens[mid]) <= row) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

#ifdef FASTDIT_CUDA_EMULATION
// Two "SMs": grids stay small, so every grid-stride loop runs several rounds in the tests.
inline int sm_count(int) { return 2; }
inline cudaStream_t current_stream(const at::Tensor&) { return nullptr; }
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
#else
inline int sm_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

// The device the kernels run on: CUDA (CPU in the emulation build).
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;
#endif

}  // namespace fastdit
