"""Causal VAE decode and encode, provider by provider: time and peak memory.

Providers: fastdit's CausalVAE eager on the dispatcher's backends (``fastdit-eager``), with every
conv on the Triton implicit GEMM (``fastdit-triton``), with its encoder / decoder under
torch.compile, and diffusers' AutoencoderKLWan (eager and compiled) where diffusers is
installed; the same random weights for all, every output checked against the float32
reference VAE before it is timed, every provider's decode (then encode) timed in one interleaved
run. fastdit runs channels-last-3d.
Defaults: CUDA bf16 at Wan 2.1 size, decode of a 21x60x104 latent
(-> 81 frames of 480x832) and encode of that video; CPU: the tiny preset at 9 frames of 64x96.
"""

import argparse
import copy
import gc

import torch

from fastdit.benchmarks.harness import Candidate, Report, measure_ceilings, peak_memory_gib, reset_peak_memory
from fastdit.models.wan.vae import VAE_PRESETS, CausalVAE
from fastdit.sizes import parse_size

PROVIDERS = ("fastdit-eager", "fastdit-triton", "fastdit-compile", "diffusers-eager", "diffusers-compile")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae-size", default=None, help="vae: HEIGHTxWIDTHxFRAMES of the video (default 480x832x81)")
    parser.add_argument("--vae-providers", default=",".join(PROVIDERS), help=f"vae: comma list of {PROVIDERS}")


def _diffusers_vae(config):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=config.base_dim,
        z_dim=config.z_dim,
        dim_mult=list(config.dim_mult),
        num_res_blocks=config.num_res_blocks,
        temperal_downsample=list(config.temporal_downsample),
    )


# Relative (norm) error against the float32 reference: bf16 activations through ~30 convs.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-4}


def run(args: argparse.Namespace, device: torch.device) -> Report:
    cuda = device.type == "cuda"
    name = "wan2.1" if cuda else "tiny"
    config = VAE_PRESETS[name]
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.vae_size:
        height, width, frames = parse_size(args.vae_size, frames="required")
    else:
        frames, height, width = ((21 if args.quick else 81), 480, 832) if cuda else (9, 64, 96)
    providers = [p.strip() for p in args.vae_providers.split(",") if p.strip()]
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("vae: skipping diffusers providers: diffusers is not installed")
        providers = [p for p in providers if not p.startswith("diffusers")]
    report = Report("vae", device, measure_ceilings(device, quick=args.quick))
    gen = torch.Generator().manual_seed(0)
    video = (torch.rand(1, 3, frames, height, width, generator=gen) * 2 - 1).to(device, dtype)
    latent = torch.randn(1, config.z_dim, 1 + (frames - 1) // 4, height // 8, width // 8, generator=gen)
    latent = latent.to(device, dtype)
    shape = f"{name} {height}x{width}x{frames} {str(dtype).replace('torch.', '')}"
    torch.manual_seed(0)
    weights = CausalVAE(config).eval()  # every provider runs these weights (diffusers' copy included)
    with torch.inference_mode():  # the oracle: the reference ops in float32 (== diffusers to ~1e-7)
        oracle = copy.deepcopy(weights).to(device).set_backend("reference")
        references = {"decode": oracle.decode(latent.float()), "encode": oracle.encode(video.float())}
        del oracle
    runs: dict[str, dict] = {}  # provider -> {"decode": fn, "encode": fn}; every model alive for the interleaving
    for family in ("fastdit", "diffusers"):
        wanted = [p for p in providers if p.startswith(family)]
        for provider in wanted:
            if provider == "fastdit-triton" and not cuda:
                print("vae: skipping fastdit-triton on CPU (Triton would run in its interpreter)")
                continue
            if family == "fastdit":
                model = copy.deepcopy(weights).set_backend("triton" if provider == "fastdit-triton" else None)
            else:
                model = _diffusers_vae(config)
                model.load_state_dict(weights.state_dict())
            model = model.to(device, dtype).eval()
            if provider.endswith("compile"):
                model.encoder = torch.compile(model.encoder)
                model.decoder = torch.compile(model.decoder)
            if family == "fastdit":
                runs[provider] = {"decode": lambda m=model: m.decode(latent), "encode": lambda m=model: m.encode(video)}
            else:
                runs[provider] = {"decode": lambda m=model: m.decode(latent).sample,
                                  "encode": lambda m=model: m.encode(video).latent_dist.mean}  # fmt: skip
    timing = {"warmup": 0, "min_rounds": 3, "budget_s": 1.0 if args.quick else 3.0}
    for op in ("decode", "encode"):
        candidates = [Candidate(provider, fns[op]) for provider, fns in runs.items()]
        with torch.inference_mode():
            rows = report.compare(f"{op} {shape}", candidates, reference=references[op], tolerance=TOLERANCE[dtype],
                                  timing=timing, first_call=True)  # fmt: skip
            for cand in candidates:
                row = rows[cand.provider]
                if row["status"] != "ok":
                    continue
                if cuda:  # peak memory of each call alone, after the interleaved timing
                    reset_peak_memory(device)
                    cand.fn()
                    row["peak_gib"] = peak_memory_gib(device)
                print(f"  vae {cand.provider} {op}: {row['ms']:.1f} ms", flush=True)
    del runs
    gc.collect()
    return report
