"""Loading diffusers-format Wan 2.1 transformer weights into :class:`fastdit.models.DiT`.

Sources: a ``WanTransformer3DModel`` (or any module with ``.config`` and ``.state_dict()``), a
state dict, a ``.safetensors`` file, or a diffusers model directory (``config.json`` plus
``diffusion_pytorch_model.safetensors`` or its sharded index). Only safetensors are read: no
pickle is ever loaded.
"""

import json
import os
import re

import torch
from safetensors.torch import load_file

from fastdit.models.config import DiTConfig


class WeightLoadError(ValueError):
    """The checkpoint does not fit the model: lists missing, unexpected and mis-shaped keys."""


# diffusers name -> fastdit name, tried in order (block index captured as \1).
_RENAMES = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_in."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_out."),
    (r"^condition_embedder\.time_proj\.", "time_proj."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_in."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_out."),
    (r"^patch_embedding\.", "patch_embed."),
    (r"^proj_out\.", "head_proj."),
    (r"^scale_shift_table$", "head_modulation"),
    (r"^blocks\.(\d+)\.attn1\.to_(q|k|v)\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.norm_(q|k)\.weight$", r"blocks.\1.self_attn.\2_norm"),
    (r"^blocks\.(\d+)\.attn2\.to_(q|k|v)\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.norm_(q|k)\.weight$", r"blocks.\1.cross_attn.\2_norm"),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.cross_norm."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn_in."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn_out."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
]


def diffusers_key_to_fastdit(key: str) -> str | None:
    for pattern, replacement in _RENAMES:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    return None


def convert_diffusers_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename diffusers keys to fastdit's; returns (converted, diffusers keys with no fastdit name)."""
    converted, unknown = {}, []
    for key, value in state_dict.items():
        new = diffusers_key_to_fastdit(key)
        if new is None:
            unknown.append(key)
            continue
        if new == "patch_embed.weight" and value.dim() == 5:
            value = value.reshape(value.shape[0], -1)  # Conv3d(kernel = stride = patch) -> Linear
        converted[new] = value
    return converted, unknown


def config_from_diffusers(cfg: dict) -> DiTConfig:
    """DiTConfig from a diffusers ``WanTransformer3DModel`` config; rejects what fastdit does not run."""
    unsupported = {k: cfg.get(k) for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len") if cfg.get(k)}
    if unsupported:
        raise WeightLoadError(f"image-conditioned (I2V) Wan transformers are not supported yet: {unsupported}")
    qk_norm = cfg.get("qk_norm", "rms_norm_across_heads")
    if qk_norm != "rms_norm_across_heads":
        raise WeightLoadError(f"qk_norm={qk_norm!r} is not supported (only 'rms_norm_across_heads')")
    return DiTConfig(
        num_heads=cfg.get("num_attention_heads", 40),
        head_dim=cfg.get("attention_head_dim", 128),
        num_layers=cfg.get("num_layers", 40),
        ffn_dim=cfg.get("ffn_dim", 13824),
        in_channels=cfg.get("in_channels", 16),
        out_channels=cfg.get("out_channels") or cfg.get("in_channels", 16),
        text_dim=cfg.get("text_dim", 4096),
        freq_dim=cfg.get("freq_dim", 256),
        patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
        cross_attn_norm=cfg.get("cross_attn_norm", True),
        eps=cfg.get("eps", 1e-6),
    )


def _infer_config(state_dict: dict[str, torch.Tensor]) -> DiTConfig:
    """Config from tensor shapes; the head count is not in the shapes, so head_dim 128 is assumed."""
    try:
        patch = state_dict["patch_embedding.weight"]
        hidden, in_channels = patch.shape[:2]
        layers = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
        patch_size = tuple(patch.shape[2:])
        out_features = state_dict["proj_out.weight"].shape[0]
    except (KeyError, ValueError) as err:
        raise WeightLoadError(f"cannot infer a DiT config from this state dict ({err}); pass config=") from err
    if hidden % 128:
        raise WeightLoadError(f"hidden size {hidden} is not a multiple of 128; pass config= with the head count")
    volume = patch_size[0] * patch_size[1] * patch_size[2]
    return DiTConfig(
        num_heads=hidden // 128,
        head_dim=128,
        num_layers=layers,
        ffn_dim=state_dict["blocks.0.ffn.net.0.proj.weight"].shape[0],
        in_channels=in_channels,
        out_channels=out_features // volume,
        text_dim=state_dict["condition_embedder.text_embedder.linear_1.weight"].shape[1],
        freq_dim=state_dict["condition_embedder.time_embedder.linear_1.weight"].shape[1],
        patch_size=patch_size,
        cross_attn_norm="blocks.0.norm2.weight" in state_dict,
    )


def _read_directory(path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    config = None
    config_path = os.path.join(path, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
    index = os.path.join(path, "diffusion_pytorch_model.safetensors.index.json")
    single = os.path.join(path, "diffusion_pytorch_model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state_dict = {}
        for shard in shards:
            state_dict.update(load_file(os.path.join(path, shard)))
        return state_dict, config
    if os.path.exists(single):
        return load_file(single), config
    raise WeightLoadError(
        f"{path} has neither diffusion_pytorch_model.safetensors nor its .index.json "
        "(only safetensors are loaded, never pickled .bin files)"
    )


def load_diffusers_dit(cls, source, *, config: DiTConfig | None = None, backend: str | None = None):
    """Build ``cls`` (a DiT) from diffusers-format weights; raises WeightLoadError on any mismatch."""
    diffusers_config = None
    if isinstance(source, torch.nn.Module):
        diffusers_config = dict(getattr(source, "config", {}) or {})
        state_dict = source.state_dict()
    elif isinstance(source, dict):
        state_dict = source
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            state_dict, diffusers_config = _read_directory(path)
        elif path.endswith(".safetensors"):
            state_dict = load_file(path)
        else:
            raise WeightLoadError(f"{path} is neither a diffusers model directory nor a .safetensors file")
    else:
        raise TypeError(f"source must be a module, a state dict or a path, got {type(source).__name__}")

    if config is None:
        config = config_from_diffusers(diffusers_config) if diffusers_config else _infer_config(state_dict)
    converted, unknown = convert_diffusers_state_dict(state_dict)
    model = cls(config, backend=backend)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if k in expected and v.shape != expected[k].shape
    )
    unexpected = sorted(unknown + [k for k in converted if k not in expected])
    if missing or unexpected or mis_shaped:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if mis_shaped:
            parts.append(f"shape mismatches ({len(mis_shaped)}): {mis_shaped}")
        raise WeightLoadError("checkpoint does not match the DiT config: " + "; ".join(parts))
    dtype = next(iter(converted.values())).dtype
    model.load_state_dict(converted, strict=True)
    return model.to(dtype)
