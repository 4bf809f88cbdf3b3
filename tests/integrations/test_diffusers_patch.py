"""fastdit.patch / unpatch on diffusers' Wan 2.1 transformer, VAE and pipeline (tiny, random weights)."""

import copy
import re
import warnings

import pytest
import torch

import fastdit
from fastdit.ops import dispatch
from tests.conftest import CPU_BACKENDS, rel_err

diffusers = pytest.importorskip("diffusers", reason="the drop-in tests need `pip install -e .[diffusers]`")
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline  # noqa: E402

from tests.models.test_dit_diffusers_parity import make_wan  # noqa: E402

TRANSFORMER_OPS = {"attention", "rope3d_qk_norm", "adaln_modulate", "gated_residual", "gated_residual_modulate"}
# On a CPU, patch() without a backend runs the transformer on diffusers' own code (fastdit has no
# kernel there: test_default_patch_on_cpu_runs_diffusers_own_code). The tests of the patched path
# itself force fastdit's torch backend, so that it is fastdit's code they check on this machine.
FASTDIT_PATH = "torch"
VAE_OPS = {"causal_conv3d", "rms_norm_silu"}


def make_vae(**overrides):
    torch.manual_seed(1)
    config = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
                  latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 2.0])  # fmt: skip
    vae = AutoencoderKLWan(**{**config, **overrides}).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            p.normal_(1.0 if "gamma" in name else 0.0, 0.2 if p.dim() > 1 else 0.1)
    return vae


@pytest.fixture
def op_calls():
    """Names of the fastdit ops dispatched during the test (dispatch.trace)."""
    seen = OpNames()
    with dispatch.trace() as log:
        seen.log = log
        yield seen


class OpNames:
    """The op names of a dispatch trace, as a list the tests can clear and count."""

    log: list

    def __contains__(self, name):
        return name in self._names()

    def _names(self):
        return [op for op, _ in self.log]

    def __iter__(self):
        return iter(self._names())

    def __len__(self):
        return len(self.log)

    def __bool__(self):
        return bool(self.log)

    def count(self, name):
        return self._names().count(name)

    def clear(self):
        self.log.clear()


def instance_state(model):
    """Every module's own attribute names and processor objects: what unpatch must restore."""
    return [(name, sorted(vars(m)), id(getattr(m, "processor", None))) for name, m in model.named_modules()]


@pytest.mark.parametrize("cross_attn_norm", [True, False])
@pytest.mark.parametrize("shape, text_len", [((2, 4, 3, 6, 10), 5), ((1, 4, 1, 8, 6), 7)])
def test_patched_transformer_matches_and_unpatch_restores_bitwise(cross_attn_norm, shape, text_len, op_calls):
    wan = make_wan(cross_attn_norm=cross_attn_norm)
    x, text = torch.randn(shape), torch.randn(shape[0], text_len, 16)
    t = torch.rand(shape[0]) * 1000
    before = instance_state(wan)
    with torch.no_grad():
        expect = wan(x, t, text).sample
        changes = fastdit.patch(wan, backend=FASTDIT_PATH)
        assert len(changes) == 4 and any("attention processors" in c for c in changes)
        op_calls.clear()
        got = wan(x, t, text).sample
        assert TRANSFORMER_OPS <= set(op_calls), set(op_calls)  # the patch changed what runs
        assert rel_err(got, expect) <= 1e-5
        fastdit.unpatch(wan)
        op_calls.clear()
        again = wan(x, t, text).sample
    assert not op_calls
    assert torch.equal(again, expect)
    assert instance_state(wan) == before


@pytest.mark.parametrize(
    "flags, expect_ops",
    [
        (dict(attention=True, rope=False, adaln=False), {"attention"}),
        (dict(attention=False, rope=True, adaln=False), {"rope3d_qk_norm"}),
        (dict(attention=False, rope=False, adaln=True), TRANSFORMER_OPS - {"attention", "rope3d_qk_norm"}),
    ],
)
def test_each_part_alone(flags, expect_ops, op_calls):
    wan = make_wan()
    x, t, text = torch.randn(1, 4, 3, 6, 10), torch.tensor([300.0]), torch.randn(1, 5, 16)
    with torch.no_grad():
        expect = wan(x, t, text).sample
        fastdit.patch(wan, vae=False, backend=FASTDIT_PATH, **flags)
        op_calls.clear()
        got = wan(x, t, text).sample
        fastdit.unpatch(wan)
    assert set(op_calls) == expect_ops
    assert rel_err(got, expect) <= 1e-5


