"""DiT configuration and named presets."""

from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class DiTConfig:
    """A Wan 2.1-style DiT. Field names follow diffusers' ``WanTransformer3DModel`` where they exist.

    ``rope_axes_dim=None`` means Wan's split of ``head_dim``; ``rope_interleaved=False`` selects
    the half-rotation layout.
    """

    num_heads: int = 12
    head_dim: int = 128
    num_layers: int = 30
    ffn_dim: int = 8960
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_axes_dim: tuple[int, int, int] | None = None
    rope_interleaved: bool = True
    # Wan 2.1 image-to-video: the CLIP image states' width, and the cross-attention's added key /
    # value projections' input width (the image embedder's output, = hidden); None for T2V.
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError("image_dim and added_kv_proj_dim go together (Wan 2.1 I2V sets both)")
        if self.added_kv_proj_dim is not None and self.added_kv_proj_dim != self.hidden:
            raise ValueError(
                f"added_kv_proj_dim must equal the hidden size {self.hidden} (the image embedder's output), "
                f"got {self.added_kv_proj_dim}"
            )

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def image_conditioned(self) -> bool:
        """Wan 2.1 I2V: CLIP image states enter the cross-attention (``forward(..., image_embeds=)``)."""
        return self.image_dim is not None

    @property
    def patch_volume(self) -> int:
        return self.patch_size[0] * self.patch_size[1] * self.patch_size[2]

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "DiTConfig":
        return replace(self, **changes)


PRESETS: dict[str, DiTConfig] = {
    # CPU tests and the demo: every code path of the real model at a size that runs in milliseconds.
    "tiny": DiTConfig(num_heads=2, head_dim=24, num_layers=2, ffn_dim=96, text_dim=32, freq_dim=32),
    "wan2.1-1.3b": DiTConfig(num_heads=12, head_dim=128, num_layers=30, ffn_dim=8960),
    "wan2.1-14b": DiTConfig(num_heads=40, head_dim=128, num_layers=40, ffn_dim=13824),
}


def preset(name: str) -> DiTConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown DiT preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]
