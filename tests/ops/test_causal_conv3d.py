import pytest
import torch

from fastdit import ops
from fastdit.ops.causal_conv3d import causal_conv3d_reference

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3}


def conv_oracle(x, weight, bias=None, stride=(1, 1, 1), padding=(0, 0), front=None, *, time_padding=None, upsample=1,
                residual=None):  # fmt: skip
    """float64 causal conv as a sum of shifted windows times weight taps (no conv kernel used).

    ``time_padding`` frames (default kt - 1) go before x: ``front`` (the cache) last, zeros before
    it. x and the cache are nearest-upsampled ``upsample`` x, then zero-padded by ``padding``
    (p_h, p_w) or (top, bottom, left, right); ``residual`` is added at the end.
    """
    kt, kh, kw = weight.shape[2:]
    pad_t = kt - 1 if time_padding is None else time_padding
    x = x.double()
    frames = [] if front is None else [front.double()]
    cached = 0 if front is None else front.shape[2]
    zeros = torch.zeros(x.shape[0], x.shape[1], pad_t - cached, *x.shape[3:], dtype=torch.float64)
    xp = torch.cat([zeros, *frames, x], dim=2)
    xp = xp.repeat_interleave(upsample, 3).repeat_interleave(upsample, 4)
    top, bottom, left, right = (padding[0], padding[0], padding[1], padding[1]) if len(padding) == 2 else padding
    xp = torch.nn.functional.pad(xp, (left, right, top, bottom))
    st, sh, sw = stride
    t_out = (xp.shape[2] - kt) // st + 1
    h_out = (xp.shape[3] - kh) // sh + 1
    w_out = (xp.shape[4] - kw) // sw + 1
    y = torch.zeros(x.shape[0], weight.shape[0], t_out, h_out, w_out, dtype=torch.float64)
    for a in range(kt):
        for b in range(kh):
            for c in range(kw):
                window = xp[:, :, a : a + st * t_out : st, b : b + sh * h_out : sh, c : c + sw * w_out : sw]
                y += torch.einsum("bitxy,oi->botxy", window, weight[:, :, a, b, c].double())
    if bias is not None:
        y += bias.double()[None, :, None, None, None]
    return y if residual is None else y + residual.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "kernel, stride, padding",
    [
        ((3, 3, 3), (1, 1, 1), (1, 1)),
        ((3, 1, 1), (1, 1, 1), (0, 0)),
        ((1, 3, 3), (1, 2, 2), (1, 1)),
        ((3, 3, 3), (2, 1, 2), (0, 1)),
    ],
)
@pytest.mark.parametrize("frames", [1, 5])
def test_causal_conv3d_matches_oracle(dtype, kernel, stride, padding, frames):
    x = torch.randn(2, 3, frames, 7, 10, dtype=dtype)
    weight = torch.randn(5, 3, *kernel, dtype=dtype) / 4
    bias = torch.randn(5, dtype=dtype)
    y, cache = ops.causal_conv3d(x, weight, bias, stride=stride, padding=padding)
    expect = conv_oracle(x, weight, bias, stride, padding)
    assert y.dtype == dtype and y.shape == expect.shape
    torch.testing.assert_close(y.double(), expect, atol=TOL[dtype] * 10, rtol=TOL[dtype])
    kt = kernel[0]
    torch.testing.assert_close(cache, x[:, :, max(0, frames - (kt - 1)) :], atol=0, rtol=0)


@pytest.mark.parametrize("chunks", [[1, 4, 4], [2, 3, 4], [1, 1, 1, 6], [9]])
@pytest.mark.parametrize("kt", [3, 2])
def test_streaming_chunks_equal_whole_clip(chunks, kt):
    x = torch.randn(1, 4, sum(chunks), 6, 5, dtype=torch.float64)
    weight, bias = torch.randn(3, 4, kt, 3, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    whole, _ = ops.causal_conv3d(x, weight, bias, padding=(1, 1))
    outs, cache, start = [], None, 0
    for n in chunks:
        y, cache = ops.causal_conv3d(x[:, :, start : start + n], weight, bias, padding=(1, 1), cache=cache)
        assert cache.shape[2] == min(kt - 1, start + n)
        outs.append(y)
        start += n
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, atol=1e-12, rtol=1e-12)


