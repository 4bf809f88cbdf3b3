"""The fast backends of causal_conv3d (triton: implicit GEMM; cudnn: torch's conv3d) against
float64 oracles built without any conv kernel (CPU: Triton under TRITON_INTERPRET=1; GPU:
-m gpu in bf16 at VAE shapes). rms_norm_silu's own tests are in test_rms_norm_silu.py."""

import pytest
import torch

from fastdit import ops
from tests.conftest import CPU_BACKENDS, rel_err
from tests.ops.test_causal_conv3d import conv_oracle

needs_triton = [
    pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton is not installed"),
    pytest.mark.triton_cpu,
]
FAST = [pytest.param("triton", marks=needs_triton), "cudnn"]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration", "test_faketensor")
    if not torch.cuda.is_available()
    else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
)


# (kernel, stride, padding (top, bottom, left, right), time_padding, upsample, cached frames):
# every conv of the Wan VAE, plus odd strides and paddings.
CASES = [
    ((3, 3, 3), (1, 1, 1), (1, 1, 1, 1), None, 1, 0),  # residual-block conv, first chunk
    ((3, 3, 3), (1, 1, 1), (1, 1, 1, 1), None, 1, 1),  # ... after a one-frame chunk
    ((3, 3, 3), (1, 1, 1), (1, 1, 1, 1), None, 1, 2),  # ... streaming
    ((1, 1, 1), (1, 1, 1), (0, 0, 0, 0), None, 1, 0),  # shortcut / quant convs
    ((1, 3, 3), (1, 2, 2), (0, 1, 0, 1), None, 1, 0),  # spatial downsampler (ZeroPad2d(0, 1, 0, 1))
    ((1, 3, 3), (1, 1, 1), (1, 1, 1, 1), None, 2, 0),  # spatial upsampler: nearest 2x fused
    ((3, 1, 1), (2, 1, 1), (0, 0, 0, 0), 1, 1, 1),  # temporal downsampler: one cached frame, stride 2
    ((3, 1, 1), (1, 1, 1), (0, 0, 0, 0), None, 1, 2),  # temporal upsampler's conv
    ((3, 3, 3), (2, 1, 2), (0, 1, 2, 0), None, 1, 0),
    ((2, 3, 1), (1, 2, 1), (1, 0, 0, 0), None, 1, 1),
]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[0]}s{c[1]}p{c[2]}tp{c[3]}u{c[4]}c{c[5]}")
@pytest.mark.parametrize("channels_last", [True, False])
def test_fast_conv_matches_oracle(backend, dtype, case, channels_last, poison_outputs):
    kernel, stride, padding, time_padding, up, cached = case
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = torch.randn(2, 5, 4, 6, 7).to(dtype).to(memory_format=fmt)
    weight = (torch.randn(11, 5, *kernel) / 4).to(dtype)
    bias = torch.randn(11).to(dtype)
    cache = torch.randn(2, 5, cached, 6, 7).to(dtype) if cached else None
    kw = dict(stride=stride, padding=padding, time_padding=time_padding, upsample=up, cache=cache)
    y, new_cache = ops.causal_conv3d(x, weight, bias, backend=backend, **kw)
    expect = conv_oracle(x, weight, bias, stride, padding, front=cache, time_padding=time_padding, upsample=up)
    assert y.dtype == dtype and y.shape == expect.shape
    torch.testing.assert_close(y.double(), expect, atol=TOL[dtype] * 20, rtol=TOL[dtype])
    ref_y, ref_cache = ops.causal_conv3d(x, weight, bias, backend="reference", **kw)
    assert torch.equal(new_cache, ref_cache)
    residual = torch.randn(expect.shape).to(dtype)
    y_res, _ = ops.causal_conv3d(x, weight, bias, residual=residual, backend=backend, **kw)
    torch.testing.assert_close(y_res.double(), expect + residual.double(), atol=TOL[dtype] * 20, rtol=TOL[dtype])


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("cin, cout", [(3, 8), (16, 40), (40, 16), (70, 33)])
def test_fast_conv_channel_counts(backend, cin, cout, poison_outputs):
    """Channel counts below, at and across BLOCK_K / BLOCK_N, not powers of two (the VAE's 3 -> 96 input conv)."""
    x = torch.randn(1, cin, 3, 5, 4).to(memory_format=torch.channels_last_3d)
    weight, bias = torch.randn(cout, cin, 3, 3, 3) / cin, torch.randn(cout)
    y, _ = ops.causal_conv3d(x, weight, bias, padding=(1, 1), backend=backend)
    torch.testing.assert_close(y.double(), conv_oracle(x, weight, bias, padding=(1, 1)), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_fast_conv_streaming_equals_whole_clip(backend):
    x = torch.randn(1, 6, 9, 5, 6).to(memory_format=torch.channels_last_3d)
    weight, bias = torch.randn(4, 6, 3, 3, 3) / 8, torch.randn(4)
    whole, _ = ops.causal_conv3d(x, weight, bias, padding=(1, 1), backend=backend)
    outs, cache, start = [], None, 0
    for n in (1, 4, 1, 3):
        y, cache = ops.causal_conv3d(x[:, :, start : start + n], weight, bias, padding=(1, 1), cache=cache,
                                     backend=backend)  # fmt: skip
        outs.append(y)
        start += n
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_fast_conv_gradients_match_reference(backend):
    d = dict(dtype=torch.float64 if backend == "cudnn" else torch.float32)
    x, cache = torch.randn(1, 3, 3, 4, 5, **d), torch.randn(1, 3, 2, 4, 5, **d)
    weight, bias, res = torch.randn(4, 3, 3, 3, 3, **d), torch.randn(4, **d), torch.randn(1, 4, 3, 8, 10, **d)
    grad = torch.randn(1, 4, 3, 8, 10, **d)

    def grads(name):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, res, cache)]
        y, _ = ops.causal_conv3d(leaves[0], leaves[1], leaves[2], padding=(1, 1), upsample=2, residual=leaves[3],
                                 cache=leaves[4], backend=name)  # fmt: skip
        return torch.autograd.grad(y, leaves, grad)

    for got, want in zip(grads(backend), grads("reference")):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton)])
