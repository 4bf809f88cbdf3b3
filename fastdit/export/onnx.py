"""ONNX export of the DiT and the VAE decoder: standard ops only, dynamic batch and sizes.

fastdit's own ops are torch custom ops (Triton / CUDA kernels, packed batches with per-sample
loops in the reference); an ONNX graph needs standard operators that TensorRT and onnxruntime
parse. So the export traces *export twins*: modules that share the model's parameters and
compute the same function on dense tensors with plain torch ops:

- RoPE as elementwise math on cos / sin of angles computed from the token grid in the graph
  (float32; positions and frequencies exact, so no [S, D] table is stored);
- attention as MatMul / Softmax / MatMul (no ``Attention`` op, which TensorRT 10 does not parse);
- adaLN as ``LayerNormalization`` + Mul / Add, the q / k RMSNorm as ReduceMean + Sqrt + Div;
- the VAE decoder's causal convs as Conv over explicitly zero-padded frames (the whole clip in one
  call: equal to the streaming decode, see :class:`ExportVAEDecoder`).

Inputs follow ``DiT.forward``: ``latents (B, C, T, H, W)``, ``timestep (B,)``, ``text (B, L, D_text)``;
B, T, H, W and L are dynamic. Opset 18 by default (ONNX's LayerNormalization is 17).
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

from fastdit.models.wan.block import block_modulation, head_modulation, wan_block
from fastdit.models.wan.dit import DiT
from fastdit.models.wan.vae import CausalVAE
from fastdit.reference.rope3d import wan_axes_dim

DEFAULT_OPSET = 18
# Standard ops the export must stay within: each is in the TensorRT 10 ONNX parser's supported
# list (onnx-tensorrt docs/operators.md), all in the default domain. TensorRT has no float64.
TENSORRT_OPS = frozenset(
    "Abs Add And ArgMax Cast Ceil Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos CumSum Div Einsum "
    "Equal Erf Exp Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm Greater GreaterOrEqual "
    "GroupNormalization Identity InstanceNormalization LayerNormalization Less LessOrEqual Log MatMul Max Min Mod "
    "Mul Neg Not Or Pad Pow Range Reciprocal ReduceMax ReduceMean ReduceMin ReduceSum ReduceSumSquare Relu Reshape "
    "Resize ScatterElements ScatterND Shape Sigmoid Sign Sin Size Slice Softmax Split Sqrt Squeeze Sub Sum Tanh "
    "Tile Transpose Trilu Unsqueeze Where".split()
)


# ---- the DiT ------------------------------------------------------------------------------------


def _rope_cos_sin(t: int, h: int, w: int, head_dim: int, theta: float, axes_dim, device):
    """cos / sin ``(S, D/2)`` for the (t, h, w) grid: positions from Range, float32 angles."""
    axes_dim = tuple(axes_dim) if axes_dim is not None else wan_axes_dim(head_dim)
    pos_t = torch.arange(t, device=device, dtype=torch.float32)
    pos_h = torch.arange(h, device=device, dtype=torch.float32)
    pos_w = torch.arange(w, device=device, dtype=torch.float32)
    parts = []
    for pos, dim, shape in ((pos_t, axes_dim[0], (t, 1, 1)), (pos_h, axes_dim[1], (1, h, 1)),
                            (pos_w, axes_dim[2], (1, 1, w))):  # fmt: skip
        freq = torch.tensor([theta ** (-i / dim) for i in range(0, dim, 2)], device=device, dtype=torch.float32)
        angle = (pos[:, None] * freq[None, :]).reshape(*shape, -1)
        parts.append(angle.expand(t, h, w, -1))
    angle = torch.cat(parts, dim=-1).reshape(t * h * w, -1)
    return angle.cos(), angle.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (B, S, H, D) rotated by per-token angles; cos / sin (S, D/2)."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        x1, x2 = pairs[..., 0], pairs[..., 1]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def _attention(q, k, v, scale):
    """(B, S, H, D) x (B, L, H, D) -> (B, S, H, D) as MatMul / Softmax / MatMul."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(weights, v).transpose(1, 2)


