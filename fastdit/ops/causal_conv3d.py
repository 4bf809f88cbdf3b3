"""Causal 3D convolution with the streaming cache of the Wan VAE.

Backends:
- ``reference``: fastdit.reference (fp32 math, pads and concatenates in memory).
- ``cudnn``: torch's conv3d in x's dtype and memory format (cuDNN on GPUs, oneDNN on CPUs),
  after concatenating the cache / zero frames and nearest-upsampling in memory like diffusers.
- ``triton``: kernels/causal_conv3d.py, an implicit GEMM that reads the causal padding, the cache and
  the upsampling in place, with bias and residual fused; output channels-last-3d. Its backward
  is the reference backward (torch convolution gradients): the VAE runs inference.

The dispatcher tries ``cudnn`` first, on GPUs and CPUs: it is the measured baseline (docs/performance.md),
while the Triton kernel's speed is unmeasured until an H100 run fills in docs/performance.md.
A per-shape policy overrides that order where a benchmark measured the winner:
``fastdit bench --suite vae_ops --conv-policy-out FILE`` writes one; the ``conv_policy`` setting
(``FASTDIT_CONV_POLICY=FILE``) or ``fastdit/ops/policies/causal_conv3d.json`` (none is committed
yet) names it.
"""

import json
import os

import torch

from fastdit import settings
from fastdit.kernels.launch import triton_missing
from fastdit.ops._registry import interpreter_fake, register_triton_backend
from fastdit.ops.dispatch import Backend, choose, register_backend, set_priority, set_shape_policy
from fastdit.ops.validation import FLOAT_DTYPES, check_same_dtype, check_tensor
from fastdit.reference.causal_conv3d import (
    causal_conv3d_bwd_ref,
    causal_conv3d_ref,
    causal_padded_input,
    new_cache_ref,
)


def output_shape(x_shape, weight_shape, stride, padding, time_padding=None, upsample=1):
    """(B, Cout, T', H', W') of a causal conv over x: ``time_padding`` (default kt - 1) front frames,
    ``padding`` (p_h, p_w) or (top, bottom, left, right), x upsampled ``upsample`` x in space first."""
    batch, _, frames, height, width = x_shape
    cout, _, kt, kh, kw = weight_shape
    st, sh, sw = stride
    top, bottom, left, right = (padding[0], padding[0], padding[1], padding[1]) if len(padding) == 2 else padding
    front = kt - 1 if time_padding is None else time_padding
    return (
        batch,
        cout,
        (frames + front - kt) // st + 1,
        (height * upsample + top + bottom - kh) // sh + 1,
        (width * upsample + left + right - kw) // sw + 1,
    )


def _fake(x, weight, bias, residual, cache, stride, padding, time_padding, upsample, layout=torch.contiguous_format):
    """Outputs of a fixed layout whatever x's (torch.compile plans strides from the fake)."""
    y = x.new_empty(output_shape(x.shape, weight.shape, stride, padding, time_padding, upsample))
    frames = min(time_padding, x.shape[2] + (0 if cache is None else cache.shape[2]))
    new_cache = x.new_empty((x.shape[0], x.shape[1], frames, *x.shape[3:]))
    return y.contiguous(memory_format=layout), new_cache.contiguous(memory_format=layout)


def _setup(ctx, inputs, output):
    # the triton op's inputs end with its two variant flags, which carry no gradient
    x, weight, bias, residual, cache, ctx.stride, ctx.padding, ctx.time_padding, ctx.upsample = inputs[:9]
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, bias, residual, cache)


def _backward(ctx, grad_y, grad_cache):
    x, weight, bias, residual, cache = ctx.saved_tensors
    dx, dw, db, dres, dcache = causal_conv3d_bwd_ref(
        grad_y, x, weight, bias, stride=ctx.stride, padding=ctx.padding, time_padding=ctx.time_padding,
        upsample=ctx.upsample, residual=residual, cache=cache,
    )  # fmt: skip
    return dx, dw, db, dres, dcache, *([None] * (ctx.num_inputs - 5))


# ---- reference backend ---------------------------------------------------------------------------


@torch.library.custom_op("fastdit::causal_conv3d_reference", mutates_args=())
def causal_conv3d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    cache: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    time_padding: int,
    upsample: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    y, new_cache = causal_conv3d_ref(
        x, weight, bias, stride=stride, padding=padding, time_padding=time_padding, upsample=upsample,
        residual=residual, cache=cache,
    )  # fmt: skip
    return y.contiguous(), new_cache.contiguous()  # contiguous always, as the fake says


