"""DiT.forward against diffusers' WanTransformer3DModel with copied weights (float32, CPU)."""

import json
import os

import pytest
import torch

from fastdit.models import DiT, WeightLoadError
from tests.conftest import rel_err

diffusers = pytest.importorskip("diffusers", reason="the parity oracle needs `pip install -e .[diffusers]`")
from diffusers import WanTransformer3DModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=32,
    ffn_dim=40,
    num_layers=2,
    rope_max_seq_len=64,
)


def make_wan(**overrides) -> WanTransformer3DModel:
    model = WanTransformer3DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but make every weight matter
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize(
    "shape, text_len",
    [
        ((2, 4, 3, 6, 10), 5),  # batch > 1, non-square
        ((1, 4, 1, 8, 6), 7),  # an image: T = 1
        ((3, 4, 5, 4, 12), 3),  # odd batch, wide
    ],
)
@pytest.mark.parametrize("cross_attn_norm", [True, False])
def test_forward_matches_diffusers(shape, text_len, cross_attn_norm):
    wan = make_wan(cross_attn_norm=cross_attn_norm)
    dit = DiT.from_diffusers(wan).eval()
    x = torch.randn(shape)
    t = torch.rand(shape[0]) * 1000
    text = torch.randn(shape[0], text_len, TINY["text_dim"])
    with torch.no_grad():
        expect = wan(x, t, text)[0]
        got = dit(x, t, text)
    assert got.shape == expect.shape
    assert rel_err(got, expect) <= 1e-5


def test_forward_matches_diffusers_patch_in_time_and_axes():
    wan = make_wan(patch_size=(2, 2, 2), attention_head_dim=20, num_attention_heads=3)
    dit = DiT.from_diffusers(wan).eval()
    assert dit.config.patch_size == (2, 2, 2) and dit.config.num_heads == 3
    x, t, text = torch.randn(2, 4, 4, 6, 8), torch.tensor([3.0, 999.0]), torch.randn(2, 6, 16)
    with torch.no_grad():
        assert rel_err(dit(x, t, text), wan(x, t, text)[0]) <= 1e-5


def test_load_from_directory_state_dict_and_file(tmp_path):
    wan = make_wan()
    wan.save_pretrained(tmp_path / "wan", safe_serialization=True)
    x, t, text = torch.randn(1, 4, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, 16)
    with torch.no_grad():
        expect = wan(x, t, text)[0]
        from_dir = DiT.from_diffusers(tmp_path / "wan")
        assert from_dir.config.num_heads == 2 and from_dir.config.head_dim == 12
        assert rel_err(from_dir(x, t, text), expect) <= 1e-5
        # A bare state dict or file carries no head count: pass the config.
        from_sd = DiT.from_diffusers(wan.state_dict(), config=from_dir.config)
        assert rel_err(from_sd(x, t, text), expect) <= 1e-5
        file = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in wan.state_dict().items()}, str(file))
        from_file = DiT.from_diffusers(str(file), config=from_dir.config)
        assert rel_err(from_file(x, t, text), expect) <= 1e-5


def test_sharded_directory(tmp_path):
    wan = make_wan()
    state = {k: v.contiguous() for k, v in wan.state_dict().items()}
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"part-1.safetensors": keys[:half], "part-2.safetensors": keys[half:]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(tmp_path / name))
    weight_map = {k: name for name, names in shards.items() for k in names}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(dict(wan.config)))
    dit = DiT.from_diffusers(tmp_path)
    x, t, text = torch.randn(1, 4, 1, 4, 4), torch.tensor([1.0]), torch.randn(1, 2, 16)
    with torch.no_grad():
        assert rel_err(dit(x, t, text), wan(x, t, text)[0]) <= 1e-5


