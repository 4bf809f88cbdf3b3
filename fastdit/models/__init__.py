"""Models built on fastdit.ops: the Wan 2.1 DiT, its config and presets, packed batches, weight loading."""

from fastdit.models.config import PRESETS, DiTConfig, preset
from fastdit.models.dit import DiT
from fastdit.models.packing import PackedBatch, patchify, unpatchify
from fastdit.models.weights import WeightLoadError

__all__ = ["DiT", "DiTConfig", "PRESETS", "PackedBatch", "WeightLoadError", "patchify", "preset", "unpatchify"]
