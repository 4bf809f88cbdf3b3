"""The model-family interface and registry (fastdit.models.family), the Wan family behind it, and the
VAE loaded in place like the DiT."""

import json

import pytest
import torch

from fastdit.models import (
    FamilyCheckpoint,
    ModelFamily,
    UnknownCheckpointError,
    VAEFacts,
    WeightLoadError,
    families,
    open_checkpoint,
    register_family,
)
from fastdit.models.wan import WAN, CausalVAE, WanCheckpoint

pytest.importorskip("diffusers", reason="writing diffusers checkpoints needs `pip install -e .[diffusers]`")

from tests.integrations.test_diffusers_patch import make_vae  # noqa: E402
from tests.models.test_checkpoint import _write  # noqa: E402
from tests.models.test_vae_diffusers_parity import WAN22  # noqa: E402


def test_a_wan_directory_opens_through_the_registry_with_its_facts(tmp_path):
    """Catches the registry handing a Wan directory to no family (or a second copy of its facts),
    and VAEFacts disagreeing with the checkpoint's own numbers."""
    assert families() == {"wan": WAN}
    for path, expect in ((_write(tmp_path / "a"), (8, 4, 1)), (_write(tmp_path / "b", wan22_vae=True), (16, 4, 2))):
        checkpoint = open_checkpoint(path)
        assert isinstance(checkpoint, WanCheckpoint) and isinstance(checkpoint, FamilyCheckpoint)
        assert checkpoint.family is WAN
        facts = checkpoint.vae_facts
        assert (facts.spatial, facts.temporal, facts.patch) == expect
        assert facts.latent_channels == checkpoint.latent_channels and facts.pixel_channels == 3
        vae = checkpoint.load_vae()
        assert vae.facts == facts  # the built VAE agrees with what its config said
        dit = checkpoint.load_dit(dtype=torch.float32)
        assert dit.config.text_dim == checkpoint.text_dim and dit.sequence_parallel_plan().heads == dit.config.num_heads


@pytest.mark.bad_input
def test_unknown_directories_name_every_family_and_why_not(tmp_path):
    """Catches an unknown checkpoint loaded as Wan (a shape error deep in loading) or refused
    without saying what fastdit runs."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        UnknownCheckpointError, match="not wan: it must hold transformer/ and vae/.*fastdit runs wan: Wan"
    ):
        open_checkpoint(tmp_path / "empty")
    path = _write(tmp_path / "flux")
    config = json.loads((path / "transformer" / "config.json").read_text())
    (path / "transformer" / "config.json").write_text(json.dumps({**config, "_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(UnknownCheckpointError, match="transformer/ is a FluxTransformer2DModel, not a WanTransformer"):
        open_checkpoint(path)
    with pytest.raises(WeightLoadError, match="no such directory"):
        open_checkpoint(tmp_path / "missing")
    with pytest.raises(WeightLoadError, match="no DiT part 'transformer_2'"):
        open_checkpoint(_write(tmp_path / "c")).load_dit("transformer_2")


@pytest.mark.bad_input
def test_register_family_refuses_a_second_family_of_the_same_name_and_non_families():
    """Catches a plug-in silently replacing the Wan family (every Wan checkpoint then opened by it)."""

    class Other(ModelFamily):
        name, description = "wan", "another"

        def why_not(self, path):
            return "never"

        def open(self, path):
            raise AssertionError

    with pytest.raises(ValueError, match="already registered"):
        register_family(Other())
    with pytest.raises(TypeError, match="takes a ModelFamily"):
        register_family(object())
    assert register_family(WAN) is WAN and families() == {"wan": WAN}  # the same one again is a no-op


@pytest.mark.bad_input
@pytest.mark.parametrize("frames, height, width, message", [
    (8, 64, 64, "1 \\+ 4k"), (0, 64, 64, "1 \\+ 4k"), (9, 60, 64, "multiples of 8"), (9, 0, 64, "multiples of 8"),
])  # fmt: skip
def test_vae_facts_latent_shape_refuses_what_does_not_divide(frames, height, width, message):
    """Catches a floor division that silently drops the last frames or pixel rows."""
    facts = VAEFacts(spatial=8, temporal=4, latent_channels=16)
    assert facts.latent_shape(81, 480, 832) == (16, 21, 60, 104)
    with pytest.raises(ValueError, match=message):
        facts.latent_shape(frames, height, width)


# ---- the VAE in place ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wan22", [False, True], ids=["wan2.1", "wan2.2"])
def test_vae_in_place_load_is_the_checkpoint_bit_for_bit(tmp_path, dtype, wan22):
    """Catches a VAE tensor read from the wrong byte range or shard, a cast that rounds where it
    must be exact, conv weights left in the checkpoint's layout (the Triton conv reads them Cin
    innermost), a random init left in a parameter, or a sharded VAE directory not read."""
    torch.manual_seed(0)
    vae = make_vae(**WAN22) if wan22 else make_vae()
    vae = vae.to(torch.bfloat16)
    vae.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    model = CausalVAE.from_diffusers(tmp_path, dtype=dtype)
    want = vae.state_dict()
    for name, value in model.state_dict().items():
        assert value.dtype == (dtype or torch.bfloat16), name
        assert torch.equal(value, want[name].to(value.dtype)), name
    conv = model.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last_3d)
    assert all(p.requires_grad for p in model.parameters())


def test_vae_from_a_module_or_state_dict_is_a_copy_in_the_asked_dtype():
    """Catches the in-place load aliasing the diffusers module's tensors (a change to one would
    change the other), or the dtype argument ignored for in-memory sources."""
    vae = make_vae()
    model = CausalVAE.from_diffusers(vae, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    from_state = CausalVAE.from_diffusers(dict(vae.state_dict()), config=model.config)
    assert next(from_state.parameters()).dtype == torch.float32
    before = vae.decoder.conv_in.weight.clone()
    with torch.no_grad():
        from_state.decoder.conv_in.weight.add_(1.0)
    assert torch.equal(vae.decoder.conv_in.weight, before)
    shared = CausalVAE.from_diffusers(vae, share_weights=True)
    assert shared.decoder.conv_in.weight is vae.decoder.conv_in.weight


@pytest.mark.bad_input
def test_vae_loading_refuses_bad_arguments_before_reading(tmp_path):
    """Catches an integer dtype passed through (every weight truncated) and share_weights taken
    for a path (nothing to share: a silent copy)."""
    make_vae().save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(TypeError, match="floating torch.dtype"):
        CausalVAE.from_diffusers(tmp_path, dtype=torch.int8)
    with pytest.raises(ValueError, match="share_weights=True needs an AutoencoderKLWan module"):
        CausalVAE.from_diffusers(tmp_path, share_weights=True)
    with pytest.raises(TypeError, match="source must be"):
        CausalVAE.from_diffusers(42)
    (tmp_path / "config.json").unlink()
    with pytest.raises(WeightLoadError, match="no config.json"):
        CausalVAE.from_diffusers(tmp_path)
