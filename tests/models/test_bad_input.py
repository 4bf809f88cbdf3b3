"""Bad input to the models and the weight loaders: a ValueError (WeightLoadError for files) that
names the argument or the file, raised before any compute, never an error from deep in torch,
einops or safetensors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fastdit.models import DiT, PackedBatch, WeightLoadError, preset
from fastdit.models.wan.vae import CausalVAE
from fastdit.models.weights import read_safetensors

pytestmark = pytest.mark.bad_input

TINY = preset("tiny")  # in_channels 16, text_dim 32, patch (1, 2, 2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DiT(TINY, backend="reference")


def _dense(**changes):
    args = {"latents": torch.randn(2, 16, 1, 4, 4), "timestep": torch.tensor([1.0, 2.0]), "text": torch.randn(2, 3, 32)}
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(latents=torch.randn(2, 8, 1, 4, 4)), "latents must have in_channels = 16"),
        (dict(latents=torch.randn(16, 1, 4, 4)), "latents must have 5 dims"),
        (dict(text=torch.randn(2, 3, 31)), r"text must be \(B, L, text_dim\) = \(2, L, 32\)"),
        (dict(text=torch.randn(3, 3, 32)), r"text must be \(B, L, text_dim\) = \(2, L, 32\)"),
        (dict(text=torch.randn(3, 32)), "text must have 3 dims"),
        (dict(text=torch.randn(2, 0, 32)), "text must have at least one token"),
        (dict(timestep=torch.tensor([1.0])), r"timestep must be \(B,\) = \(2,\) or per token \(B, S\) = \(2, 4\)"),
        (dict(timestep=torch.zeros(2, 5)), r"timestep must be \(B,\) = \(2,\) or per token \(B, S\) = \(2, 4\)"),
        (dict(image_embeds=torch.randn(2, 3, 8)), "this DiT has no image conditioning"),
        (dict(latents=torch.randn(2, 16, 1, 5, 4)), "not divisible"),
    ],
)
def test_dit_forward_names_the_bad_argument(model, changes, match, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("the model computed before refusing its input")

    monkeypatch.setattr(model.patch_embed, "forward", no_compute)
    with pytest.raises(ValueError, match=match):
        model(**_dense(**changes))


def test_forward_packed_names_a_wrong_token_or_text_width(model):
    batch = PackedBatch.from_samples([torch.randn(8, 1, 4, 4)], torch.tensor([1.0]), [torch.randn(3, 32)])
    with pytest.raises(ValueError, match=r"batch.tokens must be \(total, in_channels \* pt \* ph \* pw\)"):
        model.forward_packed(batch)
    batch = PackedBatch.from_samples([torch.randn(16, 1, 4, 4)], torch.tensor([1.0]), [torch.randn(3, 30)])
    with pytest.raises(ValueError, match=r"batch.text must be \(total_text, text_dim\)"):
        model.forward_packed(batch)


def test_from_samples_names_mixed_widths_and_devices():
    latent = torch.randn(16, 1, 4, 4)
    with pytest.raises(ValueError, match=r"texts\[1\] has text_dim 31"):
        PackedBatch.from_samples([latent, latent], torch.tensor([1.0, 2.0]), [torch.randn(3, 32), torch.randn(2, 31)])
    with pytest.raises(ValueError, match=r"latents\[1\] is on meta"):
        PackedBatch.from_samples([latent, latent.to("meta")], [1.0, 2.0], [torch.randn(3, 32)] * 2)
    with pytest.raises(ValueError, match=r"texts\[0\] is on meta"):
        PackedBatch.from_samples([latent], [1.0], [torch.randn(3, 32, device="meta")])
    with pytest.raises(TypeError, match=r"texts\[0\] must be a torch.Tensor"):
        PackedBatch.from_samples([latent], [1.0], [[1.0, 2.0]])


def test_unpack_names_a_grid_that_does_not_match_the_tokens():
    batch = PackedBatch.from_samples([torch.randn(16, 1, 4, 4)], torch.tensor([1.0]), [torch.randn(3, 32)])
    out = torch.randn(4, 64)
    batch.grid_thw = torch.tensor([[1, 1, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"grid_thw\[0\] = \[1, 1, 3\] has 3 tokens but sample 0 has 4"):
        batch.unpack(out, 16)
    with pytest.raises(ValueError, match=r"out must be the packed prediction"):
        batch.unpack(torch.randn(4, 60), 16)


# ---- weight files -----------------------------------------------------------------------------------


def _model_dir(tmp_path, weights: bytes | None = None, config: str | None = None):
    d = tmp_path / "transformer"
    d.mkdir()
    (d / "config.json").write_text(config if config is not None else json.dumps({"num_layers": 1}))
    if weights is not None:
        (d / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    return d


def _valid_safetensors(tmp_path) -> bytes:
    path = tmp_path / "valid.safetensors"
    save_file({"x": torch.randn(64, 64)}, str(path))
    return path.read_bytes()


@pytest.mark.parametrize(
    "make, match",
    [
        # fixed bytes, not os.urandom: a random file opens like a pickle (0x80) once in 256 runs
        (lambda tmp: bytes(range(7, 256)) * 16, "header claims|not a valid safetensors"),
        (lambda tmp: _valid_safetensors(tmp)[:-100], "not a valid safetensors"),
        (lambda tmp: (2**42).to_bytes(8, "little") + b"{}", "header claims 4398046511104 bytes"),
        (lambda tmp: b"PK\x03\x04\x14\x00\x00\x00\x00\x00" + bytes(range(64)), "pickled PyTorch checkpoint"),
        (lambda tmp: b"\x80\x02}q\x00." + bytes(range(16)), "pickled PyTorch checkpoint"),
        (lambda tmp: b"1234567", "7 bytes is too short"),
        (lambda tmp: (20).to_bytes(8, "little") + b"not json at all!!!!!", "not a valid safetensors"),
    ],
    ids=["random", "truncated", "terabyte_header", "torch_zip", "pickle", "seven_bytes", "bad_header"],
)
def test_corrupt_weight_files_name_the_file(tmp_path, make, match):
    d = _model_dir(tmp_path, make(tmp_path))
    with pytest.raises(WeightLoadError, match=match) as info:
        DiT.from_diffusers(str(d))
    assert "diffusion_pytorch_model.safetensors" in str(info.value)
    single = tmp_path / "single.safetensors"
    single.write_bytes(make(tmp_path))
    with pytest.raises(WeightLoadError, match="single.safetensors"):
        DiT.from_diffusers(str(single))


def test_valid_files_whose_header_length_starts_like_a_pickle_load(tmp_path):
    """A header of 0x?80 bytes makes a safetensors file begin with 0x80, a pickle's first byte."""
    starts = []
    for n in range(60, 90):
        path = tmp_path / f"{n}.safetensors"
        save_file({"x" * n: torch.full((2,), float(n))}, str(path))
        if path.read_bytes()[:1] == b"\x80":
            starts.append(n)
            assert torch.equal(read_safetensors(str(path))["x" * n], torch.full((2,), float(n)))
    assert starts  # the case really occurred


