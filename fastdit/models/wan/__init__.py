"""The Wan family (Wan 2.1 T2V / I2V, Wan 2.2 A14B and TI2V-5B, in diffusers format).

``config``: :class:`DiTConfig` and presets; ``block``: the Wan block's math, shared by the DiT,
the ONNX export and the diffusers patch; ``dit``: the packed :class:`DiT`; ``vae``: the causal
:class:`CausalVAE` (Wan 2.1's and Wan 2.2's); ``weights``: diffusers' key map and config;
``checkpoint``: :class:`WanCheckpoint`, a directory read once; ``lora``, ``text_encoder`` (UMT5),
``image_encoder`` (CLIP). :data:`WAN` is the family registered with :mod:`fastdit.models.family`.
"""

import json
import os

from fastdit.models.family import ModelFamily, register_family
from fastdit.models.wan.checkpoint import CLASS_NAMES, SUPPORTED, WanCheckpoint
from fastdit.models.wan.config import PRESETS, DiTConfig, preset
from fastdit.models.wan.dit import DiT
from fastdit.models.wan.vae import VAE_PRESETS, CausalVAE, SpatialTiling, VAEConfig


class WanFamily(ModelFamily):
    name = "wan"
    description = SUPPORTED

    def why_not(self, path: str) -> str | None:
        """transformer/ and vae/ must be present, and transformer/config.json name no other class
        (one written without ``_class_name`` is taken for Wan; its keys are checked when opened)."""
        if not all(os.path.isdir(os.path.join(path, p)) for p in ("transformer", "vae")):
            return "it must hold transformer/ and vae/"
        try:
            with open(os.path.join(path, "transformer", "config.json"), "rb") as f:
                found = json.loads(f.read(1 << 20)).get("_class_name")
        except (OSError, ValueError, AttributeError):
            return None  # unreadable or missing: open() names the problem
        if found not in (None, CLASS_NAMES["transformer"]):
            return f"transformer/ is a {found}, not a {CLASS_NAMES['transformer']}"
        return None

    def open(self, path: str) -> WanCheckpoint:
        return WanCheckpoint.open(path)


WAN = register_family(WanFamily())

__all__ = [
    "PRESETS",
    "VAE_PRESETS",
    "WAN",
    "CausalVAE",
    "DiT",
    "DiTConfig",
    "SpatialTiling",
    "VAEConfig",
    "WanCheckpoint",
    "WanFamily",
    "preset",
]
