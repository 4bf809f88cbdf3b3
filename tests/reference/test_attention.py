"""The attention reference's own invariants (its results are checked against SDPA and float64
math through the op in tests/ops/test_attention.py)."""

import torch

from fastdit import ops
from fastdit.reference import attention as attention_module
from tests.conftest import packed_cu


def test_query_chunking_is_exact(monkeypatch):
    lengths = [40, 9]
    q, k, v = (torch.randn(49, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cu = packed_cu(lengths)
    full = ops.varlen_attention(q, k, v, cu, cu, 40, 40, causal=True)
    full.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    monkeypatch.setattr(attention_module, "_CHUNK_ELEMS", 2 * 40 * 3)  # 3-row chunks
    chunked = ops.varlen_attention(q, k, v, cu, cu, 40, 40, causal=True)
    chunked.sum().backward()
    torch.testing.assert_close(chunked, full, atol=1e-12, rtol=1e-12)
    for t, g in zip((q, k, v), grads):
        torch.testing.assert_close(t.grad, g, atol=1e-12, rtol=1e-12)
