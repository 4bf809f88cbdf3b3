"""Causal 3D convolution (Wan 2.1 VAE semantics), whole-clip and streaming, forward and backward.

The time axis is padded in front with ``p_t`` frames (default ``kt - 1``): zeros, of which the
last ones are replaced by ``cache`` (the last <= p_t input frames of the previous chunk) when
streaming. ``upsample = u`` first repeats every pixel of every frame u x u (nearest upsampling,
the VAE's upsamplers). Height and width then get ``padding = (top, bottom, left, right)`` zeros.
``residual`` (the output's shape) is added after the bias. ``new_cache`` is the last ``p_t``
frames of ``cat(cache, x)`` (fewer if fewer exist), so chunked calls equal one call on the whole
clip. Math in float32 (float64 kept), output in x.dtype; new_cache keeps x's values.
"""

import torch
import torch.nn.functional as F

from fastdit.reference.common import upcast


def _triple(v: int | tuple[int, int, int] | list[int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)


def _four(padding) -> tuple[int, int, int, int]:
    """(p_h, p_w) -> (p_h, p_h, p_w, p_w); (top, bottom, left, right) as it is."""
    return (padding[0], padding[0], padding[1], padding[1]) if len(padding) == 2 else tuple(padding)


def causal_padded_input(x: torch.Tensor, cache: torch.Tensor | None, front: int) -> torch.Tensor:
    """cat(zeros, cache, x) along time with ``front`` frames in front of x."""
    parts = [] if cache is None else [cache]
    zeros = max(0, front - (0 if cache is None else cache.shape[2]))
    if zeros:
        pad = x.new_zeros((x.shape[0], x.shape[1], zeros, *x.shape[3:]))
        if x.is_contiguous(memory_format=torch.channels_last_3d):  # keep channels-last through the cat
            pad = pad.contiguous(memory_format=torch.channels_last_3d)
        parts.insert(0, pad)
    return torch.cat([*parts, x], dim=2) if parts else x


def new_cache_ref(
    x: torch.Tensor, cache: torch.Tensor | None, keep: int, memory_format=torch.preserve_format
) -> torch.Tensor:
    """The last ``keep`` frames of cat(cache, x) (fewer if fewer exist), as a new tensor in ``memory_format``."""
    if keep == 0:
        return x[:, :, :0].clone(memory_format=memory_format)
    if cache is None or x.shape[2] >= keep:
        return x[:, :, max(0, x.shape[2] - keep) :].clone(memory_format=memory_format)
    frames = torch.cat([cache, x], dim=2)
    return frames[:, :, max(0, frames.shape[2] - keep) :].clone(memory_format=memory_format)


def _conv(x, weight, bias, residual, cache, stride, padding, front, upsample):
    """The causal conv in the dtype of its inputs (the callers upcast)."""
    xp = causal_padded_input(x, cache, front)
    if upsample > 1:
        xp = xp.repeat_interleave(upsample, dim=3).repeat_interleave(upsample, dim=4)
    top, bottom, left, right = _four(padding)
    y = F.conv3d(F.pad(xp, (left, right, top, bottom)), weight, bias, stride=_triple(stride))
    return y if residual is None else y + residual


def causal_conv3d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int | tuple[int, int, int] = 1,
    padding=(0, 0),
    time_padding: int | None = None,
    upsample: int = 1,
    residual: torch.Tensor | None = None,
    cache: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, Cin, T, H, W), weight (Cout, Cin, kt, kh, kw), cache (B, Cin, <= p_t, H, W) -> (y, new_cache)."""
    front = weight.shape[2] - 1 if time_padding is None else time_padding
    acc = torch.promote_types(x.dtype, torch.float32)
    y = _conv(
        x.to(acc),
        upcast(weight),
        None if bias is None else upcast(bias),
        None if residual is None else residual.to(acc),
        None if cache is None else cache.to(acc),
        stride,
        padding,
        front,
        upsample,
    )
    return y.to(x.dtype), new_cache_ref(x, cache, front)


def causal_conv3d_bwd_ref(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    stride: int | tuple[int, int, int] = 1,
    padding=(0, 0),
    time_padding: int | None = None,
    upsample: int = 1,
    residual: torch.Tensor | None = None,
    cache: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients (dx, dweight, dbias, dresidual, dcache) of causal_conv3d_ref's y; None for absent inputs."""
    front = weight.shape[2] - 1 if time_padding is None else time_padding
    acc = torch.promote_types(x.dtype, torch.float32)
    inputs = (x, weight, bias, residual, cache)
    leaves = [None if t is None else t.detach().to(acc).requires_grad_() for t in inputs]
    with torch.enable_grad():
        y = _conv(*leaves, stride, padding, front, upsample)
        present = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(y, present, grad.to(acc)))
    return tuple(None if t is None else next(grads).to(t.dtype) for t in inputs)
