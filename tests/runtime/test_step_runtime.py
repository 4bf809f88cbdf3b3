"""The step runtime: text keys / values computed once per run, CUDA-graph replay per shape bucket."""

import pytest
import torch

from fastdit.models import DiT, PackedBatch, preset
from fastdit.runtime import FlowMatchSampler, GraphedDiT, text_to_image, text_to_video
from tests.conftest import rel_err


def tiny(device="cpu", backend=None):
    torch.manual_seed(0)
    model = DiT(preset("tiny"), backend=backend).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.to(device)


def mixed_batch(cfg, device="cpu", dtype=torch.float32):
    latents = [torch.randn(cfg.in_channels, 3, 4, 6), torch.randn(cfg.in_channels, 1, 8, 4)]
    texts = [torch.randn(n, cfg.text_dim) for n in (4, 7)]
    batch = PackedBatch.from_samples([x.to(device, dtype) for x in latents], torch.tensor([10.0, 600.0], device=device),
                                     [t.to(device, dtype) for t in texts], cfg.patch_size)  # fmt: skip
    return batch


def test_precomputed_text_kv_gives_the_same_prediction():
    model = tiny()
    batch = mixed_batch(model.config)
    with torch.no_grad():
        kv = model.text_kv(batch.text)
        cfg = model.config
        assert len(kv) == cfg.num_layers and kv[0][0].shape == (11, cfg.num_heads, cfg.head_dim)
        assert torch.equal(model.forward_packed(batch, text_kv=kv), model.forward_packed(batch))
    with pytest.raises(ValueError, match="text_kv has 1 entries"):
        model.forward_packed(batch, text_kv=kv[:1])


@pytest.mark.parametrize("cache_text", [True, False])
def test_sampler_computes_the_text_once_per_run(cache_text, set_setting):
    set_setting(batch_invariant=False)  # one text MLP call per batch (per sample when batch-invariant)
    model = tiny()
    calls = []
    model.text_in.register_forward_hook(lambda *a: calls.append(1))
    requests = [text_to_video(torch.randn(5, 32), 16, 2, 2, 4, seed=1), text_to_image(torch.randn(3, 32), 16, 4, 2)]
    out = FlowMatchSampler(model, num_steps=4, guidance=3.0, cache_text=cache_text)(requests)
    assert len(calls) == (1 if cache_text else 4)
    reference = FlowMatchSampler(model, num_steps=4, guidance=3.0, cache_text=False)(requests)
    for a, b in zip(out, reference):
        assert torch.equal(a, b)


def test_graphs_need_cuda_and_a_fast_backend():
    with pytest.raises(ValueError, match="needs a CUDA model"):
        GraphedDiT(tiny())


@pytest.mark.gpu
def test_graph_replay_matches_eager_per_bucket():
    model = tiny("cuda").to(torch.bfloat16)
    graphed = GraphedDiT(model)
    with torch.no_grad():
        first = mixed_batch(model.config, "cuda", torch.bfloat16)
        kv = model.text_kv(first.text)
        for batch in (first, mixed_batch(model.config, "cuda", torch.bfloat16)):  # same bucket, new values
            want = model.forward_packed(batch, text_kv=kv)
            got = graphed(batch, text_kv=kv)
            assert rel_err(got, want) <= 1e-2
        assert graphed.captures == 1
        image = torch.randn(16, 1, 4, 4, device="cuda", dtype=torch.bfloat16)
        text = torch.randn(2, 32, device="cuda", dtype=torch.bfloat16)
        other = PackedBatch.from_samples([image], torch.tensor([3.0], device="cuda"), [text], (1, 2, 2))
        assert rel_err(graphed(other), model.forward_packed(other)) <= 1e-2
        assert graphed.captures == 2


@pytest.mark.gpu
def test_sampler_with_cuda_graphs_matches_eager():
    model = tiny("cuda").to(torch.bfloat16)
    requests = [text_to_video(torch.randn(5, 32), 16, 3, 4, 4, seed=1), text_to_image(torch.randn(3, 32), 16, 4, 2)]
    eager = FlowMatchSampler(model, num_steps=4, guidance=3.0)(requests)
    graphed = FlowMatchSampler(model, num_steps=4, guidance=3.0, cuda_graphs=True)(requests)
    for a, b in zip(graphed, eager):
        assert rel_err(a, b) <= 2e-2


@pytest.mark.gpu
def test_fast_step_allocates_no_more_than_the_reference():
    model = tiny("cuda").to(torch.bfloat16)
    batch = mixed_batch(model.config, "cuda", torch.bfloat16)
    peaks = {}
    with torch.no_grad():
        for backend in ("reference", None):
            model.set_backend(backend)
            model.forward_packed(batch)  # warm up (Triton compiles, autotunes)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model.forward_packed(batch)
            peaks[backend] = torch.cuda.max_memory_allocated() - base
    assert peaks[None] <= peaks["reference"], peaks