@pytest.mark.triton_cpu
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton is not installed")
def test_patched_transformer_fp16_on_triton():
    wan = make_wan()
    x, t, text = torch.randn(2, 4, 3, 6, 10), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 16)
    with torch.no_grad():
        exact = wan(x, t, text).sample.double()
        half = wan.half()
        plain = half(x.half(), t, text.half()).sample
        fastdit.patch(half, backend="triton")
        with dispatch.trace() as log:
            fast = half(x.half(), t, text.half()).sample
        fastdit.unpatch(half)
    assert {op for op, _ in log} == TRANSFORMER_OPS and {b for _, b in log} == {"triton"}  # triton reached them all
    assert fast.dtype == torch.float16
    # fastdit in fp16 is at most 2x as far from the fp32 model as diffusers' own fp16 run
    assert rel_err(fast, exact) <= max(2 * rel_err(plain, exact), 2e-3)


def test_diffusers_set_attention_backend_reaches_fastdit(op_calls):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from fastdit.integrations.diffusers import register_attention_backend

    register_attention_backend()
    wan = make_wan()
    x, t, text = torch.randn(1, 4, 1, 6, 6), torch.tensor([5.0]), torch.randn(1, 3, 16)
    old = _AttentionBackendRegistry._active_backend
    try:
        with torch.no_grad():
            expect = wan(x, t, text).sample
            wan.set_attention_backend("fastdit")  # diffusers' own API, unchanged
            op_calls.clear()
            got = wan(x, t, text).sample
            wan.reset_attention_backend()
    finally:
        _AttentionBackendRegistry._active_backend = old
    assert op_calls.count("attention") == 4  # 2 blocks x (self + cross)
    assert rel_err(got, expect) <= 1e-5


def test_patched_vae_matches_shares_weights_and_tiles(op_calls):
    vae = make_vae()
    video = torch.rand(1, 3, 5, 48, 64) * 2 - 1
    with torch.no_grad():
        expect_latent = vae.encode(video).latent_dist
        expect_video = vae.decode(expect_latent.mean).sample
        before = instance_state(vae)  # after diffusers' own calls, which add their cache attributes
        changes = fastdit.patch(vae)
        assert changes == ["vae: encode / decode -> fastdit CausalVAE (shared weights)"]
        fast = vae._fastdit_vae.fast
        assert fast.decoder.conv_out.weight.data_ptr() == vae.decoder.conv_out.weight.data_ptr()
        op_calls.clear()
        latent = vae.encode(video).latent_dist
        assert VAE_OPS <= set(op_calls)
        assert rel_err(latent.mean, expect_latent.mean) <= 1e-5
        assert rel_err(latent.logvar, expect_latent.logvar) <= 1e-5
        assert rel_err(vae.decode(expect_latent.mean).sample, expect_video) <= 1e-5
        # diffusers' tiling settings carry over
        vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                          tile_sample_stride_width=16)  # fmt: skip
        tiled = vae.decode(expect_latent.mean).sample
        fastdit.unpatch(vae)
        assert rel_err(tiled, vae.decode(expect_latent.mean).sample) <= 1e-5
        vae.disable_tiling()
        assert torch.equal(vae.decode(expect_latent.mean).sample, expect_video)
    assert instance_state(vae) == before


def test_patched_pipeline_is_called_unchanged():
    vae = make_vae()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=make_wan(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    embeds, negative = torch.randn(1, 5, 16), torch.randn(1, 5, 16)

    def run():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, height=32, width=48, num_frames=5,
                    num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                    output_type="pt").frames  # fmt: skip

    expect = run()
    changes = fastdit.patch(pipe, backend=FASTDIT_PATH)
    assert [c.split(":")[0].split(".")[0] for c in changes] == ["transformer"] * 4 + ["vae"]
    got = run()
    fastdit.unpatch(pipe)
    assert got.shape == expect.shape == (1, 5, 3, 32, 48)
    assert rel_err(got, expect) <= 1e-5
    assert torch.equal(run(), expect)


