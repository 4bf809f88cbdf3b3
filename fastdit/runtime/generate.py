"""``fastdit generate``: prompt embeddings -> packed flow-matching sampling -> causal VAE -> MP4 / PNG.

Text encoding is out of scope: embeddings come from a safetensors file with ``prompt_embeds``
``(L, text_dim)`` (and optionally ``negative_prompt_embeds``), e.g. saved from diffusers'
``WanPipeline.encode_prompt`` output, or are random (``--random-embeds``) for the tiny preset.
Every input is validated before any model is built.
"""

import argparse
import os
import time
from dataclasses import dataclass

import torch

from fastdit.models import DiT
from fastdit.models.vae import CausalVAE, SpatialTiling
from fastdit.runtime import modes
from fastdit.runtime.sampler import FlowMatchSampler

MODES = ("t2v", "t2i", "i2v", "extend", "connect", "loop", "v2v")
VAE_FOR_DIT = {"tiny": "tiny", "wan2.1-1.3b": "wan2.1", "wan2.1-14b": "wan2.1"}
SPATIAL, TEMPORAL = 8, 4  # the VAE's compression


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=sorted(VAE_FOR_DIT))
    parser.add_argument("--weights", default=None, help="diffusers-format Wan 2.1 directory (transformer/, vae/)")
    embeds = parser.add_mutually_exclusive_group()
    embeds.add_argument("--prompt-embeds", default=None, help="safetensors with prompt_embeds (L, text_dim)")
    embeds.add_argument("--random-embeds", action="store_true", help="random prompt embeddings (demo, tests)")
    parser.add_argument("--size", default="64x96", help="HxW in pixels, multiples of 16")
    parser.add_argument("--frames", type=int, default=9, help="video frames, 1 + 4k (1 = an image)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--shift", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", default="t2v", choices=MODES)
    parser.add_argument("--input", nargs="*", default=[], help="image / video files for i2v, extend, connect, v2v")
    parser.add_argument("--strength", type=float, default=0.7, help="v2v: noise level the input is taken to")
    parser.add_argument("--out", default="fastdit_out.mp4", help=".mp4 for video, .png for one frame")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--vae-tiling", action="store_true", help="encode / decode in overlapping 256-pixel tiles (less VAE memory)"
    )


@dataclass
class Plan:
    height: int
    width: int
    frames: int


def validate(args) -> Plan:
    """Every check that needs no model: sizes, frame counts, files, mode inputs."""
    try:
        height, width = (int(v) for v in args.size.lower().split("x"))
    except ValueError as err:
        raise SystemExit(f"--size must be HxW, got {args.size!r}") from err
    factor = SPATIAL * 2  # VAE 8x and the DiT's 2x2 patches
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise SystemExit(f"--size {height}x{width}: height and width must be positive multiples of {factor}")
    frames = 1 if args.mode == "t2i" else args.frames
    if frames < 1 or (frames - 1) % TEMPORAL:
        raise SystemExit(f"--frames {frames}: must be 1 + 4k (the VAE keeps the first frame alone)")
    needed = {"i2v": 1, "extend": 1, "connect": 2, "v2v": 1}.get(args.mode, 0)
    if len(args.input) != needed:
        raise SystemExit(f"--mode {args.mode} takes {needed} --input file(s), got {len(args.input)}")
    for path in [*args.input, *([args.prompt_embeds] if args.prompt_embeds else [])]:
        if not os.path.isfile(path):
            raise SystemExit(f"file not found: {path}")
    if args.weights and not all(os.path.isdir(os.path.join(args.weights, d)) for d in ("transformer", "vae")):
        raise SystemExit(f"--weights {args.weights} must hold transformer/ and vae/ (diffusers format)")
    if not (args.prompt_embeds or args.random_embeds):
        raise SystemExit("pass --prompt-embeds FILE or --random-embeds (text encoding is not part of fastdit)")
    if not 0.0 <= args.strength <= 1.0:
        raise SystemExit(f"--strength must be in [0, 1], got {args.strength}")
    return Plan(height, width, frames)