def test_triton_conv_always_reads_cin_innermost_weights(backend, monkeypatch):
    """The kernel gets every weight with Cin innermost (its compile-checked, coalesced layout):
    a default-layout weight is reordered, a channels-last one passed as is; results are bitwise
    equal, as the kernel's arithmetic does not depend on the layout."""
    import importlib

    kernel_module = importlib.import_module("fastdit.kernels.causal_conv3d")  # the launcher's module
    seen = []
    real = kernel_module.launcher

    def spy(kernel):
        launch = real(kernel)

        class Grid:
            def __getitem__(self, grid):
                def run(x, cache, weight, *args, **kwargs):  # the kernel's arguments: x, cache, weight, ...
                    seen.append((weight.stride(1), weight.data_ptr()))
                    return launch[grid](x, cache, weight, *args, **kwargs)

                return run

        return Grid()

    monkeypatch.setattr(kernel_module, "launcher", spy)
    x = torch.randn(1, 6, 3, 5, 4).to(memory_format=torch.channels_last_3d)
    weight = torch.randn(7, 6, 3, 3, 3)
    channels_last = weight.contiguous(memory_format=torch.channels_last_3d)
    y_default, _ = ops.causal_conv3d(x, weight, padding=(1, 1), backend=backend)
    y_last, _ = ops.causal_conv3d(x, channels_last, padding=(1, 1), backend=backend)
    assert [stride for stride, _ in seen] == [1, 1]
    assert seen[1][1] == channels_last.data_ptr()  # no copy when the layout is already right
    assert torch.equal(y_default, y_last)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cin", [24, 40])
