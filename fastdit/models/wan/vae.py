"""The causal 3D VAEs of Wan 2.1 and Wan 2.2 (reference semantics; run on fastdit.ops.causal_conv3d).

Video (B, 3, T, H, W) with T = 1 + 4k is compressed 4x in time (the first frame alone) and 8x in
space to a 16-channel latent (Wan 2.1). Wan 2.2's VAE (TI2V-5B, ``is_residual``, ``patch_size=2``)
first folds 2x2 pixels into 12 channels, adds a parameter-free shortcut around each down / up
block (channel-group means of space-time folded pixels; channel repeats unfolded), and reaches
16x in space with 48 latent channels. Every temporal convolution is causal; encoding runs on frame chunks
[1, 4, 4, ...] and decoding on one latent frame at a time, each causal conv carrying the last
CACHE_T = 2 frames of its input from one chunk to the next (``StreamCache``), so memory does not
grow with the clip. Parameter names follow diffusers' ``AutoencoderKLWan`` so its weights load
as they are; ``encode`` returns the unnormalized latent mean and ``decode`` takes it, as there.
"""

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from fastdit import ops
from fastdit.models.family import BackendChoice, VAEFacts
from fastdit.models.weights import (
    WeightLoadError,
    assign_from_files,
    checkpoint_dtype,
    config_int,
    read_directory,
    shapes_must_match,
)
from fastdit.ops.dispatch import on_model_backend

VAE_OPS = ("causal_conv3d", "rms_norm_silu")  # the fastdit ops the VAE calls


@dataclass(frozen=True)
class VAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = field(default_factory=tuple)
    latents_std: tuple[float, ...] = field(default_factory=tuple)
    # Wan 2.2: residual down / up blocks, 2x2 pixel patches, a wider decoder (None: base_dim)
    is_residual: bool = False
    patch_size: int = 1
    decoder_base_dim: int | None = None

    @property
    def spatial_ratio(self) -> int:
        """Pixels per latent row / column: 8 (Wan 2.1), 16 (Wan 2.2: 8 x its 2x2 patches)."""
        return 2 ** (len(self.dim_mult) - 1) * self.patch_size

    @property
    def pixel_channels(self) -> int:
        """Channels the encoder takes and the decoder returns: RGB, times the patch's pixels."""
        return 3 * self.patch_size**2

    @property
    def temporal_ratio(self) -> int:
        """Frames per latent frame after the first: 2 per temporal downsampling stage (4 for Wan)."""
        return 2 ** sum(self.temporal_downsample)

    @property
    def facts(self) -> VAEFacts:
        return VAEFacts(spatial=self.spatial_ratio, temporal=self.temporal_ratio, latent_channels=self.z_dim,
                        patch=self.patch_size)  # fmt: skip


