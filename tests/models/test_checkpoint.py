"""WanCheckpoint: a checkpoint directory read once, its facts from its own files."""

import json

import pytest

from fastdit.models.wan.checkpoint import UnknownCheckpointError, WanCheckpoint
from fastdit.models.weights import WeightLoadError

pytest.importorskip("diffusers", reason="writing diffusers checkpoints needs `pip install -e .[diffusers]`")

from tests.integrations.test_diffusers_patch import make_vae  # noqa: E402
from tests.models.test_dit_diffusers_parity import I2V, make_wan  # noqa: E402
from tests.models.test_vae_diffusers_parity import WAN22  # noqa: E402


def _write(path, *, i2v=False, wan22_vae=False):
    make_wan(**(I2V if i2v else {})).save_pretrained(path / "transformer", safe_serialization=True)
    vae = make_vae(**WAN22, latents_mean=[0.0] * 12, latents_std=[1.0] * 12) if wan22_vae else make_vae()
    vae.save_pretrained(path / "vae", safe_serialization=True)
    return path


def test_wan21_and_wan22_facts_come_from_their_files(tmp_path):
    """Catches Wan 2.1's 8x / 16-channel numbers assumed for a Wan 2.2 VAE (the split VAE decode
    and the size checks failed on them), or the I2V kind read from the wrong keys."""
    wan21 = WanCheckpoint.open(_write(tmp_path / "a"))
    assert (wan21.vae_spatial, wan21.vae_temporal, wan21.vae_patch) == (8, 4, 1)
    assert wan21.latent_channels == wan21.vae["z_dim"] and not wan21.image_conditioned and not wan21.clip
    assert wan21.text_dim == wan21.transformer["text_dim"] and not wan21.two_experts and wan21.boundary_ratio is None
    wan22 = WanCheckpoint.open(_write(tmp_path / "b", i2v=True, wan22_vae=True))
    assert (wan22.vae_spatial, wan22.vae_temporal, wan22.vae_patch, wan22.latent_channels) == (16, 4, 2, 12)
    assert wan22.image_conditioned and wan22.clip
    assert wan22.has("transformer", "vae") and not wan22.has("text_encoder")


def test_two_experts_their_boundary_and_disagreements(tmp_path):
    """Catches a boundary taken from the wrong file or unchecked, and experts that cannot share
    latents found only when the second one runs."""
    path = _write(tmp_path / "c")
    config = json.loads((path / "transformer" / "config.json").read_text())
    (path / "transformer_2").mkdir()
    (path / "transformer_2" / "config.json").write_text(json.dumps({**config, "text_dim": 32}))
    checkpoint = WanCheckpoint.open(path)
    with pytest.raises(WeightLoadError, match="boundary_ratio in \\(0, 1\\]"):
        _ = checkpoint.boundary_ratio
    (path / "model_index.json").write_text(json.dumps({"boundary_ratio": 0.875, "expand_timesteps": True}))
    checkpoint = WanCheckpoint.open(path)
    assert checkpoint.boundary_ratio == 0.875 and checkpoint.expand_timesteps
    assert checkpoint.expert_differences(["text_dim", "in_channels"]) == ["text_dim 16 vs 32"]


@pytest.mark.bad_input
def test_other_models_get_a_named_error_listing_what_fastdit_runs(tmp_path):
    """Catches a non-Wan diffusers directory loaded as Wan weights (a shape error deep in loading)."""
    path = _write(tmp_path / "d")
    config = json.loads((path / "transformer" / "config.json").read_text())
    (path / "transformer" / "config.json").write_text(json.dumps({**config, "_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(UnknownCheckpointError, match="FluxTransformer2DModel.*fastdit runs Wan 2.1 / 2.2"):
        WanCheckpoint.open(path)
    with pytest.raises(UnknownCheckpointError, match="must hold transformer/ and vae/"):
        WanCheckpoint.open(path / "transformer")
    with pytest.raises(WeightLoadError, match="no such directory"):
        WanCheckpoint.open(tmp_path / "missing")


@pytest.mark.bad_input
def test_vae_facts_that_are_not_numbers_are_named(tmp_path):
    path = _write(tmp_path / "e")
    config = json.loads((path / "vae" / "config.json").read_text())
    (path / "vae" / "config.json").write_text(json.dumps({**config, "dim_mult": "1,2,4,4",
                                                          "temperal_downsample": [0, 1, 1]}))  # fmt: skip
    checkpoint = WanCheckpoint.open(path)
    with pytest.raises(WeightLoadError, match="dim_mult must be a list"):
        _ = checkpoint.vae_spatial
    with pytest.raises(WeightLoadError, match="temperal_downsample must be a list of booleans"):
        _ = checkpoint.vae_temporal
