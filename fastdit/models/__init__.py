"""Models built on fastdit.ops, one package per family (``fastdit.models.wan``), and what every
family shares: the packed batch (``packing``), checkpoint reading and loading in place
(``weights``), and the family interface and registry (``family``: :func:`open_checkpoint`).

The Wan family's classes are re-exported here (``fastdit.models.DiT`` is Wan's DiT)."""

from fastdit.models.family import (
    FamilyCheckpoint,
    ModelFamily,
    SequenceParallelPlan,
    UnknownCheckpointError,
    VAEFacts,
    families,
    open_checkpoint,
    register_family,
)
from fastdit.models.packing import PackedBatch, patchify, unpatchify
from fastdit.models.wan import PRESETS, CausalVAE, DiT, DiTConfig, SpatialTiling, VAEConfig, WanCheckpoint, preset
from fastdit.models.weights import WeightLoadError

__all__ = [
    "PRESETS",
    "CausalVAE",
    "DiT",
    "DiTConfig",
    "FamilyCheckpoint",
    "ModelFamily",
    "PackedBatch",
    "SequenceParallelPlan",
    "SpatialTiling",
    "UnknownCheckpointError",
    "VAEConfig",
    "VAEFacts",
    "WanCheckpoint",
    "WeightLoadError",
    "families",
    "open_checkpoint",
    "patchify",
    "preset",
    "register_family",
    "unpatchify",
]
