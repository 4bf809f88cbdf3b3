"""Wan's diffusers-format transformer weights (T2V, and I2V with its image embedder and added key /
value projections) in :class:`fastdit.models.wan.DiT`: the key map, the config, the loader.

Sources: a ``WanTransformer3DModel`` (or any module with ``.config`` and ``.state_dict()``), a
state dict, a ``.safetensors`` file, or a diffusers model directory (``config.json`` plus
``diffusion_pytorch_model.safetensors`` or its sharded index). Files are read in place by
:func:`fastdit.models.weights.assign_from_files`; only safetensors are read, never a pickle.
"""

import os
import re

import torch

from fastdit.models.wan.config import DiTConfig
from fastdit.models.weights import (
    WeightLoadError,
    assign_from_files,
    checkpoint_dtype,
    config_int,
    read_directory,
    safetensors_entries,
    shapes_must_match,
)

# diffusers name -> fastdit name, tried in order (block index captured as \1).
_RENAMES = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_in."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_out."),
    (r"^condition_embedder\.time_proj\.", "time_proj."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_in."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_out."),
    (r"^condition_embedder\.image_embedder\.norm(1|2)\.", r"image_embed.norm\1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "image_embed.ff_in."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "image_embed.ff_out."),
    (r"^patch_embedding\.", "patch_embed."),
    (r"^proj_out\.", "head_proj."),
    (r"^scale_shift_table$", "head_modulation"),
    (r"^blocks\.(\d+)\.attn1\.to_(q|k|v)\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.norm_(q|k)\.weight$", r"blocks.\1.self_attn.\2_norm"),
    (r"^blocks\.(\d+)\.attn2\.to_(q|k|v)\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.norm_(q|k)\.weight$", r"blocks.\1.cross_attn.\2_norm"),
    (r"^blocks\.(\d+)\.attn2\.add_(k|v)_proj\.", r"blocks.\1.cross_attn.add_\2."),
    (r"^blocks\.(\d+)\.attn2\.norm_added_k\.weight$", r"blocks.\1.cross_attn.add_k_norm"),
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
        converted[new] = _fit(new, value)
    return converted, unknown


def config_from_diffusers(cfg: dict) -> DiTConfig:
    """DiTConfig from a diffusers ``WanTransformer3DModel`` config; rejects what fastdit does not run."""
    if cfg.get("pos_embed_seq_len"):
        raise WeightLoadError(
            f"pos_embed_seq_len={cfg['pos_embed_seq_len']}: the first-last-frame (FLF2V) image embedding is not "
            "supported (Wan 2.1 I2V 480P / 720P are)"
        )
    image_dim, added_kv = cfg.get("image_dim"), cfg.get("added_kv_proj_dim")
    for key, value in (("image_dim", image_dim), ("added_kv_proj_dim", added_kv)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise WeightLoadError(f"config.json: {key} must be a positive int or null, got {value!r}")
    if (image_dim is None) != (added_kv is None):
        raise WeightLoadError(f"config.json: image_dim ({image_dim}) and added_kv_proj_dim ({added_kv}) go together")
    qk_norm = cfg.get("qk_norm", "rms_norm_across_heads")
    if qk_norm != "rms_norm_across_heads":
        raise WeightLoadError(f"qk_norm={qk_norm!r} is not supported (only 'rms_norm_across_heads')")
    ints = {"num_attention_heads": 40, "attention_head_dim": 128, "num_layers": 40, "ffn_dim": 13824,
            "in_channels": 16, "text_dim": 4096, "freq_dim": 256}  # fmt: skip
    values = {key: config_int(cfg, key, default, "config.json") for key, default in ints.items()}
    out_channels = values["in_channels"]
    if cfg.get("out_channels") is not None:
        out_channels = config_int(cfg, "out_channels", None, "config.json")
    patch_size = cfg.get("patch_size", (1, 2, 2))
    if not isinstance(out_channels, int) or out_channels < 1:
        raise WeightLoadError(f"config.json: out_channels must be a positive int, got {out_channels!r}")
    if (
        not isinstance(patch_size, (list, tuple))
        or len(patch_size) != 3
        or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in patch_size)
    ):
        raise WeightLoadError(f"config.json: patch_size must be three positive ints, got {patch_size!r}")
    eps = cfg.get("eps", 1e-6)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        raise WeightLoadError(f"config.json: eps must be a positive number, got {eps!r}")
    try:
        return DiTConfig(
            num_heads=values["num_attention_heads"],
            head_dim=values["attention_head_dim"],
            num_layers=values["num_layers"],
            ffn_dim=values["ffn_dim"],
            in_channels=values["in_channels"],
            out_channels=out_channels,
            text_dim=values["text_dim"],
            freq_dim=values["freq_dim"],
            patch_size=tuple(patch_size),
            cross_attn_norm=bool(cfg.get("cross_attn_norm", True)),
            eps=float(eps),
            image_dim=image_dim,
            added_kv_proj_dim=added_kv,
        )
    except ValueError as err:
        raise WeightLoadError(f"config.json: {err}") from err


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
    image = state_dict.get("condition_embedder.image_embedder.norm1.weight")
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
        image_dim=image.shape[0] if image is not None else None,
        added_kv_proj_dim=hidden if image is not None else None,
    )


