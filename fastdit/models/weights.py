"""Loading diffusers-format Wan 2.1 transformer weights (T2V, and I2V with its image embedder and
added key / value projections) into :class:`fastdit.models.DiT`.

Sources: a ``WanTransformer3DModel`` (or any module with ``.config`` and ``.state_dict()``), a
state dict, a ``.safetensors`` file, or a diffusers model directory (``config.json`` plus
``diffusion_pytorch_model.safetensors`` or its sharded index). Only safetensors are read: no
pickle is ever loaded.
"""

import json
import os
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fastdit.models.config import DiTConfig


class WeightLoadError(ValueError):
    """A checkpoint that cannot be read or does not fit the model: names the file and what is
    wrong, or lists missing, unexpected and mis-shaped keys."""


_PICKLE_MAGICS = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a bare pickle stream


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or a :class:`WeightLoadError` that names the file
    and what is wrong with it (missing, too short, truncated, a pickle, a corrupt header)."""
    if not os.path.isfile(path):
        raise WeightLoadError(f"{path}: no such file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = f.read(9)
    head = start[:8]
    # The JSON header opens at byte 8; the first 8 bytes are its length, whose low byte may well
    # be 0x80 (a pickle's first byte), so only a file without that "{" is taken for a pickle.
    if start[8:9] != b"{" and head.startswith(_PICKLE_MAGICS):
        raise WeightLoadError(
            f"{path}: this is a pickled PyTorch checkpoint (torch.save), not safetensors; fastdit never unpickles. "
            "Convert it once where you trust it: safetensors.torch.save_file(torch.load(f), 'model.safetensors')"
        )
    if size < 8:
        raise WeightLoadError(f"{path}: {size} bytes is too short for a safetensors file (an 8-byte header length)")
    header_len = int.from_bytes(head, "little")
    if header_len > size - 8:
        raise WeightLoadError(
            f"{path}: its header claims {header_len} bytes but the file has {size}: truncated or not a safetensors file"
        )
    try:
        return load_file(path)
    except (SafetensorError, ValueError, OSError) as err:
        raise WeightLoadError(f"{path}: not a valid safetensors file ({err})") from err


def read_json(path: str) -> dict:
    """A JSON object from ``path``, or a :class:`WeightLoadError` naming the file and the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightLoadError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(value, dict):
        raise WeightLoadError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def config_int(cfg: dict, key: str, default, where: str, *, minimum: int = 1, maximum: int = 1 << 20):
    """``cfg[key]`` (or ``default``) as an int in [minimum, maximum], or a :class:`WeightLoadError`
    naming ``where`` and the key: a string ("16"), a float, a bool or a size no model has (the
    bound stops a 1e9 from building anything) is refused, never converted."""
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise WeightLoadError(f"{where}: {key} must be an int in [{minimum}, {maximum}], got {value!r}")
    return value


def shapes_must_match(what: str, expected: dict[str, torch.Size], found: dict[str, torch.Tensor],
                      unknown: list[str] = ()) -> None:  # fmt: skip
    """A :class:`WeightLoadError` listing missing, unexpected and mis-shaped keys, if any."""
    missing = sorted(set(expected) - set(found))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k])}"
        for k, v in found.items()
        if k in expected and tuple(v.shape) != tuple(expected[k])
    )
    unexpected = sorted(list(unknown) + [k for k in found if k not in expected])
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {missing[:20]}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}")
    if mis_shaped:
        parts.append(f"shape mismatches ({len(mis_shaped)}): {mis_shaped[:20]}")
    if parts:
        raise WeightLoadError(f"{what}: " + "; ".join(parts))


def _hub_blobs(root: str) -> str | None:
    """The ``blobs/`` folder of the Hugging Face cache repository that ``root`` (a real path) is a
    snapshot of (``<repo>/snapshots/<revision>[/subfolder]``), or None outside such a layout."""
    parts = root.split(os.sep)
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots":
            repo = os.sep.join(parts[:i]) or os.sep
            blobs = os.path.join(repo, "blobs")
            return blobs if os.path.isdir(blobs) else None
    return None


def shard_path(directory: str, shard: object, index: str) -> str:
    """A sharded index's file name, resolved inside ``directory``: an absolute path or one that
    climbs out (``../x.safetensors``, a symlink elsewhere) is refused, never read. The one place a
    symlink may point is the Hugging Face cache's own layout: a file of ``snapshots/<rev>/`` that
    links into the same repository's ``blobs/``."""
    if not isinstance(shard, str) or not shard:
        raise WeightLoadError(f"{index}: weight_map values must be file names, got {shard!r}")
    root = os.path.realpath(directory)
    lexical = os.path.normpath(os.path.join(root, shard))
    if os.path.isabs(shard) or os.path.commonpath([root, lexical]) != root:
        raise WeightLoadError(f"{index}: shard {shard!r} is outside the model directory {directory}")
    resolved = os.path.realpath(lexical)
    allowed = [root] + [b for b in [_hub_blobs(root)] if b is not None]
    if not any(os.path.commonpath([a, resolved]) == a for a in allowed):
        raise WeightLoadError(f"{index}: shard {shard!r} links outside the model directory {directory} ({resolved})")
    return resolved


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
        if new == "patch_embed.weight" and value.dim() == 5:
            value = value.reshape(value.shape[0], -1)  # Conv3d(kernel = stride = patch) -> Linear
        converted[new] = value
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


def _read_directory(path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    config = None
    config_path = os.path.join(path, "config.json")
    if os.path.exists(config_path):
        config = read_json(config_path)
    index = os.path.join(path, "diffusion_pytorch_model.safetensors.index.json")
    single = os.path.join(path, "diffusion_pytorch_model.safetensors")
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightLoadError(f"{index}: needs a non-empty 'weight_map' object (tensor name -> shard file)")
        state_dict = {}
        for shard in sorted({shard_path(path, name, index) for name in weight_map.values()}):
            state_dict.update(read_safetensors(shard))
        return state_dict, config
    if os.path.exists(single):
        return read_safetensors(single), config
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
            state_dict = read_safetensors(path)
        else:
            raise WeightLoadError(f"{path} is neither a diffusers model directory nor a .safetensors file")
    else:
        raise TypeError(f"source must be a module, a state dict or a path, got {type(source).__name__}")

    if config is None:
        config = config_from_diffusers(diffusers_config) if diffusers_config else _infer_config(state_dict)
    if not state_dict:
        raise WeightLoadError("the checkpoint holds no tensors")
    converted, unknown = convert_diffusers_state_dict(state_dict)
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    if len(blocks) != config.num_layers:  # before building: a config's num_layers of 1e9 builds nothing
        raise WeightLoadError(
            f"the config says num_layers={config.num_layers}; the checkpoint has {len(blocks)} blocks"
        )
    with torch.device("meta"):  # every shape compared before a byte is allocated (huge dims included)
        expected = {k: v.shape for k, v in cls(config, backend=backend).state_dict().items()}
    shapes_must_match("checkpoint does not match the DiT config", expected, converted, unknown)
    dtype = next(iter(converted.values())).dtype
    model = cls(config, backend=backend)
    model.load_state_dict(converted, strict=True)
    return model.to(dtype)
