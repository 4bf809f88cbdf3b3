"""`fastdit generate` end to end on the tiny preset (random weights and embeddings, CPU)."""

import imageio.v3 as iio
import pytest
import torch
from safetensors.torch import save_file

from fastdit.cli import main
from fastdit.models import DiT
from fastdit.models.vae import CausalVAE


def generate(tmp_path, *args):
    return main(["generate", "--random-embeds", "--steps", "3", "--device", "cpu", *args])


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
    with pytest.raises(SystemExit, match="needs at least 17 frames"):
        generate(tmp_path, "--mode", "connect", "--input", str(clip), str(clip), "--frames", "13", "--size", "32x32",
                 "--out", str(joined))  # fmt: skip


def test_prompt_embeddings_file(tmp_path):
    embeds = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": torch.randn(7, 32), "negative_prompt_embeds": torch.randn(3, 32)}, str(embeds))
    out = tmp_path / "out.png"
    assert main(["generate", "--prompt-embeds", str(embeds), "--mode", "t2i", "--size", "32x32", "--steps", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    wrong = tmp_path / "wrong.safetensors"
    save_file({"prompt_embeds": torch.randn(7, 40)}, str(wrong))
    with pytest.raises(SystemExit, match="40 wide; the tiny DiT takes 32"):
        main(["generate", "--prompt-embeds", str(wrong), "--mode", "t2i", "--size", "32x32", "--out", str(out)])


@pytest.mark.parametrize(
    "args, match",
    [
        (["--size", "60x96"], "multiples of 16"),
        (["--frames", "8"], "must be 1 \\+ 4k"),
        (["--mode", "i2v"], "takes 1 --input"),
        (["--mode", "v2v", "--input", "missing.mp4"], "file not found: missing.mp4"),
        (["--weights", "/nonexistent"], "must hold transformer/ and vae/"),
        (["--mode", "v2v", "--input", __file__, "--strength", "2"], "--strength must be in"),
    ],
)
def test_bad_input_fails_before_any_model_is_built(tmp_path, args, match, monkeypatch):
    monkeypatch.setattr(DiT, "from_preset", lambda *a, **k: pytest.fail("built a model before validating"))
    with pytest.raises(SystemExit, match=match):
        generate(tmp_path, *args)


def _parse(args):
    from fastdit.cli import build_parser

    return build_parser().parse_args(["generate", "--random-embeds", "--steps", "3", "--device", "cpu", *args])
