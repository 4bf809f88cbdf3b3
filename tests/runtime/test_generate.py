"""`fastdit generate` end to end on the tiny preset (random weights and embeddings, CPU)."""

import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastdit.cli import main
from fastdit.models import DiT
from fastdit.models.wan.vae import CausalVAE
from tests.conftest import rel_err

iio = pytest.importorskip("imageio.v3", reason="reading and writing videos needs imageio (`pip install -e .[test]`)")

EMBEDS = ["--random-embeds"]


def generate(tmp_path, *args):
    return main(["generate", *EMBEDS, "--steps", "3", "--device", "cpu", *args])


def test_text_to_video_writes_an_mp4(tmp_path, capsys):
    out = tmp_path / "t2v.mp4"
    assert generate(tmp_path, "--frames", "9", "--size", "64x96", "--out", str(out)) == 0
    frames = iio.imread(out)
    assert frames.shape == (9, 64, 96, 3)
    printed = capsys.readouterr().out
    assert "timings: load" in printed and "sample" in printed and "decode" in printed


def test_text_to_image_writes_a_png(tmp_path):
    out = tmp_path / "image.png"
    assert generate(tmp_path, "--mode", "t2i", "--size", "32x48", "--out", str(out)) == 0
    assert iio.imread(out).shape == (32, 48, 3)