def test_missing_and_unexpected_keys_are_listed():
    state = dict(make_wan().state_dict())
    state.pop("blocks.1.attn1.to_q.weight")
    state["blocks.0.attn1.add_k_proj.weight"] = torch.zeros(24, 24)
    config = DiT.from_diffusers(make_wan()).config
    with pytest.raises(WeightLoadError) as info:
        DiT.from_diffusers(state, config=config)
    message = str(info.value)
    assert "missing keys (1): ['blocks.1.self_attn.q.weight']" in message
    assert "unexpected keys (1): ['blocks.0.attn1.add_k_proj.weight']" in message


@pytest.mark.bad_input
def test_shape_mismatch_is_reported():
    config = DiT.from_diffusers(make_wan()).config.replace(ffn_dim=48)
    with pytest.raises(WeightLoadError, match="shape mismatches .*ffn_in.weight"):
        DiT.from_diffusers(make_wan().state_dict(), config=config)


@pytest.mark.bad_input
def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(make_wan().config)))
    torch.save({}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightLoadError, match="never pickled"):
        DiT.from_diffusers(tmp_path)
    assert os.path.exists(tmp_path / "diffusion_pytorch_model.bin")


I2V = dict(in_channels=12, image_dim=8, added_kv_proj_dim=24)  # noise 4 + mask 4 + image latent 4


@pytest.mark.parametrize("shape, image_len", [((2, 12, 3, 4, 6), 5), ((1, 12, 1, 6, 4), 1)])
def test_i2v_forward_matches_diffusers(shape, image_len, tmp_path):
    wan = make_wan(**I2V)
    dit = DiT.from_diffusers(wan).eval()
    assert dit.config.image_dim == 8 and dit.config.in_channels == 12
    x, t = torch.randn(shape), torch.rand(shape[0]) * 1000
    text = torch.randn(shape[0], 512, 16)  # diffusers' I2V attention takes the last 512 context tokens as text
    image = torch.randn(shape[0], image_len, 8)
    with torch.no_grad():
        expect = wan(x, t, text, encoder_hidden_states_image=image)[0]
        assert rel_err(dit(x, t, text, image_embeds=image), expect) <= 1e-5
        wan.save_pretrained(tmp_path / "i2v", safe_serialization=True)
        assert rel_err(DiT.from_diffusers(tmp_path / "i2v")(x, t, text, image), expect) <= 1e-5
        from_state_dict = DiT.from_diffusers(wan.state_dict(), config=dit.config)
        assert rel_err(from_state_dict(x, t, text, image), expect) <= 1e-5


def test_i2v_packed_batch_of_different_sizes_and_image_lengths():
    wan = make_wan(**I2V)
    dit = DiT.from_diffusers(wan).eval()
    from fastdit.models import PackedBatch

    shapes, lengths = [(12, 2, 4, 6), (12, 1, 6, 4)], [3, 7]
    latents = [torch.randn(s) for s in shapes]
    texts = [torch.randn(512, 16) for _ in shapes]
    images = [torch.randn(n, 8) for n in lengths]
    t = torch.tensor([300.0, 900.0])
    batch = PackedBatch.from_samples(latents, t, texts, images=images)
    with torch.no_grad():
        outs = batch.unpack(dit.forward_packed(batch), 4)
        for i in range(2):
            expect = wan(latents[i][None], t[i : i + 1], texts[i][None], encoder_hidden_states_image=images[i][None])
            assert rel_err(outs[i], expect[0][0]) <= 1e-5


