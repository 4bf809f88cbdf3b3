// Schemas of fastdit's CUDA ops. Each op is `fastdit::<op>_cuda`; the public Python function
// fastdit.ops.<op> picks it through the backend dispatcher, and fastdit/ops registers its fake
// (meta) implementation and autograd from Python once this library is loaded.
#include <torch/library.h>

TORCH_LIBRARY(fastdit, m) {
  // r = res + y * gate[sample(row)], math in fp32, r in res.dtype.
  //   res, y: (N, C) contiguous, same dtype (fp16 | bf16 | fp32)
  //   gate:   (B, C) float32 with cu_seqlens (B+1,) int32, or (N, C) float32 per token
  m.def("gated_residual_cuda(Tensor res, Tensor y, Tensor gate, Tensor? cu_seqlens) -> Tensor");
}
