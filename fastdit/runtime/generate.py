"""``fastdit generate``: prompt -> UMT5 -> packed flow-matching sampling -> causal VAE -> MP4 / PNG.

The text comes from ``--prompt`` (encoded by the checkpoint's own UMT5 as diffusers'
``WanPipeline.encode_prompt`` does, or by a tiny random UMT5 for the tiny preset), from a
safetensors file with ``prompt_embeds`` ``(L, text_dim)`` (and optionally
``negative_prompt_embeds``), or is random (``--random-embeds``). ``--lora`` fuses LoRAs into the
DiT; ``--sigmas`` and ``--guidance 1`` give step-distilled sampling. Every input is validated
before any model is built.
"""

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from fastdit.models import DiT, WeightLoadError, preset
from fastdit.models.checkpoint import WanCheckpoint
from fastdit.models.image_encoder import ImageEncoder
from fastdit.models.lora import check_lora_file
from fastdit.models.text_encoder import PromptEncoder, transformers_missing
from fastdit.models.vae import CausalVAE, SpatialTiling
from fastdit.models.weights import read_safetensors
from fastdit.runtime import modes
from fastdit.runtime.sampler import EXPERT_FIELDS, FlowMatchSampler, explicit_sigmas
from fastdit.sizes import SIZE_SYNTAX, parse_size

MODES = ("t2v", "t2i", "i2v", "extend", "connect", "loop", "v2v")
VAE_FOR_DIT = {"tiny": "tiny", "wan2.1-1.3b": "wan2.1", "wan2.1-14b": "wan2.1"}
SPATIAL, TEMPORAL = 8, 4  # the Wan 2.1 VAE's compression (Wan 2.2's: 16 in space)
DEFAULT_FRAMES = 9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=sorted(VAE_FOR_DIT),
                        help="model shapes with random weights when --weights is not given")  # fmt: skip
    parser.add_argument("--weights", default=None, metavar="DIR",
                        help="a local diffusers-format Wan directory: Wan 2.1 T2V / I2V, Wan 2.2 A14B (with "
                        "transformer_2/) or TI2V-5B (transformer/, vae/; text_encoder/ and tokenizer/ for "
                        "--prompt)")  # fmt: skip
    text = parser.add_mutually_exclusive_group()
    text.add_argument(
        "--prompt",
        default=None,
        help="text prompt, encoded by the checkpoint's UMT5 (a tiny random one for --preset tiny)",
    )
    text.add_argument(
        "--prompt-embeds",
        default=None,
        metavar="FILE",
        help="safetensors with prompt_embeds (L, text_dim) and optionally negative_prompt_embeds",
    )
    text.add_argument("--random-embeds", action="store_true", help="random prompt embeddings (demo, tests)")
    parser.add_argument(
        "--negative-prompt",
        default=None,
        help="what to steer away from with --guidance > 1 (with --prompt; empty when not given)",
    )
    parser.add_argument("--size", default="64x96", help=f"{SIZE_SYNTAX}; height and width multiples of 16")
    parser.add_argument(
        "--frames", type=int, default=None, help=f"video frames, 1 + 4k (None: those of --size, else {DEFAULT_FRAMES})"
    )
    parser.add_argument("--steps", type=int, default=8, help="sampling steps (ignored with --sigmas)")
    parser.add_argument("--sigmas", default=None, metavar="S0,S1,...",
                        help="explicit noise levels from 1 down, comma list, taken as is (no --shift); "
                        "a final 0 is added when missing")  # fmt: skip
    parser.add_argument(
        "--guidance",
        type=float,
        default=5.0,
        help="classifier-free guidance scale; 1 runs no unconditional pass (distilled models)",
    )
    parser.add_argument("--shift", type=float, default=5.0, help="timestep shift of the schedule (Wan: 3 at 480p)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the noise (and the tiny preset's weights)")
    parser.add_argument("--mode", default="t2v", choices=MODES, help="what to generate from what")
    parser.add_argument(
        "--input", nargs="*", default=[], metavar="FILE", help="image / video files for i2v, extend, connect (two), v2v"
    )
    parser.add_argument("--strength", type=float, default=0.7, help="v2v: noise level the input is taken to")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="LoRA safetensors fused into the DiT (diffusers / PEFT or original Wan keys); "
                        "repeatable, SCALE defaults to 1")  # fmt: skip
    parser.add_argument("--lora-2", action="append", default=[], metavar="FILE[:SCALE]",
                        help="Wan 2.2 A14B: LoRA for the low-noise expert (transformer_2); --lora goes to the "
                        "high-noise one")  # fmt: skip
    parser.add_argument(
        "--guidance-2",
        type=float,
        default=None,
        help="Wan 2.2 A14B: the low-noise expert's guidance scale (None: --guidance)",
    )
    parser.add_argument(
        "--offload-experts",
        default="auto",
        choices=["auto", "on", "off"],
        help="Wan 2.2 A14B: keep only the active expert on the GPU (auto: when both do not fit)",
    )
    parser.add_argument("--out", default="fastdit_out.mp4", help=".mp4 for video, .png for one frame")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--vae-tiling", action="store_true", help="encode / decode in overlapping 256-pixel tiles (less VAE memory)"
    )


