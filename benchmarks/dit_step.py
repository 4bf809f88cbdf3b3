"""One DiT denoising step (transformer forward) at a preset and video size, provider by provider.

Providers: fastdit eager, eager with the text keys / values precomputed (what a sampling run pays
per step), CUDA-graph replay of that step (CUDA only), fastdit under
``torch.compile(fullgraph=True)``, and, when diffusers is importable, diffusers'
``WanTransformer3DModel`` eager, compiled, and a copy of it patched by ``fastdit.patch``, with the
same config and weights. All are timed in one interleaved run (one call each per round), after
each was checked against the float32 reference. Random weights, one CFG branch, batch 1. FLOPs
count every matmul and both attentions (see ``step_flops``). Then a packed batch of mixed sizes
(a video, an image at a larger size, a smaller video) in one fastdit forward against the same
requests one by one, interleaved too.

``fastdit-cold-start`` (CUDA) is the time to the first step in a fresh process whose Triton and
inductor caches are empty (every kernel JIT-compiled and autotuned on the spot): the other
providers' ``first_call_s`` run after earlier suites and tests warmed those caches, so they
understate what a new deployment pays. The child runs outside any checkout (a temporary working
directory, so nothing there shadows an installed package), loads the same weights as every
other provider and returns its output, which is checked like theirs. Its row also gives the
child's model build and whole process time (imports included); ``fastdit-cold-start-fixed-tiles``
is the same with the attention autotuner off (``FASTDIT_ATTN_AUTOTUNE=0``). On a CPU nothing
compiles (fastdit's CPU path is PyTorch's own ops), so there is no cold-start row there.

Run: ``fastdit bench --suite dit_step --preset wan2.1-1.3b --size 480x832x81`` (or ``python -m
fastdit.benchmarks.dit_step ...``).
"""

import argparse
import copy
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import fastdit
from fastdit import settings
from fastdit.benchmarks.harness import (
    Candidate,
    Report,
    measure_ceilings,
    output_error,
    peak_memory_gib,
    reset_peak_memory,
    significant,
    time_ms,
)
from fastdit.models import DiT, DiTConfig, PackedBatch, preset
from fastdit.runtime import GraphedDiT
from fastdit.sizes import parse_size

PROVIDERS = (
    "fastdit-eager",
    "fastdit-text-cached",
    "fastdit-graph",
    "fastdit-compile",
    "diffusers-eager",
    "diffusers-compile",
    "diffusers-patched",
    "fastdit-packed",  # the mixed-size batch: packed and one by one
    "fastdit-cold-start",  # the first step of a fresh process with empty kernel caches
)