def test_default_patch_on_cpu_runs_diffusers_own_code(op_calls, caplog):
    """Catches a patch that makes a model slower where fastdit has no kernel: on a CPU the
    dispatcher's choice is PyTorch's own ops, so the patched transformer runs diffusers' code
    (bitwise the unpatched output), records that choice in the trace and says so once; the VAE
    runs fastdit's CausalVAE (its oneDNN convs are the faster path on CPUs)."""
    import logging

    from fastdit.integrations.diffusers import _log_native_once

    _log_native_once.cache_clear()  # said once per process: make this test's call the first
    wan = make_wan()
    x, t, text = torch.randn(1, 4, 3, 6, 10), torch.tensor([300.0]), torch.randn(1, 5, 16)
    with torch.no_grad():
        expect = wan(x, t, text).sample
        fastdit.patch(wan)
        try:
            with caplog.at_level(logging.INFO, logger="fastdit"):
                op_calls.clear()
                got = wan(x, t, text).sample
                assert dict(op_calls.log) == {
                    "adaln_modulate": "torch",
                    "rope3d_qk_norm": "torch",
                    "attention": "torch",
                }
                wan(x, t, text)
        finally:
            fastdit.unpatch(wan)
    assert torch.equal(got, expect)
    said = [r.getMessage() for r in caplog.records if "no fastdit kernel runs" in r.getMessage()]
    assert len(said) == len(set(said)) and any("adaln_modulate on cpu" in m for m in said)


@pytest.mark.bad_input
def test_patch_errors():
    wan = make_wan()
    with pytest.raises(TypeError, match="takes a diffusers pipeline"):
        fastdit.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="changed nothing"):
        fastdit.patch(wan, attention=False, rope=False, adaln=False)
    with pytest.raises(ValueError, match="not patched"):
        fastdit.unpatch(wan)
    fastdit.patch(wan)
    with pytest.raises(RuntimeError, match="already patched"):
        fastdit.patch(wan)
    fastdit.unpatch(wan)


@pytest.mark.parametrize("flags", [{}, {"adaln": False}])
def test_patched_forward_skips_the_ops_value_checks(monkeypatch, op_calls, flags):
    """The patched code builds the ops' sample boundaries itself, so the per-call value checks
    (a host sync each on a GPU: 5 per block before) are skipped; the grid is checked on host ints."""
    from fastdit.ops import validation

    checked = []
    real = validation.check_values_enabled

    def spy(*tensors):
        enabled = real(*tensors)
        checked.append(enabled)
        return enabled

    monkeypatch.setattr(validation, "check_values_enabled", spy)
    wan = make_wan()
    fastdit.patch(wan, backend=FASTDIT_PATH, **flags)
    with torch.no_grad():
        wan(torch.randn(1, 4, 3, 6, 6), torch.tensor([5.0]), torch.randn(1, 3, 16))
    assert "rope3d_qk_norm" in op_calls and not any(checked)  # no op read a boundary back
    with pytest.raises(ValueError, match="smaller than the patch size"):
        with torch.no_grad():
            wan(torch.randn(1, 4, 3, 1, 6), torch.tensor([5.0]), torch.randn(1, 3, 16))
    fastdit.unpatch(wan)


@pytest.mark.parametrize("version", ["0.35.2", "0.43.0.dev0", "1.0.0"])
def test_patch_warns_outside_the_tested_diffusers_range(monkeypatch, version):
    import diffusers

    wan = make_wan()
    monkeypatch.setattr(diffusers, "__version__", version)
    with pytest.warns(UserWarning, match=f"tested with diffusers 0.36 to 0.42, found {re.escape(version)}"):
        fastdit.patch(wan)
    fastdit.unpatch(wan)


def test_patch_is_silent_on_the_installed_diffusers():
    wan = make_wan()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fastdit.patch(wan)
    fastdit.unpatch(wan)