class _OnnxLayers:
    """The Wan block's primitives (:class:`fastdit.models.wan.block.WanBlockLayers`) in standard
    ONNX operators on dense ``(B, S, C)`` tensors, over the block's own parameters."""

    def __init__(self, block, context: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        self.block, self.cfg, self.context, self.cos, self.sin = block, block.config, context, cos, sin

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.cfg.num_heads, self.cfg.head_dim))

    def _attend(self, attn, q, k, v):
        return attn.o(_attention(q, k, v, self.cfg.head_dim**-0.5).flatten(2))

    def modulate(self, x, shift, scale):
        return F.layer_norm(x, (x.shape[-1],), eps=self.cfg.eps) * (1 + scale[:, None]) + shift[:, None]

    def self_attention(self, h):
        attn, eps, interleaved = self.block.self_attn, self.cfg.eps, self.cfg.rope_interleaved
        q = _rotate(self._heads(_rms(attn.q(h), attn.q_norm, eps)), self.cos, self.sin, interleaved)
        k = _rotate(self._heads(_rms(attn.k(h), attn.k_norm, eps)), self.cos, self.sin, interleaved)
        return self._attend(attn, q, k, self._heads(attn.v(h)))

    def gated_residual(self, x, y, gate):
        return x + y * gate[:, None]

    def cross_norm(self, x):
        norm = self.block.cross_norm
        return x if norm is None else F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)

    def cross_attention(self, h):
        cross, eps = self.block.cross_attn, self.cfg.eps
        q = self._heads(_rms(cross.q(h), cross.q_norm, eps))
        k = self._heads(_rms(cross.k(self.context), cross.k_norm, eps))
        return self._attend(cross, q, k, self._heads(cross.v(self.context)))

    def residual_modulate(self, x, y, shift, scale):
        x = x + y
        return x, self.modulate(x, shift, scale)

    def ffn(self, h):
        return self.block.ffn_out(F.gelu(self.block.ffn_in(h), approximate="tanh"))