VAE_PRESETS: dict[str, VAEConfig] = {
    # CPU tests and the demo: every layer type of the real VAE, 16 latent channels like Wan's.
    "tiny": VAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
    "wan2.1": VAEConfig(),
    # Wan 2.2 TI2V-5B's VAE shape (random weights; its real statistics come with the checkpoint)
    "wan2.2": VAEConfig(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, patch_size=2),
}


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C p p, T, H/p, W/p), channels ordered (c, column, row): diffusers'."""
    if p == 1:
        return x
    return rearrange(x, "b c t (h r) (w q) -> b (c q r) t h w", r=p, q=p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    if p == 1:
        return x
    return rearrange(x, "b (c q r) t h w -> b c t (h r) (w q)", r=p, q=p)


def average_down(x: torch.Tensor, channels: int, factor_t: int, factor_s: int) -> torch.Tensor:
    """Wan 2.2's encoder shortcut: fold ``factor_t x factor_s x factor_s`` pixels into channels
    (time zero-padded in front to a multiple of factor_t) and average groups of them down to
    ``channels`` (diffusers' ``AvgDown3D``)."""
    pad = (factor_t - x.shape[2] % factor_t) % factor_t
    if pad:
        x = F.pad(x, (0, 0, 0, 0, pad, 0))
    x = rearrange(x, "b c (t a) (h p) (w q) -> b (c a p q) t h w", a=factor_t, p=factor_s, q=factor_s)
    return x.unflatten(1, (channels, -1)).mean(dim=2)


def duplicate_up(x: torch.Tensor, channels: int, factor_t: int, factor_s: int, first_chunk: bool) -> torch.Tensor:
    """Wan 2.2's decoder shortcut: repeat channels and unfold them into ``factor_t x factor_s x
    factor_s`` pixels (diffusers' ``DupUp3D``); on the first chunk only the last of the
    ``factor_t`` frames is kept (the first latent frame is one video frame)."""
    repeats = channels * factor_t * factor_s * factor_s // x.shape[1]
    x = rearrange(x.repeat_interleave(repeats, dim=1), "b (c a p q) t h w -> b c (t a) (h p) (w q)",
                  a=factor_t, p=factor_s, q=factor_s)  # fmt: skip
    return x[:, :, factor_t - 1 :] if first_chunk else x


class StreamCache:
    """The per-conv caches of one streaming pass, handed out in call order (Wan's feat_cache)."""

    def __init__(self):
        self.slots: list = []
        self.index = 0

    def start_chunk(self):
        self.index = 0

    def get(self):
        if self.index == len(self.slots):
            self.slots.append(None)
        return self.slots[self.index]

    def put(self, value):
        self.slots[self.index] = value
        self.index += 1


class CausalConv3d(nn.Module):
    """Causal in time (kt - 1 frames of front context, from the cache or zeros), zero-padded in space."""

    def __init__(self, cin, cout, kernel, padding=0):
        super().__init__()
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        padding = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        self.weight = nn.Parameter(torch.empty(cout, cin, *kernel))
        self.bias = nn.Parameter(torch.zeros(cout))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.spatial_padding = padding[1:]

    def forward(self, x, stream: StreamCache | None = None, residual=None):
        cache = None if stream is None else stream.get()
        y, new_cache = ops.causal_conv3d(
            x, self.weight, self.bias, padding=self.spatial_padding, cache=cache, residual=residual,
        )  # fmt: skip
        if stream is not None and self.weight.shape[2] > 1:
            stream.put(new_cache)
        return y


class RMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma (Wan's RMS_norm), statistics in fp32; ``silu=True``
    applies SiLU in the same pass (fastdit.ops.rms_norm_silu)."""

    def __init__(self, dim, images=False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x, silu=False):
        return ops.rms_norm_silu(x, self.gamma, silu=silu)


class ResidualBlock(nn.Module):
    """conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x), the add fused into conv2."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm1 = RMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1)
        self.norm2 = RMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1)
        self.conv_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x, stream=None):
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(self.norm1(x, silu=True), stream)
        return self.conv2(self.norm2(x, silu=True), stream, residual=h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (1x1 convs as matmuls over
    channels-last pixels)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x, stream=None):
        b, c, t, h, w = x.shape
        pixels = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
        qkv = F.linear(pixels, self.to_qkv.weight.view(3 * c, c), self.to_qkv.bias)
        q, k, v = qkv.unflatten(-1, (3, c)).unbind(-2)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        out = F.linear(out, self.proj.weight.view(c, c), self.proj.bias)
        return x + out.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class Resample(nn.Module):
    """Spatial 2x down/up sampling per frame, with Wan's causal temporal 2x where asked.

    The 2D convs run as causal_conv3d with a one-frame kernel: the upsampler's nearest 2x is
    fused into its conv (``upsample=2``), the downsampler's right/bottom zero pad is its padding.
    Parameter names are diffusers' (``resample.1``, ``time_conv``).
    """

    def __init__(self, dim, mode, upsample_out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            out_dim = dim // 2 if upsample_out_dim is None else upsample_out_dim  # Wan 2.1 halves, 2.2 keeps
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, out_dim, 3, padding=1))  # fmt: skip
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1))  # stride 2 in time, applied below

    def forward(self, x, stream=None):
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d" and stream is not None:
            # One cache slot: "first" after the first chunk (which is not upsampled in time), then
            # the time conv's streaming cache; a missing cache means zero frames, as in Wan.
            slot = stream.get()
            if slot is None:
                stream.put("first")
            else:
                cache = None if isinstance(slot, str) else slot
                y, new_cache = ops.causal_conv3d(x, self.time_conv.weight, self.time_conv.bias, cache=cache)
                stream.put(new_cache)
                # Channels [0, c) are frame 2i, [c, 2c) frame 2i + 1.
                x = y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, t * 2, h, w)
                x = x.contiguous(memory_format=torch.channels_last_3d)
        conv = self.resample[1]
        if self.mode.startswith("upsample"):
            x, _ = ops.causal_conv3d(x, conv.weight[:, :, None], conv.bias, padding=(1, 1), upsample=2)
        else:
            x, _ = ops.causal_conv3d(x, conv.weight[:, :, None], conv.bias, stride=(1, 2, 2), padding=(0, 1, 0, 1))
        if self.mode == "downsample3d" and stream is not None:
            # One cache slot: the last frame of the previous chunk; the first chunk is not
            # downsampled in time; later chunks are, with that frame in front and no padding.
            previous = stream.get()
            if previous is None:
                stream.put(x[:, :, -1:].clone())
            else:
                x, last = ops.causal_conv3d(
                    x, self.time_conv.weight, self.time_conv.bias, stride=(2, 1, 1), time_padding=1,
                    cache=previous,
                )  # fmt: skip
                stream.put(last)
        return x


class MidBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x, stream=None):
        x = self.resnets[0](x, stream)
        x = self.attentions[0](x)
        return self.resnets[1](x, stream)


class ResidualDownBlock(nn.Module):
    """Wan 2.2's encoder stage: residual blocks and the downsampler, plus :func:`average_down` of
    the stage's input (diffusers' ``WanResidualDownBlock``)."""

    def __init__(self, cin, cout, num_res_blocks, temporal: bool, down: bool):
        super().__init__()
        self.cout, self.factor_t, self.factor_s = cout, 2 if temporal else 1, 2 if down else 1
        self.resnets = nn.ModuleList(ResidualBlock(cin if j == 0 else cout, cout) for j in range(num_res_blocks))
        self.downsampler = Resample(cout, "downsample3d" if temporal else "downsample2d") if down else None

    def forward(self, x, stream=None):
        shortcut = average_down(x, self.cout, self.factor_t, self.factor_s)
        for resnet in self.resnets:
            x = resnet(x, stream)
        if self.downsampler is not None:
            x = self.downsampler(x, stream)
        return x + shortcut


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig, out_channels: int):
        super().__init__()
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.pixel_channels, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        scale = 1.0
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(cfg.dim_mult) - 1
            if cfg.is_residual:
                temporal = cfg.temporal_downsample[i] if not last else False
                self.down_blocks.append(ResidualDownBlock(cin, cout, cfg.num_res_blocks, temporal, not last))
                continue
            for _ in range(cfg.num_res_blocks):
                self.down_blocks.append(ResidualBlock(cin, cout))
                if scale in cfg.attn_scales:
                    self.down_blocks.append(AttentionBlock(cout))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                self.down_blocks.append(
                    Resample(cout, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d")
                )
                scale /= 2.0
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], out_channels, 3, padding=1)

    def forward(self, x, stream):
        x = self.conv_in(x, stream)
        for layer in self.down_blocks:
            x = layer(x, stream)
        x = self.mid_block(x, stream)
        return self.conv_out(self.norm_out(x, silu=True), stream)


class UpBlock(nn.Module):
    def __init__(self, cin, cout, num_res_blocks, mode):
        super().__init__()
        self.resnets = nn.ModuleList(ResidualBlock(cin if j == 0 else cout, cout) for j in range(num_res_blocks + 1))
        self.upsamplers = nn.ModuleList([Resample(cout, mode)]) if mode else None

    def forward(self, x, stream):
        for resnet in self.resnets:
            x = resnet(x, stream)
        return x if self.upsamplers is None else self.upsamplers[0](x, stream)


