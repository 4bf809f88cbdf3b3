"""CausalVAE (Wan 2.1 semantics on fastdit.ops) against diffusers' AutoencoderKLWan, float32 CPU."""

import pytest
import torch

from fastdit.models.wan.vae import CausalVAE
from tests.conftest import rel_err

pytest.importorskip("diffusers", reason="the parity oracle needs `pip install -e .[diffusers]`")
from diffusers import AutoencoderKLWan  # noqa: E402


def make_wan(**overrides):
    torch.manual_seed(0)
    config = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
    model = AutoencoderKLWan(**{**config, **overrides}).eval()
    with torch.no_grad():  # every weight random, norms away from 1
        for name, p in model.named_parameters():
            p.normal_(1.0 if "gamma" in name else 0.0, 0.2 if p.dim() > 1 else 0.1)
    return model


WAN22 = dict(z_dim=12, is_residual=True, patch_size=2, in_channels=12, out_channels=12, decoder_base_dim=12,
             scale_factor_spatial=16)  # fmt: skip  # the TI2V-5B VAE's structure, tiny


@pytest.mark.parametrize("frames", [1, 5, 13])
@pytest.mark.parametrize("height, width", [(16, 32), (32, 16)])
@pytest.mark.parametrize("version", ["wan2.1", "wan2.2"])
def test_encode_decode_match_diffusers(frames, height, width, version):
    wan = make_wan(**(WAN22 if version == "wan2.2" else {}))
    vae = CausalVAE.from_diffusers(wan).eval()
    ratio = 16 if version == "wan2.2" else 8
    assert vae.config.spatial_ratio == ratio and vae.config.is_residual == (version == "wan2.2")
    video = torch.rand(1, 3, frames, height, width) * 2 - 1
    with torch.no_grad():
        expect = wan.encode(video).latent_dist.mean
        latent = vae.encode(video)
        assert latent.shape == (1, wan.config.z_dim, 1 + (frames - 1) // 4, height // ratio, width // ratio)
        assert rel_err(latent, expect) <= 1e-5
        decoded = vae.decode(expect)
        assert decoded.shape == video.shape
        assert rel_err(decoded, wan.decode(expect).sample) <= 1e-5


def test_two_res_blocks_and_batch_of_two():
    # (diffusers 0.42's encoder cannot run attn_scales: it passes feat_cache to its attention block)
    wan = make_wan(num_res_blocks=2)
    vae = CausalVAE.from_diffusers(wan).eval()
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        expect = wan.encode(video).latent_dist.mean
        assert rel_err(vae.encode(video), expect) <= 1e-5
        assert rel_err(vae.decode(expect), wan.decode(expect).sample) <= 1e-5


@pytest.mark.bad_input
def test_load_from_directory_and_bad_input(tmp_path):
    from safetensors.torch import load_file, save_file

    wan = make_wan()
    wan.save_pretrained(tmp_path, safe_serialization=True)
    vae = CausalVAE.from_diffusers(tmp_path)
    assert vae.config.z_dim == 4 and vae.config.dim_mult == (1, 2, 2, 2)
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        vae.encode(torch.randn(1, 3, 4, 16, 16))
    from_state = CausalVAE.from_diffusers(dict(wan.state_dict()), config=vae.config)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(from_state.encode(video), vae.encode(video))
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state.pop("decoder.conv_out.weight")
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="missing .*decoder.conv_out.weight"):
        CausalVAE.from_diffusers(tmp_path)


def test_every_chunking_gives_the_same_latent_and_video():
    vae = CausalVAE.from_diffusers(make_wan()).eval()
    video = torch.rand(1, 3, 17, 16, 16) * 2 - 1
    with torch.no_grad():
        latent = vae.encode(video)  # Wan's [1, 4, 4, 4, 4]
        for chunk in (8, 12, 16):
            assert rel_err(vae.encode(video, chunk_frames=chunk), latent) <= 1e-6
        decoded = vae.decode(latent)  # one latent frame at a time
        for chunk in (2, 3, 4):
            assert rel_err(vae.decode(latent, chunk_frames=chunk), decoded) <= 1e-6
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.encode(video, chunk_frames=6)