class ExportDiT(nn.Module):
    """``DiT.forward`` with standard ops only, sharing ``dit``'s parameters (float32 graph)."""

    def __init__(self, dit: DiT):
        super().__init__()
        self.dit = dit

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        dit, cfg = self.dit, self.dit.config
        batch, channels, frames, height, width = latents.shape
        pt, ph, pw = cfg.patch_size
        t, h, w = frames // pt, height // ph, width // pw
        # patchify: features (c, pt, ph, pw), tokens (t, h, w) row-major
        x = latents.reshape(batch, channels, t, pt, h, ph, w, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        x = dit.patch_embed(x.reshape(batch, t * h * w, channels * pt * ph * pw))
        temb, mod = dit.embed_conditions(timestep)
        context = dit.text_context(text)
        cos, sin = _rope_cos_sin(t, h, w, cfg.head_dim, cfg.rope_theta, cfg.rope_axes_dim, latents.device)
        for block in dit.blocks:
            x = wan_block(_OnnxLayers(block, context, cos, sin), x, block_modulation(block.modulation, mod))
        shift, sc = head_modulation(dit.head_modulation, temb)
        x = F.layer_norm(x, (cfg.hidden,), eps=cfg.eps) * (1 + sc[:, None]) + shift[:, None]
        out = dit.head_proj(x)  # features (pt, ph, pw, c)
        out = out.reshape(batch, t, h, w, pt, ph, pw, cfg.out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(batch, cfg.out_channels, frames, height, width)


# ---- the VAE decoder ------------------------------------------------------------------------------


def _causal_conv(conv, x, residual=None):
    """fastdit.models.wan.vae.CausalConv3d over the whole clip: kt - 1 zero frames in front."""
    kt = conv.weight.shape[2]
    ph, pw = conv.spatial_padding
    x = F.pad(x, (pw, pw, ph, ph, kt - 1, 0))
    y = F.conv3d(x, conv.weight, conv.bias)
    return y if residual is None else y + residual


def _norm(norm, x, silu):
    gamma = norm.gamma.reshape(1, -1, *([1] * (x.dim() - 2)))
    y = x / x.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12) * (x.shape[1] ** 0.5) * gamma
    return F.silu(y) if silu else y


class ExportVAEDecoder(nn.Module):
    """``CausalVAE.decode`` of a whole latent clip in one graph, standard ops only.

    Equal to the streaming decode: a causal conv over the whole clip is what the chunks compute
    with their caches, and the temporal upsamplers skip the first latent frame (Wan keeps it
    alone) and see zeros before the second, exactly as the stream cache's first-chunk marker does.
    Memory grows with the clip (no streaming inside a graph): export short clips or tiles.
    """

    def __init__(self, vae: CausalVAE):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        from fastdit.models.wan.vae import AttentionBlock, ResidualBlock

        decoder = self.vae.decoder
        x = _causal_conv(self.vae.post_quant_conv, z)
        x = _causal_conv(decoder.conv_in, x)

        def run(layer, x):
            if isinstance(layer, ResidualBlock):
                h = x if layer.conv_shortcut is None else _causal_conv(layer.conv_shortcut, x)
                y = _causal_conv(layer.conv1, _norm(layer.norm1, x, True))
                return _causal_conv(layer.conv2, _norm(layer.norm2, y, True), residual=h)
            if isinstance(layer, AttentionBlock):
                b, c, t, hh, ww = x.shape
                pixels = _norm(layer.norm, x, False).permute(0, 2, 3, 4, 1).reshape(b * t, hh * ww, c)
                qkv = F.linear(pixels, layer.to_qkv.weight.reshape(3 * c, c), layer.to_qkv.bias)
                q, k, v = qkv.unflatten(-1, (3, c)).unbind(-2)
                attn = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * c**-0.5, dim=-1)
                out = F.linear(torch.matmul(attn, v), layer.proj.weight.reshape(c, c), layer.proj.bias)
                return x + out.reshape(b, t, hh, ww, c).permute(0, 4, 1, 2, 3)
            return self._resample(layer, x)

        mid = decoder.mid_block
        x = run(mid.resnets[0], x)
        x = run(mid.attentions[0], x)
        x = run(mid.resnets[1], x)
        for block in decoder.up_blocks:
            for resnet in block.resnets:
                x = run(resnet, x)
            if block.upsamplers is not None:
                x = run(block.upsamplers[0], x)
        x = _causal_conv(decoder.conv_out, _norm(decoder.norm_out, x, True))
        return x.clamp(-1.0, 1.0)

    @staticmethod
    def _resample(layer, x):
        b, c, t, h, w = x.shape
        if layer.mode == "upsample3d":
            # frame 0 stays single; frames 1.. are doubled by the time conv (zeros before frame 1)
            rest = _causal_conv(layer.time_conv, x[:, :, 1:])
            rest = rest.reshape(b, 2, c, t - 1, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * (t - 1), h, w)
            x = torch.cat([x[:, :, :1], rest], dim=2)
        frames = x.shape[2]
        conv = layer.resample[1]
        y = x.permute(0, 2, 1, 3, 4).reshape(b * frames, c, h, w)
        y = F.interpolate(y, scale_factor=2.0, mode="nearest")
        y = F.conv2d(y, conv.weight, conv.bias, padding=1)
        return y.reshape(b, frames, -1, 2 * h, 2 * w).permute(0, 2, 1, 3, 4)


# ---- export ---------------------------------------------------------------------------------------


def _example_dit_inputs(config, batch=2, frames=2, height=4, width=6, text_len=5):
    pt, ph, pw = config.patch_size
    return (
        torch.randn(batch, config.in_channels, frames * pt, height * ph, width * pw),
        torch.tensor([500.0] * batch),
        torch.randn(batch, text_len, config.text_dim),
    )


