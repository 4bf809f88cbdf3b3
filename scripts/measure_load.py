"""How much host memory and time loading a DiT checkpoint takes: fastdit's in-place load against
diffusers' ``from_pretrained``, each in a fresh process, on a synthetic checkpoint of a real
model's shapes (random bf16 weights, diffusers' names and sharding).

    python scripts/measure_load.py [--preset wan2.1-1.3b] [--shards 2] [--dir DIR] [--keep]

Peak memory is sampled every 2 ms from ``/proc/self/status`` while the checkpoint loads and every
weight is then read once (as a first forward would: diffusers maps the shards and reads their
pages lazily; fastdit reads each tensor into its own storage): the peak resident set above its
value after the imports, and its anonymous and file-backed parts (file pages are page cache the
kernel can reclaim). One row per loader, with the ratio to the checkpoint's bytes.
"""

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, threading, time
import torch
which, path = sys.argv[1], sys.argv[2]
if which == "fastdit":
    from fastdit.models import DiT
    load = lambda: DiT.from_diffusers(path, dtype=torch.bfloat16)
else:
    from diffusers import WanTransformer3DModel
    load = lambda: WanTransformer3DModel.from_pretrained(path, torch_dtype=torch.bfloat16)

def status():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return fields

base, peak, done = status(), {}, False
def sample():
    while not done:
        for key, value in status().items():
            peak[key] = max(peak.get(key, 0), value)
        time.sleep(0.002)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.perf_counter()
model = load()
wall = time.perf_counter() - start
with torch.no_grad():  # read every weight once, as the first forward does (maps in lazily mapped pages)
    touched = sum(float(p.float().sum()) for p in model.parameters())
ready = time.perf_counter() - start
done = True
thread.join()
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"wall_s": wall, "ready_s": ready, "param_bytes": params,
                  **{k: peak[k] - base[k] for k in ("VmRSS", "RssAnon", "RssFile")}}))
"""


def write_checkpoint(directory: str, preset: str, shards: int, layers: int | None = None) -> int:
    """A diffusers Wan transformer directory with random bf16 weights: returns its tensor bytes."""
    import torch
    from safetensors.torch import save_file

    from fastdit.models.wan.config import preset as get_preset

    cfg = get_preset(preset)
    if layers is not None:  # a smaller model of the same widths (tests)
        cfg = dataclasses.replace(cfg, num_layers=layers)
    config = {"_class_name": "WanTransformer3DModel", "patch_size": list(cfg.patch_size),
              "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim,
              "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "text_dim": cfg.text_dim,
              "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers,
              "cross_attn_norm": cfg.cross_attn_norm, "qk_norm": "rms_norm_across_heads", "eps": cfg.eps,
              "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024}  # fmt: skip
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
        shapes = {k: v.shape for k, v in model.state_dict().items()}
    names = sorted(shapes)
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    per_shard, weight_map, shard, size = total / shards, {}, {}, 0
    index = 1

    def flush():
        nonlocal shard, size, index
        file = f"diffusion_pytorch_model-{index:05d}-of-{shards:05d}.safetensors"
        save_file(shard, os.path.join(directory, file))
        weight_map.update(dict.fromkeys(shard, file))
        shard, size, index = {}, 0, index + 1

    gen = torch.Generator().manual_seed(0)
    for name in names:
        shard[name] = (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size >= per_shard and index < shards:
            flush()
    flush()
    with open(os.path.join(directory, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="wan2.1-1.3b")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--layers", type=int, default=None, help="override the preset's block count")
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--loaders", default="fastdit,diffusers")
    parser.add_argument("--reuse", action="store_true", help="measure the checkpoint already in --dir")
    args = parser.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="fastdit-load-")
    try:
        if args.reuse:
            with open(os.path.join(directory, "diffusion_pytorch_model.safetensors.index.json")) as f:
                total = json.load(f)["metadata"]["total_size"]
        else:
            total = write_checkpoint(directory, args.preset, args.shards, args.layers)
        print(f"checkpoint: {args.preset}, {total / 1e9:.2f} GB bf16 in {args.shards} shards at {directory}")
        print(
            "| load | wall (then every weight read once) | peak RSS above imports (anonymous + file pages) | "
            "x checkpoint bytes |"
        )
        print("|---|---|---|---|")
        for which in args.loaders.split(","):
            out = subprocess.run([sys.executable, "-c", CHILD, which, directory], capture_output=True, text=True)
            if out.returncode:
                print(f"| {which} | failed: {out.stderr.strip().splitlines()[-1]} | | |")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            peak, anon, file = row["VmRSS"], row["RssAnon"], row["RssFile"]
            memory = f"+{peak / 1e9:.2f} GB ({anon / 1e9:.2f} + {file / 1e9:.2f})"
            print(f"| {which} | {row['wall_s']:.1f} s ({row['ready_s']:.1f} s) | {memory} | {peak / total:.2f}x |")
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