@pytest.mark.parametrize("case", CASES[:8], ids=lambda c: f"k{c[0]}s{c[1]}p{c[2]}tp{c[3]}u{c[4]}c{c[5]}")
def test_weight_tma_path_matches_oracle(set_setting, backend, dtype, cin, case, poison_outputs):
    """FASTDIT_CONV_TMA=1: weight tiles as boxes of the (Cout, taps * Cin) matrix (interpreted
    here). Cin = 24 leaves 8 columns of each 32-wide box in the next tap, which must meet zeros;
    Cin = 40 takes two channel blocks per tap; Cout = 11 leaves rows past the tensor."""
    from fastdit.kernels.causal_conv3d import use_weight_tma

    set_setting(conv_tma=True)
    kernel, stride, padding, time_padding, up, cached = case
    x = torch.randn(1, cin, 3, 5, 6).to(dtype).to(memory_format=torch.channels_last_3d)
    weight = (torch.randn(11, cin, *kernel) / cin).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    bias = torch.randn(11).to(dtype)
    cache = torch.randn(1, cin, cached, 5, 6).to(dtype) if cached else None
    assert use_weight_tma(weight)
    if kernel != (1, 1, 1):  # (Cout, Cin, 1, 1, 1) is channels-last either way
        assert not use_weight_tma(weight.contiguous())
    kw = dict(stride=stride, padding=padding, time_padding=time_padding, upsample=up, cache=cache)
    y, _ = ops.causal_conv3d(x, weight, bias, backend=backend, **kw)
    expect = conv_oracle(x, weight, bias, stride, padding, front=cache, time_padding=time_padding, upsample=up)
    torch.testing.assert_close(y.double(), expect, atol=TOL[dtype] * 20, rtol=TOL[dtype])


def test_vae_conv_weights_are_stored_cin_innermost():
    from fastdit.models.wan.vae import CausalConv3d, CausalVAE

    vae = CausalVAE.from_preset("tiny")
    copy = CausalVAE(vae.config)
    copy.load_state_dict({k: v.contiguous() for k, v in vae.state_dict().items()})  # a default-layout checkpoint
    for model in (vae, copy, copy.to(torch.float16)):
        convs = [m for m in model.modules() if isinstance(m, CausalConv3d | torch.nn.Conv2d)]
        assert convs and all(m.weight.stride(1) == 1 for m in convs)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton is not installed")
@pytest.mark.bad_input
def test_triton_conv_rejects_float64_with_its_reason():
    x, weight = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64), torch.randn(3, 2, 3, 3, 3, dtype=torch.float64)
    with pytest.raises(ops.BackendNotSupportedError, match="dtype float64"):
        ops.causal_conv3d(x, weight, backend="triton")


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton)])
def test_triton_conv_opcheck(backend):
    x, cache = torch.randn(1, 4, 3, 4, 5), torch.randn(1, 4, 2, 4, 5)
    weight, bias, res = torch.randn(8, 4, 3, 3, 3), torch.randn(8), torch.randn(1, 8, 3, 4, 5)
    for args in (
        (x, weight, bias, res, cache, [1, 1, 1], [1, 1, 1, 1], 2, 1),
        (x, weight[:, :, :1], None, None, None, [1, 2, 2], [0, 1, 0, 1], 0, 1),
        (x, weight, bias, None, None, [1, 1, 1], [1, 1, 1, 1], 2, 2),
        (x.contiguous(memory_format=torch.channels_last_3d), weight, bias, None,
         cache.contiguous(memory_format=torch.channels_last_3d), [1, 1, 1], [1, 1, 1, 1], 2, 1),
    ):  # fmt: skip
        torch.library.opcheck(torch.ops.fastdit.causal_conv3d_triton.default, args, test_utils=OPCHECK_UTILS)


# ---- GPU: bf16 at VAE shapes, compiled --------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "triton+wtma", "cudnn"])
@pytest.mark.parametrize(
    "cin, cout, frames, hw, kernel, up",
    [(384, 384, 2, (30, 52), (3, 3, 3), 1), (16, 384, 2, (30, 52), (3, 3, 3), 1), (96, 96, 2, (120, 208), (3, 3, 3), 1),
     (192, 96, 2, (60, 104), (1, 3, 3), 2), (3, 96, 1, (60, 104), (3, 3, 3), 1)],
)  # fmt: skip
def test_fast_conv_cuda_bf16(set_setting, backend, cin, cout, frames, hw, kernel, up):
    backend, _, variant = backend.partition("+")
    set_setting(conv_tma=variant == "wtma")
    x = torch.randn(1, cin, frames, *hw, device="cuda").bfloat16().to(memory_format=torch.channels_last_3d)
    weight = (torch.randn(cout, cin, *kernel, device="cuda") / (cin * 3) ** 0.5).bfloat16()
    weight = weight.contiguous(memory_format=torch.channels_last_3d)  # as CausalVAE stores it
    cache = torch.randn(1, cin, 2, *hw, device="cuda").bfloat16()
    kw = dict(padding=(1, 1), upsample=up, cache=cache if kernel[0] == 3 else None)
    y, _ = ops.causal_conv3d(x, weight, backend=backend, **kw)
    expect, _ = ops.causal_conv3d(x.double(), weight.double(), cache=None if kw["cache"] is None else cache.double(),
                                  padding=(1, 1), upsample=up, backend="reference")  # fmt: skip
    ours = rel_err(y, expect)
    assert ours <= 1e-2, ours  # bf16 inputs, fp32 accumulation
    if backend == "triton":  # at most twice cuDNN's own bf16 error against the same float64 oracle
        cudnn_y, _ = ops.causal_conv3d(x, weight, backend="cudnn", **kw)
        assert ours <= 2 * max(rel_err(cudnn_y, expect), 1e-3), ours


