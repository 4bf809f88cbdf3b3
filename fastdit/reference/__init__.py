"""Pure-PyTorch reference semantics: the parity oracle for every fast path.

Every function here computes in float32 (angles in float64), casts the result to the input's
dtype, and uses no fused kernel or fast path. The ``reference`` backend of fastdit.ops runs these;
the tests compare every other backend against them, and them against independent float64 math
and diffusers' Wan 2.1 implementation.
"""

from fastdit.reference.attention import attention_bwd_ref, attention_ref, varlen_attention_bwd_ref, varlen_attention_ref
from fastdit.reference.causal_conv3d import causal_conv3d_bwd_ref, causal_conv3d_ref
from fastdit.reference.common import sample_index
from fastdit.reference.modulation import (
    adaln_modulate_bwd_ref,
    adaln_modulate_ref,
    gated_residual_bwd_ref,
    gated_residual_modulate_ref,
    gated_residual_ref,
)
from fastdit.reference.rms_norm_silu import rms_norm_silu_bwd_ref, rms_norm_silu_ref
from fastdit.reference.rope3d import rope3d_angles, rope3d_ref, wan_axes_dim

__all__ = [
    "adaln_modulate_bwd_ref",
    "adaln_modulate_ref",
    "attention_bwd_ref",
    "attention_ref",
    "causal_conv3d_bwd_ref",
    "causal_conv3d_ref",
    "gated_residual_bwd_ref",
    "gated_residual_modulate_ref",
    "gated_residual_ref",
    "rms_norm_silu_bwd_ref",
    "rms_norm_silu_ref",
    "rope3d_angles",
    "rope3d_ref",
    "sample_index",
    "varlen_attention_bwd_ref",
    "varlen_attention_ref",
    "wan_axes_dim",
]
