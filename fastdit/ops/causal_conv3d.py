"""Causal 3D convolution with the streaming cache of the Wan VAE."""

import torch

from fastdit.ops.dispatch import Backend, register_backend, select_backend
from fastdit.ops.validation import FLOAT_DTYPES, check_same_dtype, check_tensor
from fastdit.reference.causal_conv3d import causal_conv3d_bwd_ref, causal_conv3d_ref


@torch.library.custom_op("fastdit::causal_conv3d_reference", mutates_args=())
def causal_conv3d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    cache: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return causal_conv3d_ref(x, weight, bias, stride=stride, padding=padding, cache=cache)


def output_shape(x_shape, weight_shape, stride, padding) -> tuple[int, int, int, int, int]:
    """(B, Cout, T', H', W') of a causal conv over x (front time padding kt - 1)."""
    batch, _, frames, height, width = x_shape
    cout, _, kt, kh, kw = weight_shape
    st, sh, sw = stride
    return (
        batch,
        cout,
        (frames - 1) // st + 1,
        (height + 2 * padding[0] - kh) // sh + 1,
        (width + 2 * padding[1] - kw) // sw + 1,
    )


@causal_conv3d_reference.register_fake
def _(x, weight, bias, stride, padding, cache):
    keep = weight.shape[2] - 1
    cached = 0 if cache is None else cache.shape[2]
    frames = min(keep, cached + x.shape[2])
    y = x.new_empty(output_shape(x.shape, weight.shape, stride, padding))
    return y, x.new_empty((x.shape[0], x.shape[1], frames, *x.shape[3:]))


def _setup(ctx, inputs, output):
    x, weight, bias, ctx.stride, ctx.padding, cache = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, bias, cache)


def _backward(ctx, grad_y, grad_cache):
    x, weight, bias, cache = ctx.saved_tensors
    dx, dw, db, dcache = causal_conv3d_bwd_ref(
        grad_y, x, weight, bias, stride=ctx.stride, padding=ctx.padding, cache=cache
    )
    return dx, dw, db, None, None, dcache


causal_conv3d_reference.register_autograd(_backward, setup_context=_setup)
register_backend(Backend("causal_conv3d", "reference", causal_conv3d_reference, devices=None, dtypes=FLOAT_DTYPES))


def _triple(name, value) -> list[int]:
    vals = [value] * 3 if isinstance(value, int) and not isinstance(value, bool) else list(value)
    if len(vals) != 3 or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in vals):
        raise ValueError(f"{name} must be a positive int or three positive ints (t, h, w), got {value!r}")
    return vals


def causal_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int | tuple[int, int, int] = 1,
    padding: tuple[int, int] = (0, 0),
    cache: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D convolution, causal in time: ``kt - 1`` zero frames in front, none behind.

    Args:
        x: ``(B, Cin, T, H, W)`` in any memory format; fp16 / bf16 / fp32 / fp64; ``T >= 1``.
        weight: ``(Cout, Cin, kt, kh, kw)``, x's dtype.
        bias: ``(Cout,)`` or None.
        stride: int or ``(st, sh, sw)``.
        padding: ``(p_h, p_w)`` spatial zero padding on both sides.
        cache: ``(B, Cin, c, H, W)`` with ``c <= kt - 1``: the last input frames of the previous
            chunk; they replace the last ``c`` of the zero frames (streaming). None at the start.
        backend: force a backend; default the dispatcher's choice.

    Returns:
        ``(y, new_cache)``: ``y (B, Cout, (T-1)//st + 1, H', W')`` in x's dtype, and the last
        ``kt - 1`` frames of ``cat(cache, x)`` (fewer if fewer exist) to pass to the next chunk.
        ``new_cache`` carries no gradient.
    """
    check_tensor("x", x, ndims=(5,))
    check_tensor("weight", weight, ndims=(5,), device=x.device)
    check_same_dtype(("x", "weight"), (x, weight))
    batch, cin, frames, height, width = x.shape
    if weight.shape[1] != cin:
        raise ValueError(f"weight {tuple(weight.shape)} expects Cin = {weight.shape[1]} channels, x has {cin}")
    if frames < 1:
        raise ValueError(f"x must have T >= 1 frames, got shape {tuple(x.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndims=(1,), device=x.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape (Cout,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    strides = _triple("stride", stride)
    pads = list(padding)
    if len(pads) != 2 or any(not isinstance(p, int) or isinstance(p, bool) or p < 0 for p in pads):
        raise ValueError(f"padding must be two non-negative ints (p_h, p_w), got {padding!r}")
    kt, kh, kw = weight.shape[2:]
    if height + 2 * pads[0] < kh or width + 2 * pads[1] < kw:
        raise ValueError(f"x {tuple(x.shape)} with padding {tuple(pads)} is smaller than the kernel {(kh, kw)}")
    if cache is not None:
        check_tensor("cache", cache, ndims=(5,), device=x.device)
        check_same_dtype(("x", "cache"), (x, cache))
        if cache.shape[:2] != x.shape[:2] or cache.shape[3:] != x.shape[3:] or cache.shape[2] > kt - 1:
            raise ValueError(
                f"cache must be (B, Cin, c <= kt-1 = {kt - 1}, H, W) = ({batch}, {cin}, <= {kt - 1}, {height}, "
                f"{width}), got {tuple(cache.shape)}"
            )
    impl = select_backend(
        "causal_conv3d", {"device": x.device, "dtype": x.dtype, "kernel": (kt, kh, kw), "stride": strides}, backend
    )
    return impl.fn(x, weight, bias, strides, pads, cache)
