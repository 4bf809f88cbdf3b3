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


@pytest.mark.bad_input
def test_i2v_configs_are_refused():
    with pytest.raises(WeightLoadError, match="image-conditioned"):
        DiT.from_diffusers(make_wan(image_dim=8, added_kv_proj_dim=24))


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
