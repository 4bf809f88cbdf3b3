"""DiT.from_diffusers loads in place: built on the meta device, each weight read from its
safetensors file straight into its own storage, in the dtype and on the device asked for; every
header is checked before a byte of data is read."""

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from fastdit.models import DiT, WeightLoadError
from fastdit.models.wan.weights import convert_diffusers_state_dict
from fastdit.models.weights import safetensors_entries

pytest.importorskip("diffusers", reason="writing diffusers checkpoints needs `pip install -e .[diffusers]`")

from tests.models.test_dit_diffusers_parity import make_wan  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _checkpoint(path, dtype=torch.bfloat16):
    torch.manual_seed(0)
    wan = make_wan().to(dtype)
    wan.save_pretrained(path, safe_serialization=True, max_shard_size="20KB")
    return wan


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_in_place_load_is_the_checkpoint_bit_for_bit(tmp_path, dtype):
    """Catches a weight read from the wrong byte range or shard, the patch conv not reshaped, a
    dtype cast that rounds (bf16 -> fp32 must be exact), or a random init left in a parameter."""
    wan = _checkpoint(tmp_path)
    model = DiT.from_diffusers(str(tmp_path), dtype=dtype)
    want, _ = convert_diffusers_state_dict(wan.state_dict())
    for name, value in model.state_dict().items():
        assert value.dtype == (dtype or torch.bfloat16), name
        assert torch.equal(value, want[name].to(value.dtype)), name
    assert all(p.requires_grad for p in model.parameters())


def test_a_module_source_shares_no_storage_with_the_model():
    """Catches the in-place load aliasing a diffusers module's tensors: a LoRA fused into the
    fastdit model would then change the diffusers model too."""
    wan = make_wan()
    model = DiT.from_diffusers(wan)
    before = wan.blocks[0].attn1.to_q.weight.clone()
    with torch.no_grad():
        model.blocks[0].self_attn.q.weight.add_(1.0)
    assert torch.equal(wan.blocks[0].attn1.to_q.weight, before)


def test_peak_host_memory_is_the_checkpoint_once(tmp_path):
    """Issue 28's measure on a 2-block Wan 2.1 1.3B-wide checkpoint (~0.3 GB bf16, 2 shards), in a
    fresh process: peak resident memory above the imports <= 1.3x the checkpoint's bytes (the old
    loader took 3-4x: a random fp32 model, the file, then a bf16 copy). Catches any second copy."""
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "measure_load.py"), "--layers", "2", "--loaders", "fastdit",
         "--dir", str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    row = next(line for line in out.stdout.splitlines() if line.startswith("| fastdit"))
    ratio = float(row.rstrip(" |").rsplit("|", 1)[-1].strip().rstrip("x"))
    assert ratio <= 1.3, out.stdout


def _raw_safetensors(path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)
    return str(path)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "header, data, message",
    [
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
            "overlap",
        ),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), "claims bytes"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "claims bytes"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "'Q4'"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "claims bytes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), "claims bytes"),
        ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "data_offsets"),
        (["not", "an", "object"], b"", "not a JSON object"),
    ],
)
def test_bad_headers_are_refused_before_any_data_is_read(tmp_path, header, data, message):
    """Catches a header that would send a read outside the file, into another tensor's bytes, or
    into a buffer of the wrong size (the reader trusts the offsets it checked)."""
    path = _raw_safetensors(tmp_path / "x.safetensors", header, data)
    with pytest.raises(WeightLoadError, match=message) as info:
        safetensors_entries(path)
    assert "x.safetensors" in str(info.value)


@pytest.mark.bad_input
def test_a_tensor_in_two_shards_is_refused(tmp_path):
    """Catches a sharded checkpoint whose shards disagree silently resolving to the last one read."""
    wan = _checkpoint(tmp_path)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    name = next(k for k, v in index["weight_map"].items() if v == first)
    other = sorted(set(index["weight_map"].values()))[1]
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / other)
    tensors[name] = wan.state_dict()[name].contiguous()
    save_file(tensors, tmp_path / other)
    with pytest.raises(WeightLoadError, match=f"tensor '{name}' is in two shards"):
        DiT.from_diffusers(str(tmp_path))


@pytest.mark.bad_input
def test_a_shard_cut_after_its_header_was_read_is_named(tmp_path):
    """Catches a short read (a file truncated between the header check and the data) filling a
    weight with uninitialised memory."""
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(64.0)}, path)
    (entry,) = safetensors_entries(str(path)).values()
    os.truncate(path, os.path.getsize(path) - 16)
    from fastdit.models.weights import read_entry

    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(WeightLoadError, match="cut short"):
            read_entry(fd, entry)
    finally:
        os.close(fd)


@pytest.mark.bad_input
def test_a_dtype_that_is_not_floating_is_refused(tmp_path):
    _checkpoint(tmp_path)
    with pytest.raises(TypeError, match="floating torch.dtype"):
        DiT.from_diffusers(str(tmp_path), dtype=torch.int8)
