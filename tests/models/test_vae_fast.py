"""The VAE on the fast ops (triton / cudnn convs, fused norm + SiLU, channels-last, fp16 / bf16)
and its spatial tiling, against the reference VAE and diffusers' tiled encode / decode."""

import copy
import math

import pytest
import torch

from fastdit.models.wan.vae import CausalVAE, SpatialTiling
from fastdit.ops import dispatch
from tests.conftest import CPU_BACKENDS, rel_err


def random_vae(preset="tiny") -> CausalVAE:
    torch.manual_seed(0)
    vae = CausalVAE.from_preset(preset).eval()
    with torch.no_grad():  # every weight random, norms away from 1
        for name, p in vae.named_parameters():
            p.normal_(1.0 if "gamma" in name else 0.0, 0.2 if p.dim() > 1 else 0.1)
    return vae


def psnr(video: torch.Tensor, ref: torch.Tensor) -> float:
    """dB over the [-1, 1] range (peak-to-peak 2)."""
    mse = (video.double() - ref.double()).pow(2).mean().item()
    return 10 * math.log10(4 / max(mse, 1e-30))


@pytest.mark.triton_cpu
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton is not installed")
def test_vae_on_triton_matches_reference_fp32_and_fp16():
    """Also: every decoder activation between blocks stays channels-last on the Triton convs
    (catches a layout copy creeping in between blocks: it would double the decoder's traffic)."""
    vae = random_vae()
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        latent, decoded = vae.encode(video), vae.decode(vae.encode(video))
        vae.set_backend("triton")
        assert set(vae.op_backends.values()) == {"triton"}
        assert rel_err(vae.encode(video), latent) <= 1e-5
        seen = []
        hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o)) for m in vae.decoder.modules()
                 if type(m).__name__ in ("ResidualBlock", "Resample")]  # fmt: skip
        with dispatch.trace() as log:
            fast = vae.decode(latent)
        for h in hooks:
            h.remove()
        assert {op for op, _ in log} == {"causal_conv3d", "rms_norm_silu"} and {b for _, b in log} == {"triton"}
        assert seen and all(o.is_contiguous(memory_format=torch.channels_last_3d) for o in seen)
        assert fast.shape == decoded.shape and fast.is_contiguous()
        assert rel_err(fast, decoded) <= 1e-5
        # fp16 holds the precision on the first latent frame (the chunking is the fp32 check's)
        first = latent[:, :, :1]
        expect_first = copy.deepcopy(vae).set_backend("reference").decode(first)  # float32 weights, not interpreted
        assert psnr(vae.half().decode(first.half()), expect_first) >= 45.0


def test_vae_on_cudnn_backend_and_bf16():
    vae = random_vae()
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        latent, decoded = vae.encode(video), vae.decode(vae.encode(video))
        vae.set_backend("cudnn")
        assert rel_err(vae.encode(video), latent) <= 1e-5
        assert rel_err(vae.decode(latent), decoded) <= 1e-5
        # bf16 (CPU convs accumulate in bf16 steps; the GPU test below holds 45 dB at 480p)
        assert psnr(vae.to(torch.bfloat16).decode(latent.bfloat16()), decoded) >= 35.0
    with pytest.raises(ValueError, match="unknown backend"):
        vae.set_backend("fast")


def test_decode_writes_one_preallocated_video():
    """Decoding more frames grows only the output: the per-chunk stream caches keep their size."""
    vae = random_vae()
    sizes = []
    with torch.no_grad():
        for frames in (3, 6):
            z = torch.randn(1, 16, frames, 2, 2)
            stream_sizes = []
            original = vae.decoder.forward

            def spy(x, stream, first_chunk=False, original=original, stream_sizes=stream_sizes):
                out = original(x, stream, first_chunk)
                stream_sizes.append(sum(t.numel() for t in stream.slots if isinstance(t, torch.Tensor)))
                return out

            vae.decoder.forward = spy
            video = vae.decode(z)
            del vae.decoder.forward
            assert video.shape[2] == 1 + 4 * (frames - 1)
            sizes.append(max(stream_sizes))
    assert sizes[0] == sizes[1]


