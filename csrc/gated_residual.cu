// Gated residual r = res + y * gate, the elementwise tail of every DiT sub-block.
//
// Memory bound: per element it reads res and y and writes r (3 * sizeof(T) bytes; gate rows are
// B x C floats, negligible and L2 resident). One CTA walks rows; each thread moves 16 bytes per
// load when C and the pointers allow it, otherwise one element at a time.
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common.cuh"

namespace fastdit {
namespace {

template <typename T, int VEC>
__global__ void gated_residual_kernel(
    // pointers
    const T* __restrict__ res, const T* __restrict__ y, const float* __restrict__ gate,
    const int32_t* __restrict__ cu_seqlens,  // nullptr: gate is per row
    T* __restrict__ out,
    // sizes
    int64_t num_rows, int64_t num_cols, int64_t num_samples) {
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const int64_t gate_row = cu_seqlens == nullptr ? row : sample_of_row(cu_seqlens, num_samples, row);
    // int64 offsets: num_rows * num_cols passes 2^31 at real video sizes.
    const int64_t base = row * num_cols;
    const float* g = gate + gate_row * num_cols;
    for (int64_t col = static_cast<int64_t>(threadIdx.x) * VEC; col < num_cols; col += blockDim.x * VEC) {
      // VEC > 1: 16-byte loads and stores; the caller checked alignment and num_cols % VEC == 0.
      Vec<T, VEC> r, yv;
      r.load(res + base + col);
      yv.load(y + base + col);
      float gv[VEC], o[VEC];
      load_floats<VEC>(g + col, gv);  // the fp32 gate row by 16-byte loads too
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] = to_float(r.v[i]) + to_float(yv.v[i]) * gv[i];
      store_rounded<T, VEC>(out + base + col, o);
    }
  }
}

template <typename T>
void launch(const at::Tensor& res, const at::Tensor& y, const at::Tensor& gate, const int32_t* cu_seqlens,
            int64_t num_samples, at::Tensor& out) {
  const int64_t rows = res.size(0);
  const int64_t cols = res.size(1);
  if (rows == 0 || cols == 0) return;
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = cols % kVec == 0 && aligned16(res.data_ptr()) && aligned16(y.data_ptr()) &&
                       aligned16(out.data_ptr());
  const int vec = aligned ? kVec : 1;
  const int64_t per_row = (cols + vec - 1) / vec;
  const int threads = static_cast<int>(std::min<int64_t>(256, ((per_row + 31) / 32) * 32));
  const int64_t max_blocks = static_cast<int64_t>(sm_count(res.get_device())) * 32;
  const int blocks = static_cast<int>(std::min<int64_t>(rows, max_blocks));
  cudaStream_t stream = current_stream(res);
  const T* r = reinterpret_cast<const T*>(res.data_ptr());
  const T* yy = reinterpret_cast<const T*>(y.data_ptr());
  T* o = reinterpret_cast<T*>(out.data_ptr());
  const float* g = gate.data_ptr<float>();
  if (aligned) {
    FASTDIT_LAUNCH(blocks, threads, 0, stream, gated_residual_kernel<T, kVec>)(
        r, yy, g, cu_seqlens, o, rows, cols, num_samples);
  } else {
    FASTDIT_LAUNCH(blocks, threads, 0, stream, gated_residual_kernel<T, 1>)(
        r, yy, g, cu_seqlens, o, rows, cols, num_samples);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gated_residual_cuda(const at::Tensor& res, const at::Tensor& y, const at::Tensor& gate,
                               const std::optional<at::Tensor>& cu_seqlens) {
  TORCH_CHECK(on_kernel_device(res) && on_kernel_device(y) && on_kernel_device(gate),
              "gated_residual_cuda: res, y, gate must be CUDA tensors");
  TORCH_CHECK(res.dim() == 2 && y.sizes() == res.sizes(),
              "gated_residual_cuda: res and y must be (N, C) of one shape, got ", res.sizes(), " and ", y.sizes());
  TORCH_CHECK(y.scalar_type() == res.scalar_type(), "gated_residual_cuda: y dtype ", y.scalar_type(),
              " differs from res dtype ", res.scalar_type());
  TORCH_CHECK(gate.scalar_type() == at::kFloat, "gated_residual_cuda: gate must be float32, got ", gate.scalar_type());
  TORCH_CHECK(res.is_contiguous() && y.is_contiguous() && gate.is_contiguous(),
              "gated_residual_cuda: res, y and gate must be contiguous");
  TORCH_CHECK(gate.dim() == 2 && gate.size(1) == res.size(1), "gated_residual_cuda: gate must be (B or N, C), got ",
              gate.sizes());
  const int32_t* cu_ptr = nullptr;
  int64_t num_samples = gate.size(0);
  if (cu_seqlens.has_value()) {
    const auto& cu = *cu_seqlens;
    TORCH_CHECK(on_kernel_device(cu) && cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.is_contiguous(),
                "gated_residual_cuda: cu_seqlens must be a contiguous int32 CUDA vector");
    TORCH_CHECK(cu.size(0) == gate.size(0) + 1, "gated_residual_cuda: cu_seqlens has ", cu.size(0),
                " entries, expected B + 1 = ", gate.size(0) + 1);
    cu_ptr = cu.data_ptr<int32_t>();
  } else {
    TORCH_CHECK(gate.size(0) == res.size(0), "gated_residual_cuda: a per-token gate needs N rows, got ", gate.size(0));
  }
  const DeviceGuard guard(res.device());
  at::Tensor out = at::empty_like(res);
  // The vector path reads gate rows 16 bytes at a time: a view off a 16-byte boundary is copied.
  const at::Tensor gate_rows = aligned16(gate.data_ptr()) ? gate : gate.clone();
  switch (res.scalar_type()) {
    case at::kFloat:
      launch<float>(res, y, gate_rows, cu_ptr, num_samples, out);
      break;
    case at::kHalf:
      launch<__half>(res, y, gate_rows, cu_ptr, num_samples, out);
      break;
    case at::kBFloat16:
      launch<__nv_bfloat16>(res, y, gate_rows, cu_ptr, num_samples, out);
      break;
    default:
      TORCH_CHECK(false, "gated_residual_cuda: unsupported dtype ", res.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdit, FASTDIT_DISPATCH_KEY, m) { m.impl("gated_residual_cuda", &gated_residual_cuda); }

}  // namespace fastdit