@pytest.mark.parametrize(
    "config, match",
    [
        ("{not json", "config.json: not a readable JSON file"),
        ("[1, 2]", "expected a JSON object"),
        ('{"num_layers": "thirty"}', "num_layers must be an int in .1, 1048576., got 'thirty'"),
        ('{"patch_size": [1, 2]}', "patch_size must be three positive ints"),
        ('{"eps": -1}', "eps must be a positive number"),
    ],
)
def test_malformed_config_json_names_the_key(tmp_path, config, match):
    d = _model_dir(tmp_path, _valid_safetensors(tmp_path), config)
    with pytest.raises(WeightLoadError, match=match):
        DiT.from_diffusers(str(d))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors", 7])
def test_sharded_index_entries_must_stay_inside_the_directory(tmp_path, shard):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(_valid_safetensors(tmp_path))
    d = _model_dir(tmp_path)
    shard = str(outside) if shard == "ABSOLUTE" else shard
    index = {"weight_map": {"patch_embedding.weight": shard}}
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightLoadError, match="outside the model directory|must be file names"):
        DiT.from_diffusers(str(d))


def test_vae_directory_errors_name_the_file(tmp_path):
    d = tmp_path / "vae"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "diffusion_pytorch_model.safetensors").write_bytes(b"1234567")
    with pytest.raises(WeightLoadError, match="vae/diffusion_pytorch_model.safetensors: 7 bytes"):
        CausalVAE.from_diffusers(str(d))
    (d / "config.json").write_text("{")
    with pytest.raises(WeightLoadError, match="vae/config.json: not a readable JSON"):
        CausalVAE.from_diffusers(str(d))
    with pytest.raises(WeightLoadError, match="not a diffusers AutoencoderKLWan directory"):
        CausalVAE.from_diffusers(str(tmp_path / "missing"))


