"""RMS norm over the channel dim (Wan VAE's ``RMS_norm``), optionally followed by SiLU.

``y = x / max(||x||_C, eps) * sqrt(C) * gamma`` with the L2 norm over channels (dim 1, like
``F.normalize``), then ``silu(y)`` if asked. Math in float32 (float64 kept), output in x.dtype.
"""

import torch
import torch.nn.functional as F

from fastdit.reference.common import upcast


def _norm_silu(x: torch.Tensor, gamma: torch.Tensor, eps: float, silu: bool) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = F.normalize(x, dim=1, eps=eps) * x.shape[1] ** 0.5 * gamma.reshape(shape)
    return F.silu(y) if silu else y


def rms_norm_silu_ref(x: torch.Tensor, gamma: torch.Tensor, *, eps: float = 1e-12, silu: bool = True) -> torch.Tensor:
    """x (B, C, ...) any memory format, gamma (C,) -> (B, C, ...) in x's dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return _norm_silu(x.to(acc), upcast(gamma), eps, silu).to(x.dtype)


def rms_norm_silu_bwd_ref(
    grad: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, *, eps: float = 1e-12, silu: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dgamma) of rms_norm_silu_ref."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xs, gs = x.detach().to(acc).requires_grad_(), gamma.detach().to(acc).requires_grad_()
    with torch.enable_grad():
        dx, dgamma = torch.autograd.grad(_norm_silu(xs, gs, eps, silu), (xs, gs), grad.to(acc))
    return dx.to(x.dtype), dgamma.to(gamma.dtype)
