"""A Wan checkpoint directory, read once: every fact its consumers need, from its own files.

``WanCheckpoint.open(path)`` reads ``model_index.json`` (when present) and the ``config.json`` of
``transformer/``, ``transformer_2/`` and ``vae/`` once; the runtime, export and the loaders then
ask it (the VAE's spatial and temporal ratios and latent channels, the DiT's text width and
image conditioning, the two-expert boundary) instead of re-reading files or assuming Wan 2.1's
numbers. A directory that is not a Wan checkpoint in diffusers format gets a named error listing
what fastdit runs. It is the Wan family's :class:`fastdit.models.family.FamilyCheckpoint`.
"""

import os
from dataclasses import dataclass, field

from fastdit.models.family import FamilyCheckpoint, UnknownCheckpointError, VAEFacts
from fastdit.models.weights import WeightLoadError, config_int, read_json

SUPPORTED = "Wan 2.1 / 2.2 in diffusers format (transformer/ WanTransformer3DModel, vae/ AutoencoderKLWan)"
PARTS = ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "image_encoder", "image_processor")
CLASS_NAMES = {"transformer": "WanTransformer3DModel", "transformer_2": "WanTransformer3DModel",
               "vae": "AutoencoderKLWan"}  # fmt: skip

__all__ = ["CLASS_NAMES", "PARTS", "SUPPORTED", "UnknownCheckpointError", "WanCheckpoint"]


