"""Loading diffusers-format Wan 2.1 transformer weights (T2V, and I2V with its image embedder and
added key / value projections) into :class:`fastdit.models.DiT`.

Sources: a ``WanTransformer3DModel`` (or any module with ``.config`` and ``.state_dict()``), a
state dict, a ``.safetensors`` file, or a diffusers model directory (``config.json`` plus
``diffusion_pytorch_model.safetensors`` or its sharded index). Only safetensors are read: no
pickle is ever loaded.
"""

import functools
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fastdit.models.config import DiTConfig


class WeightLoadError(ValueError):
    """A checkpoint that cannot be read or does not fit the model: names the file and what is
    wrong, or lists missing, unexpected and mis-shaped keys."""


_PICKLE_MAGICS = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a bare pickle stream


def _header_length(path: str) -> int:
    """The JSON header's length of the safetensors file at ``path``, or a :class:`WeightLoadError`
    that names the file and what is wrong with it (missing, too short, truncated, a pickle)."""
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
    return header_len


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or a :class:`WeightLoadError` that names the file
    and what is wrong with it (missing, too short, truncated, a pickle, a corrupt header)."""
    _header_length(path)
    try:
        return load_file(path)
    except (SafetensorError, ValueError, OSError) as err:
        raise WeightLoadError(f"{path}: not a valid safetensors file ({err})") from err


# safetensors' dtype names (the format's spec) -> torch dtypes
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


READ_THREADS = 4  # concurrent tensor reads while loading a checkpoint


class TensorEntry:
    """One tensor of a safetensors file, not read yet: its file, dtype, shape and byte range."""

    __slots__ = ("path", "name", "dtype", "shape", "start", "end")

    def __init__(self, path, name, dtype, shape, start, end):
        self.path, self.name, self.dtype, self.shape, self.start, self.end = path, name, dtype, shape, start, end

    def meta(self) -> torch.Tensor:
        """A meta tensor of this shape and dtype: what config inference and the shape check read."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


def safetensors_entries(path: str) -> dict[str, TensorEntry]:
    """The tensors a ``.safetensors`` file holds, from its header alone (no tensor is read): the
    same refusals as :func:`read_safetensors`, plus any entry whose byte range is outside the
    file, overlaps another or does not hold its shape x dtype."""
    header_len, size = _header_length(path), os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(8)
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise WeightLoadError(f"{path}: not a valid safetensors file (header: {err})") from err
    if not isinstance(header, dict):
        raise WeightLoadError(f"{path}: not a valid safetensors file (its header is not a JSON object)")
    data_start, entries, ranges = 8 + header_len, {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise WeightLoadError(f"{path}: not a valid safetensors file (tensor {name!r}: {err!r})") from err
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != nbytes or data_start + end > size:
            raise WeightLoadError(f"{path}: not a valid safetensors file (tensor {name!r}, {info.get('dtype')} "
                                  f"{list(shape)}, claims bytes [{begin}, {end}) of a {size - data_start}-byte data "
                                  "section)")  # fmt: skip
        entries[name] = TensorEntry(path, name, dtype, shape, data_start + begin, data_start + end)
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(ranges, ranges[1:]):
        if begin_b < end_a:
            raise WeightLoadError(f"{path}: not a valid safetensors file (tensors {a!r} and {b!r} overlap)")
    return entries


def read_entry(fd: int, entry: TensorEntry, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """``entry``'s tensor read from the file descriptor ``fd`` (positional reads: threads may
    share it) straight into its own storage (no memory map, no second copy), then cast to
    ``dtype`` / moved to ``device`` if given: the host holds this one tensor twice at most while
    it converts."""
    out = torch.empty(entry.shape, dtype=entry.dtype)
    view, offset = memoryview(out.view(-1).view(torch.uint8).numpy()), entry.start
    while len(view):
        count = os.preadv(fd, [view], offset)
        if count <= 0:
            raise WeightLoadError(f"{entry.path}: tensor {entry.name!r} is cut short (the file changed while read?)")
        view, offset = view[count:], offset + count
    return out.to(device=device, dtype=dtype) if (dtype or device) is not None else out


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


def _read_directory(path: str) -> tuple[dict[str, TensorEntry], dict | None]:
    """The tensors of a diffusers model directory (single file or sharded index) as header
    entries, not read yet, and its config.json (None when absent)."""
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
        entries = {}
        for shard in sorted({shard_path(path, name, index) for name in weight_map.values()}):
            for name, entry in safetensors_entries(shard).items():
                if name in entries:
                    raise WeightLoadError(f"{index}: tensor {name!r} is in two shards ({entries[name].path}, {shard})")
                entries[name] = entry
        return entries, config
    if os.path.exists(single):
        return safetensors_entries(single), config
    raise WeightLoadError(
        f"{path} has neither diffusion_pytorch_model.safetensors nor its .index.json "
        "(only safetensors are loaded, never pickled .bin files)"
    )


def _checkpoint_dtype(tensors: dict) -> torch.dtype:
    """The dtype a checkpoint is loaded in by default: its floating dtype holding the most bytes."""
    totals: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.dtype.is_floating_point:
            totals[t.dtype] = totals.get(t.dtype, 0) + t.numel() * t.element_size()
    return max(totals, key=totals.get) if totals else torch.float32


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
            entries, diffusers_config = _read_directory(path)
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
    dtype = dtype or _checkpoint_dtype(tensors)
    device = torch.device("cpu") if device is None else torch.device(device)
    if entries is None:  # tensors in memory: copied, so the model never shares storage with the source
        copies = {name: value.to(device=device, dtype=dtype, copy=True) for name, value in converted.items()}
        model.load_state_dict(copies, strict=True, assign=True)
    else:
        _assign_from_files(model, entries, dtype, device)
    left = [name for name, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if left:
        raise WeightLoadError(f"the checkpoint left {len(left)} tensors unloaded: {left[:20]}")
    return model


def _assign_from_files(model, entries: dict[str, TensorEntry], dtype, device) -> None:
    """Read every entry (shard by shard, in file order) into the meta-built model's parameters."""
    by_file: dict[str, list[TensorEntry]] = {}
    for entry in entries.values():
        by_file.setdefault(entry.path, []).append(entry)
    for path, shard in sorted(by_file.items()):
        fd = os.open(path, os.O_RDONLY)
        try:  # reads release the GIL: a few threads keep the disk (or page cache copy) busy
            with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
                shard = sorted(shard, key=lambda e: e.start)
                read = functools.partial(read_entry, fd, dtype=dtype, device=device)
                for entry, value in zip(shard, pool.map(read, shard)):
                    name = diffusers_key_to_fastdit(entry.name)
                    module_name, _, leaf = name.rpartition(".")
                    module = model.get_submodule(module_name)
                    old = getattr(module, leaf)
                    setattr(module, leaf, torch.nn.Parameter(_fit(name, value), requires_grad=old.requires_grad))
        finally:
            os.close(fd)
