"""The I2V image encoder: fastdit's ImageEncoder against diffusers' ``WanImageToVideoPipeline.encode_image``."""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the image encoder needs `pip install -e .[text]`")
from fastdit.models.wan.image_encoder import ImageEncoder  # noqa: E402


def tiny_clip(image_dim: int = 8, seed: int = 0):
    """(CLIPImageProcessor, CLIPVisionModel): 32-pixel crops in 16-pixel patches, 5 tokens of ``image_dim``."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=image_dim, intermediate_size=2 * image_dim, num_hidden_layers=3,
                              num_attention_heads=2, image_size=32, patch_size=16,
                              projection_dim=image_dim)  # fmt: skip
    torch.manual_seed(seed)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return processor, CLIPVisionModel(config).eval()


def test_encode_matches_wan_image_to_video_pipeline(tmp_path):
    pytest.importorskip("diffusers", reason="the parity test needs `pip install -e .[diffusers]`")
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    processor, model = tiny_clip()
    picture = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, image_encoder=model, image_processor=processor,
                                   vae=None, transformer=None, scheduler=None)  # fmt: skip
    with torch.no_grad():
        expect = pipe.encode_image(Image.fromarray(picture), device=torch.device("cpu"))
    got = ImageEncoder(processor, model).encode(picture[None][0])
    assert got.shape == expect.shape == (1, 5, 8)
    assert torch.allclose(got, expect, atol=1e-6, rtol=1e-5)
    processor.save_pretrained(tmp_path / "image_processor")
    model.save_pretrained(tmp_path / "image_encoder")
    loaded = ImageEncoder.from_pretrained(str(tmp_path))
    assert torch.equal(loaded.encode(picture), got)


@pytest.mark.bad_input
def test_a_checkpoint_without_the_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image_encoder/ folder"):
        ImageEncoder.from_pretrained(str(tmp_path))