@pytest.mark.gpu
def test_fast_ops_compile_fullgraph_cuda():
    x = torch.randn(1, 96, 4, 32, 48, device="cuda").bfloat16().to(memory_format=torch.channels_last_3d)
    weight = (torch.randn(96, 96, 3, 3, 3, device="cuda") / 50).bfloat16()
    gamma = torch.ones(96, device="cuda").bfloat16()

    def block(x):
        h = ops.rms_norm_silu(x, gamma, backend="triton")
        y, cache = ops.causal_conv3d(h, weight, padding=(1, 1), residual=x, backend="triton")
        return y, cache

    compiled = torch.compile(block, fullgraph=True)
    (got_y, got_cache), (want_y, want_cache) = compiled(x), block(x)
    # The conv is autotuned again under compile and may sum in another tile order: a few bf16
    # roundings of the fp32 accumulator apart, not bitwise. The cache is a copy of the input.
    assert rel_err(got_y, want_y) <= 2**-8, rel_err(got_y, want_y)
    assert torch.equal(got_cache, want_cache)


# ---- the measured per-shape policy --------------------------------------------------------------------


def test_measured_policy_picks_the_backend_per_shape(tmp_path):
    import json

    from fastdit.ops import dispatch
    from fastdit.ops.causal_conv3d import load_policy, policy_key, use_policy

    x, weight = torch.randn(1, 4, 3, 5, 5), torch.randn(6, 4, 3, 3, 3)
    chosen = policy_key(4, 6, (3, 3, 3), (1, 1, 1), 1, torch.float32)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"device_type": "cpu", "choices": {chosen: "reference"}}))
    inputs = lambda w: {"device": x.device, "dtype": x.dtype, "kernel": tuple(w.shape[2:]), "stride": [1, 1, 1],  # noqa: E731
                        "cin": 4, "cout": w.shape[0], "upsample": 1}  # fmt: skip
    try:
        use_policy(load_policy(str(path)))
        assert dispatch.select_backend("causal_conv3d", inputs(weight)).name == "reference"  # the policy's pick
        other = torch.randn(5, 4, 3, 3, 3)
        assert dispatch.select_backend("causal_conv3d", inputs(other)).name == "cudnn"  # not in the policy: priority
        assert dispatch.select_backend("causal_conv3d", inputs(weight), "cudnn").name == "cudnn"  # forced
        y, _ = ops.causal_conv3d(x, weight, padding=(1, 1))
        torch.testing.assert_close(y, ops.causal_conv3d(x, weight, padding=(1, 1), backend="reference")[0])
    finally:
        use_policy(load_policy())
    assert dispatch.select_backend("causal_conv3d", inputs(weight)).name == "cudnn"
    path.write_text(json.dumps({"choices": {}}))
    with pytest.raises(ValueError, match="device_type"):
        load_policy(str(path))


def test_vae_ops_benchmark_writes_a_loadable_policy(tmp_path):
    from fastdit.cli import main
    from fastdit.ops.causal_conv3d import load_policy

    out = tmp_path / "policy.json"
    args = ["bench", "--suite", "vae_ops", "--device", "cpu", "--quick", "--out", str(tmp_path),
            "--conv-shapes", "8,16,2,6,10;4,8,1,5,5", "--conv-policy-out", str(out), "--vae-ops", "conv3d"]  # fmt: skip
    assert main(args) == 0
    policy = load_policy(str(out))
    assert policy["device_type"] == "cpu"
    assert set(policy["choices"]) == {"8-16-k333-s111-u1-float32", "4-8-k333-s111-u1-float32"}
    assert set(policy["choices"].values()) <= {"cudnn", "triton"}