def test_i2v_gradients_reach_the_image_layers():
    wan = make_wan(**I2V)
    dit = DiT.from_diffusers(wan)
    x, t, text, image = (
        torch.randn(1, 12, 2, 4, 4),
        torch.tensor([400.0]),
        torch.randn(1, 512, 16),
        torch.randn(1, 4, 8),
    )
    wan(x, t, text, encoder_hidden_states_image=image)[0].square().mean().backward()
    dit(x, t, text, image).square().mean().backward()
    wan_params, dit_params = dict(wan.named_parameters()), dict(dit.named_parameters())
    pairs = {
        "condition_embedder.image_embedder.ff.net.0.proj.weight": "image_embed.ff_in.weight",
        "condition_embedder.image_embedder.norm2.bias": "image_embed.norm2.bias",
        "blocks.1.attn2.add_k_proj.weight": "blocks.1.cross_attn.add_k.weight",
        "blocks.0.attn2.norm_added_k.weight": "blocks.0.cross_attn.add_k_norm",
    }
    for theirs, ours in pairs.items():
        assert rel_err(dit_params[ours].grad, wan_params[theirs].grad) <= 1e-4, ours


@pytest.mark.bad_input
def test_i2v_inputs_and_configs_are_checked():
    dit = DiT.from_diffusers(make_wan(**I2V)).eval()
    x, t, text = torch.randn(1, 12, 1, 4, 4), torch.tensor([1.0]), torch.randn(1, 512, 16)
    with pytest.raises(ValueError, match="needs image_embeds"):
        dit(x, t, text)
    with pytest.raises(ValueError, match="image_embeds must be"):
        dit(x, t, text, torch.randn(1, 3, 9))
    with pytest.raises(ValueError, match="image_embeds must be"):
        dit(x, t, text, torch.randn(2, 3, 8))
    t2v = DiT.from_diffusers(make_wan()).eval()
    with pytest.raises(ValueError, match="no image conditioning"):
        t2v(torch.randn(1, 4, 1, 4, 4), t, text, torch.randn(1, 3, 8))
    with pytest.raises(WeightLoadError, match="FLF2V"):
        DiT.from_diffusers(make_wan(**I2V, pos_embed_seq_len=10))
    config = dict(make_wan(**I2V).config)
    with pytest.raises(WeightLoadError, match="go together"):
        from fastdit.models.wan.weights import config_from_diffusers

        config_from_diffusers({**config, "added_kv_proj_dim": None})
    with pytest.raises(WeightLoadError, match="added_kv_proj_dim must equal the hidden size"):
        config_from_diffusers({**config, "added_kv_proj_dim": 16})


def test_gradients_match_diffusers():
    wan = make_wan()
    dit = DiT.from_diffusers(wan)
    x, t, text = torch.randn(2, 4, 3, 4, 6), torch.tensor([20.0, 800.0]), torch.randn(2, 5, 16)
    wan(x, t, text)[0].square().mean().backward()
    dit(x, t, text).square().mean().backward()
    wan_params, dit_params = dict(wan.named_parameters()), dict(dit.named_parameters())
    pairs = {
        "blocks.0.attn1.to_q.weight": "blocks.0.self_attn.q.weight",
        "blocks.1.attn1.norm_k.weight": "blocks.1.self_attn.k_norm",
        "blocks.0.attn2.to_v.weight": "blocks.0.cross_attn.v.weight",
        "blocks.1.scale_shift_table": "blocks.1.modulation",
        "blocks.0.ffn.net.0.proj.weight": "blocks.0.ffn_in.weight",
        "condition_embedder.time_proj.weight": "time_proj.weight",
        "scale_shift_table": "head_modulation",
    }
    for theirs, ours in pairs.items():
        assert rel_err(dit_params[ours].grad, wan_params[theirs].grad) <= 1e-4, ours
    patch_grad = wan_params["patch_embedding.weight"].grad.flatten(1)
    assert rel_err(dit_params["patch_embed.weight"].grad, patch_grad) <= 1e-4