I2V = TINY.replace(in_channels=36, out_channels=16, image_dim=8, added_kv_proj_dim=TINY.hidden)


def test_i2v_image_states_are_checked_and_views_give_the_contiguous_result():
    torch.manual_seed(0)
    model = DiT(I2V, backend="reference").eval()
    latents, t, text = torch.randn(2, 36, 1, 4, 4), torch.tensor([1.0, 2.0]), torch.randn(2, 3, 32)
    image = torch.randn(2, 5, 8)
    with torch.no_grad():
        expect = model(latents, t, text, image)
        strided = torch.randn(2, 8, 5).transpose(1, 2)  # (2, 5, 8) with strides (40, 1, 5)
        strided.copy_(image)
        offset = torch.randn(3, 5, 8)[1:]
        offset.copy_(image)
        assert torch.equal(model(latents, t, text, strided), expect)
        assert torch.equal(model(latents, t, text, offset), expect)
        per_token = t[:, None].expand(2, 4)  # an expanded (stride-0) per-token timestep view
        contiguous = model(latents, per_token.contiguous(), text, image)
        assert torch.equal(model(latents, per_token, text, image), contiguous)
        assert (contiguous - expect).abs().max() <= 1e-5  # per-token rows: the per-sample result up to rounding
    for bad, match in [
        (None, "needs image_embeds"),
        (torch.randn(2, 5, 9), "image_embeds must be"),
        (torch.randn(2, 0, 8), "image_embeds must be"),
        (torch.randn(1, 5, 8), "image_embeds must be"),
        (torch.randn(2, 5, 8, device="meta"), "image_embeds is on meta"),
    ]:
        with pytest.raises(ValueError, match=match):
            model(latents, t, text, bad)


def test_packed_image_states_and_per_token_timesteps_are_validated():
    torch.manual_seed(0)
    model = DiT(I2V, backend="reference").eval()
    latents = [torch.randn(36, 1, 4, 4), torch.randn(36, 1, 2, 4)]
    texts, images = [torch.randn(3, 32)] * 2, [torch.randn(5, 8), torch.randn(2, 8)]
    with pytest.raises(ValueError, match="need one image per latent"):
        PackedBatch.from_samples(latents, [1.0, 2.0], texts, images=images[:1])
    with pytest.raises(ValueError, match=r"images\[1\] must be \(L >= 1, image_dim = 8\)"):
        PackedBatch.from_samples(latents, [1.0, 2.0], texts, images=[images[0], torch.randn(2, 7)])
    with pytest.raises(ValueError, match=r"timesteps must be per sample \(2,\) or per token \(6,\)"):
        PackedBatch.from_samples(latents, torch.zeros(5), texts, images=images)
    batch = PackedBatch.from_samples(latents, torch.zeros(6), texts, images=images)  # per token
    with torch.no_grad():
        model.forward_packed(batch)
    batch.cu_seqlens_image = torch.tensor([0, 5, 6], dtype=torch.int32)  # ends short of the 7 image tokens
    with pytest.raises(ValueError, match="cu_seqlens_image"):
        model.forward_packed(batch)
    batch.cu_seqlens_image = torch.tensor([0, 5, 7], dtype=torch.int64)
    with pytest.raises(TypeError, match="cu_seqlens_image"):
        model.forward_packed(batch)
    batch.cu_seqlens_image = torch.tensor([0, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_image describes 1 samples"):
        model.forward_packed(batch)
    batch.cu_seqlens_image = torch.tensor([0, 5, 7], dtype=torch.int32)
    batch.max_seqlen_image = 2
    with pytest.raises(ValueError, match="max_seqlen_image"):
        model.forward_packed(batch)
    batch.image, batch.cu_seqlens_image = None, None
    with pytest.raises(ValueError, match="image-to-video DiT"):
        model.forward_packed(batch)
