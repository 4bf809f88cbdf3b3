// Schemas of fastdit's CUDA ops. Each op is `fastdit::<op>_cuda`; the public Python function
// fastdit.ops.<op> picks it through the backend dispatcher, and fastdit/ops registers its fake
// (meta) implementation and autograd from Python once this library is loaded.
#include <torch/library.h>

TORCH_LIBRARY(fastdit, m) {
  // r = res + y * gate[sample(row)], math in fp32, r in res.dtype.
  //   res, y: (N, C) contiguous, same dtype (fp16 | bf16 | fp32)
  //   gate:   (B, C) float32 with cu_seqlens (B+1,) int32, or (N, C) float32 per token
  m.def("gated_residual_cuda(Tensor res, Tensor y, Tensor gate, Tensor? cu_seqlens) -> Tensor");

  // 3D RoPE with the arguments of fastdit::rope3d_reference (same fake and autograd).
  //   x, q, k: (total, H, D), last dim contiguous; grid_thw (B, 3); cu_seqlens (B+1,) int32;
  //   token_offset (B,) or None; axes_dim (dt, dh, dw); conjugate rotates by -angle (backward).
  m.def(
      "rope3d_cuda(Tensor x, Tensor grid_thw, Tensor cu_seqlens, Tensor? token_offset, float theta, int[] axes_dim, "
      "bool interleaved, bool conjugate) -> Tensor");
  m.def(
      "rope3d_qk_cuda(Tensor q, Tensor k, Tensor grid_thw, Tensor cu_seqlens, Tensor? token_offset, float theta, "
      "int[] axes_dim, bool interleaved, bool conjugate) -> (Tensor, Tensor)");
  m.def(
      "rope3d_inplace_cuda(Tensor(a!) x, Tensor grid_thw, Tensor cu_seqlens, Tensor? token_offset, float theta, "
      "int[] axes_dim, bool interleaved, bool conjugate) -> ()");
  m.def(
      "rope3d_qk_inplace_cuda(Tensor(a!) q, Tensor(b!) k, Tensor grid_thw, Tensor cu_seqlens, Tensor? token_offset, "
      "float theta, int[] axes_dim, bool interleaved, bool conjugate) -> ()");

  // adaLN modulation with the arguments of fastdit::adaln_modulate_reference (same fake and
  // autograd). x: (N, C) rows; shift, scale: (B, C) with cu_seqlens or (N, C), float32;
  // weight, bias: (C,) float32 or None; norm: "layer" | "rms".
  m.def(
      "adaln_modulate_cuda(Tensor x, Tensor shift, Tensor scale, Tensor? cu_seqlens, str norm, float eps, "
      "Tensor? weight, Tensor? bias) -> Tensor");
}
