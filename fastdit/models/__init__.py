"""Models built on fastdit.ops: the Wan 2.1 DiT and causal VAE, configs and presets, packed batches, weights."""

from fastdit.models.config import PRESETS, DiTConfig, preset
from fastdit.models.dit import DiT
from fastdit.models.packing import PackedBatch, patchify, unpatchify
from fastdit.models.vae import CausalVAE, SpatialTiling, VAEConfig
from fastdit.models.weights import WeightLoadError

__all__ = [
    "CausalVAE",
    "SpatialTiling",
    "DiT",
    "DiTConfig",
    "PRESETS",
    "PackedBatch",
    "VAEConfig",
    "WeightLoadError",
    "patchify",
    "preset",
    "unpatchify",
]
