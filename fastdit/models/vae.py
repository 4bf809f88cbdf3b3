"""The causal 3D VAE of Wan 2.1 (reference semantics; runs on fastdit.ops.causal_conv3d).

Video (B, 3, T, H, W) with T = 1 + 4k is compressed 4x in time (the first frame alone) and 8x in
space to a 16-channel latent. Every temporal convolution is causal; encoding runs on frame chunks
[1, 4, 4, ...] and decoding on one latent frame at a time, each causal conv carrying the last
CACHE_T = 2 frames of its input from one chunk to the next (``StreamCache``), so memory does not
grow with the clip. Parameter names follow diffusers' ``AutoencoderKLWan`` so its weights load
as they are; ``encode`` returns the unnormalized latent mean and ``decode`` takes it, as there.
"""

import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from fastdit import ops


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


VAE_PRESETS: dict[str, VAEConfig] = {
    # CPU tests and the demo: every layer type of the real VAE, 16 latent channels like Wan's.
    "tiny": VAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
    "wan2.1": VAEConfig(),
}


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

    def forward(self, x, stream: StreamCache | None = None):
        cache = None if stream is None else stream.get()
        y, new_cache = ops.causal_conv3d(x, self.weight, self.bias, padding=self.spatial_padding, cache=cache)
        if stream is not None and self.weight.shape[2] > 1:
            stream.put(new_cache)
        return y


class RMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma (Wan's RMS_norm), statistics in fp32."""

    def __init__(self, dim, images=False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x):
        return F.normalize(x.float(), dim=1).to(x.dtype) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1 = RMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1)
        self.norm2 = RMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1)
        self.conv_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x, stream=None):
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)), stream)
        x = self.conv2(F.silu(self.norm2(x)), stream)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x, stream=None):
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        q, k, v = self.to_qkv(self.norm(frames)).reshape(b * t, 3, c, h * w).permute(1, 0, 3, 2).unbind(0)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        out = self.proj(out.permute(0, 2, 1).reshape(b * t, c, h, w))
        return x + out.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)


class _Upsample(nn.Upsample):
    def forward(self, x):
        return super().forward(x.float()).type_as(x)


class Resample(nn.Module):
    """Spatial 2x down/up sampling per frame, with Wan's causal temporal 2x where asked."""

    def __init__(self, dim, mode):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(_Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))  # fmt: skip
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
                y, new_cache = ops.causal_conv3d(
                    x, self.time_conv.weight, self.time_conv.bias, padding=(0, 0), cache=cache
                )
                stream.put(new_cache)
                x = torch.stack((y[:, :c], y[:, c:]), dim=3).reshape(b, c, t * 2, h, w)
        frames = x.permute(0, 2, 1, 3, 4).reshape(-1, c, h, w)
        frames = self.resample(frames)
        x = frames.view(b, -1, *frames.shape[1:]).permute(0, 2, 1, 3, 4)
        if self.mode == "downsample3d" and stream is not None:
            # One cache slot: the last frame of the previous chunk; the first chunk is not
            # downsampled in time; later chunks are, with that frame in front and no padding.
            previous = stream.get()
            stream.put(x[:, :, -1:].clone())
            if previous is not None:
                x = F.conv3d(
                    torch.cat([previous, x], dim=2), self.time_conv.weight, self.time_conv.bias, stride=(2, 1, 1)
                )
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


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig, out_channels: int):
        super().__init__()
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(3, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        scale = 1.0
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
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
        return self.conv_out(F.silu(self.norm_out(x)), stream)


class UpBlock(nn.Module):
    def __init__(self, cin, cout, num_res_blocks, mode):
        super().__init__()
        self.resnets = nn.ModuleList(ResidualBlock(cin if j == 0 else cout, cout) for j in range(num_res_blocks + 1))
        self.upsamplers = nn.ModuleList([Resample(cout, mode)]) if mode else None

    def forward(self, x, stream):
        for resnet in self.resnets:
            x = resnet(x, stream)
        return x if self.upsamplers is None else self.upsamplers[0](x, stream)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2  # the previous block's upsampler halves the channels
            mode = None
            if i != len(cfg.dim_mult) - 1:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
            self.up_blocks.append(UpBlock(cin, cout, cfg.num_res_blocks, mode))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 3, 3, padding=1)

    def forward(self, x, stream):
        x = self.mid_block(self.conv_in(x, stream), stream)
        for block in self.up_blocks:
            x = block(x, stream)
        return self.conv_out(F.silu(self.norm_out(x)), stream)


