// adaLN modulation y = norm(x) * (1 + scale) + shift for packed batches: fastdit::adaln_modulate_cuda.
//
// One CTA (256 threads) per row, grid-stride. The row stays in registers (ITEMS vectors of VEC
// elements per thread): one read of x, one write of y, statistics in fp32 with a two-pass
// (centred) variance over the registers, block reductions through warp shuffles. shift / scale
// (fp32) are per sample, found by binary search in cu_seqlens, or per token; they (and the affine
// weight / bias) are read with 16-byte loads in the vector path, like x: one float at a time,
// their 32-byte thread stride made every warp load touch 8 cache lines for 128 useful bytes.
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common.cuh"

namespace fastdit {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxItems = 8;  // vectors per thread: C <= 256 * VEC * 8 (16384 in bf16, 8192 in fp32)

__device__ __forceinline__ float block_sum(float v, float* shared) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared is reused across calls
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  return total;
}

template <typename T, int VEC, int ITEMS, bool RMS>
__global__ void __launch_bounds__(kThreads) adaln_modulate_kernel(
    // pointers
    const T* __restrict__ x, const float* __restrict__ shift, const float* __restrict__ scale,
    const float* __restrict__ weight, const float* __restrict__ bias,  // nullptr: no affine
    const int32_t* __restrict__ cu_seqlens,                            // nullptr: per-token modulation
    T* __restrict__ out,
    // sizes
    int64_t rows, int64_t cols, int64_t num_samples, float eps,
    // strides of rows, in elements
    int64_t stride_x, int64_t stride_out) {
  __shared__ float shared[kThreads / 32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t mod_row = cu_seqlens == nullptr ? row : sample_of_row(cu_seqlens, num_samples, row);
    const T* src = x + row * stride_x;
    float v[ITEMS][VEC];
    float sum = 0.f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t col = (static_cast<int64_t>(it) * kThreads + threadIdx.x) * VEC;
      Vec<T, VEC> in;
      if (col < cols) {
        in.load(src + col);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        v[it][j] = col < cols ? to_float(in.v[j]) : 0.f;
        sum += v[it][j];
      }
    }
    const float mean = RMS ? 0.f : block_sum(sum, shared) / cols;
    float sq = 0.f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t col = (static_cast<int64_t>(it) * kThreads + threadIdx.x) * VEC;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float c = col < cols ? v[it][j] - mean : 0.f;
        sq += c * c;
      }
    }
    const float rstd = rsqrtf(block_sum(sq, shared) / cols + eps);
    const float* sh = shift + mod_row * cols;
    const float* sc = scale + mod_row * cols;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t col = (static_cast<int64_t>(it) * kThreads + threadIdx.x) * VEC;
      if (col >= cols) continue;
      float s[VEC], c[VEC], w[VEC], b[VEC];
      load_floats<VEC>(sh + col, s);
      load_floats<VEC>(sc + col, c);
      if (weight != nullptr) load_floats<VEC>(weight + col, w);
      if (bias != nullptr) load_floats<VEC>(bias + col, b);
      Vec<T, VEC> o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float n = (v[it][j] - mean) * rstd;
        if (weight != nullptr) n *= w[j];
        if (bias != nullptr) n += b[j];
        o.v[j] = from_float<T>(n * (1.f + c[j]) + s[j]);
      }
      o.store(out + row * stride_out + col);
    }
  }
}

template <typename T, int VEC, bool RMS>
void launch_items(int items, const at::Tensor& x, const float* shift, const float* scale, const float* weight,
                  const float* bias, const int32_t* cu, int64_t num_samples, float eps, at::Tensor& out) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const int blocks = static_cast<int>(std::min<int64_t>(rows, static_cast<int64_t>(sm_count(x.get_device())) * 8));
  cudaStream_t stream = current_stream(x);
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  T* op = reinterpret_cast<T*>(out.data_ptr());
#define FASTDIT_ADALN_CASE(N)                                                                                  \
  case N:                                                                                                      \
    FASTDIT_LAUNCH(blocks, kThreads, 0, stream, adaln_modulate_kernel<T, VEC, N, RMS>)(                         \
        xp, shift, scale, weight, bias, cu, op, rows, cols, num_samples, eps, x.stride(0), out.stride(0)); \
    break;
  switch (items) {
    FASTDIT_ADALN_CASE(1)
    FASTDIT_ADALN_CASE(2)
    FASTDIT_ADALN_CASE(4)
    FASTDIT_ADALN_CASE(8)
    default:
      TORCH_CHECK(false, "adaln_modulate_cuda: internal error, items=", items);
  }