def _fit(name: str, value: torch.Tensor) -> torch.Tensor:
    """A renamed checkpoint tensor in the module's shape (the patch Conv3d, kernel = stride =
    patch, as a Linear)."""
    if name == "patch_embed.weight" and value.dim() == 5:
        return value.reshape(value.shape[0], -1)
    return value


def load_diffusers_dit(cls, source, *, config: DiTConfig | None = None, backend: str | None = None,
                       dtype: torch.dtype | None = None, device=None):  # fmt: skip
    """Build ``cls`` (a DiT) from diffusers-format weights, in place; raises WeightLoadError on
    any mismatch before a weight is read.

    The model is built on the meta device and every parameter is the checkpoint's tensor itself,
    read from disk straight into its storage one at a time (files) or copied from the given
    tensors (a module or state dict), cast to ``dtype`` (default: the checkpoint's floating dtype
    with the most bytes) and placed on ``device`` (default CPU). No random initialisation, no
    float32 copy: host memory peaks at the model's bytes plus one tensor being converted.
    """
    entries: dict | None = None  # file sources: header entries, read later
    diffusers_config = None
    if isinstance(source, torch.nn.Module):
        diffusers_config = dict(getattr(source, "config", {}) or {})
        tensors = source.state_dict()
    elif isinstance(source, dict):
        tensors = source
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            entries, diffusers_config = read_directory(path)
        elif path.endswith(".safetensors"):
            entries = safetensors_entries(path)
        else:
            raise WeightLoadError(f"{path} is neither a diffusers model directory nor a .safetensors file")
        tensors = {name: entry.meta() for name, entry in entries.items()}
    else:
        raise TypeError(f"source must be a module, a state dict or a path, got {type(source).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")

    if config is None:
        config = config_from_diffusers(diffusers_config) if diffusers_config else _infer_config(tensors)
    if not tensors:
        raise WeightLoadError("the checkpoint holds no tensors")
    converted, unknown = convert_diffusers_state_dict(tensors)
    blocks = {int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))}
    if len(blocks) != config.num_layers:  # before building: a config's num_layers of 1e9 builds nothing
        raise WeightLoadError(
            f"the config says num_layers={config.num_layers}; the checkpoint has {len(blocks)} blocks"
        )
    with torch.device("meta"):  # every shape compared before a byte is allocated (huge dims included)
        model = cls(config, backend=backend)
    shapes_must_match("checkpoint does not match the DiT config", {k: v.shape for k, v in model.state_dict().items()},
                      converted, unknown)  # fmt: skip
    dtype = dtype or checkpoint_dtype(tensors)
    device = torch.device("cpu") if device is None else torch.device(device)
    if entries is None:  # tensors in memory: copied, so the model never shares storage with the source
        copies = {name: value.to(device=device, dtype=dtype, copy=True) for name, value in converted.items()}
        model.load_state_dict(copies, strict=True, assign=True)
    else:
        assign_from_files(model, entries, dtype, device, rename=diffusers_key_to_fastdit, fit=_fit)
    left = [name for name, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if left:
        raise WeightLoadError(f"the checkpoint left {len(left)} tensors unloaded: {left[:20]}")
    return model