class CausalVAE(nn.Module):
    """Wan 2.1's causal video VAE. ``encode`` (B, 3, T, H, W) -> latent mean (B, z, 1 + (T-1)/4, H/8, W/8);
    ``decode`` (B, z, T', H', W') -> video (B, 3, 1 + 4 (T'-1), 8 H', 8 W') in [-1, 1]."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, config.z_dim * 2)
        self.quant_conv = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    def encode(self, video: torch.Tensor, chunk_frames: int = 4) -> torch.Tensor:
        """Encode in chunks: the first frame alone, then ``chunk_frames`` (a multiple of 4) at a time.

        Wan encodes [1, 4, 4, ...]; every chunking gives the same latent (the convs are causal
        and carry their context in the stream caches), larger chunks trade memory for fewer steps.
        """
        frames = video.shape[2]
        if (frames - 1) % 4:
            raise ValueError(f"video must have 1 + 4k frames, got {frames}")
        if chunk_frames < 4 or chunk_frames % 4:
            raise ValueError(f"chunk_frames must be a positive multiple of 4, got {chunk_frames}")
        stream = StreamCache()
        bounds = [0, 1, *range(1 + chunk_frames, frames, chunk_frames), frames]
        chunks = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                stream.start_chunk()
                chunks.append(self.encoder(video[:, :, start:end], stream))
        moments = self.quant_conv(torch.cat(chunks, dim=2))
        return moments[:, : self.config.z_dim]

    def decode(self, z: torch.Tensor, chunk_frames: int = 1) -> torch.Tensor:
        """Decode the first latent frame alone, then ``chunk_frames`` latent frames at a time
        (Wan: one at a time, the least memory); every chunking gives the same video."""
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        x = self.post_quant_conv(z)
        stream = StreamCache()
        bounds = [0, 1, *range(1 + chunk_frames, x.shape[2], chunk_frames), x.shape[2]]
        frames = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                stream.start_chunk()
                frames.append(self.decoder(x[:, :, start:end], stream))
        return torch.clamp(torch.cat(frames, dim=2), -1.0, 1.0)

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

    @classmethod
    def from_diffusers(cls, source, config: VAEConfig | None = None) -> "CausalVAE":
        """Load diffusers ``AutoencoderKLWan`` weights: a module, a diffusers directory (config.json +
        safetensors, never pickle), or a state dict with its ``config`` (default: Wan 2.1's)."""
        if isinstance(source, nn.Module):
            cfg, state = dict(source.config), source.state_dict()
        elif isinstance(source, dict):
            model = cls(config or VAE_PRESETS["wan2.1"])
            missing, unexpected = model.load_state_dict(source, strict=False)
            if missing or unexpected:
                raise ValueError(f"VAE checkpoint mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
            return model.to(next(iter(source.values())).dtype)
        else:
            path = os.fspath(source)
            with open(os.path.join(path, "config.json")) as f:
                cfg = json.load(f)
            state = load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))
        if cfg.get("is_residual") or (cfg.get("patch_size") or 1) != 1:
            raise ValueError("only the Wan 2.1 VAE (not residual, no patchify) is supported")
        config = VAEConfig(
            base_dim=cfg.get("base_dim", 96),
            z_dim=cfg.get("z_dim", 16),
            dim_mult=tuple(cfg.get("dim_mult", (1, 2, 4, 4))),
            num_res_blocks=cfg.get("num_res_blocks", 2),
            attn_scales=tuple(cfg.get("attn_scales", ())),
            temporal_downsample=tuple(cfg.get("temperal_downsample", (False, True, True))),
            latents_mean=tuple(cfg.get("latents_mean", ())),
            latents_std=tuple(cfg.get("latents_std", ())),
        )
        model = cls(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"VAE checkpoint mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        return model.to(next(iter(state.values())).dtype)