#undef FASTDIT_ADALN_CASE
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_typed(const at::Tensor& x, const float* shift, const float* scale, const float* weight, const float* bias,
                  const int32_t* cu, int64_t num_samples, float eps, bool rms, at::Tensor& out) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t cols = x.size(1);
  const bool vec_ok = cols % kVec == 0 && aligned16(x.data_ptr()) && aligned16(out.data_ptr()) &&
                      x.stride(0) % kVec == 0 && out.stride(0) % kVec == 0;
  const int vec = vec_ok ? kVec : 1;
  const int64_t needed = (cols + static_cast<int64_t>(kThreads) * vec - 1) / (static_cast<int64_t>(kThreads) * vec);
  TORCH_CHECK(needed <= kMaxItems, "adaln_modulate_cuda: C=", cols, " exceeds ", kThreads * vec * kMaxItems,
              " for this dtype and alignment");
  const int items = needed <= 1 ? 1 : needed <= 2 ? 2 : needed <= 4 ? 4 : 8;
  if (vec_ok) {
    rms ? launch_items<T, kVec, true>(items, x, shift, scale, weight, bias, cu, num_samples, eps, out)
        : launch_items<T, kVec, false>(items, x, shift, scale, weight, bias, cu, num_samples, eps, out);
  } else {
    rms ? launch_items<T, 1, true>(items, x, shift, scale, weight, bias, cu, num_samples, eps, out)
        : launch_items<T, 1, false>(items, x, shift, scale, weight, bias, cu, num_samples, eps, out);
  }
}

// fp32 rows the vector path reads 16 bytes at a time: a view starting off a 16-byte boundary is
// copied (B x C or C floats; per-token rows only when a caller passes such a view).
at::Tensor aligned_rows(const at::Tensor& t) { return aligned16(t.data_ptr()) ? t : t.clone(); }

std::optional<at::Tensor> optional_fp32(const std::optional<at::Tensor>& t, int64_t cols, const char* name) {
  if (!t.has_value()) return std::nullopt;
  TORCH_CHECK(on_kernel_device(*t) && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == cols,
              "adaln_modulate_cuda: ", name, " must be a contiguous float32 (C,) CUDA tensor");
  return aligned_rows(*t);
}

at::Tensor adaln_modulate_cuda(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                               const std::optional<at::Tensor>& cu_seqlens, c10::string_view norm, double eps,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(on_kernel_device(x) && x.dim() == 2 && x.stride(1) == 1,
              "adaln_modulate_cuda: x must be (N, C) CUDA rows");
  TORCH_CHECK(norm == "layer" || norm == "rms", "adaln_modulate_cuda: norm must be 'layer' or 'rms'");
  const int64_t cols = x.size(1);
  for (const at::Tensor* t : {&shift, &scale}) {
    TORCH_CHECK(on_kernel_device(*t) && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                    t->size(1) == cols,
                "adaln_modulate_cuda: shift and scale must be contiguous float32 (B or N, C) CUDA tensors");
  }
  const int32_t* cu = nullptr;
  int64_t num_samples = shift.size(0);
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(on_kernel_device(*cu_seqlens) && cu_seqlens->scalar_type() == at::kInt &&
                    cu_seqlens->is_contiguous() && cu_seqlens->numel() == shift.size(0) + 1,
                "adaln_modulate_cuda: cu_seqlens must be a contiguous int32 (B+1,) CUDA vector");
    cu = cu_seqlens->data_ptr<int32_t>();
  } else {
    TORCH_CHECK(shift.size(0) == x.size(0), "adaln_modulate_cuda: per-token shift needs N rows");
  }
  const DeviceGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  if (x.size(0) == 0) return out;
  const std::optional<at::Tensor> weight_rows = optional_fp32(weight, cols, "weight");
  const std::optional<at::Tensor> bias_rows = optional_fp32(bias, cols, "bias");
  const at::Tensor shift_rows = aligned_rows(shift), scale_rows = aligned_rows(scale);
  const float* w = weight_rows ? weight_rows->data_ptr<float>() : nullptr;
  const float* b = bias_rows ? bias_rows->data_ptr<float>() : nullptr;
  const float* sh = shift_rows.data_ptr<float>();
  const float* sc = scale_rows.data_ptr<float>();
  const bool rms = norm == "rms";
  const float e = static_cast<float>(eps);
  switch (x.scalar_type()) {
    case at::kFloat:
      launch_typed<float>(x, sh, sc, w, b, cu, num_samples, e, rms, out);
      break;
    case at::kHalf:
      launch_typed<__half>(x, sh, sc, w, b, cu, num_samples, e, rms, out);
      break;
    case at::kBFloat16:
      launch_typed<__nv_bfloat16>(x, sh, sc, w, b, cu, num_samples, e, rms, out);
      break;
    default:
      TORCH_CHECK(false, "adaln_modulate_cuda: unsupported dtype ", x.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdit, FASTDIT_DISPATCH_KEY, m) { m.impl("adaln_modulate_cuda", &adaln_modulate_cuda); }

}  // namespace fastdit
