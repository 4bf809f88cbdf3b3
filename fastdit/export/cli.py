"""``fastdit export onnx`` and ``fastdit export tensorrt``."""

import argparse
import importlib.util
import os

from fastdit.runtime.generate import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="format", required=True)
    onnx = sub.add_parser("onnx", help="export the DiT (or the VAE decoder) to ONNX with dynamic sizes")
    onnx.add_argument("--preset", default="tiny", help="tiny | wan2.1-1.3b | wan2.1-14b (random weights)")
    onnx.add_argument("--weights", default=None, help="diffusers Wan 2.1 directory (transformer/, vae/)")
    onnx.add_argument("--vae", action="store_true", help="export the VAE decoder instead of the DiT")
    onnx.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    onnx.add_argument("--out", required=True, help="the .onnx file")
    trt = sub.add_parser("tensorrt", help="build a TensorRT engine from a DiT ONNX graph (needs tensorrt + a GPU)")
    trt.add_argument("--onnx", required=True, help="the DiT .onnx graph from fastdit export onnx")
    trt.add_argument("--out", required=True, help="the .engine file")
    trt.add_argument(
        "--profile",
        action="append",
        required=True,
        help="a size bucket, HEIGHTxWIDTHxFRAMES in pixels (e.g. 480x832x81); repeat for more",
    )
    trt.add_argument("--precision", default="bf16", choices=["fp32", "fp16", "bf16", "fp8"], help="engine precision")
    trt.add_argument("--text-len", type=int, default=512, help="text tokens per sample")
    trt.add_argument("--text-dim", type=int, default=4096, help="text encoder width (UMT5-XXL: 4096)")
    trt.add_argument("--channels", type=int, default=None, help="latent channels (default: the graph's own)")
    trt.add_argument("--weights", default=None,
                     help="the diffusers Wan directory the graph came from: its VAE's ratios size the profiles "
                     "(default: Wan 2.1's 8x spatial, 4x temporal)")  # fmt: skip
    trt.add_argument("--max-batch", type=int, default=2, help="2: a CFG pair")


def _missing_export_extra() -> list[str]:
    return [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]


def run(args) -> str:
    if args.format == "onnx":
        missing = _missing_export_extra()
        if missing:
            raise UsageError(
                f"fastdit export onnx needs the [export] extra ({', '.join(missing)} missing): "
                'pip install "fastdit[export]" (or pip install -e ".[export]" in a checkout)'
            )
        from fastdit.export.onnx import to_onnx
        from fastdit.models import DiT
        from fastdit.models.wan.vae import CausalVAE

        if args.weights:
            folder = os.path.join(args.weights, "vae" if args.vae else "transformer")
            if not os.path.isdir(folder):
                raise UsageError(f"--weights {args.weights} has no {os.path.basename(folder)}/ directory")
            model = CausalVAE.from_diffusers(folder) if args.vae else DiT.from_diffusers(folder)
        elif args.vae:
            model = CausalVAE.from_preset("wan2.1" if args.preset.startswith("wan") else "tiny")
        else:
            model = DiT.from_preset(args.preset)
        path = to_onnx(model.eval(), args.out, opset=args.opset)
        print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB), checked: standard ops TensorRT parses")
        return path
    from fastdit.export.tensorrt import Profile, build_engine, tensorrt_missing

    spatial, temporal = None, None
    if args.weights:
        from fastdit.models import WeightLoadError, open_checkpoint

        try:
            facts = open_checkpoint(args.weights).vae_facts
            spatial, temporal = facts.spatial, facts.temporal
        except WeightLoadError as err:
            raise UsageError(f"--weights: {err}") from None
    try:
        facts = {} if spatial is None else {"spatial": spatial, "temporal": temporal}
        profiles = [Profile.parse(p, **facts) for p in args.profile]
    except ValueError as err:
        raise UsageError(f"--profile: {err}") from None
    missing = tensorrt_missing()
    if missing:
        raise UsageError(f"{missing} (pip install tensorrt on a machine with a GPU)")
    path = build_engine(args.onnx, args.out, profiles, precision=args.precision, latent_channels=args.channels,
                        text_dim=args.text_dim, text_len=args.text_len, max_batch=args.max_batch)  # fmt: skip
    print(f"wrote {path}: {len(profiles)} optimization profiles, {args.precision}")
    return path