def test_i2v_sampling_is_diffusers_transformer_in_an_euler_cfg_loop():
    from fastdit.runtime import FlowMatchSampler, flow_shift_sigmas, wan_image_to_video

    wan = make_wan(**I2V)
    dit = DiT.from_diffusers(wan).eval()
    gen = torch.Generator().manual_seed(0)
    image_latent = torch.randn(4, 3, 4, 6, generator=gen)
    image, text, negative = torch.randn(5, 8, generator=gen), torch.randn(512, 16), torch.randn(512, 16)
    request = wan_image_to_video(image_latent, image, text, channels=4, negative_text=negative, seed=7)
    (got,) = FlowMatchSampler(dit, num_steps=3, shift=3.0, guidance=4.0)([request])
    mask = torch.zeros(4, 3, 4, 6)
    mask[:, 0] = 1
    condition = torch.cat([mask, image_latent])[None]
    x = torch.randn((1, 4, 3, 4, 6), generator=torch.Generator().manual_seed(7))
    sigmas = flow_shift_sigmas(3, 3.0)
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            inp, t = torch.cat([x, condition], dim=1), torch.tensor([sigma * 1000.0])
            cond = wan(inp, t, text[None], encoder_hidden_states_image=image[None])[0]
            uncond = wan(inp, t, negative[None], encoder_hidden_states_image=image[None])[0]
            x = x + (sigma_next - sigma) * (uncond + 4.0 * (cond - uncond))
    assert rel_err(got, x[0]) <= 1e-5


def test_per_token_timesteps_match_diffusers_expand_timesteps():
    """Wan 2.2 TI2V: ``timestep (B, S)``, the first latent frame's tokens at 0 (a clean image)."""
    wan = make_wan()
    dit = DiT.from_diffusers(wan).eval()
    x, text = torch.randn(2, 4, 3, 4, 6), torch.randn(2, 5, 16)
    per_frame = torch.tensor([[0.0, 700.0, 700.0], [0.0, 250.0, 250.0]])
    t = per_frame[:, :, None].expand(2, 3, 2 * 3).reshape(2, -1)  # (B, T' H' W') in (t, h, w) order
    with torch.no_grad():
        expect = wan(x, t, text)[0]
        got = dit(x, t, text)
        assert rel_err(got, expect) <= 1e-5
        same = torch.full((2, 18), 500.0)  # equal per-token timesteps are the per-sample result
        assert rel_err(dit(x, same, text), dit(x, torch.tensor([500.0, 500.0]), text)) <= 1e-6
    with pytest.raises(ValueError, match="per token"):
        dit(x, torch.zeros(2, 17), text)


def test_clean_first_frame_sampling_is_diffusers_expand_timesteps_loop():
    """Wan 2.2 TI2V image-to-video: the first latent frame is the clean image latent, its tokens
    at timestep 0, re-imposed after every step (WanImageToVideoPipeline with expand_timesteps)."""
    from fastdit.runtime import FlowMatchSampler, flow_shift_sigmas, image_to_video

    wan = make_wan()
    dit = DiT.from_diffusers(wan).eval()
    gen = torch.Generator().manual_seed(1)
    first, text, negative = torch.randn(4, 1, 4, 6, generator=gen), torch.randn(5, 16), torch.randn(5, 16)
    request = image_to_video(first, text, frames=3, clean=True, negative_text=negative, seed=2)
    (got,) = FlowMatchSampler(dit, num_steps=3, shift=3.0, guidance=3.0)([request])
    mask = torch.ones(1, 4, 3, 4, 6)
    mask[:, :, 0] = 0
    condition = torch.zeros(1, 4, 3, 4, 6)
    condition[:, :, 0] = first[:, 0]
    x = torch.randn((1, 4, 3, 4, 6), generator=torch.Generator().manual_seed(2))
    x = (1 - mask) * condition + mask * x
    sigmas = flow_shift_sigmas(3, 3.0)
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            t = (mask[0, 0, :, ::2, ::2] * sigma * 1000.0).flatten()[None]
            cond, uncond = wan(x, t, text[None])[0], wan(x, t, negative[None])[0]
            x = x + (sigma_next - sigma) * (uncond + 3.0 * (cond - uncond))
            x = (1 - mask) * condition + mask * x
    assert torch.equal(got[:, 0], first[:, 0])
    assert rel_err(got, x[0]) <= 1e-5
