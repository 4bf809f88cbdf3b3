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

from fastdit.models import FamilyCheckpoint, VAEFacts, WeightLoadError, open_checkpoint
from fastdit.models.wan import VAE_PRESETS, CausalVAE, DiT, SpatialTiling, preset
from fastdit.models.wan.image_encoder import ImageEncoder
from fastdit.models.wan.lora import check_lora_file
from fastdit.models.wan.text_encoder import PromptEncoder, transformers_missing
from fastdit.models.weights import read_safetensors
from fastdit.runtime import modes
from fastdit.runtime.sampler import EXPERT_FIELDS, FlowMatchSampler, explicit_sigmas
from fastdit.sizes import SIZE_SYNTAX, parse_size

MODES = ("t2v", "t2i", "i2v", "extend", "connect", "loop", "v2v")
VAE_FOR_DIT = {"tiny": "tiny", "wan2.1-1.3b": "wan2.1", "wan2.1-14b": "wan2.1"}
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
    parser.add_argument("--model-seed", type=int, default=None,
                        help="seeds the tiny preset's random weights (DiT, VAE, text encoder) apart from the noise; "
                        "None: --seed ('fastdit serve --preset tiny' builds its models with 0)")  # fmt: skip
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
        "--vae-tiling",
        action="store_true",
        help="encode / decode in overlapping 256-pixel tiles, diffusers' (Wan 2.2's encoder: 512, of its folded "
        "input); less VAE memory",
    )


class UsageError(ValueError):
    """A flag that cannot work: ``fastdit`` prints it as one line and exits with status 2."""


VIDEO_SUFFIXES, IMAGE_SUFFIXES = (".mp4",), (".png",)