def _read_video(path: str, height: int, width: int) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1], resized to H x W."""
    import imageio.v3 as iio

    frames = iio.imread(path)
    frames = frames[None] if frames.ndim == 3 else frames
    video = torch.from_numpy(frames[..., :3].copy()).float().permute(3, 0, 1, 2) / 127.5 - 1.0
    if video.shape[2:] != (height, width):
        video = torch.nn.functional.interpolate(video.transpose(0, 1), size=(height, width), mode="bilinear")
        video = video.transpose(0, 1)
    keep = 1 + (video.shape[1] - 1) // TEMPORAL * TEMPORAL  # the VAE needs 1 + 4k frames
    return video[:, :keep]


def _write(path: str, video: torch.Tensor, fps: int = 16) -> None:
    import imageio.v3 as iio

    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    if path.lower().endswith(".png"):
        iio.imwrite(path, frames[0])
    else:
        iio.imwrite(path, frames, fps=fps, codec="libx264", macro_block_size=1)


def run(args) -> dict:
    plan = validate(args)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timings = {}
    start = time.perf_counter()
    if args.weights:
        dit = DiT.from_diffusers(os.path.join(args.weights, "transformer"))
        vae = CausalVAE.from_diffusers(os.path.join(args.weights, "vae"))
    else:
        torch.manual_seed(args.seed)
        dit, vae = DiT.from_preset(args.preset), CausalVAE.from_preset(VAE_FOR_DIT[args.preset])
    # The VAE runs in the DiT's dtype: bf16 on GPUs (fused norm + SiLU, channels-last convs), fp32 on CPUs.
    dit, vae = dit.to(device, dtype).eval(), vae.to(device, dtype).eval()
    tiling = SpatialTiling() if args.vae_tiling else None
    text_dim = dit.config.text_dim
    if args.prompt_embeds:
        from safetensors.torch import load_file

        embeds = load_file(args.prompt_embeds)
        text = embeds["prompt_embeds"]
        negative = embeds.get("negative_prompt_embeds")
    else:
        gen = torch.Generator().manual_seed(args.seed)
        text = torch.randn(16 if args.preset == "tiny" else 512, text_dim, generator=gen)
        negative = None
    text = text.reshape(-1, text.shape[-1])
    if text.shape[-1] != text_dim:
        raise SystemExit(f"prompt embeddings are {text.shape[-1]} wide; the {args.preset} DiT takes {text_dim}")
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    latent_shape = (vae.config.z_dim, 1 + (plan.frames - 1) // TEMPORAL, plan.height // SPATIAL, plan.width // SPATIAL)
    inputs = [_read_video(p, plan.height, plan.width).to(device) for p in args.input]
    with torch.no_grad():
        latents = [vae.normalize(vae.encode(v[None].to(dtype), tiling=tiling).float())[0].cpu() for v in inputs]
    common = dict(seed=args.seed, negative_text=negative)
    c, t, h, w = latent_shape
    if args.mode == "t2v":
        request = modes.text_to_video(text, c, t, h, w, **common)
    elif args.mode == "t2i":
        request = modes.text_to_image(text, c, h, w, **common)
    elif args.mode == "loop":
        request = modes.loop(text, c, t, h, w, **common)
    elif args.mode == "i2v":
        request = modes.image_to_video(latents[0][:, :1], text, frames=t, **common)
    elif args.mode == "extend":
        extra = t - latents[0].shape[1]  # --frames is the total length
        if extra < 1:
            raise SystemExit(f"--frames {plan.frames}: extending needs more frames than the input's")
        request = modes.extend(latents[0], text, extra_frames=extra, **common)
    elif args.mode == "connect":
        gap = t - latents[0].shape[1] - latents[1].shape[1]  # --frames is the total length
        if gap < 1:
            need = 1 + TEMPORAL * (latents[0].shape[1] + latents[1].shape[1])
            raise SystemExit(f"--frames {plan.frames}: connecting these inputs needs at least {need} frames")
        request = modes.connect(latents[0], latents[1], text, gap_frames=gap, **common)
    else:  # v2v
        request = modes.sdedit(latents[0], text, args.strength, **common)
    timings["encode_inputs"] = time.perf_counter() - start

    start = time.perf_counter()
    sampler = FlowMatchSampler(dit, num_steps=args.steps, shift=args.shift, guidance=args.guidance, progress=True)
    (latent,) = sampler([request])
    timings["sample"] = time.perf_counter() - start

    start = time.perf_counter()
    with torch.no_grad():
        video = vae.decode(vae.denormalize(latent.to(device)[None].float()).to(dtype), tiling=tiling)[0].float()
    timings["decode"] = time.perf_counter() - start
    start = time.perf_counter()
    _write(args.out, video)
    timings["write"] = time.perf_counter() - start
    print(f"wrote {args.out}: {video.shape[1]} frames of {video.shape[2]}x{video.shape[3]}")
    print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return {"video": video, "latent": latent, "timings": timings}
