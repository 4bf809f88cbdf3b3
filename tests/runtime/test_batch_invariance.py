"""Batch invariance: a request's result does not depend on what else is in its batch, bitwise
(the ``batch_invariant`` setting, on by default; docs/design.md, "Batch invariance")."""

import pytest
import torch

from fastdit.models import DiT, DiTConfig, PackedBatch
from fastdit.models.packing import per_sample
from fastdit.runtime import FlowMatchSampler, text_to_image, text_to_video


def _requests():
    g = torch.Generator().manual_seed(1)
    texts = [torch.randn(n, 32, generator=g) for n in (5, 7, 3)]
    return [text_to_video(texts[0], 16, 3, 4, 6, seed=1), text_to_video(texts[1], 16, 2, 8, 4, seed=2),
            text_to_image(texts[2], 16, 6, 6, seed=3)]  # fmt: skip


@pytest.mark.parametrize("guidance", [3.0, 1.0], ids=["cfg", "no-cfg"])
def test_a_request_alone_equals_it_packed_with_others_bitwise(guidance, set_setting):
    """Catches any matmul run over the whole packed batch (its rounding depends on the row count
    and a row's place): with the setting off the same request differs (so the test can fail)."""
    torch.manual_seed(0)
    model = DiT.from_preset("tiny").eval()
    requests = _requests()
    sampler = FlowMatchSampler(model, num_steps=3, guidance=guidance)
    together = sampler(requests)
    for request, packed in zip(requests, together):
        assert torch.equal(sampler([request])[0], packed)
    assert torch.equal(sampler(requests[::-1])[0], together[2])  # order in the batch does not matter either
    set_setting(batch_invariant=False)
    assert not torch.equal(sampler([requests[0]])[0], sampler(requests)[0])


def test_image_states_and_per_token_timesteps_are_batch_invariant_too():
    """The I2V model's image projections and Wan 2.2 TI2V's per-token timesteps: catches the image
    MLP or the per-token time MLP run over the whole batch."""
    torch.manual_seed(0)
    config = DiTConfig(num_heads=2, head_dim=24, num_layers=2, ffn_dim=96, text_dim=32, freq_dim=32,
                       image_dim=20, added_kv_proj_dim=48)  # fmt: skip
    model = DiT(config).eval()
    g = torch.Generator().manual_seed(2)
    latents = [torch.randn(16, 2, 4, 4, generator=g), torch.randn(16, 1, 6, 4, generator=g)]
    texts = [torch.randn(4, 32, generator=g), torch.randn(6, 32, generator=g)]
    images = [torch.randn(3, 20, generator=g), torch.randn(5, 20, generator=g)]
    steps = [torch.rand(8, generator=g) * 1000, torch.rand(6, generator=g) * 1000]  # per token
    with torch.no_grad():
        both = model.forward_packed(PackedBatch.from_samples(latents, torch.cat(steps), texts, images=images))
        first = model.forward_packed(PackedBatch.from_samples(latents[:1], steps[0], texts[:1], images=images[:1]))
    assert torch.equal(both[: first.shape[0]], first)


def test_per_token_timesteps_of_one_value_equal_a_per_sample_timestep(set_setting):
    """Catches the per-token time MLP run over all tokens at once: a sample then gets other rounding
    when a batch mate's clean frames turn the whole step's timesteps per token."""
    torch.manual_seed(0)
    model = DiT.from_preset("tiny").eval()
    x, text = torch.randn(16, 1, 4, 4), torch.randn(3, 32)
    with torch.no_grad():
        per_sample = model.forward_packed(PackedBatch.from_samples([x], [500.0], [text]))
        per_token = model.forward_packed(PackedBatch.from_samples([x], torch.full((4,), 500.0), [text]))
        assert torch.equal(per_sample, per_token)
        set_setting(batch_invariant=False)
        assert not torch.equal(model.forward_packed(PackedBatch.from_samples([x], torch.full((4,), 500.0), [text])),
                               per_sample)  # fmt: skip


def test_per_sample_runs_each_sample_alone_and_checks_its_bounds(set_setting):
    """Catches bounds that do not cover the rows (a sample silently dropped or read twice)."""
    calls = []
    x = torch.arange(12.0).view(6, 2)
    out = per_sample(lambda t: calls.append(t.shape[0]) or t * 2, x, (0, 1, 4, 6))
    assert torch.equal(out, x * 2) and calls == [1, 3, 2]
    view = torch.arange(24.0).view(2, 12)[:, 1::2].t()  # (6, 2), strided and offset
    assert torch.equal(per_sample(lambda t: t * 2, view, (0, 1, 4, 6)), view * 2)
    for bad in ((0, 2, 5), (1, 3, 6)):
        with pytest.raises(ValueError, match="bounds must run from 0 to x's 6 rows"):
            per_sample(lambda t: t, x, bad)
    calls.clear()
    set_setting(batch_invariant=False)
    per_sample(lambda t: calls.append(t.shape[0]) or t, x, (0, 1, 4, 6))
    assert calls == [6]


@pytest.mark.bad_input
def test_a_batch_whose_host_bounds_disagree_with_its_cu_seqlens_is_refused():
    """Catches a batch edited after it was built (or built by hand with wrong host bounds): its
    per-sample matmuls would be cut at the wrong rows."""
    batch = PackedBatch.from_samples([torch.randn(16, 1, 2, 4), torch.randn(16, 1, 4, 2)], [1.0, 2.0],
                                     [torch.randn(3, 32), torch.randn(2, 32)])  # fmt: skip
    assert batch.bounds("tokens") == (0, 2, 4) == tuple(batch.cu_seqlens.tolist())
    assert batch.bounds("text") == (0, 3, 5)
    batch.cu_seqlens = torch.tensor([0, 1, 4], dtype=torch.int32)
    batch.grid_thw = torch.tensor([[1, 1, 1], [1, 3, 1]], dtype=torch.int32)
    batch.max_seqlen = 3
    with pytest.raises(ValueError, match=r"host_bounds\['tokens'\] = \(0, 2, 4\) disagrees"):
        batch.validate()
    batch.host_bounds = None  # read back from the device instead
    assert batch.validate().bounds("tokens") == (0, 1, 4)
    with pytest.raises(ValueError, match="kind must be"):
        batch.bounds("frames")


@pytest.mark.gpu
def test_batch_invariance_on_the_gpu():
    """The same guarantee in bf16 on CUDA with the fast kernels (Triton / vendor attention, cuBLAS
    GEMMs per sample): a request alone equals it packed with two others, bitwise."""
    torch.manual_seed(0)
    model = DiT.from_preset("tiny").cuda().to(torch.bfloat16).eval()
    requests = _requests()
    sampler = FlowMatchSampler(model, num_steps=3, guidance=3.0)
    together = sampler(requests)
    for request, packed in zip(requests, together):
        assert torch.equal(sampler([request])[0], packed)