class ResidualUpBlock(nn.Module):
    """Wan 2.2's decoder stage: residual blocks and the upsampler (keeping the channels), plus
    :func:`duplicate_up` of the stage's input (diffusers' ``WanResidualUpBlock``)."""

    def __init__(self, cin, cout, num_res_blocks, temporal: bool, up: bool):
        super().__init__()
        self.cout, self.up, self.factor_t = cout, up, 2 if temporal else 1
        self.resnets = nn.ModuleList(ResidualBlock(cin if j == 0 else cout, cout) for j in range(num_res_blocks + 1))
        mode = "upsample3d" if temporal else "upsample2d"
        self.upsampler = Resample(cout, mode, upsample_out_dim=cout) if up else None

    def forward(self, x, stream, first_chunk=False):
        shortcut = duplicate_up(x, self.cout, self.factor_t, 2, first_chunk) if self.up else None
        for resnet in self.resnets:
            x = resnet(x, stream)
        if self.upsampler is not None:
            x = self.upsampler(x, stream)
        return x if shortcut is None else x + shortcut


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        base = cfg.decoder_base_dim or cfg.base_dim
        dims = [base * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            up = i != len(cfg.dim_mult) - 1
            if cfg.is_residual:
                self.up_blocks.append(ResidualUpBlock(cin, cout, cfg.num_res_blocks, up and temporal_upsample[i], up))
                continue
            if i > 0:
                cin //= 2  # the previous block's upsampler halves the channels
            mode = None
            if up:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
            self.up_blocks.append(UpBlock(cin, cout, cfg.num_res_blocks, mode))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.pixel_channels, 3, padding=1)

    def forward(self, x, stream, first_chunk=False):
        x = self.mid_block(self.conv_in(x, stream), stream)
        for block in self.up_blocks:
            x = block(x, stream, first_chunk) if isinstance(block, ResidualUpBlock) else block(x, stream)
        return self.conv_out(self.norm_out(x, silu=True), stream)


@dataclass(frozen=True)
class SpatialTiling:
    """Overlapping spatial tiles for encode / decode, in video pixels (diffusers' ``enable_tiling``
    defaults): tiles of ``min_height x min_width`` every ``stride_*`` pixels, seams blended
    linearly over the overlap. Each tile runs the whole causal stream, so peak memory follows the
    tile, not the frame; the result equals diffusers' tiled encode / decode with the same sizes."""

    min_height: int = 256
    min_width: int = 256
    stride_height: int = 192
    stride_width: int = 192

    def __post_init__(self):
        for name in ("min_height", "min_width", "stride_height", "stride_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 8 or value % 8:
                raise ValueError(f"SpatialTiling.{name} must be a positive multiple of 8 pixels, got {value!r}")
        if self.stride_height > self.min_height or self.stride_width > self.min_width:
            raise ValueError(f"SpatialTiling strides must not exceed the tile sizes, got {self}")


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Blend the end of ``a`` into the start of ``b`` along ``dim`` over ``extent`` rows, in place in b."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    for i in range(extent):
        w = i / extent
        b.select(dim, i).copy_(a.select(dim, a.shape[dim] - extent + i) * (1 - w) + b.select(dim, i) * w)
    return b


def tile_starts(height: int, width: int, stride: tuple[int, int]) -> tuple[list[int], list[int]]:
    """Top and left corners of the overlapping spatial tiles, in rows and columns (diffusers' order)."""
    return list(range(0, height, stride[0])), list(range(0, width, stride[1]))


def blend_tiles(rows: list[list[torch.Tensor]], tile_out: tuple[int, int], stride_out: tuple[int, int],
                out_hw: tuple[int, int]) -> torch.Tensor:  # fmt: skip
    """Blend a grid of decoded / encoded tiles into one picture (diffusers' seams, in place)."""
    blend = (tile_out[0] - stride_out[0], tile_out[1] - stride_out[1])
    out_rows = []
    for i, row in enumerate(rows):
        out_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, blend[0], dim=-2)
            if j > 0:
                tile = _blend(row[j - 1], tile, blend[1], dim=-1)
            out_row.append(tile[..., : stride_out[0], : stride_out[1]])
        out_rows.append(torch.cat(out_row, dim=-1))
    return torch.cat(out_rows, dim=-2)[..., : out_hw[0], : out_hw[1]]