def test_wan22_vae_chunking_batch_and_directory(tmp_path):
    wan = make_wan(**WAN22, num_res_blocks=2)
    wan.save_pretrained(tmp_path, safe_serialization=True)
    vae = CausalVAE.from_diffusers(tmp_path).eval()
    assert vae.config.decoder_base_dim == 12
    video = torch.rand(2, 3, 13, 32, 32) * 2 - 1
    with torch.no_grad():
        expect = wan.encode(video).latent_dist.mean
        assert rel_err(vae.encode(video), expect) <= 1e-5
        assert rel_err(vae.encode(video, chunk_frames=8), expect) <= 1e-5
        decoded = wan.decode(expect).sample
        assert rel_err(vae.decode(expect), decoded) <= 1e-5
        assert rel_err(vae.decode(expect, chunk_frames=2), decoded) <= 1e-5


@pytest.mark.bad_input
def test_wan22_vae_refuses_what_it_does_not_run():
    from fastdit.models.wan.vae import SpatialTiling

    vae = CausalVAE.from_diffusers(make_wan(**WAN22)).eval()
    with pytest.raises(ValueError, match="multiples of the VAE's patch size 2"):
        vae.encode(torch.zeros(1, 3, 1, 33, 32))
    with pytest.raises(ValueError, match="positive multiple of 8 pixels"):  # tiles the encoder cannot cut
        vae.encode(torch.zeros(1, 3, 1, 32, 288), tiling=SpatialTiling(min_height=20))
    with pytest.raises(ValueError, match="fastdit runs RGB videos"):
        CausalVAE.from_diffusers(make_wan(**{**WAN22, "in_channels": 16}))


@pytest.mark.parametrize("height, width", [(3, 5), (4, 4)])
def test_wan22_tiled_decode_matches_diffusers(height, width):
    """Wan 2.2's VAE tiles in its patchified picture (16 pixels per latent, 8 rows of 2x2 patches)
    and unpatchifies after blending, as diffusers' tiled_decode: catches tiles cut at 8 pixels per
    latent (Wan 2.1's), seams blended after unpatchify, or the 12-channel output taken for RGB."""
    from fastdit.models.wan.vae import SpatialTiling

    wan = make_wan(**WAN22)
    wan.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=16,
                      tile_sample_stride_width=16)  # fmt: skip
    vae = CausalVAE.from_diffusers(wan).eval()
    tiling = SpatialTiling(min_height=32, min_width=32, stride_height=16, stride_width=16)
    z = torch.randn(1, 12, 2, height, width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expect = wan.decode(z).sample
        got = vae.decode(z, tiling=tiling)
        untiled = vae.decode(z)
    assert got.shape == expect.shape == (1, 3, 5, 16 * height, 16 * width)
    assert rel_err(got, expect) <= 1e-5
    assert rel_err(got, untiled) > 1e-4  # the tiles did blend


@pytest.mark.parametrize("height, width", [(48, 80), (64, 64)])
def test_wan22_tiled_encode_matches_diffusers(height, width):
    """Wan 2.2's encoder tiles its 2x2-folded input, as diffusers' tiled_encode (each tile twice
    the video pixels): catches tiles cut from the unfolded video, blended at Wan 2.1's 8 pixels
    per latent in the video, or the tiling condition read from the folded size."""
    from fastdit.models.wan.vae import SpatialTiling

    wan = make_wan(**WAN22)
    wan.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=8,
                      tile_sample_stride_width=8)  # fmt: skip
    vae = CausalVAE.from_diffusers(wan).eval()
    tiling = SpatialTiling(min_height=16, min_width=16, stride_height=8, stride_width=8)
    video = torch.rand(1, 3, 5, height, width, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        expect = wan.encode(video).latent_dist.mean
        got = vae.encode(video, tiling=tiling)
        untiled = vae.encode(video)
    assert got.shape == expect.shape == (1, 12, 2, height // 16, width // 16)
    assert rel_err(got, expect) <= 1e-5
    assert rel_err(got, untiled) > 1e-4  # the tiles did blend


@pytest.mark.bad_input
def test_wan22_tiles_must_be_whole_latents():
    """Catches a tile of 24 pixels (1.5 latents of Wan 2.2) silently rounded down."""
    from fastdit.models.wan.vae import SpatialTiling

    vae = CausalVAE.from_diffusers(make_wan(**WAN22)).eval()
    with pytest.raises(ValueError, match="multiples of its 16 pixels per latent"):
        vae.decode(torch.zeros(1, 12, 1, 4, 4), tiling=SpatialTiling(min_height=32, min_width=32, stride_height=24,
                                                                      stride_width=16))  # fmt: skip
