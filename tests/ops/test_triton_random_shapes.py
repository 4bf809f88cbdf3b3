"""Random packed batches through every Triton kernel against the reference (fixed seeds).

Lengths straddle the interpreter's 16-row tiles (1, 15, 16, 17, ...), head dims are odd sizes,
KV heads divide Q heads; each case also checks the backward where the op has one.
"""

import random

import pytest
import torch

from fastdit import ops
from tests.conftest import CPU_BACKENDS, packed_cu

pytestmark = [
    pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton is not installed"),
    pytest.mark.triton_cpu,
]
LENGTH_CHOICES = [1, 2, 15, 16, 17, 31, 33, 48, 63]


def _lengths(rng, count):
    return [rng.choice(LENGTH_CHOICES) for _ in range(count)]


def _compare_with_grads(fn, inputs, tol):
    outs = fn(*inputs, backend="triton")
    outs = outs if isinstance(outs, tuple) else (outs,)
    weights = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), inputs)
    refs = fn(*inputs, backend="reference")
    refs = refs if isinstance(refs, tuple) else (refs,)
    want = torch.autograd.grad(sum((o * w).sum() for o, w in zip(refs, weights)), inputs)
    # Relative to the reference's norm, floored at 1: a gradient that is exactly 0 in theory (one
    # key: the softmax is constant) comes out as ~1e-7 of rounding noise from both backends.
    for a, b in [*zip(outs, refs), *zip(got, want)]:
        assert (a - b).norm() <= tol * max(b.norm().item(), 1.0)


@pytest.mark.parametrize("seed", range(12))
def test_random_varlen_attention(seed):
    rng = random.Random(seed)
    batch = rng.randint(1, 4)
    len_q = _lengths(rng, batch)
    len_k = len_q if rng.random() < 0.5 else _lengths(rng, batch)
    kv_heads = rng.choice([1, 2])
    heads = kv_heads * rng.choice([1, 2, 3])
    head_dim = rng.choice([8, 20, 40, 64])
    causal = rng.random() < 0.5
    torch.manual_seed(seed)
    q = torch.randn(sum(len_q), heads, head_dim, requires_grad=True)
    k = torch.randn(sum(len_k), kv_heads, head_dim, requires_grad=True)
    v = torch.randn(sum(len_k), kv_heads, head_dim, requires_grad=True)
    cq, ck = packed_cu(len_q), packed_cu(len_k)

    def fn(q, k, v, backend):
        return ops.varlen_attention(q, k, v, cq, ck, max(len_q), max(len_k), causal=causal, backend=backend)

    _compare_with_grads(fn, (q, k, v), 1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_random_modulation_and_rope(seed):
    rng = random.Random(100 + seed)
    lengths = _lengths(rng, rng.randint(1, 4))
    channels = rng.choice([8, 24, 73, 130])
    per_token = rng.random() < 0.3
    norm = rng.choice(["layer", "rms"])
    torch.manual_seed(seed)
    cu = packed_cu(lengths)
    rows = sum(lengths) if per_token else len(lengths)
    x, y = (torch.randn(sum(lengths), channels, requires_grad=True) for _ in range(2))
    gate, shift, scale = (torch.randn(rows, channels, requires_grad=True) for _ in range(3))

    def fused(x, y, gate, shift, scale, backend):
        return ops.gated_residual_modulate(x, y, gate, shift, scale, cu, norm=norm, backend=backend)

    _compare_with_grads(fused, (x, y, gate, shift, scale), 1e-5)
    head_dim = rng.choice([12, 24, 64])
    grid = []
    for n in lengths:  # grids that hold the sample, or fewer tokens (the rest unrotated)
        t = rng.randint(1, 3)
        grid.append([t, rng.randint(1, 4), rng.randint(1, 4)] if rng.random() < 0.3 else [1, 1, n])
    grid = torch.tensor(grid, dtype=torch.int32)
    q = torch.randn(sum(lengths), rng.choice([1, 3]), head_dim, requires_grad=True)
    interleaved = rng.random() < 0.5

    def rope(q, backend):
        return ops.rope3d(q, grid, cu, interleaved=interleaved, backend=backend)

    _compare_with_grads(rope, (q,), 1e-6)