def test_cache_replaces_zero_padding_exactly():
    x, front = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64), torch.randn(1, 2, 1, 4, 4, dtype=torch.float64)
    weight = torch.randn(2, 2, 3, 3, 3, dtype=torch.float64)
    y, new_cache = ops.causal_conv3d(x, weight, padding=(1, 1), cache=front)
    torch.testing.assert_close(y, conv_oracle(x, weight, padding=(1, 1), front=front))
    torch.testing.assert_close(new_cache, x[:, :, 1:])


def test_kernel_of_one_frame_has_empty_cache_and_channels_last_input():
    x = torch.randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d)
    weight = torch.randn(4, 3, 1, 3, 3)
    y, cache = ops.causal_conv3d(x, weight, padding=(1, 1))
    assert cache.shape == (2, 3, 0, 5, 6)
    torch.testing.assert_close(y.double(), conv_oracle(x, weight, padding=(1, 1)), atol=1e-5, rtol=1e-5)


def test_causal_conv3d_gradcheck():
    d = dict(dtype=torch.float64, requires_grad=True)
    x, cache = torch.randn(1, 2, 3, 4, 3, **d), torch.randn(1, 2, 1, 4, 3, **d)
    weight, bias = torch.randn(2, 2, 3, 3, 2, **d), torch.randn(2, **d)
    fn = lambda *a: ops.causal_conv3d(a[0], a[1], a[2], padding=(1, 0), cache=a[3])[0]
    assert torch.autograd.gradcheck(fn, (x, weight, bias, cache))
    assert torch.autograd.gradcheck(lambda a, w: ops.causal_conv3d(a, w, stride=(2, 1, 2))[0], (x, weight))


def test_causal_conv3d_opcheck():
    x, cache = torch.randn(1, 2, 3, 4, 5, requires_grad=True), torch.randn(1, 2, 2, 4, 5, requires_grad=True)
    weight, bias = torch.randn(3, 2, 3, 3, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    res = torch.randn(1, 3, 3, 4, 5, requires_grad=True)
    torch.library.opcheck(causal_conv3d_reference, (x, weight, bias, res, cache, [1, 1, 1], [1, 1, 1, 1], 2, 1))
    torch.library.opcheck(causal_conv3d_reference, (x, weight, None, None, None, [1, 2, 2], [1, 1, 0, 1], 2, 2))
    cl = torch.channels_last_3d
    x_cl = x.detach().contiguous(memory_format=cl).requires_grad_()
    cache_cl = cache.detach().contiguous(memory_format=cl).requires_grad_()
    torch.library.opcheck(causal_conv3d_reference, (x_cl, weight, bias, None, cache_cl, [1, 1, 1], [1, 1, 1, 1], 2, 1))
    y, new_cache = causal_conv3d_reference(x_cl, weight, bias, None, cache_cl, [1, 1, 1], [1, 1, 1, 1], 2, 1)
    assert y.is_contiguous() and new_cache.is_contiguous()  # fixed layout, whatever x's


@pytest.mark.parametrize("cin, onednn", [(2, False), (16, True)])
def test_cpu_conv_onednn_path_with_strided_operands(monkeypatch, cin, onednn):
    """The float32 CPU conv calls oneDNN directly above ~4M multiply-adds and conv3d below.
    Catches the direct call fed a strided bias or a permuted x as they are (oneDNN read them
    as dense: silently wrong), the size test inverted (every tiny conv paying oneDNN's fixed
    cost, every large one the slow native kernel), and the wrong stride / padding order."""
    calls = []
    direct = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda *a: calls.append(1) or direct(*a))
    x = torch.randn(1, 16, 16, 3, cin).permute(0, 4, 2, 1, 3)  # (1, cin, 3, 16, 16), no dense layout
    weight = torch.randn(16, cin, 3, 3, 3) / 8
    bias = torch.randn(32)[::2]  # stride 2
    y, _ = ops.causal_conv3d(x, weight, bias, stride=(1, 2, 1), padding=(1, 0), backend="cudnn")
    expect = conv_oracle(x, weight, bias, (1, 2, 1), (1, 0))
    torch.testing.assert_close(y.double(), expect, atol=1e-4, rtol=1e-5)
    assert bool(calls) == (onednn and torch.backends.mkldnn.is_available())


