"""The Sora report's generation modes as :class:`SampleRequest` builders (latent space).

All but SDEdit are conditioning on known latent frames; latent frame ``i`` covers video frames
``4i - 3 .. 4i`` (frame 0 alone), so an image is one latent frame. Shapes are latent
``(C, T, H, W)``; ``text`` is ``(L, text_dim)``.
"""

import torch

from fastdit.runtime.sampler import SampleRequest


def text_to_video(text, channels: int, frames: int, height: int, width: int, **kwargs) -> SampleRequest:
    """A video of ``frames`` latent frames from text alone."""
    return SampleRequest((channels, frames, height, width), text, **kwargs)


def text_to_image(text, channels: int, height: int, width: int, **kwargs) -> SampleRequest:
    """An image: a one-frame video."""
    return SampleRequest((channels, 1, height, width), text, **kwargs)


def _known(shape, frames_known: dict[int, torch.Tensor]):
    channels, frames, height, width = shape
    known = torch.zeros(shape)
    mask = torch.zeros(frames, dtype=torch.bool)
    for index, frame in frames_known.items():
        known[:, index] = frame
        mask[index] = True
    return known, mask


def image_to_video(image_latent: torch.Tensor, text, frames: int, clean: bool = False, **kwargs) -> SampleRequest:
    """Animate an image: ``image_latent (C, 1, H, W)`` is the first latent frame of ``frames``.

    ``clean``: the frame is kept clean with its tokens at timestep 0 (Wan 2.2 TI2V's
    image-to-video); otherwise it is re-imposed noised to each step's sigma (any T2V model).
    """
    channels, _, height, width = image_latent.shape
    shape = (channels, frames, height, width)
    known, mask = _known(shape, {0: image_latent[:, 0]})
    return SampleRequest(shape, text, known=known, known_frames=mask, clean_known=clean, **kwargs)


def wan_image_to_video(image_latent: torch.Tensor, image_embeds: torch.Tensor | None, text, channels: int = 16,
                       **kwargs) -> SampleRequest:  # fmt: skip
    """Wan I2V's own conditioning (diffusers' ``WanImageToVideoPipeline``): the model sees, next to
    the noisy latent, a 4-channel mask (ones on latent frame 0, where the image is) and
    ``image_latent (C, T, H, W)``, the normalized VAE latent of the image followed by black
    frames; ``image_embeds (L_image, image_dim)`` are the CLIP image states its cross-attention
    reads (Wan 2.1; None for Wan 2.2 A14B I2V, whose transformer has no image attention). The
    noise latent has ``channels`` channels and the image latent's T, H, W."""
    _, frames, height, width = image_latent.shape
    mask = torch.zeros(4, frames, height, width, dtype=image_latent.dtype, device=image_latent.device)
    mask[:, 0] = 1.0
    condition = torch.cat([mask, image_latent])
    return SampleRequest((channels, frames, height, width), text, condition=condition, image=image_embeds, **kwargs)


def extend(video_latent: torch.Tensor, text, extra_frames: int, backward: bool = False, **kwargs) -> SampleRequest:
    """Extend ``video_latent (C, T, H, W)`` by ``extra_frames`` latent frames after it (or before it)."""
    channels, frames, height, width = video_latent.shape
    shape = (channels, frames + extra_frames, height, width)
    offset = extra_frames if backward else 0
    known, mask = _known(shape, {offset + i: video_latent[:, i] for i in range(frames)})
    return SampleRequest(shape, text, known=known, known_frames=mask, **kwargs)


def connect(first: torch.Tensor, second: torch.Tensor, text, gap_frames: int, **kwargs) -> SampleRequest:
    """Connect two videos: ``first``, ``gap_frames`` generated latent frames, then ``second``."""
    if first.shape[0] != second.shape[0] or first.shape[2:] != second.shape[2:]:
        raise ValueError(f"videos to connect must share C, H, W: {tuple(first.shape)} vs {tuple(second.shape)}")
    channels, t1, height, width = first.shape
    t2 = second.shape[1]
    shape = (channels, t1 + gap_frames + t2, height, width)
    frames = {i: first[:, i] for i in range(t1)}
    frames.update({t1 + gap_frames + i: second[:, i] for i in range(t2)})
    known, mask = _known(shape, frames)
    return SampleRequest(shape, text, known=known, known_frames=mask, **kwargs)


def loop(text, channels: int, frames: int, height: int, width: int, **kwargs) -> SampleRequest:
    """A seamless loop: the last latent frame is tied to the first throughout sampling."""
    return SampleRequest((channels, frames, height, width), text, tie_last_to_first=True, **kwargs)


def sdedit(latent: torch.Tensor, text, strength: float, **kwargs) -> SampleRequest:
    """Video-to-video editing: noise ``latent`` to ``strength`` (0..1), then denoise it."""
    return SampleRequest(tuple(latent.shape), text, init=latent, strength=strength, **kwargs)
