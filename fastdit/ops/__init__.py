"""fastdit's public ops: one function each, packed (varlen) form first, dense accepted.

Each (op, backend) pair is a ``torch.library`` custom op ``fastdit::<op>_<backend>`` with a fake
implementation and registered autograd; the functions here validate inputs, pick the backend
(:mod:`fastdit.ops.dispatch`) and call it.
"""

from fastdit import _extension  # noqa: F401, I001  (loads fastdit._C once, before any backend registers)
from fastdit.ops.adaln_modulate import adaln_modulate
from fastdit.ops.attention import attention, varlen_attention, varlen_attention_backward
from fastdit.ops.causal_conv3d import causal_conv3d
from fastdit.ops.dispatch import BackendNotSupportedError, backends, priority, select_backend, set_priority
from fastdit.ops.gated_residual import gated_residual, gated_residual_modulate
from fastdit.ops.rms_norm import rms_norm
from fastdit.ops.rms_norm_silu import rms_norm_silu
from fastdit.ops.rope3d import rope3d, rope3d_qk
from fastdit.ops.rotary import rotary, rotary_qk, rotary_tables

__all__ = [
    "BackendNotSupportedError",
    "adaln_modulate",
    "attention",
    "backends",
    "causal_conv3d",
    "gated_residual",
    "gated_residual_modulate",
    "priority",
    "rms_norm",
    "rms_norm_silu",
    "rope3d",
    "rope3d_qk",
    "rotary",
    "rotary_qk",
    "rotary_tables",
    "select_backend",
    "set_priority",
    "varlen_attention",
    "varlen_attention_backward",
]