causal_conv3d_reference.register_fake(_fake)
causal_conv3d_reference.register_autograd(_backward, setup_context=_setup)
register_backend(Backend("causal_conv3d", "reference", causal_conv3d_reference, devices=None, dtypes=FLOAT_DTYPES))


# ---- cudnn backend: torch's conv3d --------------------------------------------------------------


# On CPUs torch's conv3d picks its single-threaded native kernel for small batch-1 inputs (a size
# heuristic in aten's ConvUtils), 2-5x slower than oneDNN's on the VAE's shapes at every size
# measured here (docs/performance.md, "CPU"); so float32 CPU convs call oneDNN directly (the aten
# op that conv3d itself dispatches to above the heuristic's threshold; autograd and channels-last
# as conv3d's). Below about 4M multiply-adds oneDNN's fixed cost per call (~0.05 ms) loses to
# the native kernel (2-48 channels at 8x13: 0.067 vs 0.041 ms), so those stay on conv3d.
_ONEDNN = hasattr(torch, "mkldnn_convolution") and torch.backends.mkldnn.is_available()
_ONEDNN_MIN_MACS = 4_000_000


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` when it is dense in NCDHW or channels-last-3d order, else a channels-last-3d copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last_3d):
        return t
    return t.contiguous(memory_format=torch.channels_last_3d)


def _conv3d(x, weight, bias, stride, padding):
    if (
        _ONEDNN
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and torch.backends.mkldnn.enabled
        and not torch.compiler.is_compiling()  # the aten op has no meta kernel: compiled graphs take conv3d's
        and x.numel() * weight.shape[0] * weight[0, 0].numel() >= _ONEDNN_MIN_MACS
    ):
        # The direct call skips conv3d's layout handling: a strided bias came back wrong (torch
        # 2.13), so every operand is made dense first (a no-op for the VAE's own tensors).
        bias = None if bias is None else bias.contiguous()
        return torch.mkldnn_convolution(_dense(x), _dense(weight), bias, padding, stride, (1, 1, 1), 1)
    return torch.nn.functional.conv3d(x, weight, bias, stride=stride, padding=padding)


def causal_conv3d_cudnn(x, weight, bias, residual, cache, stride, padding, time_padding, upsample):
    """torch's conv3d in x's dtype (cuDNN on GPUs; oneDNN on CPUs, called directly for float32);
    autograd is torch's own."""
    xp = causal_padded_input(x, cache, time_padding)
    if upsample > 1:
        xp = torch.nn.functional.interpolate(xp, scale_factor=(1, upsample, upsample), mode="nearest")
    top, bottom, left, right = padding
    if top != bottom or left != right:
        xp = torch.nn.functional.pad(xp, (left, right, top, bottom))
        top = left = 0
    y = _conv3d(xp, weight, bias, list(stride), [0, top, left])
    if residual is not None:
        y = y + residual
    return y, new_cache_ref(x, cache, time_padding)


register_backend(
    Backend(
        "causal_conv3d",
        "cudnn",
        causal_conv3d_cudnn,
        devices=("cuda", "cpu"),
        dtypes=FLOAT_DTYPES,  # the default on CPUs too (oneDNN): the reference is the oracle, not a speed path
    )
)


# ---- triton backend: kernels/causal_conv3d.py ----------------------------------------------------------

if triton_missing() is None:
    from fastdit.kernels.causal_conv3d import causal_conv3d_forward

    @torch.library.triton_op("fastdit::causal_conv3d_triton", mutates_args=())
    def causal_conv3d_triton(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        residual: torch.Tensor | None,
        cache: torch.Tensor | None,
        stride: list[int],
        padding: list[int],
        time_padding: int,
        upsample: int,
        autotune: bool = True,
        weight_tma: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shape = output_shape(x.shape, weight.shape, stride, padding, time_padding, upsample)
        y = causal_conv3d_forward(x, weight, bias, residual, cache, stride, padding, time_padding, upsample, shape,
                                  autotune=autotune, weight_tma=weight_tma)  # fmt: skip
        # Both outputs channels-last-3d always: the next chunk's kernel reads the cache in rows.
        return y, new_cache_ref(x, cache, time_padding, memory_format=torch.channels_last_3d)

    def _fake_triton(*args):
        return _fake(*args[:9], layout=torch.channels_last_3d)

    interpreter_fake(causal_conv3d_triton, _fake_triton)
    causal_conv3d_triton.register_autograd(_backward, setup_context=_setup)
    register_triton_backend(
        "causal_conv3d",
        causal_conv3d_triton,
        variant=lambda s: {"autotune": s.conv_autotune, "weight_tma": s.conv_tma},
    )
else:
    register_triton_backend("causal_conv3d", None)

set_priority("causal_conv3d", ["cudnn", "triton", "reference"])


# ---- per-shape choice: the winners a vae_ops benchmark measured --------------------------------

POLICY_FILE = os.path.join(os.path.dirname(__file__), "policies", "causal_conv3d.json")


def policy_key(cin: int, cout: int, kernel, stride, upsample: int, dtype: torch.dtype) -> str:
    """The shape signature a conv policy is keyed on (spatial size and frames excluded)."""
    k, st = "".join(map(str, kernel)), "".join(map(str, stride))
    return f"{cin}-{cout}-k{k}-s{st}-u{upsample}-{str(dtype).replace('torch.', '')}"


def load_policy(path: str | None = None) -> dict | None:
    """The policy JSON at ``path``, else the ``conv_policy`` setting (``FASTDIT_CONV_POLICY``), else
    the packaged file: ``{"device_type": "cuda", "choices": {policy_key: backend}, ...}``; None
    when there is none."""
    path = path or settings.get().conv_policy or POLICY_FILE
    if not os.path.exists(path):
        return None
    with open(path) as f:
        policy = json.load(f)
    if not isinstance(policy.get("choices"), dict) or "device_type" not in policy:
        raise ValueError(f"{path}: a conv policy needs 'device_type' and a 'choices' mapping")
    return policy


def _chooser(policy: dict):
    device_type, choices = policy["device_type"], policy["choices"]

    def choose(inputs: dict) -> str | None:
        if inputs["device"].type != device_type:
            return None
        return choices.get(policy_key(inputs["cin"], inputs["cout"], inputs["kernel"], inputs["stride"],
                                      inputs["upsample"], inputs["dtype"]))  # fmt: skip

    return choose


# path -> its chooser (None: no file there); filled in eager mode, since torch.compile cannot
# trace file reads. The settings' policy at import is loaded then.
_LOADED: dict = {}


def _policy_at(path: str):
    if path not in _LOADED and not torch.compiler.is_compiling():
        policy = load_policy(path)
        _LOADED[path] = None if policy is None else _chooser(policy)
    return _LOADED.get(path)


def _settings_policy(inputs: dict) -> str | None:
    """The policy the settings name (or the packaged one). A path first named by an override
    is read at its first eager conv; a graph compiled before that uses the priority list."""
    choose = _policy_at(settings.get().conv_policy or POLICY_FILE)
    return None if choose is None else choose(inputs)


def use_policy(policy: dict | None) -> None:
    """Install a measured per-shape conv policy in the dispatcher; None goes back to the one the
    settings name (``conv_policy``, else the packaged file)."""
    if policy is None:
        set_shape_policy("causal_conv3d", _settings_policy, source="conv_policy setting or packaged file")
    else:
        set_shape_policy("causal_conv3d", _chooser(policy), source=f"{len(policy['choices'])} measured shapes")


use_policy(None)
_policy_at(settings.get().conv_policy or POLICY_FILE)


# ---- public op ----------------------------------------------------------------------------------


def _triple(name, value) -> list[int]:
    vals = [value] * 3 if isinstance(value, int) and not isinstance(value, bool) else list(value)
    if len(vals) != 3 or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in vals):
        raise ValueError(f"{name} must be a positive int or three positive ints (t, h, w), got {value!r}")
    return vals


def _nonneg_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def causal_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int | tuple[int, int, int] = 1,
    padding: tuple[int, int] | tuple[int, int, int, int] = (0, 0),
    cache: torch.Tensor | None = None,
    time_padding: int | None = None,
    upsample: int = 1,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D convolution, causal in time: ``time_padding`` frames in front (default ``kt - 1``), none behind.

    Args:
        x: ``(B, Cin, T, H, W)`` in any memory format (channels-last-3d is the fast one);
            fp16 / bf16 / fp32 / fp64.
        weight: ``(Cout, Cin, kt, kh, kw)``, x's dtype, any memory format.
        bias: ``(Cout,)`` or None.
        stride: int or ``(st, sh, sw)``.
        padding: spatial zero padding, ``(p_h, p_w)`` on both sides or ``(top, bottom, left, right)``.
        cache: ``(B, Cin, c, H, W)`` with ``c <= time_padding``: the last input frames of the
            previous chunk; they replace the last ``c`` of the zero frames (streaming). None at the start.
        time_padding: front frames (zeros or cache); default ``kt - 1``. With fewer (the VAE's
            temporal downsampler uses 1 cached frame and stride 2) the output has
            ``(T + time_padding - kt) // st + 1`` frames.
        upsample: nearest spatial upsampling of x (and the cache) by this factor before the conv,
            fused into the ``triton`` kernel's loads (the VAE's 2x upsamplers).
        residual: a tensor of the output's shape added after the bias (fused in ``triton``).
        backend: force a backend (``reference``, ``cudnn``, ``triton``); default the dispatcher's choice.

    Returns:
        ``(y, new_cache)``: ``y (B, Cout, T', H', W')`` in x's dtype (channels-last-3d from
        ``triton``), and the last ``time_padding`` frames of ``cat(cache, x)`` (fewer if fewer
        exist, a copy) to pass to the next chunk. ``new_cache`` carries no gradient.
    """
    check_tensor("x", x, ndims=(5,))
    check_tensor("weight", weight, ndims=(5,), device=x.device)
    check_same_dtype(("x", "weight"), (x, weight))
    batch, cin, frames, height, width = x.shape
    if weight.shape[1] != cin:
        raise ValueError(f"weight {tuple(weight.shape)} expects Cin = {weight.shape[1]} channels, x has {cin}")
    if min(weight.shape) < 1:
        # torch's conv3d refuses Cout = 0 and returns a wrongly shaped result for Cin = 0
        raise ValueError(f"weight (Cout, Cin, kt, kh, kw) must have every dim >= 1, got {tuple(weight.shape)}")
    if frames < 1:
        raise ValueError(f"x must have T >= 1 frames, got shape {tuple(x.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndims=(1,), device=x.device)
        check_same_dtype(("x", "bias"), (x, bias))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape (Cout,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    strides = _triple("stride", stride)
    pads = list(padding)
    if len(pads) not in (2, 4) or not all(_nonneg_int(p) for p in pads):
        raise ValueError(
            f"padding must be two non-negative ints (p_h, p_w) or four (top, bottom, left, right), got {padding!r}"
        )
    pads = [pads[0], pads[0], pads[1], pads[1]] if len(pads) == 2 else pads
    if not isinstance(upsample, int) or isinstance(upsample, bool) or upsample < 1:
        raise ValueError(f"upsample must be a positive int, got {upsample!r}")
    kt, kh, kw = weight.shape[2:]
    front = kt - 1 if time_padding is None else time_padding
    if not _nonneg_int(front):
        raise ValueError(f"time_padding must be a non-negative int, got {time_padding!r}")
    if frames + front < kt:
        raise ValueError(f"x has {frames} frames; with time_padding {front} that is fewer than the kernel's kt = {kt}")
    if height * upsample + pads[0] + pads[1] < kh or width * upsample + pads[2] + pads[3] < kw:
        raise ValueError(f"x {tuple(x.shape)} with padding {tuple(pads)} is smaller than the kernel {(kh, kw)}")
    if cache is not None:
        check_tensor("cache", cache, ndims=(5,), device=x.device)
        check_same_dtype(("x", "cache"), (x, cache))
        if cache.shape[:2] != x.shape[:2] or cache.shape[3:] != x.shape[3:] or cache.shape[2] > front:
            raise ValueError(
                f"cache must be (B, Cin, c <= time_padding = {front}, H, W) = ({batch}, {cin}, <= {front}, "
                f"{height}, {width}), got {tuple(cache.shape)}"
            )
    if residual is not None:
        check_tensor("residual", residual, ndims=(5,), device=x.device)
        check_same_dtype(("x", "residual"), (x, residual))
        expect = output_shape(x.shape, weight.shape, strides, pads, front, upsample)
        if tuple(residual.shape) != expect:
            raise ValueError(f"residual must have the output's shape {expect}, got {tuple(residual.shape)}")
    inputs = {"device": x.device, "dtype": x.dtype, "kernel": (kt, kh, kw), "stride": tuple(strides), "cin": cin,
              "cout": weight.shape[0], "upsample": upsample}  # fmt: skip
    impl = choose("causal_conv3d", inputs, backend)
    return impl.forward(x, weight, bias, residual, cache, strides, pads, front, upsample)
