"""Every family's RoPE runs on fastdit's rotary op exactly: HunyuanVideo 1.0 and 1.5, LTX, LTX-2
(interleaved and split), CogVideoX (1.0's crop grid, 1.5's slice grid), Mochi and Cosmos.

For each family, diffusers' own rotary module makes the tables and diffusers' own apply function
rotates x (fp32 and bf16); fastdit's ``ops.rotary`` rotates the same x from the same tables in
fastdit's (token, head, pair) form. fp32 agrees to 1e-6, bf16 to one bf16 rounding. Where a
family's angles follow a theta schedule, ``ops.rotary_tables`` rebuilds its tables from positions
(per-axis theta, fractional and scaled positions, given frequencies), against diffusers' tables.
"""

import importlib
import math

import pytest
import torch

from fastdit import ops
from tests.conftest import CPU_BACKENDS, rel_err

diffusers = pytest.importorskip("diffusers", reason="the drop-in tests need `pip install -e .[diffusers]`")
from diffusers.models.embeddings import apply_rotary_emb, get_3d_rotary_pos_embed  # noqa: E402

BACKENDS = [b if b != "triton" else pytest.param("triton", marks=pytest.mark.triton_cpu) for b in CPU_BACKENDS]


def _family(module: str, name: str):
    """A diffusers class, or a skip naming the version that lacks it."""
    try:
        found = getattr(importlib.import_module(f"diffusers.models.transformers.{module}"), name, None)
    except ModuleNotFoundError:
        found = None
    if found is None:
        pytest.skip(f"diffusers {diffusers.__version__} has no {name}")
    return found