def to_onnx(model, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, check: bool = True,
            external_data: bool | None = None) -> str:  # fmt: skip
    """Export a :class:`DiT` (or a :class:`CausalVAE`'s decoder) to an ONNX file with dynamic sizes.

    Args:
        model: a ``DiT`` (inputs ``latents (B, C, T, H, W)``, ``timestep (B,)``, ``text (B, L, D)``,
            output ``(B, C_out, T, H, W)``) or a ``CausalVAE`` (input ``z (B, z_dim, T', H', W')``,
            output the video ``(B, 3, 1 + 4 (T'-1), 8 H', 8 W')``). Exported in float32.
        path: the ``.onnx`` file (weights inside it, or beside it in ``<path>.data`` past 1.5 GiB).
        opset: ONNX opset (>= 18).
        check: run ``onnx.checker`` and assert every op is a standard one TensorRT parses.
        external_data: weights in a side file; None: when they pass 1.5 GiB (protobuf's cap is 2).

    Returns:
        The path written.
    """
    if opset < 18:
        raise ValueError(f"opset must be >= 18, got {opset}")
    path = os.fspath(path)
    if isinstance(model, DiT) and model.config.image_conditioned:
        raise NotImplementedError("ONNX export of the Wan 2.1 I2V DiT (image_dim set) is not written yet; T2V exports")
    if isinstance(model, DiT):
        twin = ExportDiT(model.float().eval())
        cfg = model.config
        args = _example_dit_inputs(cfg)
        batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("text_len", min=1, max=4096)
        t = torch.export.Dim("t", min=1, max=1024)
        h, w = torch.export.Dim("h", min=1, max=1024), torch.export.Dim("w", min=1, max=1024)
        pt, ph, pw = cfg.patch_size
        dynamic = {
            "latents": {0: batch, 2: t * pt if pt > 1 else t, 3: h * ph, 4: w * pw},
            "timestep": {0: batch},
            "text": {0: batch, 1: seq},
        }
        names = (["latents", "timestep", "text"], ["prediction"])
    elif isinstance(model, CausalVAE):
        twin = ExportVAEDecoder(model.float().eval())
        args = (torch.randn(1, model.config.z_dim, 3, 4, 6),)
        batch = torch.export.Dim("batch", min=1, max=64)
        t = torch.export.Dim("t", min=2, max=1024)
        h, w = torch.export.Dim("h", min=1, max=1024), torch.export.Dim("w", min=1, max=1024)
        dynamic = {"z": {0: batch, 2: t, 3: h, 4: w}}
        names = (["z"], ["video"])
    else:
        raise TypeError(f"to_onnx exports a fastdit DiT or CausalVAE, got {type(model).__name__}")
    with torch.no_grad():
        program = torch.onnx.export(
            twin, args, dynamo=True, dynamic_shapes=dynamic, opset_version=opset, input_names=names[0],
            output_names=names[1], external_data=False,
        )  # fmt: skip
    # protobuf caps a file at 2 GiB: larger models keep their weights in a side file (path + ".data")
    if external_data is None:
        external_data = sum(p.numel() * 4 for p in model.parameters()) > 1.5 * 2**30
    program.save(path, external_data=external_data)
    if check:
        check_onnx(path)
    return path


def check_onnx(path: str | os.PathLike) -> list[str]:
    """onnx.checker plus the TensorRT rule: every node a standard-domain op from TENSORRT_OPS.
    Returns the sorted op types used."""
    import onnx

    path = os.fspath(path)
    onnx.checker.check_model(path, full_check=True)  # by path: works past 2 GiB with external weights
    model = onnx.load(path, load_external_data=False)
    nodes = [node for graph in (model.graph, *model.functions) for node in graph.node]
    used = {node.op_type for node in nodes if node.domain in ("", "ai.onnx")}
    foreign = {f"{node.domain}::{node.op_type}" for node in nodes if node.domain not in ("", "ai.onnx")}
    unsupported = sorted(used - TENSORRT_OPS) + sorted(foreign)
    if unsupported:
        raise ValueError(f"{path}: ops outside the TensorRT-parsable set: {unsupported}")
    double = onnx.TensorProto.DOUBLE
    typed = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    doubles = [v.name for v in typed if v.type.tensor_type.elem_type == double]
    doubles += [t.name for t in model.graph.initializer if t.data_type == double]
    doubles += [n.name for n in model.graph.node if n.op_type == "Cast" and any(a.name == "to" and a.i == double
                                                                              for a in n.attribute)]  # fmt: skip
    if doubles:
        raise ValueError(f"{path}: float64 tensors, which TensorRT does not support: {doubles[:5]}")
    return sorted(used)