@dataclass
class GenerationRequest:
    """One ``fastdit generate`` run, parsed and validated once by :func:`validate`; everything after
    (loading, encoding, sampling, decoding) trusts it and reads no flag again. Field names follow
    the flags'."""

    mode: str
    height: int  # pixels, a multiple of size_multiple
    width: int
    frames: int  # 1 + temporal k (the VAE's own temporal ratio)
    device: torch.device
    vae_facts: VAEFacts  # the checkpoint's VAE, or the preset's
    steps: int
    guidance: float
    shift: float
    seed: int
    strength: float
    out: str
    preset: str
    offload_experts: str
    vae_tiling: bool
    guidance_2: float | None = None
    weights: str | None = None  # --weights, read once into checkpoint
    checkpoint: FamilyCheckpoint | None = None
    prompt: str | None = None  # encoded by the checkpoint's text encoder at run time
    negative_prompt: str | None = None
    input_paths: list[str] = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)  # (3, T, H, W) in [-1, 1], read and checked
    text: torch.Tensor | None = None  # (L, text_dim) prompt embeddings from --prompt-embeds
    negative: torch.Tensor | None = None
    sigmas: torch.Tensor | None = None  # --sigmas, checked
    loras: list[tuple[str, float]] = field(default_factory=list)  # --lora FILE[:SCALE], the files exist
    loras_2: list[tuple[str, float]] = field(default_factory=list)  # --lora-2, for transformer_2
    boundary_ratio: float | None = None  # Wan 2.2 A14B: model_index.json's, with transformer_2/
    model_seed: int | None = None  # the tiny preset's weights (None: seed)

    @property
    def weights_seed(self) -> int:
        """What seeds the tiny preset's random weights: ``model_seed``, else ``seed``."""
        return self.seed if self.model_seed is None else self.model_seed

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(C, T', H', W')`` of the latent this request samples."""
        return self.vae_facts.latent_shape(self.frames, self.height, self.width)


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


def validate(args) -> GenerationRequest:
    """The one place a run's flags are checked, before any model is built: sizes and frame counts
    (against the checkpoint's own VAE and patch), sampling, the output path, the device, what the
    checkpoint and mode need, the input files (decoded here) and the prompt embeddings; a
    :class:`UsageError` naming the flag."""
    checkpoint, facts, height, width, frames, size_frames = _validate_size(args)
    sigmas = _validate_sampling(args)
    _check_out(args.out, frames)
    device = device_of(args.device)
    boundary = _validate_model_inputs(args, checkpoint)
    request = GenerationRequest(
        mode=args.mode, height=height, width=width, frames=frames, device=device, vae_facts=facts, steps=args.steps,
        guidance=args.guidance, shift=args.shift, seed=args.seed, strength=args.strength, out=args.out,
        preset=args.preset, offload_experts=args.offload_experts, vae_tiling=args.vae_tiling,
        guidance_2=args.guidance_2, weights=args.weights, checkpoint=checkpoint, prompt=args.prompt,
        negative_prompt=args.negative_prompt, input_paths=list(args.input), sigmas=sigmas,
        loras=[_lora_arg(a) for a in args.lora], loras_2=[_lora_arg(a) for a in args.lora_2], boundary_ratio=boundary,
        model_seed=args.model_seed,
    )  # fmt: skip
    _read_inputs(request, args, size_frames)
    return request


def _validate_size(args):
    """``(checkpoint, VAE facts, height, width, frames, frames given by --size)``: --size and
    --frames against the VAE's ratios and the DiT's patch."""
    try:
        height, width, size_frames = parse_size(args.size)
    except ValueError as err:
        raise UsageError(f"--{err}") from err
    if size_frames is not None and args.frames not in (None, size_frames):
        raise UsageError(f"--size {args.size} says {size_frames} frames and --frames {args.frames}: give one")
    checkpoint = open_weights(args.weights)
    facts = checkpoint.vae_facts if checkpoint else VAE_PRESETS[VAE_FOR_DIT[args.preset]].facts
    patch = checkpoint.patch_size if checkpoint else preset(args.preset).patch_size
    factor = facts.spatial * max(patch[1:])  # pixels per DiT token row (Wan 2.1: 8 x 2, Wan 2.2 TI2V: 16 x 2)
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise UsageError(f"--size {height}x{width}: height and width must be positive multiples of {factor}")
    if args.mode == "t2i" and args.frames not in (None, 1):
        raise UsageError(f"--frames {args.frames} with --mode t2i: an image has one frame; drop --frames or use t2v")
    frames = args.frames if args.frames is not None else size_frames
    if args.mode == "t2i" and frames not in (None, 1):
        raise UsageError(f"--size {args.size} with --mode t2i: an image has one frame; use HEIGHTxWIDTH")
    frames = 1 if args.mode == "t2i" else (DEFAULT_FRAMES if frames is None else frames)
    if frames < 1 or (frames - 1) % facts.temporal:
        raise UsageError(f"--frames {frames}: must be 1 + {facts.temporal}k (the VAE keeps the first frame alone)")
    return checkpoint, facts, height, width, frames, size_frames


def _validate_sampling(args) -> torch.Tensor | None:
    """Steps, guidance, shift, seed, strength; ``--sigmas`` parsed (None without it)."""
    if args.sigmas is None and args.steps < 1:  # with --sigmas, --steps is ignored
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    for flag in ("guidance", "guidance_2", "shift", "strength"):
        value = getattr(args, flag)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"--{flag.replace('_', '-')} must be a finite number, got {value}")
    for flag in ("seed", "model_seed"):
        value = getattr(args, flag)
        if value is not None and not 0 <= value < 2**64:
            raise UsageError(f"--{flag.replace('_', '-')} must be in [0, 2**64), got {value}")
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
    return sigmas


def _validate_model_inputs(args, checkpoint: FamilyCheckpoint | None) -> float | None:
    """What the mode and the checkpoint need: input files, the I2V kind, the prompt flags, a second
    expert's boundary (returned; None without one)."""
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
    return boundary


