"""The triton backend of gated_residual (CPU: under TRITON_INTERPRET=1; GPU: -m gpu); the
shared kernel's backward, opcheck and compile are in test_adaln_modulate_triton.py."""

import pytest
import torch

from fastdit import ops
from tests.conftest import packed_cu
from tests.ops.test_adaln_modulate import modulate_oracle, residual_oracle
from tests.ops.test_adaln_modulate_triton import CHANNELS, LENGTHS, TOL, pytestmark  # noqa: F401


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("lengths", LENGTHS)
def test_gated_residual_triton_forward(dtype, channels, lengths, poison_outputs):
    total, batch = sum(lengths), len(lengths)
    res, y = torch.randn(total, channels).to(dtype), torch.randn(total, channels).to(dtype)
    gate = torch.randn(batch, channels)
    cu = packed_cu(lengths)
    out = ops.gated_residual(res, y, gate, cu, backend="triton")
    expect = residual_oracle(res, y, gate, lengths)
    torch.testing.assert_close(out.double(), expect, atol=TOL[dtype] * 10, rtol=TOL[dtype])
    shift, scale = torch.randn(batch, channels), torch.randn(batch, channels)
    r, mod = ops.gated_residual_modulate(res, y, gate, shift, scale, cu, backend="triton")
    torch.testing.assert_close(r, out, atol=0, rtol=0)
    torch.testing.assert_close(
        mod.double(), modulate_oracle(r, shift, scale, lengths), atol=TOL[dtype] * 10, rtol=TOL[dtype]
    )
