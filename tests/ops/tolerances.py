"""How far a fast kernel may land from the reference op, derived from how each rounds (style #8).

The elementwise kernels (RoPE, the gated residual) compute the reference's own float32
expression. Two things can still move a result on a GPU:

- FMA contraction: nvcc and Triton fuse ``a + b * c`` (and ``x1 cos - x2 sin``) into one fused
  multiply-add, rounded once, where eager PyTorch rounds the product first. Each product term
  then differs by at most one float32 rounding, ``eps32 * |term|``: an absolute error that does
  not shrink with the result (it matters where terms cancel).
- The final cast to the output dtype: a float32 value moved by that much may round to the
  neighbouring 16-bit value, one ulp, at most ``eps(dtype) * |result|`` relative.

So ``|fast - reference| <= terms * eps32 * max|term| + eps(dtype) * |reference|``, which is
``torch.testing.assert_close(atol=..., rtol=...)``'s form. Simulated on the CPU (the FMA as the
float64 expression rounded once) over 16.9M random elements of the gated residual: 365 bf16 and
23% of float32 results differ from eager's under exact comparison, none beyond these bounds; the
same for RoPE.

Reductions (the norms of adaLN, attention's softmax sums) run in another order on every backend;
their tests compare relative errors against float64 oracles instead.
"""

import torch

FP32_EPS = torch.finfo(torch.float32).eps


def fma_tolerance(dtype: torch.dtype, term_magnitude: float, terms: int = 2) -> dict[str, float]:
    """``assert_close`` bounds for a kernel that evaluates the reference's float32 expression of
    ``terms`` products, each at most ``term_magnitude``, up to FMA contraction, then casts to
    ``dtype``."""
    return {"atol": terms * FP32_EPS * float(term_magnitude), "rtol": torch.finfo(dtype).eps}


def rope_tolerance(x: torch.Tensor) -> dict[str, float]:
    """RoPE: ``x1 cos - x2 sin`` and ``x1 sin + x2 cos`` (|cos|, |sin| <= 1): two terms of at most |x|."""
    return fma_tolerance(x.dtype, x.detach().abs().max().item(), terms=2)


def gated_residual_tolerance(res: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> dict[str, float]:
    """``res + y * gate``: one product term; the sum's own rounding is the output cast."""
    magnitude = y.detach().float().abs().max().item() * gate.detach().float().abs().max().item()
    return fma_tolerance(res.dtype, magnitude, terms=1)