def _read_inputs(request: GenerationRequest, args, size_frames: int | None) -> None:
    """The prompt embeddings and input videos read into ``request``; the frame count of extend /
    connect checked against (or, by default, derived from) the inputs'."""
    height, width, temporal = request.height, request.width, request.vae_facts.temporal
    frames = request.frames
    if args.prompt_embeds:
        request.text, request.negative = _read_embeds(args.prompt_embeds, _text_dim(args, request.checkpoint))
    request.inputs = [read_video(path, height, width, temporal) for path in args.input]
    if args.mode == "v2v" and request.inputs[0].shape[1] == 1:
        raise UsageError(f"--mode v2v restyles a video and --input {args.input[0]} is one image: use --mode i2v")
    latent_frames = [1 + (v.shape[1] - 1) // temporal for v in request.inputs]
    if args.mode in ("extend", "connect") and args.frames is None and size_frames is None:
        # by default two latent frames (8 video frames) more than the inputs hold
        frames = request.frames = 1 + temporal * (sum(latent_frames) + 1)
    total = 1 + (frames - 1) // temporal
    if args.mode == "extend" and total - latent_frames[0] < 1:
        raise UsageError(
            f"--frames {frames}: extending needs more frames than the input's {request.inputs[0].shape[1]}"
        )
    if args.mode == "connect" and total - sum(latent_frames) < 1:
        need = 1 + temporal * sum(latent_frames)
        raise UsageError(f"--frames {frames}: connecting these inputs needs at least {need} frames")


def open_weights(weights: str | None) -> FamilyCheckpoint | None:
    """``--weights DIR`` read once (None without it): every later check and step asks it; a
    :class:`UsageError` for a directory fastdit cannot run."""
    if not weights:
        return None
    if not os.path.isdir(weights):
        raise UsageError(
            f"--weights {weights}: no such directory (a local diffusers-format folder; Hub ids are not "
            "downloaded: e.g. huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir DIR)"
        )
    if not all(os.path.isdir(os.path.join(weights, d)) for d in ("transformer", "vae")):
        raise UsageError(f"--weights {weights} must hold transformer/ and vae/ (diffusers format)")
    try:
        checkpoint = open_checkpoint(weights)
        for fact in ("vae_facts", "patch_size", "text_dim", "image_conditioned"):  # every number read and checked here
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


def device_of(name: str) -> torch.device:
    """``--device``: auto (CUDA when there is one), cpu, cuda, cuda:N; a :class:`UsageError` otherwise."""
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
        raise UsageError(f"--device {name}: fastdit runs on cpu or cuda")
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


def _i2v_kind(checkpoint: FamilyCheckpoint | None) -> tuple[bool, bool]:
    """(the transformer takes its own image conditioning: more input than output channels, the mask
    and image latent of Wan 2.1 / 2.2 I2V; it also reads CLIP image states: ``image_dim``, Wan 2.1)."""
    if checkpoint is None:
        return False, False
    return checkpoint.image_conditioned, checkpoint.clip


def _text_dim(args, checkpoint: FamilyCheckpoint | None) -> int:
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


def read_video(path: str, height: int, width: int, temporal: int) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1], resized to H x W (said once on stderr, with both sizes); grayscale
    and RGBA inputs are converted to RGB."""
    frames = _read_frames(path)
    video = torch.from_numpy(frames).float().permute(3, 0, 1, 2) / 127.5 - 1.0
    if video.shape[2:] != (height, width):
        print(f"fastdit generate: note: --input {path} is {video.shape[2]}x{video.shape[3]} (HxW); resized to "
              f"{height}x{width}", file=sys.stderr)  # fmt: skip
        video = torch.nn.functional.interpolate(video.transpose(0, 1), size=(height, width), mode="bilinear")
        video = video.transpose(0, 1)
    keep = 1 + (video.shape[1] - 1) // temporal * temporal  # the VAE needs 1 + temporal k frames
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


def prompt_encoder(request: GenerationRequest, dtype: torch.dtype) -> PromptEncoder:
    """The checkpoint's UMT5 on the request's device (the tiny preset's random one, seeded by
    ``weights_seed``, without ``--weights``)."""
    if request.weights:
        return PromptEncoder.from_pretrained(request.weights, dtype=dtype, device=request.device)
    return PromptEncoder.tiny(preset(request.preset).text_dim, seed=request.weights_seed).to(request.device, dtype)


def encode_prompt(encoder: PromptEncoder, request: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(prompt (512, text_dim), negative or None)`` as ``WanPipeline.encode_prompt``: the negative
    prompt (empty when not given, as diffusers) is encoded only when guidance needs it, in one batch
    with the prompt (so a server encoding one request at a time gets ``fastdit generate``'s bits)."""
    prompts = [request.prompt]
    if request.guidance != 1.0:
        prompts.append(request.negative_prompt or "")
    embeds = encoder.encode(prompts).float().cpu()
    width = request.checkpoint.text_dim if request.checkpoint else preset(request.preset).text_dim
    if embeds.shape[-1] != width:
        raise UsageError(f"--prompt: the text encoder makes {embeds.shape[-1]}-wide states; the DiT takes {width}")
    return embeds[0], (embeds[1] if len(prompts) > 1 else None)


def encode_image(encoder: ImageEncoder, path: str) -> torch.Tensor:
    """Wan 2.1 I2V: the CLIP states of the image file's first frame, float32 on the host."""
    return encoder.encode(_read_frames(path)[0]).float().cpu()[0]