def latent_shape(config: DiTConfig, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Wan VAE compression: 4x in time (causal, first frame alone), 8x in space."""
    return config.in_channels, 1 + (frames - 1) // 4, height // 8, width // 8


def step_flops(config: DiTConfig, tokens: int, text_len: int) -> float:
    """Matmul FLOPs of one forward: per layer 12 S C^2 (self q k v o, cross q o) + 4 L C^2 (cross k v)
    + 4 S C F (FFN) + 4 S^2 C (self-attention) + 4 S L C (cross-attention), plus patch embed and head."""
    c, f, s, L = config.hidden, config.ffn_dim, tokens, text_len
    per_layer = 12 * s * c * c + 4 * L * c * c + 4 * s * c * f + 4 * s * s * c + 4 * s * L * c
    io = 2 * s * c * config.patch_volume * (config.in_channels + config.out_channels)
    return config.num_layers * per_layer + io


def diffusers_model(config: DiTConfig):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=config.patch_size,
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        text_dim=config.text_dim,
        freq_dim=config.freq_dim,
        ffn_dim=config.ffn_dim,
        num_layers=config.num_layers,
        cross_attn_norm=config.cross_attn_norm,
        eps=config.eps,
    )


def cast_like_from_pretrained(model, dtype: torch.dtype):
    """Cast parameters as ``from_pretrained(torch_dtype=dtype)`` does: the modules diffusers keeps
    in float32 stay float32, and buffers (RoPE's float64 tables) keep their dtype."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if not keep.intersection(name.split(".")):
            param.data = param.data.to(dtype)
    return model


# Relative (norm) error of a provider's step against the float32 reference: bf16 weights and
# activations through every layer (measured on CPU in fp16 through the tiny preset: ~3e-3).
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-4}


def _weights(config: DiTConfig) -> dict:
    """fastdit-named float32 random weights: diffusers' initialisation when diffusers is there
    (what a user's model would hold before loading), else fastdit's own."""
    torch.manual_seed(0)
    if _diffusers_available():
        return DiT.from_diffusers(diffusers_model(config), config=config).float().state_dict()
    return DiT(config).state_dict()


def _to_diffusers(weights: dict, model) -> dict:
    """fastdit's state dict under diffusers' names (the inverse of fastdit's weight loader)."""
    from fastdit.models.wan.weights import diffusers_key_to_fastdit

    state = {}
    for key, value in model.state_dict().items():
        name = diffusers_key_to_fastdit(key)
        state[key] = weights[name].reshape(value.shape) if name in weights else value
    return state


def _diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, help="DiT preset (default: wan2.1-1.3b on CUDA, tiny on CPU)")
    parser.add_argument("--size", default=None, help="HEIGHTxWIDTHxFRAMES in pixels (default 480x832x81 on CUDA)")
    parser.add_argument("--text-len", type=int, default=None, help="text tokens (default 512 on CUDA, 16 on CPU)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="dit_step: weights and activations (default bfloat16 on CUDA, float32 on CPU)",
    )
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {PROVIDERS}")


def _defaults(args, device: torch.device):
    cuda = device.type == "cuda"
    name = args.preset or ("wan2.1-1.3b" if cuda else "tiny")
    if args.size:
        height, width, frames = parse_size(args.size, frames="required")
        size = (frames, height, width)
    elif cuda:
        size = (21, 240, 416) if args.quick else (81, 480, 832)
    else:
        size = (9, 64, 64)
    text_len = args.text_len or (512 if cuda else 16)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    return name, size, text_len, dtype


