import pytest
import torch

from fastdit.models import DiT, DiTConfig, PackedBatch, patchify, preset, unpatchify
from tests.conftest import CPU_BACKENDS, rel_err


def tiny_dit(**changes) -> DiT:
    model = DiT(preset("tiny").replace(**changes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def test_presets_match_wan_sizes():
    small, big = preset("wan2.1-1.3b"), preset("wan2.1-14b")
    assert (small.hidden, small.num_layers, small.ffn_dim, small.num_heads) == (1536, 30, 8960, 12)
    assert (big.hidden, big.num_layers, big.ffn_dim, big.num_heads) == (5120, 40, 13824, 40)
    with torch.device("meta"):
        n_small = sum(p.numel() for p in DiT(small).parameters())
    assert 1.3e9 < n_small < 1.5e9
    with pytest.raises(KeyError, match="unknown DiT preset"):
        preset("wan9")


def test_patchify_roundtrip_and_order():
    latent = torch.randn(4, 3, 6, 10)
    tokens = patchify(latent, (1, 2, 2))
    assert tokens.shape == (3 * 3 * 5, 16)
    # token (t=1, h=2, w=3) is row 1*15 + 2*5 + 3; its features are (c, ph, pw) of that patch
    torch.testing.assert_close(tokens[1 * 15 + 2 * 5 + 3].view(4, 2, 2), latent[:, 1, 4:6, 6:8])
    channels_last = tokens.view(45, 4, 2, 2).permute(0, 2, 3, 1).reshape(45, 16)
    torch.testing.assert_close(unpatchify(channels_last, (3, 3, 5), (1, 2, 2), 4), latent)


def test_packed_mixed_batch_equals_per_sample_forward():
    model = tiny_dit()
    cfg = model.config
    # videos of different durations and aspect ratios, an image (T = 1), different text lengths
    latents = [
        torch.randn(cfg.in_channels, 3, 4, 6),
        torch.randn(cfg.in_channels, 1, 8, 4),
        torch.randn(cfg.in_channels, 5, 2, 2),
    ]
    texts = [torch.randn(n, cfg.text_dim) for n in (4, 7, 1)]
    timesteps = torch.tensor([10.0, 500.0, 999.0])
    batch = PackedBatch.from_samples(latents, timesteps, texts, cfg.patch_size)
    assert batch.cu_seqlens.tolist() == [0, 18, 26, 31] and batch.grid_thw.tolist() == [[3, 2, 3], [1, 4, 2], [5, 1, 1]]
    with torch.no_grad():
        packed = batch.unpack(model.forward_packed(batch), cfg.out_channels)
        for i, latent in enumerate(latents):
            alone = model(latent[None], timesteps[i : i + 1], texts[i][None])[0]
            assert packed[i].shape == latent.shape
            assert rel_err(packed[i], alone) <= 1e-5


def test_packed_batch_validation():
    cfg = preset("tiny")
    with pytest.raises(ValueError, match="not divisible"):
        PackedBatch.from_samples([torch.randn(16, 1, 3, 4)], [1.0], [torch.randn(2, 32)], cfg.patch_size)
    with pytest.raises(ValueError, match="one text per latent"):
        PackedBatch.from_samples([torch.randn(16, 1, 2, 4)], [1.0], [], cfg.patch_size)
    with pytest.raises(ValueError, match=r"timesteps must be per sample \(1,\) or per token \(2,\)"):
        PackedBatch.from_samples([torch.randn(16, 1, 2, 4)], [1.0, 2.0, 3.0], [torch.randn(2, 32)], cfg.patch_size)
    with pytest.raises(ValueError, match=r"texts\[0\] must be"):
        PackedBatch.from_samples([torch.randn(16, 1, 2, 4)], [1.0], [torch.randn(0, 32)], cfg.patch_size)


def test_rope_fields_reach_the_ops():
    """theta, axes and layout are config fields: changing them changes the output."""
    base = tiny_dit()
    x, t, text = torch.randn(1, 16, 2, 4, 4), torch.tensor([5.0]), torch.randn(1, 3, 32)
    with torch.no_grad():
        out = base(x, t, text)
        for change in (dict(rope_theta=256.0), dict(rope_axes_dim=(4, 10, 10)), dict(rope_interleaved=False)):
            other = DiT(base.config.replace(**change)).eval()
            other.load_state_dict(base.state_dict())
            assert rel_err(other(x, t, text), out) > 1e-4, change


def test_backward_through_the_dit():
    model = tiny_dit().train()
    x, t, text = torch.randn(2, 16, 2, 4, 4), torch.tensor([5.0, 700.0]), torch.randn(2, 3, 32)
    model(x, t, text).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["blocks.0.self_attn.q.weight"].abs().sum() > 0


def test_compiled_dit_matches_eager():
    """Catches a graph break (fullgraph) or an op that fake tensors / AOTAutograd cannot trace in
    the default CPU path (the torch backends, the cached RoPE table's compiled branch). The trace
    is what this checks; inductor's CPU code generation (a C++ compile of every kernel, 15 s here)
    is not what fastdit runs on CPUs, and the GPU test below compiles with inductor."""
    model = tiny_dit()
    x, t, text = torch.randn(2, 16, 2, 4, 6), torch.tensor([5.0, 700.0]), torch.randn(2, 3, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, text), model(x, t, text), atol=1e-5, rtol=1e-5)


def test_config_roundtrip():
    cfg = DiTConfig(num_heads=3, head_dim=16)
    assert cfg.hidden == 48 and DiTConfig(**cfg.to_dict()) == cfg


@pytest.mark.gpu
def test_dit_cuda_bf16_and_compile():
    model = tiny_dit()
    x, t, text = torch.randn(2, 16, 3, 8, 12), torch.tensor([5.0, 700.0]), torch.randn(2, 7, 32)
    with torch.no_grad():
        expect = model(x, t, text)
        gpu = model.cuda().bfloat16()
        args = (x.cuda().bfloat16(), t.cuda(), text.cuda().bfloat16())
        out = gpu(*args)
        assert rel_err(out.float().cpu(), expect) < 3e-2
        torch.testing.assert_close(torch.compile(gpu, fullgraph=True)(*args), out, atol=2e-2, rtol=2e-2)


def test_forward_validates_the_batch_once_then_trusts_it():
    from fastdit import ops
    from fastdit.ops import validation

    # Inside values_checked the ops skip value checks (the caller did them) ...
    bad_cu = torch.tensor([0, 4, 3, 6], dtype=torch.int32)
    x, gate = torch.randn(6, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.gated_residual(x, x, gate, bad_cu)
    with validation.values_checked():
        ops.gated_residual(x, x, gate, bad_cu)
    assert validation.check_values_enabled()  # ... and the flag is restored on exit.

    # forward_packed validates the whole batch up front.
    model = tiny_dit()
    latents = [torch.randn(16, 1, 2, 4), torch.randn(16, 2, 4, 2)]
    texts = [torch.randn(3, 32), torch.randn(2, 32)]
    bad = PackedBatch.from_samples(latents, [1.0, 2.0], texts)
    bad.cu_seqlens_text = torch.tensor([0, 3, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_text"):
        model.forward_packed(bad)
    bad = PackedBatch.from_samples(latents, [1.0, 2.0], texts)
    bad.grid_thw = torch.tensor([[1, 1, 2], [2, 0, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"grid_thw\[1\]"):
        model.forward_packed(bad)
    bad = PackedBatch.from_samples(latents, [1.0, 2.0], texts)
    bad.max_seqlen = 3
    with pytest.raises(ValueError, match="max_seqlen=3 is smaller"):
        model.forward_packed(bad)
    assert validation.check_values_enabled()


@pytest.mark.triton_cpu
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton is not installed")
def test_dit_on_triton_ops_matches_reference():
    reference = tiny_dit()
    fast = DiT(reference.config, backend="triton").eval()
    fast.load_state_dict(reference.state_dict())
    assert set(fast.op_backends.values()) == {"triton"}  # every op the DiT calls has a Triton kernel
    latents = [torch.randn(16, 3, 4, 6), torch.randn(16, 1, 8, 4)]
    batch = PackedBatch.from_samples(latents, [10.0, 900.0], [torch.randn(4, 32), torch.randn(7, 32)])
    with torch.no_grad():
        assert rel_err(fast.forward_packed(batch), reference.forward_packed(batch)) < 1e-5
    with pytest.raises(ValueError, match="unknown backend"):
        DiT(reference.config, backend="fastest")
    # An op without the requested backend keeps the dispatcher's choice.
    from fastdit.ops.dispatch import backends_for

    assert backends_for("cuda", ["causal_conv3d", "gated_residual"]) == {
        "causal_conv3d": None,
        "gated_residual": "cuda",
    }