@pytest.mark.gpu
def test_patched_transformer_cuda_bf16():
    wan = make_wan(num_attention_heads=4, attention_head_dim=64, text_dim=64).cuda().to(torch.bfloat16)
    x = torch.randn(2, 4, 5, 16, 16, device="cuda", dtype=torch.bfloat16)
    t, text = torch.tensor([10.0, 700.0], device="cuda"), torch.randn(2, 12, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        exact = wan.float()(x.float(), t, text.float()).sample.double()
        wan.to(torch.bfloat16)
        plain = wan(x, t, text).sample
        fastdit.patch(wan)
        fast = wan(x, t, text).sample
        fastdit.unpatch(wan)
    assert rel_err(fast, exact) <= max(2 * rel_err(plain, exact), 1e-2)


# ---- the host library's own behaviour on a patched module --------------------------------------------


def _wan_case():
    x, text = torch.randn(1, 4, 3, 6, 10), torch.randn(1, 5, 16)
    t = torch.tensor([300.0])
    return make_wan(), lambda m: m(x.to(m.dtype), t, text.to(m.dtype)).sample


def _vae_case():
    video = torch.rand(1, 3, 5, 32, 48) * 2 - 1

    def run(m):
        latent = m.encode(video.to(m.dtype)).latent_dist.mean
        return m.decode(latent).sample

    return make_vae(), run


@pytest.mark.parametrize("case", [_wan_case, _vae_case], ids=["transformer", "vae"])
@pytest.mark.bad_input
def test_a_patched_module_saves_loads_and_converts_as_unpatched(case, tmp_path):
    """state_dict, named_parameters, save_pretrained / from_pretrained, load_state_dict (strict,
    and assign=True: new parameter objects), .to(dtype) with and without torch's overwrite flag:
    the patched module (fast path) agrees with an unpatched twin after each."""
    module, run = case()
    twin = copy.deepcopy(module)
    keys, names = list(module.state_dict()), [n for n, _ in module.named_parameters()]
    fastdit.patch(module, backend=FASTDIT_PATH)
    with torch.no_grad():
        assert list(module.state_dict()) == keys  # each tensor once, under diffusers' name
        assert [n for n, _ in module.named_parameters()] == names
        assert [n for n, _ in module.named_modules()] == [n for n, _ in twin.named_modules()]
        module.save_pretrained(tmp_path / "saved")  # safetensors refuses shared tensors
        loaded = type(module).from_pretrained(tmp_path / "saved")
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), twin.state_dict().values()))

        def agree(step):
            got, want = run(module), run(twin)
            assert got.dtype == want.dtype and rel_err(got, want) <= 1e-5, step

        agree("patched")
        state = {k: v * 0.9 for k, v in twin.state_dict().items()}
        for m in (module, twin):
            m.load_state_dict(state, strict=True)
        agree("load_state_dict(strict=True)")
        state = {k: v * 1.1 for k, v in twin.state_dict().items()}
        for m in (module, twin):
            m.load_state_dict(state, strict=True, assign=True)  # the module now holds new tensors
        agree("load_state_dict(assign=True)")
        for m in (module, twin):
            m.to(torch.float64)
        agree(".to(float64)")
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            for m in (module, twin):
                m.to(torch.float32)  # new Parameter objects
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        agree(".to(float32) with overwrite_module_params_on_conversion")
    fastdit.unpatch(module)
    assert list(module.state_dict()) == keys


@pytest.mark.parametrize("case", [_wan_case, _vae_case], ids=["transformer", "vae"])
@pytest.mark.bad_input
def test_a_patched_module_runs_under_accelerate_offload_hooks(case):
    accelerate = pytest.importorskip("accelerate", reason="accelerate's hooks need `pip install accelerate`")
    module, run = case()
    with torch.no_grad():
        expect = run(module)
        fastdit.patch(module, backend=FASTDIT_PATH)
        accelerate.cpu_offload(module, execution_device=torch.device("cpu"))  # weights on meta between calls
        assert any(p.device.type == "meta" for p in module.parameters())
        got = run(module)
    assert rel_err(got, expect) <= 1e-5
    accelerate.hooks.remove_hook_from_submodules(module)
    fastdit.unpatch(module)


def _pipeline():
    return WanPipeline(tokenizer=None, text_encoder=None, vae=make_vae(), transformer=make_wan(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))  # fmt: skip


def _run_pipeline(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt_embeds=torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1)),
                negative_prompt_embeds=torch.zeros(1, 5, 16), height=32, width=48, num_frames=5,
                num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                output_type="pt").frames  # fmt: skip


# enable_sequential_cpu_offload is covered per module above (accelerate.cpu_offload): on a CPU the
# unpatched WanPipeline itself fails under it (accelerate 1.15 resetting the rope module's buffers).
@pytest.mark.parametrize("offload", [None, "enable_model_cpu_offload"])
def test_a_patched_pipeline_saves_reloads_and_offloads_as_unpatched(offload, tmp_path):
    if offload:
        pytest.importorskip("accelerate", reason="diffusers' offload needs `pip install accelerate`")
    pipe, twin = _pipeline(), _pipeline()
    twin.vae.load_state_dict(pipe.vae.state_dict())
    twin.transformer.load_state_dict(pipe.transformer.state_dict())
    fastdit.patch(pipe, backend=FASTDIT_PATH)
    if offload is None:
        pipe.save_pretrained(tmp_path / "pipe")
        loaded = WanPipeline.from_pretrained(tmp_path / "pipe", tokenizer=None, text_encoder=None, transformer_2=None)
        for name in ("vae", "transformer"):
            a, b = getattr(loaded, name).state_dict(), getattr(twin, name).state_dict()
            assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a), name
    else:
        for p in (pipe, twin):
            getattr(p, offload)(device="cpu")
    got, want = _run_pipeline(pipe), _run_pipeline(twin)
    assert rel_err(got, want) <= 1e-5
    if offload:
        pipe.remove_all_hooks()
    fastdit.unpatch(pipe)