# ---- spatial tiling: equal to diffusers' tiled encode / decode ------------------------------------


def make_wan():
    """diffusers' VAE, the tiling oracle: only these tests skip without diffusers (the GPU
    machine has none), not the module's GPU tests below."""
    diffusers = pytest.importorskip("diffusers", reason="the tiling oracle needs `pip install -e .[diffusers]`")
    torch.manual_seed(0)
    config = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
    model = diffusers.AutoencoderKLWan(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "gamma" in name else 0.0, 0.2 if p.dim() > 1 else 0.1)
    return model


@pytest.mark.parametrize("height, width", [(48, 64), (40, 56)])
def test_tiled_decode_and_encode_match_diffusers(height, width):
    wan = make_wan()
    tiling = SpatialTiling(min_height=32, min_width=32, stride_height=24, stride_width=16)
    wan.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                      tile_sample_stride_width=16)  # fmt: skip
    vae = CausalVAE.from_diffusers(wan).eval()
    video = torch.rand(1, 3, 5, height, width) * 2 - 1
    with torch.no_grad():
        expect_latent = wan.encode(video).latent_dist.mean
        latent = vae.encode(video, tiling=tiling)
        assert latent.shape == expect_latent.shape
        assert rel_err(latent, expect_latent) <= 1e-5
        untiled = vae.encode(video)
        assert rel_err(latent, untiled) > 1e-4  # tiling did happen (seams blend, not equal)
        expect_video = wan.decode(expect_latent).sample
        decoded = vae.decode(expect_latent, tiling=tiling)
        assert decoded.shape == expect_video.shape
        assert rel_err(decoded, expect_video) <= 1e-5


@pytest.mark.bad_input
def test_tiling_skipped_when_smaller_than_a_tile_and_bad_tiles():
    vae = random_vae()
    z = torch.randn(1, 16, 2, 3, 4)
    with torch.no_grad():
        assert torch.equal(vae.decode(z, tiling=SpatialTiling()), vae.decode(z))
    with pytest.raises(ValueError, match="multiple of 8"):
        SpatialTiling(min_height=30)
    with pytest.raises(ValueError, match="must not exceed"):
        SpatialTiling(min_height=32, stride_height=40)
    with pytest.raises(ValueError, match=r"z must be \(B, 16"):
        vae.decode(torch.randn(1, 4, 2, 3, 4))


# ---- GPU: bf16 at 480p against the fp32 reference, peak memory ------------------------------------


@pytest.mark.gpu
def test_vae_bf16_480p_psnr_against_fp32_reference():
    torch.manual_seed(0)
    vae = CausalVAE.from_preset("wan2.1").cuda().eval()
    z = torch.randn(1, 16, 3, 60, 104, device="cuda")
    with torch.no_grad():
        ref = vae.set_backend("reference").decode(z)
        fast = vae.set_backend(None).to(torch.bfloat16).decode(z.bfloat16())
        tri = vae.set_backend("triton").decode(z.bfloat16())
    assert psnr(fast, ref) >= 45.0
    assert psnr(tri, ref) >= 45.0


@pytest.mark.gpu
def test_vae_decode_peak_memory_does_not_grow_with_frames():
    vae = CausalVAE.from_preset("wan2.1").cuda().to(torch.bfloat16).eval()
    peaks = []
    with torch.no_grad():
        for frames in (3, 6):
            z = torch.randn(1, 16, frames, 30, 52, device="cuda", dtype=torch.bfloat16)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            video = vae.decode(z)
            peaks.append(torch.cuda.max_memory_allocated() - base - video.numel() * video.element_size())
            del video
    assert peaks[1] <= peaks[0] * 1.1, peaks