@dataclass(frozen=True)
class WanCheckpoint(FamilyCheckpoint):
    path: str
    parts: tuple[str, ...]  # the sub-folders present, of PARTS
    transformer: dict  # transformer/config.json
    vae: dict  # vae/config.json
    transformer_2: dict | None = None  # Wan 2.2 A14B's low-noise expert ({}: present, config not found)
    model_index: dict = field(default_factory=dict)  # model_index.json ({} when absent)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "WanCheckpoint":
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise WeightLoadError(f"{path}: no such directory")
        parts = tuple(p for p in PARTS if os.path.isdir(os.path.join(path, p)))
        if "transformer" not in parts or "vae" not in parts:
            raise UnknownCheckpointError(f"{path} must hold transformer/ and vae/: fastdit runs {SUPPORTED}")
        configs = {p: read_json(os.path.join(path, p, "config.json")) for p in ("transformer", "vae")}
        second = os.path.join(path, "transformer_2", "config.json")
        if "transformer_2" in parts:  # its config is read when needed (a missing one is named then)
            configs["transformer_2"] = read_json(second) if os.path.exists(second) else {}
        for part, expected in CLASS_NAMES.items():
            found = configs.get(part, {}).get("_class_name")
            if found is not None and found != expected:
                raise UnknownCheckpointError(f"{path}/{part} is a {found}, not a {expected}: fastdit runs {SUPPORTED}")
        index = os.path.join(path, "model_index.json")
        return cls(path, parts, configs["transformer"], configs["vae"], configs.get("transformer_2"),
                   read_json(index) if os.path.exists(index) else {})  # fmt: skip

    @property
    def family(self):
        from fastdit.models.wan import WAN

        return WAN

    # ---- the DiT -----------------------------------------------------------------------------------

    def _dit_int(self, key: str, default):
        return config_int(self.transformer, key, default, "transformer/config.json")

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """The DiT's (time, height, width) patch in latent cells (Wan: 1 x 2 x 2)."""
        value = self.transformer.get("patch_size", [1, 2, 2])
        if (
            not isinstance(value, list)
            or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 16 for v in value)
        ):
            raise WeightLoadError(f"transformer/config.json: patch_size must be three ints in [1, 16], got {value!r}")
        return tuple(value)

    @property
    def text_dim(self) -> int:
        return self._dit_int("text_dim", 4096)

    @property
    def image_conditioned(self) -> bool:
        """The DiT takes its own image conditioning (more input than output channels: the mask and
        image latent of Wan 2.1 / 2.2 I2V)."""
        in_channels = self._dit_int("in_channels", 16)
        if self.transformer.get("out_channels") is None:
            return False
        return self._dit_int("out_channels", None) != in_channels

    @property
    def clip(self) -> bool:
        """The DiT also reads CLIP image states (``image_dim``: Wan 2.1 I2V)."""
        return self.transformer.get("image_dim") is not None

    @property
    def expand_timesteps(self) -> bool:
        """Wan 2.2 TI2V: the image stays a clean first frame, its tokens at timestep 0."""
        return bool(self.model_index.get("expand_timesteps"))

    @property
    def two_experts(self) -> bool:
        return self.transformer_2 is not None

    @property
    def boundary_ratio(self) -> float | None:
        """Wan 2.2 A14B: the fraction of the schedule the high-noise expert runs; None without
        transformer_2/, a WeightLoadError when it is missing or out of (0, 1]."""
        if not self.two_experts:
            return None
        value = self.model_index.get("boundary_ratio")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
            raise WeightLoadError(f"{self.path}: transformer_2/ needs a boundary_ratio in (0, 1] in "
                                  f"model_index.json, got {value!r}")  # fmt: skip
        return float(value)

    def expert_differences(self, fields) -> list[str]:
        """Which of the config keys ``fields`` transformer/ and transformer_2/ disagree on."""
        if not self.two_experts:
            return []
        first, second = (
            self.transformer,
            self.transformer_2 or read_json(os.path.join(self.path, "transformer_2", "config.json")),
        )
        return [f"{f} {first.get(f)} vs {second.get(f)}" for f in fields if first.get(f) != second.get(f)]

    # ---- the VAE -----------------------------------------------------------------------------------

    @property
    def vae_patch(self) -> int:
        """Wan 2.2's VAE patchifies 2x2 pixels; 1 for Wan 2.1."""
        if not self.vae.get("patch_size"):
            return 1
        return config_int(self.vae, "patch_size", 1, "vae/config.json", maximum=16)

    @property
    def vae_spatial(self) -> int:
        """Pixels per latent row / column: 2 ** (stages - 1) x the patch (8 for Wan 2.1, 16 for 2.2)."""
        stages = self.vae.get("dim_mult", [1, 2, 4, 4])
        if not isinstance(stages, list) or not 1 <= len(stages) <= 8:
            raise WeightLoadError(f"vae/config.json: dim_mult must be a list of 1 to 8 ints, got {stages!r}")
        return 2 ** (len(stages) - 1) * self.vae_patch

    @property
    def vae_temporal(self) -> int:
        """Frames per latent frame after the first: 2 per temporal downsampling stage (4 for Wan)."""
        stages = self.vae.get("temperal_downsample", [False, True, True])  # diffusers' spelling
        if not isinstance(stages, list) or not all(isinstance(s, bool) for s in stages):
            raise WeightLoadError(f"vae/config.json: temperal_downsample must be a list of booleans, got {stages!r}")
        return 2 ** sum(stages)

    @property
    def latent_channels(self) -> int:
        return config_int(self.vae, "z_dim", 16, "vae/config.json")

    @property
    def vae_facts(self) -> VAEFacts:
        return VAEFacts(spatial=self.vae_spatial, temporal=self.vae_temporal, latent_channels=self.latent_channels,
                        patch=self.vae_patch)  # fmt: skip

    # ---- loading -----------------------------------------------------------------------------------

    def load_dit(self, part: str = "transformer", *, dtype=None, device=None, backend: str | None = None):
        """``part`` (``transformer``, or Wan 2.2 A14B's ``transformer_2``) as a DiT, in place."""
        from fastdit.models.wan.dit import DiT

        if part not in ("transformer", "transformer_2") or part not in self.parts:
            raise WeightLoadError(f"{self.path}: no DiT part {part!r} (it has {', '.join(self.parts)})")
        return DiT.from_diffusers(os.path.join(self.path, part), dtype=dtype, device=device, backend=backend)

    def load_vae(self, *, dtype=None, device=None, backend: str | None = None):
        """``vae/`` as a :class:`fastdit.models.wan.CausalVAE`, in place."""
        from fastdit.models.wan.vae import CausalVAE

        return CausalVAE.from_diffusers(os.path.join(self.path, "vae"), dtype=dtype, device=device, backend=backend)