@pytest.mark.parametrize("backend, tol", [("reference", 0.0), ("cudnn", 1e-5)])
def test_causal_conv3d_compiled_matches_eager(backend, tol):
    """Catches a conv path that cannot be traced (eager CPU fp32 calls oneDNN directly, an aten
    op without a meta kernel: compiled, conv3d runs instead, rounding in other places)."""
    # 16 channels at 16 x 16: above the size where eager CPU convs take oneDNN directly
    x, weight, bias = torch.randn(1, 16, 5, 16, 16), torch.randn(16, 16, 3, 3, 3) / 8, torch.randn(16)

    def fn(x):
        y1, cache = ops.causal_conv3d(x[:, :, :1], weight, bias, padding=(1, 1), backend=backend)
        y2, cache = ops.causal_conv3d(x[:, :, 1:], weight, bias, padding=(1, 1), cache=cache, backend=backend)
        return torch.cat([y1, y2], dim=2), cache

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")  # the trace; inductor is the GPU tests'
    for got, want in zip(compiled(x), fn(x)):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=torch.randn(1, 2, 3, 4)), ValueError, "x must have 5 dims"),
        (dict(weight=torch.randn(3, 4, 3, 3, 3)), ValueError, "expects Cin = 4"),
        (dict(weight=torch.randn(3, 2, 3, 3, 3).double()), TypeError, "x and weight must share one dtype"),
        (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(Cout,\)"),
        (dict(stride=0), ValueError, "stride must be a positive int"),
        (dict(padding=(1,)), ValueError, "padding must be two"),
        (dict(padding=(1, 1, 1)), ValueError, "or four"),
        (dict(upsample=0), ValueError, "upsample must be a positive int"),
        (dict(time_padding=-1), ValueError, "time_padding must be a non-negative int"),
        (dict(x=torch.randn(1, 2, 1, 4, 5), time_padding=1), ValueError, "fewer than the kernel's kt"),
        (dict(cache=torch.randn(1, 2, 2, 4, 5), time_padding=1), ValueError, "cache must be"),
        (dict(residual=torch.randn(1, 3, 3, 4, 5)), ValueError, "residual must have the output's shape"),
        (dict(residual=torch.randn(1, 3, 3, 2, 3).half()), TypeError, "x and residual must share one dtype"),
        (dict(backend="cuda"), ValueError, "does not exist for this op"),
        (dict(cache=torch.randn(1, 2, 3, 4, 5)), ValueError, "cache must be"),
        (dict(cache=torch.randn(1, 2, 2, 4, 4)), ValueError, "cache must be"),
        (dict(x=torch.randn(1, 2, 3, 2, 2)), ValueError, "smaller than the kernel"),
        (dict(x=torch.randn(1, 2, 0, 4, 5)), ValueError, "T >= 1"),
    ],
)
@pytest.mark.bad_input
def test_causal_conv3d_bad_input(kwargs, error, match):
    args = dict(x=torch.randn(1, 2, 3, 4, 5), weight=torch.randn(3, 2, 3, 3, 3))
    for key in ("x", "weight"):
        if key in kwargs:
            args[key] = kwargs.pop(key)
    with pytest.raises(error, match=match):
        ops.causal_conv3d(args["x"], args["weight"], **kwargs)


@pytest.mark.gpu
def test_causal_conv3d_reference_cuda_bf16():
    x = torch.randn(1, 96, 3, 60, 104).bfloat16()
    weight = (torch.randn(96, 96, 3, 3, 3) / 50).bfloat16()
    y, _ = ops.causal_conv3d(x.cuda().to(memory_format=torch.channels_last_3d), weight.cuda(), padding=(1, 1))
    expect = ops.causal_conv3d(x.double(), weight.double(), padding=(1, 1))[0]
    assert ((y.cpu().double() - expect).norm() / expect.norm()).item() < 4e-3