def test_patched_image_to_video_pipeline_equals_unpatched():
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    from tests.models.test_dit_diffusers_parity import I2V
    from tests.models.test_image_encoder import tiny_clip

    processor, clip = tiny_clip()
    # the mask (4) and image latent (z_dim 4) beside the 4-channel noise
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, image_encoder=clip, image_processor=processor,
                                   vae=make_vae(), transformer=make_wan(**I2V),
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 512, 16, generator=gen), torch.randn(1, 512, 16, generator=gen)
    picture = Image.fromarray((torch.rand(32, 48, 3, generator=gen) * 255).to(torch.uint8).numpy())

    def run():
        return pipe(image=picture, prompt_embeds=embeds, negative_prompt_embeds=negative,
                    height=32, width=48, num_frames=5, num_inference_steps=2, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").frames  # fmt: skip

    expect = run()
    fastdit.patch(pipe, backend=FASTDIT_PATH)
    try:
        got = run()
    finally:
        fastdit.unpatch(pipe)
    assert got.shape == expect.shape == (1, 5, 3, 32, 48)
    assert rel_err(got, expect) <= 1e-5
    assert torch.equal(run(), expect)


def test_patched_two_expert_pipeline_equals_unpatched():
    """Wan 2.2 A14B: transformer (high noise) and transformer_2 (low noise), switched at boundary_ratio."""
    high, low = make_wan(), make_wan()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=make_vae(), transformer=high, transformer_2=low,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), boundary_ratio=0.6)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    embeds, negative = torch.randn(1, 5, 16), torch.randn(1, 5, 16)

    def run():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, height=32, width=48, num_frames=5,
                    num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=2.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").frames  # fmt: skip

    expect = run()
    changes = fastdit.patch(pipe, backend=FASTDIT_PATH)
    assert any(c.startswith("transformer_2") for c in changes) and any(c.startswith("transformer.") for c in changes)
    try:
        got = run()
    finally:
        fastdit.unpatch(pipe)
    assert rel_err(got, expect) <= 1e-5
    assert torch.equal(run(), expect)


def test_patched_wan22_vae_equals_unpatched_tiled_too():
    """Catches the patched Wan 2.2 VAE handing tiled calls back to diffusers (or tiling them at Wan
    2.1's sizes): with diffusers' tiling on, fastdit's tiled encode and decode serve them and equal
    diffusers' own."""
    from tests.models.test_vae_diffusers_parity import WAN22

    vae = make_vae(**WAN22, latents_mean=[0.0] * 12, latents_std=[1.0] * 12)
    video = torch.rand(1, 3, 5, 32, 48) * 2 - 1
    tiles = dict(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=8,
                 tile_sample_stride_width=8)  # fmt: skip
    with torch.no_grad():
        latent = vae.encode(video).latent_dist.mean
        expect = vae.decode(latent).sample
        vae.enable_tiling(**tiles)
        tiled_latent = vae.encode(video).latent_dist.mean  # diffusers' own tiled encode and decode
        vae.enable_tiling(**{k: 2 * v for k, v in tiles.items()})  # decode tiles: whole latents (16 px)
        tiled = vae.decode(latent).sample
        vae.disable_tiling()
        changes = fastdit.patch(vae)
        assert any("fastdit CausalVAE" in c for c in changes)
        try:
            assert rel_err(vae.encode(video).latent_dist.mean, latent) <= 1e-5
            assert rel_err(vae.decode(latent).sample, expect) <= 1e-5
            with dispatch.trace() as log:
                vae.enable_tiling(**tiles)
                assert rel_err(vae.encode(video).latent_dist.mean, tiled_latent) <= 1e-5
                vae.enable_tiling(**{k: 2 * v for k, v in tiles.items()})
                assert rel_err(vae.decode(latent).sample, tiled) <= 1e-5
            assert {op for op, _ in log} >= {"causal_conv3d", "rms_norm_silu"}  # fastdit's ops ran
            assert rel_err(tiled_latent, latent) > 1e-4 and rel_err(tiled, expect) > 1e-4  # tiles did blend
        finally:
            fastdit.unpatch(vae)