def encode_prompts(request: GenerationRequest, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`encode_prompt` with an encoder built for this call and dropped (its GPU memory
    returned) before this returns."""
    encoder = prompt_encoder(request, dtype)
    try:
        return encode_prompt(encoder, request)
    finally:
        del encoder
        if request.device.type == "cuda":
            torch.cuda.empty_cache()


FPS = 16  # Wan's frame rate: what the MP4 says and what a server's `seconds` count


def video_frames(video: torch.Tensor):
    """``video`` (3, T, H, W) in [-1, 1] as the ``(T, H, W, 3)`` uint8 array a file holds."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def write_video(path: str, video, fps: int = FPS) -> None:
    """``video`` (3, T, H, W) in [-1, 1], or :func:`video_frames` of it, to ``path``: one frame as
    .png, else H.264 in .mp4."""
    import imageio.v3 as iio

    frames = video_frames(video) if isinstance(video, torch.Tensor) else video
    if path.lower().endswith(IMAGE_SUFFIXES):
        if frames.shape[0] != 1:  # validate() refuses this; never write 1 of N frames silently
            raise UsageError(f"--out {path}: a .png holds one frame, not {frames.shape[0]}")
        iio.imwrite(path, frames[0])
    else:
        iio.imwrite(path, frames, fps=fps, codec="libx264", macro_block_size=1)


def run(args) -> dict:
    """``fastdit generate``: the flags validated once (:func:`validate`), then :func:`generate`."""
    return generate(validate(args))


@dataclass
class Models:
    """What :func:`load_models` built for a request: the DiT (and Wan 2.2 A14B's low-noise expert,
    on the host while offloaded), the VAE, and whether the experts take turns on the device."""

    dit: DiT
    vae: CausalVAE
    dit_2: DiT | None = None
    offload: bool = False


def generate(request: GenerationRequest) -> dict:
    """Run a validated request: text (and image) encoders, the models, the diffusion request, the
    sampler, the VAE decode and the file. Returns the video, the latent and the stage timings."""
    device = request.device
    dtype = model_dtype(device)
    timings = {}
    if request.prompt is not None:  # encoded first, and the encoder freed before the DiT is loaded
        start = time.perf_counter()
        request.text, request.negative = encode_prompts(request, dtype)
        timings["encode_prompt"] = time.perf_counter() - start
    image_embeds = None
    if _i2v_kind(request.checkpoint)[1]:  # Wan 2.1 I2V: the CLIP states of the input image, encoder freed after
        start = time.perf_counter()
        encoder = ImageEncoder.from_pretrained(request.weights, dtype=dtype, device=device)
        image_embeds = encode_image(encoder, request.input_paths[0])
        del encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
        timings["encode_image"] = time.perf_counter() - start
    start = time.perf_counter()
    models = load_models(request, dtype)
    if request.text is not None:
        text, negative = request.text, request.negative
    else:
        gen = torch.Generator().manual_seed(request.seed)
        text = torch.randn(16 if request.preset == "tiny" else 512, models.dit.config.text_dim, generator=gen)
        negative = None
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    diffusion = diffusion_request(request, models, text, negative, image_embeds, dtype)
    timings["encode_inputs"] = time.perf_counter() - start

    start = time.perf_counter()
    sampler = FlowMatchSampler(models.dit, num_steps=request.steps, shift=request.shift, guidance=request.guidance,
                               progress=True, sigmas=request.sigmas, model_2=models.dit_2,
                               boundary_ratio=request.boundary_ratio, guidance_2=request.guidance_2,
                               offload_experts=models.offload)  # fmt: skip
    (latent,) = sampler([diffusion])
    timings["sample"] = time.perf_counter() - start

    start = time.perf_counter()
    video = decode_video(models.vae, latent, request)
    timings["decode"] = time.perf_counter() - start
    start = time.perf_counter()
    write_video(request.out, video)
    timings["write"] = time.perf_counter() - start
    print(f"wrote {request.out}: {video.shape[1]} frames of {video.shape[2]}x{video.shape[3]}")
    print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return {"video": video, "latent": latent, "timings": timings}


def model_dtype(device: torch.device) -> torch.dtype:
    """What the models run in on ``device``: bf16 on GPUs, float32 on CPUs."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_models(request: GenerationRequest, dtype: torch.dtype) -> Models:
    """The request's DiT(s) and VAE in ``dtype`` on its device, LoRAs fused: from the checkpoint, in
    place (no fp32 or second copy on the host), or the preset's random weights (seeded)."""
    device, checkpoint = request.device, request.checkpoint
    if checkpoint is not None:
        dit = checkpoint.load_dit("transformer", dtype=dtype, device=device)
        # The VAE runs in the DiT's dtype: bf16 on GPUs (fused norm + SiLU, channels-last convs), fp32 on CPUs.
        vae = checkpoint.load_vae(dtype=dtype, device=device)
    else:
        torch.manual_seed(request.weights_seed)
        dit, vae = DiT.from_preset(request.preset), CausalVAE.from_preset(VAE_FOR_DIT[request.preset])
    dit_2 = None
    if request.boundary_ratio is not None:  # Wan 2.2 A14B: the low-noise expert, on the host first
        dit_2 = checkpoint.load_dit("transformer_2", dtype=dtype).eval()
    offload = dit_2 is not None and _offload_experts(request.offload_experts, device, dit, dit_2, dtype)
    dit, vae = dit.to(device, dtype).eval(), vae.to(device, dtype).eval()
    if dit_2 is not None and not offload:
        dit_2 = dit_2.to(device)
    for model, loras, flag in ((dit, request.loras, "--lora"), (dit_2, request.loras_2, "--lora-2")):
        for path, scale in loras:
            try:
                model.load_lora(path, scale=scale, name=os.path.basename(path) + f"#{len(model.loras)}")
            except WeightLoadError as err:
                raise UsageError(f"{flag} {path}: {err}") from err
    return Models(dit, vae, dit_2, offload)


def _tiling(request: GenerationRequest) -> SpatialTiling | None:
    return SpatialTiling() if request.vae_tiling else None


def decode_video(vae: CausalVAE, latent: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
    """A sampled normalized latent ``(C, T', H', W')`` to ``(3, T, H, W)`` float32 pixels in [-1, 1]
    (the VAE's dtype and device, the request's tiling)."""
    param = next(vae.parameters())
    with torch.no_grad():
        video = vae.decode(vae.denormalize(latent.to(param.device)[None].float()).to(param.dtype),
                           tiling=_tiling(request))  # fmt: skip
    return video[0].float()


def diffusion_request(request: GenerationRequest, models: Models, text, negative, image_embeds, dtype):
    """The sampler's request for the run's mode: its input videos encoded to normalized latents."""
    vae, device, tiling = models.vae, request.device, _tiling(request)
    c, t, h, w = request.latent_shape
    inputs = [v.to(device) for v in request.inputs]
    with torch.no_grad():
        latents = [vae.normalize(vae.encode(v[None].to(dtype), tiling=tiling).float())[0].cpu() for v in inputs]
    common = dict(seed=request.seed, negative_text=negative)
    mode = request.mode
    if mode == "t2v":
        return modes.text_to_video(text, c, t, h, w, **common)
    if mode == "t2i":
        return modes.text_to_image(text, c, h, w, **common)
    if mode == "loop":
        return modes.loop(text, c, t, h, w, **common)
    if mode == "i2v" and _i2v_kind(request.checkpoint)[0]:  # the I2V model's own conditioning, as diffusers
        first = inputs[0][:, :1]
        video = torch.cat([first, torch.zeros_like(first).expand(-1, request.frames - 1, -1, -1)], dim=1)
        with torch.no_grad():
            image_latent = vae.normalize(vae.encode(video[None].to(dtype), tiling=tiling).float())[0].cpu()
        return modes.wan_image_to_video(image_latent, image_embeds, text, channels=models.dit.config.out_channels,
                                        **common)  # fmt: skip
    if mode == "i2v":  # a T2V model: the image is the known first latent frame (TI2V-5B: clean, at t = 0)
        clean_first = request.checkpoint is not None and request.checkpoint.expand_timesteps
        return modes.image_to_video(latents[0][:, :1], text, frames=t, clean=clean_first, **common)
    if mode == "extend":  # the frames are the total length (validate() checked they leave room)
        return modes.extend(latents[0], text, extra_frames=t - latents[0].shape[1], **common)
    if mode == "connect":
        gap = t - latents[0].shape[1] - latents[1].shape[1]
        return modes.connect(latents[0], latents[1], text, gap_frames=gap, **common)
    return modes.sdedit(latents[0], text, request.strength, **common)  # v2v