class UsageError(ValueError):
    """A flag that cannot work: ``fastdit`` prints it as one line and exits with status 2."""


VIDEO_SUFFIXES, IMAGE_SUFFIXES = (".mp4",), (".png",)


@dataclass
class Plan:
    height: int
    width: int
    frames: int
    device: torch.device
    inputs: list[torch.Tensor] = field(default_factory=list)  # (3, T, H, W) in [-1, 1], read and checked
    text: torch.Tensor | None = None  # (L, text_dim) prompt embeddings from --prompt-embeds
    negative: torch.Tensor | None = None
    sigmas: torch.Tensor | None = None  # --sigmas, checked
    loras: list[tuple[str, float]] = field(default_factory=list)  # --lora FILE[:SCALE], the files exist
    loras_2: list[tuple[str, float]] = field(default_factory=list)  # --lora-2, for transformer_2
    boundary_ratio: float | None = None  # Wan 2.2 A14B: model_index.json's, with transformer_2/
    checkpoint: WanCheckpoint | None = None  # --weights, its files read once


def _lora_arg(value: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` (the last colon, when what follows is a number)."""
    path, scale = value, 1.0
    head, sep, tail = value.rpartition(":")
    if sep:
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass
    if not os.path.isfile(path):
        raise UsageError(f"--lora {value}: file not found: {path}")
    if not path.endswith(".safetensors"):
        raise UsageError(f"--lora {value}: LoRAs are read from .safetensors files only (never pickles)")
    if scale != scale or abs(scale) == float("inf"):
        raise UsageError(f"--lora {value}: the scale must be a finite number")
    try:
        check_lora_file(path)
    except WeightLoadError as err:
        raise UsageError(f"--lora {value}: {err}") from err
    return path, scale


def validate(args) -> Plan:
    """Every check that needs no model: sizes, frame counts, steps, the output path, the device,
    the input files (decoded here) and the prompt embeddings; a :class:`UsageError` naming the flag."""
    try:
        height, width, size_frames = parse_size(args.size)
    except ValueError as err:
        raise UsageError(f"--{err}") from err
    if size_frames is not None and args.frames not in (None, size_frames):
        raise UsageError(f"--size {args.size} says {size_frames} frames and --frames {args.frames}: give one")
    checkpoint = _checkpoint(args)
    factor = (checkpoint.vae_spatial if checkpoint else SPATIAL) * 2  # the VAE's 8x (Wan 2.2: 16x), 2x2 patches
    if args.vae_tiling and factor > SPATIAL * 2:
        raise UsageError("--vae-tiling: tiled encode / decode of the Wan 2.2 VAE is not written yet; drop the flag")
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise UsageError(f"--size {height}x{width}: height and width must be positive multiples of {factor}")
    if args.mode == "t2i" and args.frames not in (None, 1):
        raise UsageError(f"--frames {args.frames} with --mode t2i: an image has one frame; drop --frames or use t2v")
    frames = args.frames if args.frames is not None else size_frames
    if args.mode == "t2i" and frames not in (None, 1):
        raise UsageError(f"--size {args.size} with --mode t2i: an image has one frame; use HEIGHTxWIDTH")
    frames = 1 if args.mode == "t2i" else (DEFAULT_FRAMES if frames is None else frames)
    if frames < 1 or (frames - 1) % TEMPORAL:
        raise UsageError(f"--frames {frames}: must be 1 + 4k (the VAE keeps the first frame alone)")
    if args.sigmas is None and args.steps < 1:  # with --sigmas, --steps is ignored
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    for flag in ("guidance", "guidance_2", "shift", "strength"):
        value = getattr(args, flag)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"--{flag.replace('_', '-')} must be a finite number, got {value}")
    if not 0 <= args.seed < 2**64:
        raise UsageError(f"--seed must be in [0, 2**64), got {args.seed}")
    if args.shift <= 0:
        raise UsageError(f"--shift must be > 0, got {args.shift}")
    sigmas = None
    if args.sigmas is not None:
        try:
            sigmas = explicit_sigmas([float(v) for v in args.sigmas.split(",")])
        except ValueError as err:
            raise UsageError(f"--sigmas {args.sigmas}: {err}") from err
    if args.guidance < 0:
        raise UsageError(f"--guidance must be >= 0, got {args.guidance}")
    if not 0.0 <= args.strength <= 1.0:
        raise UsageError(f"--strength must be in [0, 1], got {args.strength}")
    _check_out(args.out, frames)
    device = _device(args.device)
    needed = {"i2v": 1, "extend": 1, "connect": 2, "v2v": 1}.get(args.mode, 0)
    if len(args.input) != needed:
        raise UsageError(f"--mode {args.mode} takes {needed} --input file(s), got {len(args.input)}")
    conditioned, clip = _i2v_kind(checkpoint)
    if conditioned and args.mode != "i2v":
        raise UsageError(f"--weights {args.weights} is an image-to-video checkpoint: use --mode i2v with --input IMAGE")
    clip_folders = ("image_encoder", "image_processor")
    if clip and not checkpoint.has(*clip_folders):
        raise UsageError(
            f"--weights {args.weights}: a Wan 2.1 I2V checkpoint needs image_encoder/ and image_processor/"
        )
    if args.prompt is None and not (args.prompt_embeds or args.random_embeds):
        raise UsageError("pass --prompt TEXT, --prompt-embeds FILE or --random-embeds")
    if args.negative_prompt is not None and args.prompt is None:
        raise UsageError("--negative-prompt goes with --prompt (with --prompt-embeds, save negative_prompt_embeds)")
    if args.negative_prompt is not None and args.guidance == 1 and args.guidance_2 in (None, 1):
        raise UsageError("--negative-prompt has no effect with --guidance 1 (no unconditional pass runs): "
                         "drop it or raise --guidance")  # fmt: skip
    if args.prompt is not None:
        missing = transformers_missing()
        if missing:
            raise UsageError(f"--prompt: {missing}")
        if checkpoint and not checkpoint.has("text_encoder", "tokenizer"):
            raise UsageError(f"--prompt with --weights {args.weights}: it must hold text_encoder/ and tokenizer/")
    two_experts = bool(checkpoint) and checkpoint.two_experts
    if (args.lora_2 or args.guidance_2 is not None) and not two_experts:
        raise UsageError("--lora-2 / --guidance-2 are for two-expert checkpoints (Wan 2.2 A14B: transformer_2/)")
    if args.guidance_2 is not None and args.guidance_2 < 0:
        raise UsageError(f"--guidance-2 must be >= 0, got {args.guidance_2}")
    boundary = None
    if two_experts:
        try:
            boundary = checkpoint.boundary_ratio
        except WeightLoadError as err:
            raise UsageError(f"--weights {err}") from err
        differ = checkpoint.expert_differences(EXPERT_FIELDS)
        if differ:  # compared before either expert is loaded, not three steps in when the second runs
            raise UsageError(f"--weights {args.weights}: transformer/ and transformer_2/ cannot take turns on the same "
                             f"latents: {', '.join(differ)}")  # fmt: skip
    plan = Plan(height, width, frames, device, sigmas=sigmas, loras=[_lora_arg(a) for a in args.lora],
                loras_2=[_lora_arg(a) for a in args.lora_2], boundary_ratio=boundary,
                checkpoint=checkpoint)  # fmt: skip
    if args.prompt_embeds:
        plan.text, plan.negative = _read_embeds(args.prompt_embeds, _text_dim(args, checkpoint))
    plan.inputs = [_read_video(path, height, width) for path in args.input]
    if args.mode == "v2v" and plan.inputs[0].shape[1] == 1:
        raise UsageError(f"--mode v2v restyles a video and --input {args.input[0]} is one image: use --mode i2v")
    latent_frames = [1 + (v.shape[1] - 1) // TEMPORAL for v in plan.inputs]
    if args.mode in ("extend", "connect") and args.frames is None and size_frames is None:
        # by default two latent frames (8 video frames) more than the inputs hold
        frames = plan.frames = 1 + TEMPORAL * (sum(latent_frames) + 1)
    total = 1 + (frames - 1) // TEMPORAL
    if args.mode == "extend" and total - latent_frames[0] < 1:
        raise UsageError(f"--frames {frames}: extending needs more frames than the input's {plan.inputs[0].shape[1]}")
    if args.mode == "connect" and total - sum(latent_frames) < 1:
        need = 1 + TEMPORAL * sum(latent_frames)
        raise UsageError(f"--frames {frames}: connecting these inputs needs at least {need} frames")
    return plan


def _checkpoint(args) -> WanCheckpoint | None:
    """``--weights`` read once (None without it): every later check and step asks it."""
    if not args.weights:
        return None
    if not os.path.isdir(args.weights):
        raise UsageError(
            f"--weights {args.weights}: no such directory (a local diffusers-format folder; Hub ids are not "
            "downloaded: e.g. huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir DIR)"
        )
    if not all(os.path.isdir(os.path.join(args.weights, d)) for d in ("transformer", "vae")):
        raise UsageError(f"--weights {args.weights} must hold transformer/ and vae/ (diffusers format)")
    try:
        checkpoint = WanCheckpoint.open(args.weights)
        for fact in ("vae_spatial", "text_dim", "image_conditioned"):  # every number read and checked here
            getattr(checkpoint, fact)
    except WeightLoadError as err:
        raise UsageError(f"--weights: {err}") from err
    return checkpoint


def _check_out(path: str, frames: int) -> None:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
        raise UsageError(
            f"--out {path}: the extension must be .mp4 (video) or .png (one frame), got {suffix or 'none'}"
        )
    if suffix in IMAGE_SUFFIXES and frames > 1:
        raise UsageError(f"--out {path}: a .png holds one frame and this makes {frames}; use .mp4 or --mode t2i")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--out {path}: the directory {folder} does not exist")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this machine has no CUDA device; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: fastdit generate runs on cpu or cuda")
    return device


def _offload_experts(choice: str, device: torch.device, dit, dit_2, dtype: torch.dtype) -> bool:
    """``--offload-experts``: on / off, or auto: on a GPU whose free memory cannot hold both experts
    with a quarter of it left for activations."""
    if choice != "auto":
        return choice == "on"
    if device.type != "cuda":
        return False
    size = torch.finfo(dtype).bits // 8
    per_model = [sum(p.numel() for p in m.parameters()) * size for m in (dit, dit_2)]
    resident = sum(n for m, n in zip((dit, dit_2), per_model) if next(m.parameters()).is_cuda)  # loaded there
    free, _ = torch.cuda.mem_get_info(device)
    return sum(per_model) > 0.75 * (free + resident)


def _i2v_kind(checkpoint: WanCheckpoint | None) -> tuple[bool, bool]:
    """(the transformer takes its own image conditioning: more input than output channels, the mask
    and image latent of Wan 2.1 / 2.2 I2V; it also reads CLIP image states: ``image_dim``, Wan 2.1)."""
    if checkpoint is None:
        return False, False
    return checkpoint.image_conditioned, checkpoint.clip


def _text_dim(args, checkpoint: WanCheckpoint | None) -> int:
    """The DiT's text width, known before any model is built (the checkpoint's, else the preset's)."""
    return checkpoint.text_dim if checkpoint else preset(args.preset).text_dim


def _read_embeds(path: str, text_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not os.path.isfile(path):
        raise UsageError(f"--prompt-embeds {path}: file not found")
    try:
        embeds = read_safetensors(path)
    except WeightLoadError as err:
        raise UsageError(f"--prompt-embeds {err}") from err
    if "prompt_embeds" not in embeds:
        raise UsageError(f"--prompt-embeds {path}: holds {sorted(embeds)} but no 'prompt_embeds' tensor (L, text_dim)")
    out = []
    for key in ("prompt_embeds", "negative_prompt_embeds"):
        t = embeds.get(key)
        if t is None:
            out.append(None)
            continue
        if t.dim() not in (2, 3) or (t.dim() == 3 and t.shape[0] != 1) or not t.is_floating_point():
            raise UsageError(f"--prompt-embeds {path}: {key} must be float (L, text_dim) or (1, L, text_dim), "
                             f"got {str(t.dtype).replace('torch.', '')} {tuple(t.shape)}")  # fmt: skip
        t = t.reshape(-1, t.shape[-1])
        if t.shape[0] < 1:
            raise UsageError(f"--prompt-embeds {path}: {key} has zero tokens")
        if t.shape[-1] != text_dim:
            raise UsageError(f"--prompt-embeds {path}: {key} is {t.shape[-1]} wide; the DiT takes {text_dim}")
        out.append(t.float())
    return out[0], out[1]


def _read_video(path: str, height: int, width: int) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1], resized to H x W (said once on stderr, with both sizes); grayscale
    and RGBA inputs are converted to RGB."""
    frames = _read_frames(path)
    video = torch.from_numpy(frames).float().permute(3, 0, 1, 2) / 127.5 - 1.0
    if video.shape[2:] != (height, width):
        print(f"fastdit generate: note: --input {path} is {video.shape[2]}x{video.shape[3]} (HxW); resized to "
              f"{height}x{width}", file=sys.stderr)  # fmt: skip
        video = torch.nn.functional.interpolate(video.transpose(0, 1), size=(height, width), mode="bilinear")
        video = video.transpose(0, 1)
    keep = 1 + (video.shape[1] - 1) // TEMPORAL * TEMPORAL  # the VAE needs 1 + 4k frames
    return video[:, :keep]


def _read_frames(path: str):
    """The file's frames as a ``(T, H, W, 3)`` uint8 array (grayscale and RGBA converted to RGB)."""
    import imageio.v3 as iio
    import numpy as np

    if not os.path.isfile(path):
        raise UsageError(f"--input {path}: file not found")
    try:
        # the container says image or video (is_batch), not the array's shape: a 3 x 4 RGB image
        # and a 3-frame grayscale video are both 3-D
        video = iio.improps(path).is_batch
        frames = np.asarray(iio.imread(path))
    except Exception as err:  # noqa: BLE001 - imageio raises many kinds for files it cannot decode
        reason = (str(err).strip().splitlines() or [""])[0][:200]  # decoders print pages of logs
        raise UsageError(f"--input {path}: not a readable image or video ({type(err).__name__}: {reason})") from err
    if frames.dtype != np.uint8:
        raise UsageError(f"--input {path}: 8-bit images and videos only, got {frames.dtype} pixels")
    if not video and frames.ndim == 2:  # one grayscale image
        frames = frames[None, ..., None]
    elif not video and frames.ndim == 3:  # one image (H, W, C)
        frames = frames[None]
    elif video and frames.ndim == 3:  # grayscale video (T, H, W)
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4) or min(frames.shape[:3]) < 1:
        raise UsageError(f"--input {path}: expected an image or a video, got pixel array {frames.shape}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return np.ascontiguousarray(frames[..., :3])  # RGBA: the alpha channel is dropped


def encode_prompts(args, device: torch.device, dtype: torch.dtype,
                   checkpoint: WanCheckpoint | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """``(prompt (512, text_dim), negative or None)`` with the checkpoint's UMT5 (the tiny preset's
    random one without ``--weights``), as ``WanPipeline.encode_prompt``; the negative prompt
    (empty when not given, as diffusers) is encoded only when guidance needs it. The encoder is
    dropped (its GPU memory returned) before this returns."""
    if args.weights:
        encoder = PromptEncoder.from_pretrained(args.weights, dtype=dtype, device=device)
    else:
        encoder = PromptEncoder.tiny(preset(args.preset).text_dim, seed=args.seed).to(device, dtype)
    prompts = [args.prompt]
    if args.guidance != 1.0:
        prompts.append(args.negative_prompt or "")
    embeds = encoder.encode(prompts).float().cpu()
    width = _text_dim(args, checkpoint)
    del encoder
    if embeds.shape[-1] != width:
        raise UsageError(f"--prompt: the text encoder makes {embeds.shape[-1]}-wide states; the DiT takes {width}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return embeds[0], (embeds[1] if len(prompts) > 1 else None)


def _write(path: str, video: torch.Tensor, fps: int = 16) -> None:
    import imageio.v3 as iio

    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    if path.lower().endswith(IMAGE_SUFFIXES):
        if frames.shape[0] != 1:  # validate() refuses this; never write 1 of N frames silently
            raise UsageError(f"--out {path}: a .png holds one frame, not {frames.shape[0]}")
        iio.imwrite(path, frames[0])
    else:
        iio.imwrite(path, frames, fps=fps, codec="libx264", macro_block_size=1)


def run(args) -> dict:
    plan = validate(args)
    device = plan.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timings = {}
    if args.prompt is not None:  # encoded first, and the encoder freed before the DiT is loaded
        start = time.perf_counter()
        plan.text, plan.negative = encode_prompts(args, device, dtype, plan.checkpoint)
        timings["encode_prompt"] = time.perf_counter() - start
    image_embeds = None
    conditioned, clip = _i2v_kind(plan.checkpoint)
    if clip:  # Wan 2.1 I2V: the CLIP states of the input image, encoder freed after
        start = time.perf_counter()
        encoder = ImageEncoder.from_pretrained(args.weights, dtype=dtype, device=device)
        image_embeds = encoder.encode(_read_frames(args.input[0])[0]).float().cpu()[0]
        del encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
        timings["encode_image"] = time.perf_counter() - start
    start = time.perf_counter()
    if args.weights:
        # in place, in the run's dtype, straight onto the device: no fp32 (or second) copy on the host
        dit = DiT.from_diffusers(os.path.join(args.weights, "transformer"), dtype=dtype, device=device)
        vae = CausalVAE.from_diffusers(os.path.join(args.weights, "vae"))
    else:
        torch.manual_seed(args.seed)
        dit, vae = DiT.from_preset(args.preset), CausalVAE.from_preset(VAE_FOR_DIT[args.preset])
    dit_2 = None
    if plan.boundary_ratio is not None:  # Wan 2.2 A14B: the low-noise expert
        dit_2 = DiT.from_diffusers(os.path.join(args.weights, "transformer_2"), dtype=dtype).eval()  # host first
    offload = dit_2 is not None and _offload_experts(args.offload_experts, device, dit, dit_2, dtype)
    # The VAE runs in the DiT's dtype: bf16 on GPUs (fused norm + SiLU, channels-last convs), fp32 on CPUs.
    dit, vae = dit.to(device, dtype).eval(), vae.to(device, dtype).eval()
    if dit_2 is not None and not offload:
        dit_2 = dit_2.to(device)
    for model, loras, flag in ((dit, plan.loras, "--lora"), (dit_2, plan.loras_2, "--lora-2")):
        for path, scale in loras:
            try:
                model.load_lora(path, scale=scale, name=os.path.basename(path) + f"#{len(model.loras)}")
            except WeightLoadError as err:
                raise UsageError(f"{flag} {path}: {err}") from err
    tiling = SpatialTiling() if args.vae_tiling else None
    text_dim = dit.config.text_dim
    if plan.text is not None:
        text, negative = plan.text, plan.negative
    else:
        gen = torch.Generator().manual_seed(args.seed)
        text = torch.randn(16 if args.preset == "tiny" else 512, text_dim, generator=gen)
        negative = None
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    ratio = vae.config.spatial_ratio
    latent_shape = (vae.config.z_dim, 1 + (plan.frames - 1) // TEMPORAL, plan.height // ratio, plan.width // ratio)
    inputs = [v.to(device) for v in plan.inputs]
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
    elif args.mode == "i2v" and conditioned:  # the I2V model's own conditioning, as diffusers
        first = inputs[0][:, :1]
        video = torch.cat([first, torch.zeros_like(first).expand(-1, plan.frames - 1, -1, -1)], dim=1)
        with torch.no_grad():
            image_latent = vae.normalize(vae.encode(video[None].to(dtype), tiling=tiling).float())[0].cpu()
        request = modes.wan_image_to_video(image_latent, image_embeds, text, channels=dit.config.out_channels,
                                           **common)  # fmt: skip
    elif args.mode == "i2v":  # a T2V model: the image is the known first latent frame (TI2V-5B: clean, at t = 0)
        clean_first = plan.checkpoint is not None and plan.checkpoint.expand_timesteps
        request = modes.image_to_video(latents[0][:, :1], text, frames=t, clean=clean_first, **common)
    elif args.mode == "extend":  # --frames is the total length (validate() checked it leaves room)
        request = modes.extend(latents[0], text, extra_frames=t - latents[0].shape[1], **common)
    elif args.mode == "connect":
        gap = t - latents[0].shape[1] - latents[1].shape[1]
        request = modes.connect(latents[0], latents[1], text, gap_frames=gap, **common)
    else:  # v2v
        request = modes.sdedit(latents[0], text, args.strength, **common)
    timings["encode_inputs"] = time.perf_counter() - start

    start = time.perf_counter()
    sampler = FlowMatchSampler(dit, num_steps=args.steps, shift=args.shift, guidance=args.guidance, progress=True,
                               sigmas=plan.sigmas, model_2=dit_2, boundary_ratio=plan.boundary_ratio,
                               guidance_2=args.guidance_2, offload_experts=offload)  # fmt: skip
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
