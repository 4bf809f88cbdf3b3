"""Reading checkpoints, for every model family: safetensors files (headers checked before a byte of
data is read; never a pickle), diffusers model directories (single file or sharded index,
including the Hugging Face cache's symlinked snapshots), and loading in place: a module built on
the meta device gets each tensor read from disk straight into its own storage, in the target
dtype and on the target device, shard by shard (docs/design.md, "Loading in place").

A family's own key map and config parsing live in its package (``fastdit/models/wan/weights.py``).
"""

import functools
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


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


def read_directory(path: str) -> tuple[dict[str, TensorEntry], dict | None]:
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


def checkpoint_dtype(tensors: dict) -> torch.dtype:
    """The dtype a checkpoint is loaded in by default: its floating dtype holding the most bytes."""
    totals: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.dtype.is_floating_point:
            totals[t.dtype] = totals.get(t.dtype, 0) + t.numel() * t.element_size()
    return max(totals, key=totals.get) if totals else torch.float32


def assign_from_files(module: torch.nn.Module, entries: dict[str, TensorEntry], dtype, device,
                      rename: Callable[[str], str] = str,
                      fit: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:  # fmt: skip
    """Read every entry (shard by shard, in file order) into the meta-built ``module``: the tensor
    named ``rename(entry.name)`` becomes a new parameter (or buffer) holding the file's data cast
    to ``dtype`` (floating tensors only) on ``device``; ``fit(name, value)`` may reshape it to the
    module's layout first. Each value is read once, into its own storage; nothing else is kept."""
    by_file: dict[str, list[TensorEntry]] = {}
    for entry in entries.values():
        by_file.setdefault(entry.path, []).append(entry)
    for path, shard in sorted(by_file.items()):
        fd = os.open(path, os.O_RDONLY)
        try:  # reads release the GIL: a few threads keep the disk (or page cache copy) busy
            with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
                shard = sorted(shard, key=lambda e: e.start)
                read = functools.partial(_read_as, fd, dtype=dtype, device=device)
                for entry, value in zip(shard, pool.map(read, shard)):
                    name = rename(entry.name)
                    module_name, _, leaf = name.rpartition(".")
                    owner = module.get_submodule(module_name)
                    value = fit(name, value) if fit is not None else value
                    old = getattr(owner, leaf)
                    if leaf in owner._buffers:
                        owner._buffers[leaf] = value
                    else:
                        setattr(owner, leaf, torch.nn.Parameter(value, requires_grad=old.requires_grad))
        finally:
            os.close(fd)


def _read_as(fd: int, entry: TensorEntry, dtype, device) -> torch.Tensor:
    """An entry read in ``dtype`` when it is floating (integer tensors keep theirs)."""
    return read_entry(fd, entry, dtype=dtype if entry.dtype.is_floating_point else None, device=device)
