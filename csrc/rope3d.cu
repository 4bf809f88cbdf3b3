// 3D rotary embedding of q (and k) for packed video batches: fastdit::rope3d*_cuda.
//
// One CTA per token (grid-stride). The CTA first writes the token's cos/sin for its D/2 pairs to
// shared memory, from float64 angles (position from cu_seqlens, token_offset and the sample's
// t, h, w grid; inverse frequencies computed once per CTA), then rotates every head of q and k
// with 16-byte accesses where the layout allows. Memory bound: q and k are each read and written
// once; no [tokens, D] table exists anywhere.
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "common.cuh"

namespace fastdit {
namespace {

// Rotate the heads of one token. INTERLEAVED: pairs (2i, 2i+1), a VEC-chunk holds VEC/2 pairs.
// Otherwise pairs (i, i + D/2): a VEC-chunk of the first half and its partner in the second.
template <typename T, int VEC, bool INTERLEAVED>
__device__ __forceinline__ void rotate_heads(const T* __restrict__ x, T* __restrict__ out, int64_t heads,
                                             int64_t stride_h, int64_t stride_oh, int64_t half_d,
                                             const float* __restrict__ cos_s, const float* __restrict__ sin_s) {
  const int64_t chunks = INTERLEAVED ? (2 * half_d) / VEC : half_d / VEC;
  for (int64_t i = threadIdx.x; i < heads * chunks; i += blockDim.x) {
    const int64_t h = i / chunks;
    const int64_t e0 = (i % chunks) * VEC;
    const T* src = x + h * stride_h;
    T* dst = out + h * stride_oh;
    if constexpr (INTERLEAVED) {
      Vec<T, VEC> v;
      v.load(src + e0);
      float o[VEC];
#pragma unroll
      for (int j = 0; j < VEC / 2; ++j) {
        const int64_t p = e0 / 2 + j;
        const float x1 = to_float(v.v[2 * j]), x2 = to_float(v.v[2 * j + 1]);
        o[2 * j] = x1 * cos_s[p] - x2 * sin_s[p];
        o[2 * j + 1] = x1 * sin_s[p] + x2 * cos_s[p];
      }
      store_rounded<T, VEC>(dst + e0, o);
    } else {
      Vec<T, VEC> a, b;
      a.load(src + e0);
      b.load(src + half_d + e0);
      float oa[VEC], ob[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int64_t p = e0 + j;
        const float x1 = to_float(a.v[j]), x2 = to_float(b.v[j]);
        oa[j] = x1 * cos_s[p] - x2 * sin_s[p];
        ob[j] = x1 * sin_s[p] + x2 * cos_s[p];
      }
      store_rounded<T, VEC>(dst + e0, oa);
      store_rounded<T, VEC>(dst + half_d + e0, ob);
    }
  }
}

template <typename T, int VEC, bool INTERLEAVED>
__global__ void rope3d_kernel(
    // pointers
    const T* __restrict__ q, const T* __restrict__ k, T* __restrict__ q_out, T* __restrict__ k_out,
    const int32_t* __restrict__ cu_seqlens, const int64_t* __restrict__ grid_thw,
    const int64_t* __restrict__ token_offset,  // nullptr: 0
    // sizes
    int64_t total, int64_t num_samples, int64_t q_heads, int64_t k_heads, int64_t half_d, int64_t dt, int64_t dh,
    int64_t dw, double theta, bool conjugate,
    // strides in elements
    int64_t stride_qt, int64_t stride_qh, int64_t stride_kt, int64_t stride_kh, int64_t stride_qot,
    int64_t stride_qoh, int64_t stride_kot, int64_t stride_koh) {
  FASTDIT_DYNAMIC_SHARED(double, smem);
  double* inv_freq = smem;                                     // half_d
  float* cos_s = reinterpret_cast<float*>(inv_freq + half_d);  // half_d
  float* sin_s = cos_s + half_d;                               // half_d
  const int64_t t_pairs = dt / 2, th_pairs = (dt + dh) / 2;
  for (int64_t p = threadIdx.x; p < half_d; p += blockDim.x) {
    const int64_t axis_start = p < t_pairs ? 0 : (p < th_pairs ? t_pairs : th_pairs);
    const double d = static_cast<double>(p < t_pairs ? dt : (p < th_pairs ? dh : dw));
    inv_freq[p] = pow(theta, -2.0 * static_cast<double>(p - axis_start) / d);
  }
  for (int64_t token = blockIdx.x; token < total; token += gridDim.x) {
    const int64_t b = sample_of_row(cu_seqlens, num_samples, token);
    int64_t local = token - static_cast<int64_t>(cu_seqlens[b]);
    if (token_offset != nullptr) local += token_offset[b];
    const int64_t t = grid_thw[3 * b], h = grid_thw[3 * b + 1], w = grid_thw[3 * b + 2];
    const bool valid = local < t * h * w;  // tokens past t*h*w are not rotated
    const int64_t pos_t = local / (h * w), pos_h = (local / w) % h, pos_w = local % w;
    __syncthreads();  // inv_freq written; the previous token's readers are done with cos_s / sin_s
    for (int64_t p = threadIdx.x; p < half_d; p += blockDim.x) {
      const int64_t pos = p < t_pairs ? pos_t : (p < th_pairs ? pos_h : pos_w);
      const double angle = valid ? static_cast<double>(pos) * inv_freq[p] : 0.0;
      double s, c;
      sincos(angle, &s, &c);
      cos_s[p] = static_cast<float>(c);
      sin_s[p] = conjugate ? -static_cast<float>(s) : static_cast<float>(s);
    }
    __syncthreads();
    rotate_heads<T, VEC, INTERLEAVED>(q + token * stride_qt, q_out + token * stride_qot, q_heads, stride_qh,
                                      stride_qoh, half_d, cos_s, sin_s);
    if (k != nullptr) {
      rotate_heads<T, VEC, INTERLEAVED>(k + token * stride_kt, k_out + token * stride_kot, k_heads, stride_kh,
                                        stride_koh, half_d, cos_s, sin_s);
    }
  }
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(on_kernel_device(t) && t.dim() == 3, "rope3d_cuda: ", name, " must be a (total, H, D) CUDA tensor");
  TORCH_CHECK(t.stride(-1) == 1, "rope3d_cuda: ", name, " must have a contiguous last dim");
}

struct RopeArgs {
  const at::Tensor* q;
  const at::Tensor* k;  // nullptr: q only
  at::Tensor* q_out;
  at::Tensor* k_out;
  const int32_t* cu_seqlens;
  const int64_t* grid_thw;
  const int64_t* token_offset;
  int64_t total, num_samples, half_d, dt, dh, dw;
  double theta;
  bool conjugate;
};

template <typename T, int VEC, bool INTERLEAVED>
void launch_kernel(const RopeArgs& a, cudaStream_t stream) {
  const int blocks = static_cast<int>(std::min<int64_t>(a.total, static_cast<int64_t>(sm_count(a.q->get_device())) * 16));
  const size_t smem = a.half_d * (sizeof(double) + 2 * sizeof(float));
  const at::Tensor& q = *a.q;
  const at::Tensor& q_out = *a.q_out;
  FASTDIT_LAUNCH(blocks, 128, smem, stream, rope3d_kernel<T, VEC, INTERLEAVED>)(
      reinterpret_cast<const T*>(q.data_ptr()), a.k ? reinterpret_cast<const T*>(a.k->data_ptr()) : nullptr,
      reinterpret_cast<T*>(q_out.data_ptr()), a.k_out ? reinterpret_cast<T*>(a.k_out->data_ptr()) : nullptr,
      a.cu_seqlens, a.grid_thw, a.token_offset, a.total, a.num_samples, q.size(1), a.k ? a.k->size(1) : 0, a.half_d,
      a.dt, a.dh, a.dw, a.theta, a.conjugate, q.stride(0), q.stride(1), a.k ? a.k->stride(0) : 0,
      a.k ? a.k->stride(1) : 0, q_out.stride(0), q_out.stride(1), a.k_out ? a.k_out->stride(0) : 0,
      a.k_out ? a.k_out->stride(1) : 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_typed(const RopeArgs& a, bool interleaved, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  // 16-byte accesses need every row start aligned: base pointers and strides.
  bool vec_ok = interleaved ? (2 * a.half_d) % kVec == 0 : a.half_d % kVec == 0;
  const at::Tensor* all[] = {a.q, a.q_out, a.k, a.k_out};
  for (const at::Tensor* t : all) {
    if (t != nullptr) vec_ok = vec_ok && aligned16(t->data_ptr()) && t->stride(0) % kVec == 0 && t->stride(1) % kVec == 0;
  }
  if (interleaved) {
    vec_ok ? launch_kernel<T, kVec, true>(a, stream) : launch_kernel<T, 2, true>(a, stream);
  } else {
    vec_ok ? launch_kernel<T, kVec, false>(a, stream) : launch_kernel<T, 1, false>(a, stream);
  }
}

// Rotate q (and k) into q_out (and k_out); outputs may alias the inputs.
void launch(const at::Tensor& q, const at::Tensor* k, at::Tensor& q_out, at::Tensor* k_out, const at::Tensor& grid_thw,
            const at::Tensor& cu_seqlens, const std::optional<at::Tensor>& token_offset, double theta,
            at::IntArrayRef axes_dim, bool interleaved, bool conjugate) {
  check_rows(q, "q");
  const int64_t total = q.size(0), head_dim = q.size(2);
  TORCH_CHECK(head_dim % 2 == 0, "rope3d_cuda: head_dim must be even, got ", head_dim);
  TORCH_CHECK(axes_dim.size() == 3 && axes_dim[0] + axes_dim[1] + axes_dim[2] == head_dim,
              "rope3d_cuda: axes_dim must be three sizes summing to head_dim");
  TORCH_CHECK(on_kernel_device(cu_seqlens) && cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1,
              "rope3d_cuda: cu_seqlens must be an int32 CUDA vector");
  if (k != nullptr) {
    check_rows(*k, "k");
    TORCH_CHECK(k->size(0) == total && k->size(2) == head_dim && k->scalar_type() == q.scalar_type(),
                "rope3d_cuda: k must match q in tokens, head_dim and dtype");
  }
  if (total == 0) return;
  const DeviceGuard guard(q.device());
  const at::Tensor cu = cu_seqlens.contiguous();
  const at::Tensor grid = grid_thw.to(at::kLong).contiguous();
  std::optional<at::Tensor> offset;
  if (token_offset.has_value()) offset = token_offset->to(at::kLong).contiguous();
  const RopeArgs args{&q, k, &q_out, k_out, cu.data_ptr<int32_t>(), grid.data_ptr<int64_t>(),
                      offset ? offset->data_ptr<int64_t>() : nullptr, total, cu.size(0) - 1, head_dim / 2,
                      axes_dim[0], axes_dim[1], axes_dim[2], theta, conjugate};
  cudaStream_t stream = current_stream(q);
  switch (q.scalar_type()) {
    case at::kFloat:
      launch_typed<float>(args, interleaved, stream);
      break;
    case at::kHalf:
      launch_typed<__half>(args, interleaved, stream);
      break;
    case at::kBFloat16:
      launch_typed<__nv_bfloat16>(args, interleaved, stream);
      break;
    default:
      TORCH_CHECK(false, "rope3d_cuda: unsupported dtype ", q.scalar_type());
  }
}

at::Tensor rope3d_cuda(const at::Tensor& x, const at::Tensor& grid_thw, const at::Tensor& cu_seqlens,
                       const std::optional<at::Tensor>& token_offset, double theta, at::IntArrayRef axes_dim,
                       bool interleaved, bool conjugate) {
  const at::Tensor xc = x.stride(-1) == 1 ? x : x.contiguous();
  at::Tensor out = at::empty_like(xc);
  launch(xc, nullptr, out, nullptr, grid_thw, cu_seqlens, token_offset, theta, axes_dim, interleaved, conjugate);
  return out;
}

std::tuple<at::Tensor, at::Tensor> rope3d_qk_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& grid_thw,
                                                  const at::Tensor& cu_seqlens,
                                                  const std::optional<at::Tensor>& token_offset, double theta,
                                                  at::IntArrayRef axes_dim, bool interleaved, bool conjugate) {
  const at::Tensor qc = q.stride(-1) == 1 ? q : q.contiguous();
  const at::Tensor kc = k.stride(-1) == 1 ? k : k.contiguous();
  at::Tensor q_out = at::empty_like(qc), k_out = at::empty_like(kc);
  launch(qc, &kc, q_out, &k_out, grid_thw, cu_seqlens, token_offset, theta, axes_dim, interleaved, conjugate);
  return {q_out, k_out};
}

void rope3d_inplace_cuda(at::Tensor& x, const at::Tensor& grid_thw, const at::Tensor& cu_seqlens,
                         const std::optional<at::Tensor>& token_offset, double theta, at::IntArrayRef axes_dim,
                         bool interleaved, bool conjugate) {
  launch(x, nullptr, x, nullptr, grid_thw, cu_seqlens, token_offset, theta, axes_dim, interleaved, conjugate);
}

void rope3d_qk_inplace_cuda(at::Tensor& q, at::Tensor& k, const at::Tensor& grid_thw, const at::Tensor& cu_seqlens,
                            const std::optional<at::Tensor>& token_offset, double theta, at::IntArrayRef axes_dim,
                            bool interleaved, bool conjugate) {
  launch(q, &k, q, &k, grid_thw, cu_seqlens, token_offset, theta, axes_dim, interleaved, conjugate);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdit, FASTDIT_DISPATCH_KEY, m) {
  m.impl("rope3d_cuda", &rope3d_cuda);
  m.impl("rope3d_qk_cuda", &rope3d_qk_cuda);
  m.impl("rope3d_inplace_cuda", &rope3d_inplace_cuda);
  m.impl("rope3d_qk_inplace_cuda", &rope3d_qk_inplace_cuda);
}

}  // namespace fastdit