def test_image_to_video_keeps_the_image_as_its_first_frame(tmp_path):
    image = tmp_path / "in.png"
    iio.imwrite(image, (torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy())
    out = tmp_path / "i2v.mp4"
    from fastdit.runtime import generate as gen

    args = _parse(["--mode", "i2v", "--input", str(image), "--size", "32x32", "--frames", "5", "--out", str(out)])
    result = gen.run(args)
    # The decoder is causal: frame 0 depends on latent frame 0 only, which i2v keeps exactly.
    torch.manual_seed(args.seed)
    DiT.from_preset("tiny")
    vae = CausalVAE.from_preset("tiny").eval()
    picture = torch.from_numpy(iio.imread(image)).float().permute(2, 0, 1)[:, None] / 127.5 - 1
    with torch.no_grad():
        expect = vae.decode(vae.encode(picture[None]))[0, :, 0]
    torch.testing.assert_close(result["video"][:, 0], expect, atol=1e-5, rtol=1e-5)
    assert iio.imread(out).shape[0] == 5


def test_extend_and_connect_lengths(tmp_path):
    clip = tmp_path / "clip.mp4"
    assert generate(tmp_path, "--frames", "5", "--size", "32x32", "--out", str(clip)) == 0
    longer = tmp_path / "longer.mp4"
    assert generate(tmp_path, "--mode", "extend", "--input", str(clip), "--frames", "13", "--size", "32x32",
                    "--out", str(longer)) == 0  # fmt: skip
    assert iio.imread(longer).shape[0] == 13
    joined = tmp_path / "joined.mp4"
    assert generate(tmp_path, "--mode", "connect", "--input", str(clip), str(clip), "--frames", "21", "--size",
                    "32x32", "--out", str(joined)) == 0  # fmt: skip
    assert iio.imread(joined).shape[0] == 21  # 2 + 2 latent frames of input, 2 generated between
    assert generate(tmp_path, "--mode", "connect", "--input", str(clip), str(clip), "--frames", "13", "--size",
                    "32x32", "--out", str(joined)) == 2  # fmt: skip


def test_prompt_embeddings_file(tmp_path):
    embeds = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": torch.randn(7, 32), "negative_prompt_embeds": torch.randn(3, 32)}, str(embeds))
    out = tmp_path / "out.png"
    assert main(["generate", "--prompt-embeds", str(embeds), "--mode", "t2i", "--size", "32x32", "--steps", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    wrong = tmp_path / "wrong.safetensors"
    save_file({"prompt_embeds": torch.randn(7, 40)}, str(wrong))
    assert main(["generate", "--prompt-embeds", str(wrong), "--mode", "t2i", "--size", "32x32", "--out", str(out)]) == 2


def _files(tmp_path):
    """Inputs a user might pass: good and broken images, videos and embedding files."""
    files = {}
    files["gray"] = tmp_path / "gray.png"
    iio.imwrite(files["gray"], (np.random.rand(32, 32) * 255).astype(np.uint8))
    files["rgba"] = tmp_path / "rgba.png"
    iio.imwrite(files["rgba"], (np.random.rand(32, 32, 4) * 255).astype(np.uint8))
    files["corrupt"] = tmp_path / "corrupt.png"
    files["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    files["text"] = tmp_path / "notes.mp4"
    files["text"].write_text("not a video at all\n" * 20)
    files["pickle"] = tmp_path / "embeds.safetensors"
    # a zip's local header (torch.save's format): byte 8 is the compression method, never a "{"
    files["pickle"].write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x00\x00" + bytes(range(94)))
    files["no_key"] = tmp_path / "no_key.safetensors"
    save_file({"embeds": torch.randn(3, 32)}, str(files["no_key"]))
    files["empty"] = tmp_path / "empty.safetensors"
    save_file({"prompt_embeds": torch.randn(0, 32)}, str(files["empty"]))
    files["wide"] = tmp_path / "wide.safetensors"
    save_file({"prompt_embeds": torch.randn(3, 40)}, str(files["wide"]))
    files["json"] = tmp_path / "embeds.json"
    files["json"].write_text("{}")
    files["bad_lora"] = tmp_path / "transposed_lora.safetensors"  # a rank-3 LoRA whose A holds NaN
    save_file({"transformer.proj_out.lora_A.weight": torch.full((3, 64), float("nan")),
               "transformer.proj_out.lora_B.weight": torch.zeros(64, 3)}, str(files["bad_lora"]))  # fmt: skip
    return files


BAD_FLAGS = [
    (["--size", "60x96"], "--size 60x96: height and width must be positive multiples of 16"),
    (["--size", "big"], "--size must be HEIGHTxWIDTH or HEIGHTxWIDTHxFRAMES"),
    (["--size", "32x32x8"], "--frames 8: must be 1 \\+ 4k"),
    (["--size", "32x32x9", "--frames", "5"], "--size 32x32x9 says 9 frames and --frames 5: give one"),
    (["--mode", "t2i", "--size", "32x32x9"], "--size 32x32x9 with --mode t2i: an image has one frame"),
    (["--sigmas", "1,0.5,0.7"], "--sigmas 1,0.5,0.7: sigmas must decrease strictly"),
    (["--sigmas", "1,half"], "--sigmas 1,half: could not convert"),
    (["--guidance", "-1"], "--guidance must be >= 0"),
    (["--lora", "missing.safetensors:0.5"], "--lora missing.safetensors:0.5: file not found: missing.safetensors"),
    (["--lora", "{json}"], "--lora .*embeds.json: LoRAs are read from .safetensors files only"),
    (["--lora", "{wide}:inf"], "--lora .*: the scale must be a finite number"),
    (["--negative-prompt", "blurry"], "--negative-prompt goes with --prompt"),
    (["--frames", "8"], "--frames 8: must be 1 \\+ 4k"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--steps", "-3"], "--steps must be >= 1, got -3"),
    (["--mode", "i2v"], "--mode i2v takes 1 --input"),
    (["--mode", "t2i", "--frames", "9"], "--frames 9 with --mode t2i"),
    (["--mode", "v2v", "--input", "missing.mp4"], "--input missing.mp4: file not found"),
    (["--weights", "/nonexistent"], "--weights /nonexistent: no such directory .*huggingface-cli download"),
    (["--weights", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"], "--weights Wan-AI/.*: no such directory .*Hub ids are not"),
    (["--weights", "{tmp}"], "--weights .* must hold transformer/ and vae/"),
    (["--guidance", "nan"], "--guidance must be a finite number, got nan"),
    (["--guidance", "inf"], "--guidance must be a finite number"),
    (["--shift", "nan"], "--shift must be a finite number"),
    (["--shift", "0"], "--shift must be > 0"),
    (["--strength", "nan", "--mode", "v2v", "--input", "{gray}"], "--strength must be a finite number"),
    (["--seed", str(2**70)], "--seed must be in \\[0, 2\\*\\*64\\)"),
    (["--seed", "-1"], "--seed must be in"),
    (["--model-seed", "-1"], "--model-seed must be in"),
    (["--lora", "{bad_lora}"], "--lora .*transposed_lora.safetensors: LoRA module proj_out: lora_A.weight holds NaN"),
    (["--lora", "{bad_lora}:0.5"], "--lora .*: LoRA module proj_out"),
    (["--mode", "v2v", "--input", "{gray}", "--strength", "2"], "--strength must be in"),
    (["--out", "{tmp}/video.avi"], "--out .*video.avi: the extension must be .mp4"),
    (["--out", "{tmp}/video"], "--out .*video: the extension must be .mp4 .* got none"),
    (["--out", "{tmp}/missing/dir/video.mp4"], "--out .*: the directory .* does not exist"),
    (["--out", "{tmp}/video.png"], "--out .*video.png: a .png holds one frame and this makes 9"),
    (["--device", "quantum"], "--device quantum: not a device name"),
    (["--device", "cuda"], "--device cuda: this machine has no CUDA device"),
    (["--mode", "v2v", "--input", "{corrupt}"], "--input .*corrupt.png: not a readable image or video"),
    (["--mode", "v2v", "--input", "{text}"], "--input .*notes.mp4: not a readable image or video"),
    (["--prompt-embeds", "{pickle}"], "--prompt-embeds .*embeds.safetensors: this is a pickled PyTorch checkpoint"),
    (["--prompt-embeds", "{no_key}"], "--prompt-embeds .*: holds \\['embeds'\\] but no 'prompt_embeds'"),
    (["--prompt-embeds", "{empty}"], "--prompt-embeds .*: prompt_embeds has zero tokens"),
    (["--prompt-embeds", "{wide}"], "--prompt-embeds .*: prompt_embeds is 40 wide; the DiT takes 32"),
    (["--prompt-embeds", "{json}"], "--prompt-embeds .*embeds.json: .*too short|not a valid safetensors"),
]


@pytest.mark.parametrize(
    "args, match", BAD_FLAGS, ids=[" ".join(a[:2]) + f"#{i}" for i, (a, _) in enumerate(BAD_FLAGS)]
)
@pytest.mark.bad_input
def test_bad_input_is_one_line_and_status_2_before_any_model_is_built(tmp_path, args, match, monkeypatch, capsys):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    files = _files(tmp_path)
    args = [a.format(tmp=tmp_path, **files) for a in args]
    if "--prompt-embeds" in args:  # not together with --random-embeds
        monkeypatch.setattr("tests.runtime.test_generate.EMBEDS", [])
    monkeypatch.setattr(DiT, "from_preset", lambda *a, **k: pytest.fail("built a model before validating"))
    assert generate(tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastdit generate: error: "), err
    assert re.search(match, err), err
    assert "Traceback" not in err


@pytest.mark.parametrize("kind", ["gray", "rgba"])
@pytest.mark.bad_input
def test_grayscale_and_rgba_inputs_are_converted_to_rgb(tmp_path, kind):
    files = _files(tmp_path)
    out = tmp_path / "i2v.mp4"
    assert generate(tmp_path, "--mode", "i2v", "--input", str(files[kind]), "--size", "32x32", "--frames", "5",
                    "--out", str(out)) == 0  # fmt: skip
    assert iio.imread(out).shape == (5, 32, 32, 3)


@pytest.mark.bad_input
def test_export_without_the_extra_names_it(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert main(["export", "onnx", "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "the [export] extra (onnx missing)" in err and 'pip install "fastdit[export]"' in err, err


def _parse(args):
    from fastdit.cli import build_parser

    return build_parser().parse_args(["generate", "--random-embeds", "--steps", "3", "--device", "cpu", *args])


transformers = pytest.importorskip("transformers", reason="--prompt needs `pip install -e .[text]`")


def test_prompt_on_the_tiny_preset_is_not_taken_for_prompt_embeds(tmp_path):
    out = tmp_path / "fox.png"
    base = ["generate", "--mode", "t2i", "--size", "32x32", "--steps", "2", "--device", "cpu"]
    assert main([*base, "--prompt", "a red fox", "--negative-prompt", "blurry", "--out", str(out)]) == 0
    assert iio.imread(out).shape == (32, 32, 3)
    with pytest.raises(SystemExit) as exit_info:  # no flag is an abbreviation of another
        main([*base, "--prompt-emb", "x.safetensors", "--out", str(out)])
    assert exit_info.value.code == 2


def test_prompts_are_encoded_once_and_guidance_one_encodes_no_negative(monkeypatch):
    from fastdit.models.wan.text_encoder import PromptEncoder
    from fastdit.runtime import generate as gen

    calls = []
    real = PromptEncoder.encode
    monkeypatch.setattr(PromptEncoder, "encode", lambda self, p: calls.append(list(p)) or real(self, p))
    text, negative = gen.encode_prompts(
        gen.validate(_parse_prompt(["--prompt", "a fox", "--guidance", "1"])), torch.float32
    )
    assert calls == [["a fox"]] and negative is None and text.shape == (512, 32)
    calls.clear()
    text, negative = gen.encode_prompts(gen.validate(_parse_prompt(["--prompt", "a fox"])), torch.float32)
    assert calls == [["a fox", ""]] and negative.shape == (512, 32)  # diffusers' default negative: ""


def tiny_checkpoint(weights, i2v: bool = False):
    """A diffusers-format Wan directory of tiny random parts (transformer, vae, text encoder,
    tokenizer; for I2V the CLIP image encoder and processor too)."""
    pytest.importorskip("diffusers", reason="writing a diffusers checkpoint needs `pip install -e .[diffusers]`")
    from fastdit.models.wan.text_encoder import PromptEncoder
    from tests.integrations.test_diffusers_patch import make_vae
    from tests.models.test_dit_diffusers_parity import I2V, make_wan
    from tests.models.test_image_encoder import tiny_clip

    make_wan(**(I2V if i2v else {})).save_pretrained(weights / "transformer", safe_serialization=True)
    make_vae().save_pretrained(weights / "vae", safe_serialization=True)
    encoder = PromptEncoder.tiny(16)
    encoder.tokenizer.save_pretrained(weights / "tokenizer")
    encoder.text_encoder.save_pretrained(weights / "text_encoder")
    if i2v:
        processor, clip = tiny_clip()
        processor.save_pretrained(weights / "image_processor")
        clip.save_pretrained(weights / "image_encoder")
    return weights


def test_image_to_video_checkpoint_uses_its_own_conditioning(tmp_path, monkeypatch):
    from fastdit.runtime import modes

    weights = tiny_checkpoint(tmp_path / "i2v", i2v=True)
    image = tmp_path / "in.png"
    iio.imwrite(image, (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8))
    built = []
    real = modes.wan_image_to_video
    monkeypatch.setattr(modes, "wan_image_to_video", lambda *a, **k: built.append(a) or real(*a, **k))
    out = tmp_path / "i2v.mp4"
    args = ["generate", "--weights", str(weights), "--mode", "i2v", "--input", str(image), "--prompt", "a fox",
            "--size", "32x48x5", "--steps", "2", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert iio.imread(out).shape == (5, 32, 48, 3)
    (image_latent, image_embeds, _text) = built[0]
    assert image_latent.shape == (4, 2, 4, 6) and image_embeds.shape == (5, 8)  # 4 VAE channels; 5 CLIP tokens
    assert main([*args[:4], "t2v", *args[7:]]) == 2  # an I2V checkpoint takes --mode i2v only


def test_i2v_conditioning_equals_diffusers_prepare_latents(tmp_path, monkeypatch):
    """The conditioning the I2V model sees (first-frame mask, then the normalized VAE latent of the
    image followed by black frames) by value against diffusers' WanImageToVideoPipeline.
    prepare_latents on the same image and VAE. Catches the black frames as -1 instead of 0, the
    image repeated instead of followed by black, the mask on the wrong frame, the latent left
    unnormalized or normalized with std inverted."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    from fastdit.runtime import modes

    weights = tiny_checkpoint(tmp_path / "i2v", i2v=True)
    pixels = (np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8)  # the output size: no resize
    iio.imwrite(tmp_path / "in.png", pixels)
    made = []
    real = modes.wan_image_to_video
    monkeypatch.setattr(modes, "wan_image_to_video", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    assert main(["generate", "--weights", str(weights), "--mode", "i2v", "--input", str(tmp_path / "in.png"),
                 "--prompt", "a fox", "--size", "32x48x5", "--steps", "1", "--device", "cpu",
                 "--out", str(tmp_path / "o.mp4")]) == 0  # fmt: skip
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, image_encoder=None, image_processor=None,
                                   transformer=None, vae=AutoencoderKLWan.from_pretrained(weights / "vae"),
                                   scheduler=FlowMatchEulerDiscreteScheduler())  # fmt: skip
    image = torch.from_numpy(pixels).float().permute(2, 0, 1)[None] / 127.5 - 1.0  # what diffusers' processor gives
    with torch.no_grad():
        _, expect = pipe.prepare_latents(image, 1, num_channels_latents=4, height=32, width=48, num_frames=5,
                                         dtype=torch.float32, device=torch.device("cpu"))  # fmt: skip
    got = made[0].condition
    assert got.shape == expect.shape[1:] == (8, 2, 4, 6)  # 4 mask channels + 4 latent channels
    assert torch.equal(got[:4], expect[0, :4])  # the mask: exactly
    assert rel_err(got[4:], expect[0, 4:]) <= 1e-5, rel_err(got[4:], expect[0, 4:])


def test_weights_directory_with_its_text_encoder(tmp_path):
    weights = tiny_checkpoint(tmp_path / "weights")
    out = tmp_path / "out.mp4"
    args = ["generate", "--weights", str(weights), "--prompt", "a fox", "--size", "32x48x5", "--steps", "2",
            "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert iio.imread(out).shape == (5, 32, 48, 3)
    (weights / "tokenizer" / "tokenizer.json").unlink()
    for name in os.listdir(weights / "tokenizer"):
        os.remove(weights / "tokenizer" / name)
    os.rmdir(weights / "tokenizer")
    assert main(args) == 2  # validated: no tokenizer/ folder


def test_lora_flag_fuses_the_adapter_and_a_zero_scale_changes_nothing(tmp_path):
    hidden = preset_hidden = 48  # the tiny preset: 2 heads of 24
    assert preset_hidden == DiT.from_preset("tiny").config.hidden
    lora = tmp_path / "style.safetensors"
    gen = torch.Generator().manual_seed(0)
    state = {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, hidden, generator=gen),
             "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.randn(hidden, 4, generator=gen),
             "transformer.blocks.1.ffn.net.2.lora_A.weight": torch.randn(4, 96, generator=gen),
             "transformer.blocks.1.ffn.net.2.lora_B.weight": torch.randn(hidden, 4, generator=gen)}  # fmt: skip
    save_file(state, str(lora))
    from fastdit.runtime import generate as gen_module

    def latent(*extra):
        return gen_module.run(_parse(["--mode", "t2i", "--size", "32x32", "--out", str(tmp_path / "x.png"), *extra]))[
            "latent"
        ]

    plain = latent()
    assert torch.equal(latent("--lora", f"{lora}:0"), plain)
    assert rel_err(latent("--lora", str(lora)), plain) > 1e-3
    assert rel_err(latent("--lora", f"{lora}:0.5", "--lora", f"{lora}:0.5"), latent("--lora", str(lora))) < 1e-5


def test_few_step_sampling_flags(tmp_path):
    from fastdit.runtime import generate as gen_module

    out = str(tmp_path / "x.png")
    four = gen_module.run(_parse(["--mode", "t2i", "--size", "32x32", "--out", out, "--guidance", "1", "--steps", "4",
                                  "--shift", "5"]))["latent"]  # fmt: skip
    shifted = [5 * s / (1 + 4 * s) for s in (1.0, 0.75, 0.5, 0.25)]
    listed = gen_module.run(_parse(["--mode", "t2i", "--size", "32x32", "--out", out, "--guidance", "1", "--sigmas",
                                    ",".join(f"{s!r}" for s in shifted)]))["latent"]  # fmt: skip
    assert torch.equal(four, listed)


def _parse_prompt(args):
    from fastdit.cli import build_parser

    return build_parser().parse_args(["generate", "--steps", "3", "--device", "cpu", *args])


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v_a14b", "i2v_a14b"])
def test_two_expert_checkpoint_switches_at_its_boundary(tmp_path, monkeypatch, i2v):
    """Wan 2.2 A14B layouts: transformer/ and transformer_2/ with model_index.json's boundary_ratio;
    the I2V one takes the mask + image latent beside the noise and has no CLIP image attention."""

    from fastdit.runtime import sampler as sampler_module
    from tests.models.test_dit_diffusers_parity import make_wan

    weights = tiny_checkpoint(tmp_path / "a14b")
    if i2v:
        make_wan(in_channels=12).save_pretrained(weights / "transformer", safe_serialization=True)
    make_wan(in_channels=12 if i2v else 4).save_pretrained(weights / "transformer_2", safe_serialization=True)
    (weights / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.7}))
    seen = []
    real = sampler_module.FlowMatchSampler._velocities

    def record(self, requests, latents, sigma, *rest):
        seen.append((round(sigma * 1000), rest[-1]))  # (timestep, expert)
        return real(self, requests, latents, sigma, *rest)

    monkeypatch.setattr(sampler_module.FlowMatchSampler, "_velocities", record)
    out = tmp_path / "out.mp4"
    args = ["generate", "--weights", str(weights), "--prompt", "a fox", "--size", "32x48x5", "--steps", "4",
            "--shift", "1", "--guidance-2", "2", "--device", "cpu", "--out", str(out)]  # fmt: skip
    if i2v:
        image = tmp_path / "in.png"
        iio.imwrite(image, (np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8))
        args += ["--mode", "i2v", "--input", str(image)]
    assert main(args) == 0
    assert seen == [(1000, 0), (750, 0), (500, 1), (250, 1)]
    assert iio.imread(out).shape == (5, 32, 48, 3)


def _weights_args(weights, tmp_path) -> list[str]:
    """``fastdit generate`` on a checkpoint directory with random embeddings, on the CPU."""
    return [
        "generate",
        "--weights",
        str(weights),
        "--random-embeds",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "o.mp4"),
    ]


@pytest.mark.bad_input
def test_expert_flags_need_a_two_expert_checkpoint(tmp_path, capsys):
    weights = tiny_checkpoint(tmp_path / "t2v")
    base = _weights_args(weights, tmp_path)
    assert main([*base, "--guidance-2", "3"]) == 2
    assert "--lora-2 / --guidance-2 are for two-expert checkpoints" in capsys.readouterr().err
    (weights / "transformer_2").mkdir()
    assert main(base) == 2
    assert "needs a boundary_ratio in (0, 1] in model_index.json" in capsys.readouterr().err
    (weights / "model_index.json").write_text('{"boundary_ratio": "0.5"}')  # a string: refused, no TypeError
    assert main(base) == 2
    assert "needs a boundary_ratio in (0, 1] in model_index.json, got '0.5'" in capsys.readouterr().err
    (weights / "model_index.json").write_text('{"boundary_ratio": 0.5}')
    assert main([*base, "--guidance-2", "nan"]) == 2  # NaN compares false with every bound
    assert "--guidance-2 must be a finite number" in capsys.readouterr().err
    config = json.loads((weights / "transformer" / "config.json").read_text())
    (weights / "transformer_2" / "config.json").write_text(json.dumps({**config, "text_dim": 32}))
    assert main(base) == 2  # refused before either expert is loaded, not when the second one first runs
    err = capsys.readouterr().err
    assert "transformer/ and transformer_2/ cannot take turns on the same latents: text_dim 16 vs 32" in err, err


@pytest.mark.bad_input
def test_string_numbers_in_a_checkpoints_configs_are_named_before_loading(tmp_path, capsys, monkeypatch):
    """Catches int() on config values read before any model is built (a ValueError traceback for
    "abc", and "16" silently taken for 16 where the loader would refuse it later)."""
    weights = tiny_checkpoint(tmp_path / "w")
    capsys.readouterr()  # what writing the checkpoint printed
    base = _weights_args(weights, tmp_path)
    cases = [("transformer", "in_channels", "abc", "validate"), ("vae", "patch_size", "2", "validate"),
             ("transformer", "text_dim", "16", "load")]  # fmt: skip
    for part, key, value, when in cases:
        config_path = weights / part / "config.json"
        original = config_path.read_text()
        config_path.write_text(json.dumps({**json.loads(original), key: value}))
        with monkeypatch.context() as patch:
            if when == "validate":  # read by the checks that run before any model is built
                patch.setattr(DiT, "from_diffusers", lambda *a, **k: pytest.fail("loaded a model before validating"))
            assert main(base) == 2, key
        err = capsys.readouterr().err
        assert err.startswith("fastdit generate: error: ") and err.count("\n") == 1, err
        assert re.search(f"config.json: {key} must be an int .* got '{value}'", err), err
        config_path.write_text(original)


@pytest.mark.bad_input
def test_usage_errors_are_one_line_with_a_suggestion(capsys):
    """Catches argparse's default error (the whole usage block before the line that matters) and a
    mistyped sub-command, choice or flag without a "did you mean"."""
    cases = [
        (["genrate"], "fastdit: error: argument command: invalid choice: 'genrate'", "did you mean generate?"),
        (
            ["generate", "--promt", "a fox"],
            "fastdit generate: error: unrecognized arguments: --promt",
            "did you mean --prompt?",
        ),  # fmt: skip
        (
            ["generate", "--mode", "t2vv"],
            "fastdit generate: error: argument --mode: invalid choice",
            "did you mean t2v?",
        ),
        (["bench", "--suite", "atention"], "fastdit bench: error: argument --suite", "did you mean attention?"),
        (["generate", "--steps", "many"], "fastdit generate: error: argument --steps: invalid int value", ""),
    ]
    for argv, start, hint in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, argv
        assert err.count("\n") == 1 and err.startswith(start) and hint in err and "usage:" not in err, err


def test_steps_are_ignored_with_sigmas_and_negative_prompt_needs_guidance(tmp_path, monkeypatch, capsys):
    """--steps 0 with --sigmas runs (the help says --steps is then ignored); --negative-prompt with
    --guidance 1 is refused (no unconditional pass would read it) instead of silently ignored."""
    out = tmp_path / "o.png"
    base = ["--mode", "t2i", "--size", "32x32", "--out", str(out)]
    assert generate(tmp_path, *base, "--sigmas", "1,0.5", "--steps", "0") == 0
    monkeypatch.setattr("tests.runtime.test_generate.EMBEDS", [])
    assert generate(tmp_path, *base, "--prompt", "a fox", "--negative-prompt", "blur", "--guidance", "1") == 2
    assert "--negative-prompt has no effect with --guidance 1" in capsys.readouterr().err


def test_ti2v_checkpoint_text_and_image_to_video_from_one_model(tmp_path):
    """Wan 2.2 TI2V-5B's layout: the residual, patchified VAE (16x) and expand_timesteps."""

    from fastdit.runtime import generate as gen
    from tests.integrations.test_diffusers_patch import make_vae
    from tests.models.test_dit_diffusers_parity import make_wan
    from tests.models.test_vae_diffusers_parity import WAN22

    weights = tiny_checkpoint(tmp_path / "ti2v")
    make_wan(in_channels=12, out_channels=12).save_pretrained(weights / "transformer", safe_serialization=True)
    stats = dict(latents_mean=[0.1] * 12, latents_std=[1.5] * 12)
    make_vae(**WAN22, **stats).save_pretrained(weights / "vae", safe_serialization=True)
    (weights / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "expand_timesteps": True}))
    base = ["--weights", str(weights), "--prompt", "a fox", "--size", "64x96x5", "--steps", "2"]
    t2v = gen.run(_parse_prompt([*base, "--out", str(tmp_path / "t2v.mp4")]))
    assert t2v["latent"].shape == (12, 2, 4, 6) and t2v["video"].shape == (3, 5, 64, 96)
    image = tmp_path / "in.png"
    iio.imwrite(image, (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8))
    i2v = gen.run(_parse_prompt([*base, "--mode", "i2v", "--input", str(image), "--out", str(tmp_path / "i2v.mp4")]))
    vae = CausalVAE.from_diffusers(weights / "vae").eval()
    picture = torch.from_numpy(iio.imread(image)).float().permute(2, 0, 1)[:, None] / 127.5 - 1
    with torch.no_grad():
        first = vae.normalize(vae.encode(picture[None]))[0, :, 0]
    torch.testing.assert_close(i2v["latent"][:, 0], first, atol=1e-5, rtol=1e-5)  # the clean first frame
    assert main(["generate", *base[:-4], "--size", "48x96x5", "--out", str(tmp_path / "x.mp4")]) == 2  # 32 px
    # --vae-tiling runs the Wan 2.2 VAE's tiled encode / decode (this clip fits one tile: the same video)
    tiled = gen.run(_parse_prompt([*base, "--vae-tiling", "--out", str(tmp_path / "x.mp4")]))
    assert torch.equal(tiled["video"], t2v["video"])


@pytest.mark.bad_input
def test_small_images_keep_their_colours_and_stills_are_not_videos(tmp_path, capsys):
    """Catches an image told from a video by its array's shape: a 4 x 6 RGB image was read as a
    4-frame grayscale video 6 pixels wide (wrong colours, wrong frame count); v2v from a still
    image wrote a silent 1-frame video; a resize happened without a word."""
    from fastdit.runtime.generate import _read_frames

    red = np.zeros((4, 6, 3), np.uint8)
    red[..., 0] = 255
    iio.imwrite(tmp_path / "red.png", red)
    frames = _read_frames(str(tmp_path / "red.png"))
    assert frames.shape == (1, 4, 6, 3) and (frames[..., 0] == 255).all() and (frames[..., 1:] == 0).all()
    gray_video = (np.random.default_rng(0).random((3, 8, 8)) * 255).astype(np.uint8)
    iio.imwrite(tmp_path / "gray.gif", gray_video)
    assert _read_frames(str(tmp_path / "gray.gif")).shape == (3, 8, 8, 3)
    out = tmp_path / "o.mp4"
    assert generate(tmp_path, "--mode", "v2v", "--input", str(tmp_path / "red.png"), "--size", "32x32",
                    "--out", str(out)) == 2  # fmt: skip
    assert "--mode v2v restyles a video and --input" in capsys.readouterr().err
    assert generate(tmp_path, "--mode", "i2v", "--input", str(tmp_path / "red.png"), "--size", "32x32",
                    "--frames", "5", "--out", str(out)) == 0  # fmt: skip
    notes = [line for line in capsys.readouterr().err.splitlines() if "resized" in line]
    assert notes == [f"fastdit generate: note: --input {tmp_path / 'red.png'} is 4x6 (HxW); resized to 32x32"]


def test_extend_and_connect_default_to_two_more_latent_frames(tmp_path):
    """Catches the fixed default of 9 frames, which refused to extend any input of 9 or more."""
    clip = tmp_path / "clip.mp4"
    assert generate(tmp_path, "--size", "32x32x9", "--out", str(clip)) == 0
    longer = tmp_path / "longer.mp4"
    assert generate(tmp_path, "--mode", "extend", "--input", str(clip), "--size", "32x32", "--out", str(longer)) == 0
    assert iio.imread(longer).shape[0] == 17
    joined = tmp_path / "joined.mp4"
    assert generate(tmp_path, "--mode", "connect", "--input", str(clip), str(clip), "--size", "32x32",
                    "--out", str(joined)) == 0  # fmt: skip
    assert iio.imread(joined).shape[0] == 29
