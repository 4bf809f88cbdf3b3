"""The VAE's kernels, provider by provider: causal conv3d at the anchor shapes of docs/performance.md
and the fused RMS norm + SiLU.

conv3d providers: cuDNN through torch the way diffusers runs it (zero frames concatenated in
front, ``F.conv3d`` with spatial padding) in NCDHW and in channels-last-3d, and each fastdit
backend of ``causal_conv3d`` (``cudnn``, ``triton``; the reference is the oracle, not a
contender), plus ``fastdit-triton+wtma``: the Triton conv with its weight tiles by TMA
(FASTDIT_CONV_TMA=1), timed in the same run and left out of the policy. TFLOP/s counts the
conv's multiply-adds (2 * B*T*H*W * Cout * Cin * 27); % is of the dense bf16 matmul rate
measured in the same run.

norm + SiLU providers: eager (``F.silu(F.normalize(x) * sqrt(C) * gamma)``, Wan's code), the same
under torch.compile, and fastdit's backends of ``rms_norm_silu``. GB/s counts one read and one
write of x; % is of the copy bandwidth measured in the same run.

Defaults: CUDA bf16 at the anchors' shapes; CPU fp32 at shapes 8x smaller in each spatial dim
and channel count (the Triton kernels are not timed under the CPU interpreter).
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F

from fastdit import ops
from fastdit.benchmarks.harness import Candidate, Report, measure_ceilings, selectable_backends, switches
from fastdit.ops.causal_conv3d import policy_key

# (Cin, Cout, T, H, W): anchors.md's causal conv3d table (k = 3, two zero frames in front).
CONV_SHAPES = [
    (384, 384, 4, 60, 104),
    (384, 384, 8, 120, 208),
    (192, 192, 16, 240, 416),
    (96, 96, 16, 480, 832),
    (16, 384, 4, 60, 104),
]
CPU_CONV_SHAPES = [(48, 48, 2, 8, 13), (24, 24, 2, 30, 52), (2, 48, 2, 8, 13)]
# (C, T, H, W) of the norm + SiLU: the decoder's last stage and its middle.
NORM_SHAPES = [(96, 4, 480, 832), (384, 4, 60, 104)]
CPU_NORM_SHAPES = [(96, 2, 60, 104)]


PARTS = ("conv3d", "rms_norm_silu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae-ops", default=",".join(PARTS), help=f"vae_ops: comma list of {PARTS}")
    parser.add_argument("--conv-shapes", default=None, help="vae_ops: CIN,COUT,T,H,W[;...] conv3d shapes")
    parser.add_argument(
        "--conv-policy-out", default=None,
        help="vae_ops: write the per-shape winner among fastdit's conv backends as a dispatcher policy (JSON)",
    )  # fmt: skip


def _diffusers_conv(x, weight):
    """diffusers' WanCausalConv3d: F.pad two zero frames in front and one pixel around, then conv3d."""
    return F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), weight)


def _wan_norm_silu(x, gamma):
    return F.silu(F.normalize(x, dim=1) * x.shape[1] ** 0.5 * gamma)


# Relative (norm) error against the float32 reference: bf16 inputs round at 2^-9, and the
# conv's fp32 accumulation order differs between cuDNN and the Triton tiles.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def _conv_reference(x, weight):
    """The conv in float32 with TF32 off (the oracle's own rounding far below bf16's)."""
    allow = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        return _diffusers_conv(x.float(), weight.float())
    finally:
        torch.backends.cudnn.allow_tf32 = allow


def _write_policy(path: str, totals: dict, device: torch.device, report: Report) -> None:
    """The fastest fastdit backend per conv signature (summed over the sizes measured), as the
    JSON ``fastdit.ops.causal_conv3d.load_policy`` reads."""
    from fastdit.benchmarks.harness import environment

    choices = {key: min(per, key=per.get) for key, per in sorted(totals.items()) if per}
    policy = {
        "device_type": device.type,
        "device": environment(device)["device"],
        "source": "fastdit bench --suite vae_ops",
        "ms": {key: {name: round(ms, 4) for name, ms in per.items()} for key, per in sorted(totals.items())},
        "choices": choices,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(policy, f, indent=2)
        f.write("\n")
    print(f"  wrote the conv policy {path}: {choices}", flush=True)


def _with_weight_tma(fn):
    """``fn`` run with the conv's weight tiles by TMA (conv_tma), each call: variants are interleaved."""

    def run():
        with switches({"conv_tma": True}, ["conv_tma"]):
            return fn()

    return run


def _parse_shapes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in item.split(",")) for item in text.split(";") if item.strip()]


