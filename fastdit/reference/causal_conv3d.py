"""Causal 3D convolution (Wan 2.1 VAE semantics), whole-clip and streaming, forward and backward.

The time axis is padded in front with ``kt - 1`` frames: zeros, of which the last ones are
replaced by ``cache`` (the last <= kt - 1 input frames of the previous chunk) when streaming.
Height and width get ``padding = (p_h, p_w)`` zeros on both sides. ``new_cache`` is the last
``kt - 1`` frames of ``cat(cache, x)`` (fewer if fewer exist), so chunked calls equal one call on
the whole clip. Math in float32 (float64 kept), output in x.dtype; new_cache keeps x's values.
"""

import torch
import torch.nn.functional as F

from fastdit.reference.common import upcast


def _triple(v: int | tuple[int, int, int] | list[int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)


def _padded_input(x: torch.Tensor, cache: torch.Tensor | None, kt: int) -> tuple[torch.Tensor, int]:
    """cat(zeros, cache, x) along time with kt - 1 frames in front of x; returns it and #zero frames."""
    front = [] if cache is None else [cache]
    cached = 0 if cache is None else cache.shape[2]
    zeros = max(0, kt - 1 - cached)
    if zeros:
        front.insert(0, x.new_zeros((x.shape[0], x.shape[1], zeros, *x.shape[3:])))
    return torch.cat([*front, x], dim=2) if front else x, zeros


def _new_cache(x: torch.Tensor, cache: torch.Tensor | None, kt: int) -> torch.Tensor:
    keep = kt - 1
    frames = x if cache is None else torch.cat([cache, x], dim=2)
    return frames[:, :, max(0, frames.shape[2] - keep) :].clone() if keep else frames[:, :, :0].clone()


def causal_conv3d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int | tuple[int, int, int] = 1,
    padding: tuple[int, int] | list[int] = (0, 0),
    cache: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, Cin, T, H, W), weight (Cout, Cin, kt, kh, kw), cache (B, Cin, <= kt-1, H, W) -> (y, new_cache)."""
    kt = weight.shape[2]
    acc = torch.promote_types(x.dtype, torch.float32)
    xp, _ = _padded_input(x.to(acc), None if cache is None else cache.to(acc), kt)
    y = F.conv3d(
        xp,
        upcast(weight),
        None if bias is None else upcast(bias),
        stride=_triple(stride),
        padding=(0, padding[0], padding[1]),
    )
    return y.to(x.dtype), _new_cache(x, cache, kt)


def causal_conv3d_bwd_ref(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    stride: int | tuple[int, int, int] = 1,
    padding: tuple[int, int] | list[int] = (0, 0),
    cache: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx, dweight, dbias, dcache) of causal_conv3d_ref's y (new_cache carries none)."""
    kt = weight.shape[2]
    acc = torch.promote_types(x.dtype, torch.float32)
    xp, zeros = _padded_input(x.to(acc), None if cache is None else cache.to(acc), kt)
    w = weight.to(acc)
    d_xp, d_w, d_b = torch.ops.aten.convolution_backward(
        grad.to(acc),
        xp,
        w,
        None if bias is None else [w.shape[0]],
        list(_triple(stride)),
        [0, padding[0], padding[1]],
        [1, 1, 1],
        False,
        [0, 0, 0],
        1,
        [True, True, bias is not None],
    )
    cached = 0 if cache is None else cache.shape[2]
    dx = d_xp[:, :, zeros + cached :]
    d_cache = None if cache is None else d_xp[:, :, zeros : zeros + cached].to(cache.dtype)
    return dx.to(x.dtype), d_w.to(weight.dtype), None if bias is None else d_b.to(bias.dtype), d_cache