def _compare(theirs, ours, x_bshd, backend):
    """``theirs(x)`` (diffusers, on x in the family's layout) against ``ours(x)`` (fastdit, x in
    (B, S, H, D)) for fp32 and bf16 x."""
    for dtype in (torch.float32, torch.bfloat16):
        if backend == "triton" and dtype == torch.bfloat16:
            continue  # the interpreter has no bfloat16; the GPU tests run it
        x = x_bshd.to(dtype)
        want, got = theirs(x), ours(x)
        assert got.dtype == dtype and got.shape == want.shape
        if dtype == torch.float32:
            assert rel_err(got, want) <= 1e-6
        else:  # both compute in float32 and round once: at most one bf16 step apart
            assert ((got.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-30).all()


def _diffusers_apply(cos, sin, unbind_dim):
    """diffusers' shared apply_rotary_emb (use_real) on (B, S, H, D) x, through its (B, H, S, D) layout."""
    return lambda x: apply_rotary_emb(x.transpose(1, 2), (cos, sin), use_real_unbind_dim=unbind_dim).transpose(1, 2)


def _pairs(table):
    """A repeat-interleaved (..., D) table (each angle twice, as most families store it) as (..., D/2)."""
    assert torch.equal(table[..., 0::2], table[..., 1::2])
    return table[..., 0::2]


def _grid(*sizes, dtype=torch.float64):
    axes = torch.meshgrid(*(torch.arange(n, dtype=dtype) for n in sizes), indexing="ij")
    return torch.stack([a.reshape(-1) for a in axes], dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["HunyuanVideo", "HunyuanVideo15"])
def test_hunyuan_video_rope(backend, name):
    """HunyuanVideo 1.0 / 1.5: (t, h, w) = (4, 6, 6) of a 16-dim head, theta 256, interleaved."""
    module = "transformer_hunyuan_video" if name == "HunyuanVideo" else "transformer_hunyuan_video15"
    rope = _family(module, f"{name}RotaryPosEmbed")(patch_size=2, patch_size_t=1, rope_dim=[4, 6, 6], theta=256.0)
    cos, sin = rope(torch.zeros(1, 4, 3, 8, 10))  # (S = 3 x 4 x 5, 16)
    c, s = _pairs(cos), _pairs(sin)
    x = torch.randn(2, 60, 3, 16)
    _compare(
        _diffusers_apply(cos, sin, -1),
        lambda x: ops.rotary(x, c, s, interleaved=True, backend=backend),
        x, backend,
    )  # fmt: skip
    built = ops.rotary_tables(_grid(3, 4, 5), [4, 6, 6], theta=256.0)
    assert (built[0] - c).abs().max() <= 1e-6 and (built[1] - s).abs().max() <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_ltx_rope(backend):
    """LTX: positions as fractions of the base size times the interpolation scale, log-spaced
    frequencies times pi / 2 applied to (2 pos - 1), pairs freq-major across the three axes, and
    the inner dim (H x D = 32, not a multiple of 6) padded with unrotated pairs at the front."""
    rope_class = _family("transformer_ltx", "LTXVideoRotaryPosEmbed")
    rope = rope_class(dim=32, base_num_frames=20, base_height=2048, base_width=2048, patch_size=1, patch_size_t=1)
    scale = (torch.tensor(8.0 / 25.0), 32.0, 32.0)
    cos, sin = rope(torch.zeros(2, 36, 32), num_frames=3, height=3, width=4, rope_interpolation_scale=scale)
    c, s = _pairs(cos).unflatten(-1, (2, 8)), _pairs(sin).unflatten(-1, (2, 8))  # (B, S, H, D/2) per head
    ltx_apply = importlib.import_module("diffusers.models.transformers.transformer_ltx").apply_rotary_emb
    _compare(
        lambda x: ltx_apply(x.flatten(2), (cos, sin)).unflatten(2, (2, 16)),
        lambda x: ops.rotary(x, c, s, interleaved=True, backend=backend),
        torch.randn(2, 36, 2, 16), backend,
    )  # fmt: skip
    # the same tables from positions: one pseudo-axis per pair, its frequency given
    grid = _grid(3, 3, 4).float()
    fractions = grid * torch.tensor([scale[0].item() / 20, 32.0 / 2048, 32.0 / 2048])
    steps = 32 // 6
    freqs = 10000.0 ** torch.linspace(math.log(1.0, 10000.0), 1.0, steps, dtype=torch.float32) * math.pi / 2
    columns = [torch.zeros(len(grid))] + [fractions[:, a] * 2 - 1 for j in range(steps) for a in range(3)]
    pair_freqs = [torch.zeros(1)] + [freqs[j : j + 1].double() for j in range(steps) for a in range(3)]
    positions = torch.stack(columns, dim=-1)
    built = ops.rotary_tables(positions, [2] * len(columns), freqs=pair_freqs)
    # diffusers forms LTX's angles (up to 10000 pi / 2 rad) in float32: the tables agree within
    # that rounding of the angle, a few float32 steps of it
    angle = (positions.double() * torch.cat(pair_freqs)).abs()
    bound = angle * 2**-21 + 2e-7
    assert ((built[0] - _pairs(cos)[0]).abs() <= bound).all() and ((built[1] - _pairs(sin)[0]).abs() <= bound).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rope_type", ["interleaved", "split"])
def test_ltx2_rope(backend, rope_type):
    """LTX-2: patch-midpoint coordinates in pixel space and seconds, interleaved pairs over the
    whole inner dim, or the split form: half-split pairs with one table per head (B, H, T, D/2)."""
    rope_class = _family("transformer_ltx2", "LTX2AudioVideoRotaryPosEmbed")
    module = importlib.import_module(rope_class.__module__)
    rope = rope_class(dim=32, patch_size=1, patch_size_t=1, rope_type=rope_type, num_attention_heads=2)
    coords = rope.prepare_video_coords(2, 3, 4, 5, torch.device("cpu"), fps=24.0)
    cos, sin = rope(coords)
    x = torch.randn(2, 60, 2, 16)
    if rope_type == "interleaved":
        c, s = _pairs(cos).unflatten(-1, (2, 8)), _pairs(sin).unflatten(-1, (2, 8))
        theirs = lambda x: module.apply_interleaved_rotary_emb(x.flatten(2), (cos, sin)).unflatten(2, (2, 16))  # noqa: E731
    else:
        c, s = cos.transpose(1, 2), sin.transpose(1, 2)  # (B, H, T, D/2) -> (B, T, H, D/2)
        theirs = lambda x: module.apply_split_rotary_emb(x.flatten(2), (cos, sin)).unflatten(2, (2, 16))  # noqa: E731
    _compare(theirs, lambda x: ops.rotary(x, c, s, interleaved=rope_type == "interleaved", backend=backend), x,
             backend)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("version", ["1.0", "1.5"])
def test_cogvideox_rope(backend, version):
    """CogVideoX 1.0: fractional positions (linspace over the resize-crop region); 1.5: integer
    slice grid. (t, h, w) = (D/4, 3D/8, 3D/8) of a 32-dim head, theta 10000, interleaved."""
    if version == "1.0":
        crops = ((0, 1), (6, 9))  # a 6 x 8 grid on a wider base: cropped, fractional steps
        cos, sin = get_3d_rotary_pos_embed(32, crops, (6, 8), 3)
        t = torch.linspace(0, 3 * 2 / 3, 3, dtype=torch.float32)
        h = torch.linspace(0, 6 * 5 / 6, 6, dtype=torch.float32)
        w = torch.linspace(1, 9 * 7 / 8, 8, dtype=torch.float32)
    else:
        cos, sin = get_3d_rotary_pos_embed(32, None, (6, 8), 3, grid_type="slice", max_size=(10, 12))
        t, h, w = torch.arange(3.0), torch.arange(6.0), torch.arange(8.0)
    c, s = _pairs(cos), _pairs(sin)
    _compare(
        _diffusers_apply(cos, sin, -1),
        lambda x: ops.rotary(x, c, s, interleaved=True, backend=backend),
        torch.randn(2, 144, 2, 32), backend,
    )  # fmt: skip
    positions = torch.stack([a.reshape(-1) for a in torch.meshgrid(t, h, w, indexing="ij")], dim=-1)
    built = ops.rotary_tables(positions, [8, 12, 12], theta=10000.0)
    assert (built[0] - c).abs().max() <= 2e-6 and (built[1] - s).abs().max() <= 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_mochi_rope(backend):
    """Mochi: learned frequencies, one table per head (S, H, D/2), centred and area-scaled
    spatial positions, interleaved pairs (x[0::2], x[1::2])."""
    rope = _family("transformer_mochi", "MochiRoPE")()
    freqs = torch.randn(3, 2, 8) * 0.3
    cos, sin = rope(freqs, 3, 4, 5, device=torch.device("cpu"), dtype=torch.float32)  # (S, H, D/2)
    assert cos.shape == (60, 2, 8)

    def mochi_rotation(x):  # diffusers' MochiAttnProcessor2_0 rotation: even / odd features, stacked back
        even, odd = x[..., 0::2].float(), x[..., 1::2].float()
        turned = torch.stack([(even * cos - odd * sin).to(x.dtype), (even * sin + odd * cos).to(x.dtype)], dim=-1)
        return turned.flatten(-2)

    _compare(mochi_rotation, lambda x: ops.rotary(x, cos, sin, interleaved=True, backend=backend),
             torch.randn(2, 60, 2, 16), backend)  # fmt: skip
    # (Mochi's angle sums every axis's learned frequency on each pair, so its tables come from
    # its own module: rotary takes them as they are, per head)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosmos_rope(backend):
    """Cosmos: per-axis NTK-scaled theta, fps-scaled temporal positions, half-split pairs (its
    tables are [t, h, w] twice)."""
    rope_class = _family("transformer_cosmos", "CosmosRotaryPosEmbed")
    rope = rope_class(hidden_size=32, max_size=(16, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.5, 1.5))
    cos, sin = rope(torch.zeros(1, 4, 3, 8, 10), fps=30)
    assert torch.equal(cos[:, :16], cos[:, 16:])
    c, s = cos[:, :16], sin[:, :16]
    _compare(
        _diffusers_apply(cos, sin, -2),
        lambda x: ops.rotary(x, c, s, interleaved=False, backend=backend),
        torch.randn(2, 60, 2, 32), backend,
    )  # fmt: skip
    dims = (rope.dim_t, rope.dim_h, rope.dim_w)
    thetas = (10000.0 * rope.t_ntk_factor, 10000.0 * rope.h_ntk_factor, 10000.0 * rope.w_ntk_factor)
    positions = _grid(3, 4, 5) * torch.tensor([24 / 30, 1.0, 1.0], dtype=torch.float64)
    built = ops.rotary_tables(positions, list(dims), theta=list(thetas))
    assert (built[0] - c).abs().max() <= 2e-6 and (built[1] - s).abs().max() <= 2e-6