def run(args: argparse.Namespace, device: torch.device) -> Report:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    parts = [p.strip() for p in args.vae_ops.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown vae ops {unknown}; choose from {PARTS}")
    report = Report("vae_ops", device, measure_ceilings(device, quick=args.quick))
    budget_s = 0.3 if args.quick else 2.0
    gen = torch.Generator().manual_seed(0)
    shapes = _parse_shapes(args.conv_shapes) if args.conv_shapes else (CONV_SHAPES if cuda else CPU_CONV_SHAPES)
    if "conv3d" not in parts:
        shapes = []
    if args.quick and cuda and not args.conv_shapes:
        shapes = [s for s in shapes if s[0] * s[2] * s[3] * s[4] < 100_000_000]  # the 96-channel 480p shape is 614M
    contenders = selectable_backends("causal_conv3d", {"device": device, "dtype": dtype})
    totals: dict[str, dict[str, float]] = {}  # policy key -> backend -> summed ms over sizes
    for cin, cout, frames, height, width in shapes:
        x = torch.randn(1, cin, frames, height, width, generator=gen).to(device, dtype)
        weight = (torch.randn(cout, cin, 3, 3, 3, generator=gen) / (27 * cin) ** 0.5).to(device, dtype)
        x_cl = x.contiguous(memory_format=torch.channels_last_3d)
        w_cl = weight.contiguous(memory_format=torch.channels_last_3d)
        flops = 2 * frames * height * width * cout * cin * 27
        shape = f"conv3d {cin}-{cout} T={frames} {height}x{width}"
        runs = {
            "torch-ncdhw": lambda x=x, w=weight: _diffusers_conv(x, w),
            "torch-channels-last": lambda x=x_cl, w=w_cl: _diffusers_conv(x, w),
        }
        for name in contenders:  # y only: the cache is a copy, the same for every provider
            runs[f"fastdit-{name}"] = lambda n=name, x=x_cl, w=w_cl: ops.causal_conv3d(x, w, padding=(1, 1), backend=n)[
                0
            ]
        if "triton" in contenders:
            runs["fastdit-triton+wtma"] = runs["fastdit-triton"]
        with torch.inference_mode():
            reference = _conv_reference(x, weight)
            candidates = [Candidate(provider, _with_weight_tma(fn) if provider.endswith("+wtma") else fn, flops=flops)
                          for provider, fn in runs.items()]  # fmt: skip
            rows = report.compare(shape, candidates, reference=reference, tolerance=TOLERANCE[dtype],
                                  timing={"budget_s": budget_s})  # fmt: skip
            for provider, row in rows.items():
                if row["status"] != "ok":
                    continue
                ms = row["ms"]
                print(f"  {shape} {provider}: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s", flush=True)
                if provider.startswith("fastdit-") and "+" not in provider:  # the policy picks among backends
                    key = policy_key(cin, cout, (3, 3, 3), (1, 1, 1), 1, dtype)
                    per = totals.setdefault(key, {})
                    per[provider.removeprefix("fastdit-")] = per.get(provider.removeprefix("fastdit-"), 0.0) + ms
        runs.clear()  # free this shape's tensors before the next one

    if args.conv_policy_out:
        _write_policy(args.conv_policy_out, totals, device, report)

    compiled = torch.compile(_wan_norm_silu)
    norm_backends = selectable_backends("rms_norm_silu", {"device": device, "dtype": dtype})
    norm_shapes = (NORM_SHAPES if cuda else CPU_NORM_SHAPES) if "rms_norm_silu" in parts else []
    for channels, frames, height, width in norm_shapes:
        x = torch.randn(1, channels, frames, height, width, generator=gen).to(device, dtype)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        gamma = torch.ones(channels, 1, 1, 1, device=device, dtype=dtype)
        nbytes = 2 * x.numel() * x.element_size()
        shape = f"rms_norm_silu C={channels} T={frames} {height}x{width}"
        runs = {
            "eager": lambda x=x, g=gamma: _wan_norm_silu(x, g),
            "torch.compile": lambda x=x, g=gamma: compiled(x, g),
        }
        for name in norm_backends:
            runs[f"fastdit-{name}"] = lambda n=name, x=x, g=gamma: ops.rms_norm_silu(x, g, backend=n)
        with torch.inference_mode():
            reference = _wan_norm_silu(x.float(), gamma.float())
            candidates = [Candidate(provider, fn, nbytes=nbytes) for provider, fn in runs.items()]
            rows = report.compare(shape, candidates, reference=reference, tolerance=TOLERANCE[dtype],
                                  timing={"budget_s": budget_s}, copy_bytes=nbytes)  # fmt: skip
            for provider, row in rows.items():
                if row["status"] == "ok" and provider != "copy":
                    print(f"  {shape} {provider}: {row['ms']:.3f} ms, {nbytes / row['ms'] / 1e6:.0f} GB/s", flush=True)
    return report
