"""The CLIP image encoder of Wan 2.1 image-to-video checkpoints, through transformers.

:class:`ImageEncoder` computes what diffusers' ``WanImageToVideoPipeline.encode_image`` does: the
checkpoint's ``image_processor/`` (CLIP's resize, crop and normalization) and ``image_encoder/``
(a ``CLIPVisionModel``), keeping the penultimate layer's hidden states ``(B, L_image,
image_dim)``, which the I2V DiT's cross-attention reads (``DiT.forward(..., image_embeds=)``).
"""

import torch

from fastdit.models.wan.text_encoder import checkpoint_folders


class ImageEncoder:
    """A CLIP vision model and its image processor; ``encode(images) -> (B, L_image, image_dim)``."""

    def __init__(self, processor, encoder):
        self.processor, self.encoder = processor, encoder.eval()

    @classmethod
    def from_pretrained(cls, directory: str, *, dtype: torch.dtype | None = None, device=None) -> "ImageEncoder":
        """The ``image_encoder/`` and ``image_processor/`` folders of a diffusers Wan I2V checkpoint."""
        encoder_path, processor_path = checkpoint_folders(directory, ("image_encoder", "image_processor"), "Wan I2V")
        from transformers import CLIPImageProcessor, CLIPVisionModel

        processor = CLIPImageProcessor.from_pretrained(processor_path)
        encoder = CLIPVisionModel.from_pretrained(encoder_path, dtype=dtype)
        return cls(processor, encoder.to(device) if device is not None else encoder)

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """``images``: a PIL image, an ``(H, W, 3)`` uint8 array, or a list of them."""
        param = next(self.encoder.parameters())
        inputs = self.processor(images=images, return_tensors="pt").to(param.device)
        pixels = inputs["pixel_values"].to(param.dtype)
        return self.encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
