"""Checkpoint directories as users have them: the Hugging Face cache layout, configs that lie about
sizes or spell numbers as strings, and the dtype a checkpoint loads in."""

import json
import os
import shutil

import pytest
import torch

from fastdit.models import DiT, WeightLoadError
from fastdit.models.wan.vae import CausalVAE

pytest.importorskip("diffusers", reason="writing diffusers checkpoints needs `pip install -e .[diffusers]`")

from tests.integrations.test_diffusers_patch import make_vae  # noqa: E402
from tests.models.test_dit_diffusers_parity import make_wan  # noqa: E402


def _sharded(path, dtype=torch.float32):
    torch.manual_seed(0)
    make_wan().to(dtype).save_pretrained(path, safe_serialization=True, max_shard_size="20KB")
    assert os.path.exists(path / "diffusion_pytorch_model.safetensors.index.json")
    return path


def _as_hub_cache(source, cache):
    """``source``'s files moved into ``cache/blobs/<name>`` and linked from
    ``cache/snapshots/abc123/transformer/`` the way huggingface_hub lays out its cache."""
    snapshot = cache / "snapshots" / "abc123" / "transformer"
    snapshot.mkdir(parents=True)
    (cache / "blobs").mkdir()
    for name in os.listdir(source):
        blob = cache / "blobs" / f"sha-{name}"
        shutil.move(source / name, blob)
        os.symlink(os.path.join("..", "..", "..", "blobs", blob.name), snapshot / name)
    return snapshot


def test_the_hugging_face_cache_layout_loads_and_escapes_stay_refused(tmp_path):
    """Catches every symlinked shard taken for an escape (the HF cache's snapshot files all link
    into ../../blobs/), and the opposite bug: any symlink allowed once the layout is recognised."""
    plain = DiT.from_diffusers(str(_sharded(tmp_path / "plain")))
    snapshot = _as_hub_cache(_sharded(tmp_path / "src"), tmp_path / "models--org--tiny")
    cached = DiT.from_diffusers(str(snapshot))
    for (name, a), b in zip(plain.state_dict().items(), cached.state_dict().values()):
        assert torch.equal(a, b), name
    # a snapshot file linking outside the repository's blobs/ is still refused
    outside = tmp_path / "elsewhere.safetensors"
    shard = sorted(n for n in os.listdir(snapshot) if n.endswith(".safetensors"))[0]
    shutil.copy(os.path.realpath(snapshot / shard), outside)
    os.remove(snapshot / shard)
    os.symlink(outside, snapshot / shard)
    with pytest.raises(WeightLoadError, match="links outside the model directory"):
        DiT.from_diffusers(str(snapshot))
    # and a plain directory's symlink out of it too
    plain_dir = tmp_path / "plain"
    os.remove(plain_dir / shard)
    os.symlink(outside, plain_dir / shard)
    with pytest.raises(WeightLoadError, match="links outside the model directory"):
        DiT.from_diffusers(str(plain_dir))


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_layers": 10**9}, "num_layers must be an int in"),
        ({"num_layers": 3}, "num_layers=3; the checkpoint has 2 blocks"),
        ({"ffn_dim": 1 << 20}, "shape mismatches"),
        ({"attention_head_dim": 4096, "num_attention_heads": 256}, "shape mismatches"),
        ({"text_dim": "16"}, "text_dim must be an int in .* got '16'"),
        ({"num_attention_heads": 2.0}, "num_attention_heads must be an int"),
        ({"out_channels": "4"}, "out_channels must be an int"),
    ],
)
def test_a_config_that_lies_about_sizes_is_refused_before_anything_is_built(tmp_path, monkeypatch, change, match):
    """Catches a config read without bounds (1e9 layers looped forever, huge widths allocated
    terabytes before the shape check) and strings converted with int() (a traceback)."""
    path = tmp_path / "transformer"
    make_wan().save_pretrained(path, safe_serialization=True)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    real_init = DiT.__init__

    def only_on_meta(self, *args, **kwargs):
        assert torch.empty(0).device.type == "meta", "a DiT was built for real before the checks"
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(DiT, "__init__", only_on_meta)
    with pytest.raises(WeightLoadError, match=match):
        DiT.from_diffusers(str(path))


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "change, match",
    [
        ({"base_dim": "8"}, "base_dim must be an int"),
        ({"num_res_blocks": 10**9}, "num_res_blocks must be an int in"),
        ({"z_dim": 4.0}, "z_dim must be an int"),
        ({"patch_size": "2"}, "patch_size must be an int"),
        ({"dim_mult": [1, "2"]}, "dim_mult must be a list of ints"),
        ({"base_dim": 1 << 18}, "shape mismatches|does not match"),
    ],
)
def test_a_vae_config_that_lies_is_refused_before_anything_is_built(tmp_path, change, match):
    path = tmp_path / "vae"
    make_vae().save_pretrained(path, safe_serialization=True)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(WeightLoadError, match=match):
        CausalVAE.from_diffusers(str(path))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_checkpoints_load_in_their_own_dtype_on_the_cpu(tmp_path, dtype):
    """Catches the final cast of a loaded checkpoint dropped (a bf16 checkpoint would load as the
    model's float32 build) or applied to the wrong dtype, for the DiT and the VAE alike."""
    dit = DiT.from_diffusers(str(_sharded(tmp_path / "transformer", dtype)))
    assert {p.dtype for p in dit.parameters()} == {dtype}
    assert {p.device.type for p in dit.parameters()} == {"cpu"}
    make_vae().to(dtype).save_pretrained(tmp_path / "vae", safe_serialization=True)
    vae = CausalVAE.from_diffusers(str(tmp_path / "vae"))
    assert {p.dtype for p in vae.parameters()} == {dtype}


def test_a_48_channel_vae_config_keeps_loading(tmp_path):
    """Wan 2.2's VAE has z_dim 48, so 48 latents_mean / latents_std numbers: catches a bound on the
    config's lists that fits Wan 2.1 (16) and refuses Wan 2.2."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           latents_mean=[0.1] * 48, latents_std=[2.0] * 48)  # fmt: skip
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    loaded = CausalVAE.from_diffusers(str(tmp_path / "vae"))
    assert loaded.config.z_dim == 48 and loaded.config.latents_std == (2.0,) * 48