def run(args: argparse.Namespace, device: torch.device) -> Report:
    name, (frames, height, width), text_len, dtype = _defaults(args, device)
    config = preset(name)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise SystemExit(f"unknown providers {unknown}; choose from {PROVIDERS}")
    if not _diffusers_available():
        skipped = [p for p in providers if p.startswith("diffusers")]
        if skipped:
            print(f"dit_step: skipping {skipped}: diffusers is not installed (pip install -e .[diffusers])")
        providers = [p for p in providers if not p.startswith("diffusers")]

    channels, t, h, w = latent_shape(config, frames, height, width)
    tokens = (t // config.patch_size[0]) * (h // config.patch_size[1]) * (w // config.patch_size[2])
    flops = step_flops(config, tokens, text_len)
    shape = f"{name} {height}x{width}x{frames} S={tokens} L={text_len} {str(dtype).replace('torch.', '')}"
    report = Report("dit_step", device, measure_ceilings(device, quick=args.quick))

    gen = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(1, channels, t, h, w, generator=gen).to(device, dtype)
    timestep = torch.tensor([500.0], device=device)
    text = torch.randn(1, text_len, config.text_dim, generator=gen).to(device, dtype)
    weights = _weights(config)  # one set of random weights for every provider, diffusers' included
    with torch.inference_mode():  # the oracle: the same weights on the reference ops in float32
        oracle = DiT(config, backend="reference").to(device)
        oracle.load_state_dict(weights)
        reference = oracle(latents.float(), timestep, text.float())
        del oracle
    tolerance = TOLERANCE[dtype]

    candidates = _step_candidates(providers, config, weights, latents, timestep, text, device, dtype, flops)
    timing = {"warmup": 1, "min_rounds": 3, "budget_s": 2.0 if device.type == "cpu" else 5.0}
    rows = report.compare(shape, candidates, reference=reference, tolerance=tolerance, timing=timing,
                          first_call=True)  # fmt: skip
    for cand in candidates:  # peak memory of each step alone (CUDA), after the interleaved timing
        row = rows[cand.provider]
        if row["status"] == "ok":
            if device.type == "cuda":
                reset_peak_memory(device)
                cand.fn()
                row["peak_gib"] = peak_memory_gib(device)
            print(f"  {cand.provider}: {row['ms']:.3f} ms (first call {row['first_call_s']:.1f} s)", flush=True)
    del candidates
    gc.collect()
    if "fastdit-packed" in providers:
        _mixed_batch(report, config, weights, device, dtype, text_len, args.quick)
    if "fastdit-cold-start" in providers:
        if device.type != "cuda":
            print("  fastdit-cold-start: no row on a CPU: nothing compiles there (fastdit's CPU path is PyTorch's "
                  "own ops), so a fresh process would time imports, not empty kernel caches")  # fmt: skip
        else:
            _cold_start_rows(report, name, (frames, height, width), text_len, dtype, device, weights, reference,
                             tolerance, shape, flops)  # fmt: skip
    return report


def _step_candidates(providers, config, weights, latents, timestep, text, device, dtype, flops) -> list:
    """One :class:`Candidate` per wanted step provider, every model built from ``weights``."""
    candidates = []
    wanted = [p for p in providers if p not in ("fastdit-packed", "fastdit-cold-start")]
    if any(p.startswith("fastdit") for p in wanted):
        model = DiT(config)
        model.load_state_dict(weights)
        model = model.to(device, dtype).eval()
        batch = PackedBatch.from_dense(latents, timestep, text, config.patch_size)
        with torch.inference_mode():
            text_kv = model.text_kv(batch.text)
        runs = {
            "fastdit-eager": model,
            # packed in and out; dense_output is a view
            "fastdit-text-cached": lambda *_: model.dense_output(model.forward_packed(batch, text_kv=text_kv), latents),
        }
        if "fastdit-graph" in wanted and device.type == "cuda":
            graphed = GraphedDiT(model)
            runs["fastdit-graph"] = lambda *_: model.dense_output(graphed(batch, text_kv=text_kv), latents)
        elif "fastdit-graph" in wanted:
            print("  fastdit-graph: skipped (CUDA graphs need a GPU)")
        if "fastdit-compile" in wanted:
            runs["fastdit-compile"] = torch.compile(model, fullgraph=True)
        candidates += [_step(p, fn, latents, timestep, text, flops) for p, fn in runs.items() if p in wanted]
    if any(p.startswith("diffusers") for p in wanted):
        reference_model = diffusers_model(config)
        reference_model.load_state_dict(_to_diffusers(weights, reference_model))
        reference_model = cast_like_from_pretrained(reference_model.to(device), dtype).eval()
        runs = {"diffusers-eager": reference_model}
        if "diffusers-compile" in wanted:
            runs["diffusers-compile"] = torch.compile(reference_model)
        if "diffusers-patched" in wanted:  # a copy: the eager and compiled providers stay unpatched
            patched = copy.deepcopy(reference_model)
            fastdit.patch(patched)
            runs["diffusers-patched"] = patched
        candidates += [_step(p, fn, latents, timestep, text, flops, diffusers=True) for p, fn in runs.items()
                       if p in wanted]  # fmt: skip
    return candidates


def _step(provider, fn_model, latents, timestep, text, flops, diffusers=False):
    def step():
        with torch.inference_mode():
            out = fn_model(latents, timestep, text)
            return out[0] if diffusers else out

    return Candidate(provider, step, flops=flops)


def _cold_start_rows(report, name, size, text_len, dtype, device, weights, reference, tolerance, shape, flops):
    """With the attention autotuner (the default) and with its fixed tiles, which compile once."""
    for label, env in (("fastdit-cold-start", {}), ("fastdit-cold-start-fixed-tiles", {"FASTDIT_ATTN_AUTOTUNE": "0"})):
        try:
            cold = cold_first_step(name, size, text_len, dtype, device, env, weights=weights)
        except Exception as err:  # noqa: BLE001 - the row says what went wrong
            report.fail(label, shape, err)
            continue
        error = output_error(cold.pop("output"), reference)
        if not error <= tolerance:
            report.fail(label, shape, f"error {error:.3g} > tolerance {tolerance:.3g}", error=error)
            continue
        report.add(label, shape, cold["step_ms"], flops=flops, first_call_s=cold["first_step_s"],
                   build_s=cold["build_s"], process_s=cold["process_s"], error=significant(error, 3))  # fmt: skip
        print(f"  {label}: first step {cold['first_step_s']:.1f} s with empty kernel caches "
              f"(model build {cold['build_s']:.1f} s, whole process {cold['process_s']:.1f} s), "
              f"then {cold['step_ms']:.3f} ms", flush=True)  # fmt: skip


def cold_first_step(name: str, size: tuple[int, int, int], text_len: int, dtype: torch.dtype,
                    device: torch.device, extra_env: dict | None = None, *, weights: dict) -> dict:  # fmt: skip
    """Run :func:`cold_child` in a fresh interpreter with empty Triton / inductor cache dirs, in a
    temporary working directory (Python puts the working directory first on ``sys.path``: from a
    checkout's root a published package could be shadowed), on ``weights`` (fastdit names,
    float32, the other providers' weights). Returns the child's timings and its output."""
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory(prefix="fastdit-cold-") as work:
        # the child reads its settings from the environment once: pass this process's overrides on
        env = {**os.environ, **settings.as_environ(), **(extra_env or {}),
               "TRITON_CACHE_DIR": os.path.join(work, "triton"),
               "TORCHINDUCTOR_CACHE_DIR": os.path.join(work, "inductor")}  # fmt: skip
        env.pop("PYTHONPATH", None)
        weights_path, output_path = os.path.join(work, "weights.safetensors"), os.path.join(work, "out.safetensors")
        save_file({k: v.contiguous() for k, v in weights.items()}, weights_path)
        spec = dict(preset=name, size=list(size), text_len=text_len, dtype=str(dtype).removeprefix("torch."),
                    device=str(device), weights=weights_path, output=output_path)  # fmt: skip
        code = (
            "import sys, json; from fastdit.benchmarks.dit_step import cold_child; cold_child(json.loads(sys.argv[1]))"
        )
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env, cwd=work, capture_output=True,
                              text=True, timeout=1200)  # fmt: skip
        process_s = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"cold-start child failed ({done.returncode}): {done.stderr[-2000:]}")
        output = load_file(output_path)["output"]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "process_s": significant(process_s, 3), "output": output}


