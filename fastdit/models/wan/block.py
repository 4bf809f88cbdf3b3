"""The Wan 2.1 transformer block's math, written once (docs/design.md, "One Wan block").

Per block: adaLN-modulated self-attention with a gated residual; cross-attention to the text
(after an optional affine LayerNorm) added to the stream, whose sum the FFN's adaLN modulates;
a GELU(tanh) FFN with a gated residual. The six modulation rows are the block's learned table
plus the timestep's projection, per sample ``(B, 6, C)`` or per token ``(B, S, 6, C)``.

Three layers run it, each with the primitives it must use:

- :class:`fastdit.models.wan.dit.DiTBlock`: fastdit's ops on packed batches;
- ``fastdit.export.onnx``: standard ONNX operators on dense tensors;
- ``fastdit.integrations.diffusers``: diffusers' own modules and weights, with fastdit's ops.

Each passes a :class:`WanBlockLayers` to :func:`wan_block`; none writes the sequence again.
"""

from typing import Protocol

import torch


class WanBlockLayers(Protocol):
    """The primitives of one Wan block, over one layer's tensors (packed or dense)."""

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``LayerNorm(x) * (1 + scale) + shift``, the LayerNorm without affine."""

    def self_attention(self, h: torch.Tensor) -> torch.Tensor:
        """Self-attention over the video tokens (q / k RMSNorm across heads, 3D RoPE), projected out."""

    def gated_residual(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``x + y * gate``."""

    def cross_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The affine LayerNorm before cross-attention (identity without ``cross_attn_norm``)."""

    def cross_attention(self, h: torch.Tensor) -> torch.Tensor:
        """Cross-attention from the video tokens to the text, projected out."""

    def residual_modulate(
        self, x: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + y, modulate(x + y, shift, scale))``."""

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        """``Linear(GELU_tanh(Linear(h)))``."""


def block_modulation(table: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The six rows (shift, scale, gate of self-attention, then of the FFN), float32.

    ``table``: the block's ``(1, 6, C)``; ``temb``: the timestep projection ``(B, 6, C)`` or per
    token ``(B, S, 6, C)`` (Wan 2.2 TI2V). Returns six ``(B, C)`` or ``(B, S, C)`` tensors."""
    if temb.dim() == 4:
        return (table.float().unsqueeze(0) + temb.float()).unbind(2)
    return (table.float() + temb.float()).unbind(1)


def wan_block(layers: WanBlockLayers, x: torch.Tensor, mods: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One Wan block on the stream ``x`` with the modulation rows of :func:`block_modulation`."""
    shift, scale, gate, ffn_shift, ffn_scale, ffn_gate = mods
    x = layers.gated_residual(x, layers.self_attention(layers.modulate(x, shift, scale)), gate)
    x, h = layers.residual_modulate(x, layers.cross_attention(layers.cross_norm(x)), ffn_shift, ffn_scale)
    return layers.gated_residual(x, layers.ffn(h), ffn_gate)


def head_modulation(table: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) of the output head: its ``(1, 2, C)`` table plus ``temb (B, C)``, float32."""
    return (table.float() + temb.float()[:, None]).unbind(1)