def _tiled(fn, x: torch.Tensor, tile_in: tuple[int, int], stride_in: tuple[int, int], scale: float,
           out_hw: tuple[int, int]) -> torch.Tensor:  # fmt: skip
    """Run ``fn`` on overlapping spatial tiles of x and blend them (diffusers' tiled_encode / decode).

    ``tile_in`` / ``stride_in`` are in x's pixels, ``scale`` maps them to the output's.
    """
    tops, lefts = tile_starts(*x.shape[-2:], stride_in)
    rows = [[fn(x[..., i : i + tile_in[0], j : j + tile_in[1]]) for j in lefts] for i in tops]
    tile_out = (int(tile_in[0] * scale), int(tile_in[1] * scale))
    stride_out = (int(stride_in[0] * scale), int(stride_in[1] * scale))
    return blend_tiles(rows, tile_out, stride_out, out_hw)


class CausalVAE(BackendChoice, nn.Module):
    """Wan 2.1's causal video VAE. ``encode`` (B, 3, T, H, W) -> latent mean (B, z, 1 + (T-1)/4, H/8, W/8);
    ``decode`` (B, z, T', H', W') -> video (B, 3, 1 + 4 (T'-1), 8 H', 8 W') in [-1, 1].

    Every conv and norm runs on fastdit.ops (``backend`` forces one for all of them, else the
    dispatcher picks: on GPUs cuDNN or Triton convs and the fused Triton norm + SiLU; on CPUs the
    reference); ``encode``, ``decode`` and ``decode_patchified`` run inside
    ``dispatch.model_backend(self.backend)``, the one way the choice reaches the modules.
    Activations are channels-last-3d throughout, and so are the conv weights (Cin
    innermost; ``load_state_dict`` and ``.to()`` keep that layout; safetensors wants contiguous
    tensors, so save ``{k: v.contiguous() for k, v in vae.state_dict().items()}``); bf16 / fp16
    weights run in bf16 / fp16 with fp32 statistics and accumulation.
    """

    BACKEND_OPS = VAE_OPS

    def __init__(self, config: VAEConfig, backend: str | None = None):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, config.z_dim * 2)
        self.quant_conv = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)
        self._conv_weights_channels_last()
        self.set_backend(backend)

    def _conv_weights_channels_last(self) -> None:
        """Store every conv weight with Cin innermost, as the activations: the Triton conv then
        reads each (Cin block, Cout block) weight tile as contiguous 16-byte rows instead of
        gathering elements 27 (or 9) apart, and cuDNN's channels-last convs need no per-call
        weight transpose. (Weights shared with another module, ``from_diffusers(share_weights=True)``,
        keep their layout; the Triton op then reorders them per call.)"""
        for module in self.modules():
            if isinstance(module, CausalConv3d | nn.Conv2d):
                layout = torch.channels_last_3d if module.weight.dim() == 5 else torch.channels_last
                module.weight.data = module.weight.data.contiguous(memory_format=layout)

    @staticmethod
    def _channels_last(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last_3d)

    @on_model_backend
    def encode(
        self, video: torch.Tensor, chunk_frames: int = 4, tiling: SpatialTiling | None = None, moments: bool = False
    ) -> torch.Tensor:
        """Encode in chunks: the first frame alone, then ``chunk_frames`` (a multiple of 4) at a time.

        Wan encodes [1, 4, 4, ...]; every chunking gives the same latent (the convs are causal
        and carry their context in the stream caches), larger chunks trade memory for fewer
        steps. ``tiling`` encodes overlapping spatial tiles when the video is larger than one (Wan 2.2:
        tiles of the 2x2-folded picture, as diffusers', so each covers twice the pixels).
        ``moments=True`` returns the posterior's mean and log-variance ``(B, 2z, ...)`` (diffusers'
        ``_encode``) instead of the mean.
        """
        want_moments = moments
        frames = video.shape[2]
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be (B, 3, T, H, W), got shape {tuple(video.shape)}")
        if (frames - 1) % 4:
            raise ValueError(f"video must have 1 + 4k frames, got {frames}")
        if chunk_frames < 4 or chunk_frames % 4:
            raise ValueError(f"chunk_frames must be a positive multiple of 4, got {chunk_frames}")
        height, width = video.shape[-2:]
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(
                f"video height and width must be multiples of the VAE's patch size {p}, got {height}x{width}"
            )
        if p != 1:  # Wan 2.2: 2x2 pixels folded into 12 channels before the encoder
            video = patchify(self._channels_last(video), p).contiguous()
        if tiling is not None and (height > tiling.min_height or width > tiling.min_width):
            # As diffusers' tiled_encode: tiles of the tiling's sizes cut from the encoder's input
            # (for Wan 2.2 the folded picture, so p times as wide in the video), blended in the
            # latent, ``spatial_ratio / p`` (8 for both VAEs) rows per latent row.
            ratio = self.config.spatial_ratio // p
            sizes = (tiling.min_height, tiling.min_width, tiling.stride_height, tiling.stride_width)
            if any(size % ratio for size in sizes):
                raise ValueError(f"tiles of this VAE's encoder must be multiples of {ratio} pixels, got {tiling}")
            rows, cols = video.shape[-2:]
            moments = _tiled(lambda tile: self._encode_moments(tile, chunk_frames), video, sizes[:2], sizes[2:],
                             1 / ratio, (rows // ratio, cols // ratio))  # fmt: skip
        else:
            moments = self._encode_moments(video, chunk_frames)
        return moments.contiguous() if want_moments else moments[:, : self.config.z_dim].contiguous()

    def _encode_moments(self, video: torch.Tensor, chunk_frames: int) -> torch.Tensor:
        frames = video.shape[2]
        stream = StreamCache()
        bounds = [0, 1, *range(1 + chunk_frames, frames, chunk_frames), frames]
        out = None
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                stream.start_chunk()
                chunk = self.quant_conv(self.encoder(self._channels_last(video[:, :, start:end]), stream))
                if out is None:  # written in place: no list of chunks, no concatenation
                    out = chunk.new_empty((*chunk.shape[:2], 1 + (frames - 1) // 4, *chunk.shape[3:]))
                first = 0 if start == 0 else 1 + (start - 1) // 4
                out[:, :, first : first + chunk.shape[2]] = chunk
        return out

    @on_model_backend
    def decode(self, z: torch.Tensor, chunk_frames: int = 1, tiling: SpatialTiling | None = None) -> torch.Tensor:
        """Decode the first latent frame alone, then ``chunk_frames`` latent frames at a time
        (Wan: one at a time, the least memory); every chunking gives the same video. The video is
        written into one preallocated tensor, so peak memory is the output plus one chunk's
        activations. ``tiling`` decodes overlapping spatial tiles when the latent is larger than one."""
        if z.dim() != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"z must be (B, {self.config.z_dim}, T, H, W), got shape {tuple(z.shape)}")
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        height, width = z.shape[-2:]
        tile_in, stride_in, scale = self.decode_tiles(tiling) if tiling is not None else (None, None, None)
        if tiling is not None and (height > tile_in[0] or width > tile_in[1]):
            video = _tiled(lambda tile: self.decode_patchified(tile, chunk_frames), z, tile_in, stride_in, scale,
                           (height * scale, width * scale))  # fmt: skip
        else:
            video = self.decode_patchified(z, chunk_frames)
        if self.config.patch_size != 1:  # Wan 2.2: tiles blend in the patchified picture, as diffusers' do
            video = unpatchify(video, self.config.patch_size)
        return video.clamp_(-1.0, 1.0).contiguous()

    def decode_tiles(self, tiling: SpatialTiling) -> tuple[tuple[int, int], tuple[int, int], int]:
        """``(tile, stride)`` of ``tiling`` in latent rows and columns, and the decoder's scale from
        a latent row to a row of :meth:`decode_patchified`'s output (8 for Wan 2.1 and 2.2: 2.2's
        16 pixels per latent row are 8 rows of 2x2 patches). Tiles must be whole latent rows."""
        ratio = self.config.spatial_ratio
        sizes = (tiling.min_height, tiling.min_width, tiling.stride_height, tiling.stride_width)
        if any(size % ratio for size in sizes):
            raise ValueError(f"tiles of this VAE must be multiples of its {ratio} pixels per latent, got {tiling}")
        return (
            (sizes[0] // ratio, sizes[1] // ratio),
            (sizes[2] // ratio, sizes[3] // ratio),
            ratio // self.config.patch_size,
        )

    @on_model_backend
    def decode_patchified(self, z: torch.Tensor, chunk_frames: int = 1) -> torch.Tensor:
        """The decoder's output for latent ``z`` before Wan 2.2's unpatchify and the clamp:
        ``(B, config.pixel_channels, 1 + 4 (T - 1), 8 H, 8 W)`` (what tiles are blended in).
        Decodes the first latent frame alone, then ``chunk_frames`` at a time."""
        x = self.post_quant_conv(self._channels_last(z))
        stream = StreamCache()
        bounds = [0, 1, *range(1 + chunk_frames, x.shape[2], chunk_frames), x.shape[2]]
        out = None
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                stream.start_chunk()
                chunk = self.decoder(x[:, :, start:end], stream, first_chunk=start == 0)
                if out is None:
                    frames = 1 + 4 * (x.shape[2] - 1)
                    out = chunk.new_empty((*chunk.shape[:2], frames, *chunk.shape[3:]))
                first = 0 if start == 0 else 1 + 4 * (start - 1)
                out[:, :, first : first + chunk.shape[2]] = chunk
        return out

    @classmethod
    def from_preset(cls, name: str) -> "CausalVAE":
        """A randomly initialised VAE of a named preset (``tiny``, ``wan2.1``)."""
        if name not in VAE_PRESETS:
            raise KeyError(f"unknown VAE preset {name!r}; known: {sorted(VAE_PRESETS)}")
        return cls(VAE_PRESETS[name])

    def normalize(self, latent: torch.Tensor) -> torch.Tensor:
        """(latent - mean) / std per channel: what the DiT works on (identity without stats)."""
        if not self.config.latents_mean:
            return latent
        mean, std = self._stats(latent)
        return (latent - mean) / std

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        if not self.config.latents_mean:
            return latent
        mean, std = self._stats(latent)
        return latent * std + mean

    def _stats(self, latent):
        shape = (1, -1) + (1,) * (latent.dim() - 2)
        mean = torch.tensor(self.config.latents_mean, dtype=latent.dtype, device=latent.device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=latent.dtype, device=latent.device).view(shape)
        return mean, std

    @property
    def facts(self) -> VAEFacts:
        """This VAE's geometry (ratios and channels), as :class:`fastdit.models.family.VAEFacts`."""
        return self.config.facts

    @classmethod
    def from_diffusers(cls, source, config: VAEConfig | None = None, share_weights: bool = False, *,
                       dtype: torch.dtype | None = None, device=None,
                       backend: str | None = None) -> "CausalVAE":  # fmt: skip
        """Load diffusers ``AutoencoderKLWan`` weights, in place: a module, a diffusers directory
        (config.json + safetensors, single or sharded, never pickle), or a state dict with its
        ``config`` (default: Wan 2.1's). The VAE is built on the meta device, every shape compared
        before a byte is read, and each tensor read from its file straight into its own storage
        (or copied from the given tensors) in ``dtype`` (default: the checkpoint's floating dtype
        with the most bytes) on ``device`` (default CPU); no random initialisation, no float32
        copy. ``share_weights=True`` (a module) uses the module's parameter tensors themselves.
        ``backend`` as in the constructor."""
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        if share_weights and not isinstance(source, nn.Module):
            raise ValueError("share_weights=True needs an AutoencoderKLWan module as the source")
        entries = None  # file sources: header entries, read after the shape check
        if isinstance(source, nn.Module):
            config, tensors = vae_config_from_diffusers(dict(source.config)), source.state_dict(keep_vars=share_weights)
        elif isinstance(source, dict):
            config, tensors = config or VAE_PRESETS["wan2.1"], source
        elif isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if not os.path.isdir(path):
                raise WeightLoadError(f"{path} is not a diffusers AutoencoderKLWan directory")
            entries, cfg = read_directory(path)
            if cfg is None:
                raise WeightLoadError(f"{path}: no config.json (an AutoencoderKLWan directory has one)")
            config = vae_config_from_diffusers(cfg)
            tensors = {name: entry.meta() for name, entry in entries.items()}
        else:
            raise TypeError(f"source must be a module, a state dict or a path, got {type(source).__name__}")
        if not tensors:
            raise WeightLoadError("the VAE checkpoint holds no tensors")
        with torch.device("meta"):  # every shape compared before a byte is allocated
            model = cls(config, backend=backend)
        shapes_must_match("the VAE checkpoint does not match its config",
                          {k: v.shape for k, v in model.state_dict().items()}, tensors)  # fmt: skip
        if share_weights:
            model.load_state_dict(tensors, strict=True, assign=True)
            return model
        dtype = dtype or checkpoint_dtype(tensors)
        device = torch.device("cpu") if device is None else torch.device(device)
        if entries is None:  # tensors in memory: copied, so the VAE never shares storage with the source
            copies = {k: v.detach().to(device=device, dtype=dtype if v.is_floating_point() else v.dtype, copy=True)
                      for k, v in tensors.items()}  # fmt: skip
            model.load_state_dict(copies, strict=True, assign=True)
        else:
            assign_from_files(model, entries, dtype, device)
        left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise WeightLoadError(f"the VAE checkpoint left {len(left)} tensors unloaded: {left[:20]}")
        model._conv_weights_channels_last()
        return model


def vae_config_from_diffusers(cfg: dict) -> VAEConfig:
    """:class:`VAEConfig` from an ``AutoencoderKLWan`` config.json; a WeightLoadError for a value
    of the wrong type or size, a ValueError for a VAE that is not RGB."""
    where = "vae config.json"
    patch = config_int(cfg, "patch_size", 1, where, maximum=16) if cfg.get("patch_size") is not None else 1
    # list-valued keys: (element type, its name, the longest list; latents_mean / std hold z_dim
    # numbers: 16 for Wan 2.1, 48 for Wan 2.2)
    lists = {"dim_mult": (int, "ints", 16), "attn_scales": ((int, float), "numbers", 16),
             "temperal_downsample": (bool, "booleans", 16), "latents_mean": ((int, float), "numbers", 1024),
             "latents_std": ((int, float), "numbers", 1024)}  # fmt: skip
    for key, (kinds, kind, longest) in lists.items():
        value = cfg.get(key, [])
        ok = isinstance(value, (list, tuple)) and len(value) <= longest
        ok = ok and all(isinstance(v, kinds) and (kinds is bool or not isinstance(v, bool)) for v in value)
        if not ok or (key == "dim_mult" and not all(1 <= v <= 64 for v in value)):
            raise WeightLoadError(f"{where}: {key} must be a list of {kind} (at most {longest}), got {value!r}")
    for key, expect in (("in_channels", 3 * patch**2), ("out_channels", 3 * patch**2)):
        if cfg.get(key, expect) != expect:
            raise ValueError(
                f"VAE config: {key}={cfg[key]} with patch_size {patch}; fastdit runs RGB videos ({expect})"
            )
    decoder_base_dim = cfg.get("decoder_base_dim")
    return VAEConfig(
        base_dim=config_int(cfg, "base_dim", 96, where),
        z_dim=config_int(cfg, "z_dim", 16, where),
        dim_mult=tuple(cfg.get("dim_mult", (1, 2, 4, 4))),
        num_res_blocks=config_int(cfg, "num_res_blocks", 2, where, maximum=64),
        attn_scales=tuple(cfg.get("attn_scales", ())),
        temporal_downsample=tuple(cfg.get("temperal_downsample", (False, True, True))),
        latents_mean=tuple(cfg.get("latents_mean", ())),
        latents_std=tuple(cfg.get("latents_std", ())),
        is_residual=bool(cfg.get("is_residual", False)),
        patch_size=patch,
        decoder_base_dim=None if decoder_base_dim is None else config_int(cfg, "decoder_base_dim", None, where),
    )