def cold_child(spec: dict) -> None:
    """Build the preset's DiT on the device with the given weights, time its first step (every
    Triton kernel compiled and autotuned now), then a steady step; save the step's output and
    print one JSON line of timings."""
    from safetensors.torch import load_file, save_file

    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    config = preset(spec["preset"])
    frames, height, width = spec["size"]
    channels, t, h, w = latent_shape(config, frames, height, width)
    gen = torch.Generator(device="cpu").manual_seed(0)
    start = time.perf_counter()
    model = DiT(config)
    model.load_state_dict(load_file(spec["weights"]))
    model = model.to(device, dtype).eval()
    latents = torch.randn(1, channels, t, h, w, generator=gen).to(device, dtype)
    text = torch.randn(1, spec["text_len"], config.text_dim, generator=gen).to(device, dtype)
    timestep = torch.tensor([500.0], device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    build_s = time.perf_counter() - start

    def step():
        with torch.inference_mode():
            return model(latents, timestep, text)

    start = time.perf_counter()
    out = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_step_s = time.perf_counter() - start
    save_file({"output": out.float().cpu().contiguous()}, spec["output"])
    step_ms = time_ms(step, device, warmup=0, min_runs=2, budget_s=2.0)
    timings = {"build_s": significant(build_s, 3), "first_step_s": significant(first_step_s, 3), "step_ms": step_ms}
    print(json.dumps(timings))


def _mixed_batch(report: Report, config: DiTConfig, weights: dict, device: torch.device, dtype: torch.dtype,
                 text_len: int, quick: bool = False):  # fmt: skip
    """One packed forward over mixed sizes vs the same requests one by one (fastdit eager).

    CUDA: a 480x832 81-frame video, a 720x1280 image and a 240x416 81-frame video (``--quick``:
    21-frame videos); CPU: the same mix at a sixteenth of the size.
    """
    sizes = [(81, 480, 832), (1, 720, 1280), (81, 240, 416)]
    if quick:
        sizes = [(21, 480, 832), (1, 720, 1280), (21, 240, 416)]
    if device.type != "cuda":
        sizes = [(9, 32, 48), (1, 48, 80), (9, 16, 32)]
    gen = torch.Generator(device="cpu").manual_seed(1)
    latents = [torch.randn(*latent_shape(config, *s), generator=gen).to(device, dtype) for s in sizes]
    texts = [torch.randn(text_len, config.text_dim, generator=gen).to(device, dtype) for _ in sizes]
    timestep = torch.full((len(sizes),), 500.0, device=device)
    packed = PackedBatch.from_samples(latents, timestep, texts, config.patch_size)
    singles = [PackedBatch.from_samples([x], timestep[:1], [t], config.patch_size) for x, t in zip(latents, texts)]
    with torch.inference_mode():  # the oracle, sample by sample in float32 on the reference ops
        oracle = DiT(config, backend="reference").to(device)
        oracle.load_state_dict(weights)
        reference = torch.cat([oracle.forward_packed(_float(b)) for b in singles])
        del oracle
    model = DiT(config)
    model.load_state_dict(weights)
    model = model.to(device, dtype).eval()
    tokens = packed.tokens.shape[0]
    flops = sum(step_flops(config, b.tokens.shape[0], text_len) for b in singles)
    label = "mixed " + " + ".join("x".join(map(str, s)) for s in sizes) + f" S={tokens}"

    def run_packed():
        with torch.inference_mode():
            return model.forward_packed(packed)

    def run_singles():
        with torch.inference_mode():
            return torch.cat([model.forward_packed(b) for b in singles])

    timing = {"warmup": 1, "min_rounds": 3, "budget_s": 2.0 if device.type == "cpu" else 5.0}
    candidates = [Candidate("fastdit-packed", run_packed, flops=flops), Candidate("fastdit-one-by-one", run_singles,
                                                                                  flops=flops)]  # fmt: skip
    rows = report.compare(label, candidates, reference=reference, tolerance=TOLERANCE[dtype], timing=timing)
    for cand in candidates:
        if rows[cand.provider]["status"] == "ok":
            if device.type == "cuda":
                reset_peak_memory(device)
                cand.fn()
                rows[cand.provider]["peak_gib"] = peak_memory_gib(device)
            print(f"  {label} {cand.provider}: {rows[cand.provider]['ms']:.3f} ms", flush=True)


def _float(batch: PackedBatch) -> PackedBatch:
    return dataclasses.replace(batch, tokens=batch.tokens.float(), text=batch.text.float())


if __name__ == "__main__":
    from fastdit.cli import main

    main(["bench", "--suite", "dit_step", *__import__("sys").argv[1:]])
