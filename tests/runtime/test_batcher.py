"""StepBatcher: every active job's step in one packed forward; each job bitwise what it gives alone."""

import pytest
import torch

from fastdit.models import DiT, DiTConfig
from fastdit.runtime import FlowMatchSampler, image_to_video, text_to_image, text_to_video
from fastdit.runtime.batcher import StepBatcher
from fastdit.runtime.modes import sdedit


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DiT.from_preset("tiny").eval()


def _texts(*lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 32, generator=g) for n in lengths]


def _alone(model, request, **kwargs):
    return FlowMatchSampler(model, **kwargs)([request])[0]


def test_jobs_of_three_sizes_share_forwards_and_equal_themselves_alone(model):
    """Catches a job stepped at another job's sigma or guidance, a CFG pair split across the wrong
    jobs' text keys, or rows of one job leaking into another's matmul (bitwise check)."""
    texts = _texts(5, 7, 3)
    jobs = [(text_to_video(texts[0], 16, 3, 4, 6, seed=1), dict(num_steps=4, guidance=3.0)),
            (text_to_video(texts[1], 16, 2, 8, 4, seed=2), dict(num_steps=3, guidance=1.0)),
            (text_to_image(texts[2], 16, 6, 6, seed=3, negative_text=texts[0]),
             dict(num_steps=5, shift=3.0))]  # fmt: skip
    batcher = StepBatcher(model)
    submitted = [batcher.submit(request, **kwargs) for request, kwargs in jobs]
    batcher.run()
    assert max(batcher.samples_per_forward) == 5 and batcher.forwards == 5  # 2 + 1 + 2 samples, the longest 5 steps
    for job, (request, kwargs) in zip(submitted, jobs):
        assert job.status == "completed" and job.progress == 1.0
        assert torch.equal(job.latent, _alone(model, request, **kwargs))


def test_a_job_that_joins_mid_run_and_known_frames_and_sdedit_equal_alone(model):
    """Catches a late job started at the others' step, and the modes' known frames / SDEdit start
    handled differently from the sampler."""
    texts = _texts(4, 6, 5, seed=2)
    first = text_to_video(texts[0], 16, 3, 4, 4, seed=5)
    image = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    video = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    late = [image_to_video(image, texts[1], frames=3, seed=6), sdedit(video, texts[2], 0.6, seed=7)]
    batcher = StepBatcher(model)
    a = batcher.submit(first, num_steps=6, guidance=2.0)
    batcher.step()
    batcher.step()
    b, c = (batcher.submit(r, num_steps=4, guidance=4.0) for r in late)
    batcher.run()
    assert torch.equal(a.latent, _alone(model, first, num_steps=6, guidance=2.0))
    for job, request in zip((b, c), late):
        assert torch.equal(job.latent, _alone(model, request, num_steps=4, guidance=4.0))


def test_the_token_budget_is_first_come_first_served(model):
    """Catches a forward over the budget, and a small late job overtaking a large waiting one (which
    could then wait forever)."""
    texts = _texts(3, 3, 3)
    batcher = StepBatcher(model, max_batch_tokens=40)
    big = [batcher.submit(text_to_video(t, 16, 2, 4, 8, seed=i), num_steps=2, guidance=3.0)  # 16 x 2 tokens
           for i, t in enumerate(texts[:2])]  # fmt: skip
    small = batcher.submit(text_to_image(texts[2], 16, 2, 2, seed=9), num_steps=2, guidance=1.0)  # 1 token
    batcher.step()
    assert [j.status for j in (*big, small)] == ["in_progress", "queued", "queued"]
    batcher.run()
    assert max(batcher.tokens_per_forward) <= 40 and all(j.status == "completed" for j in (*big, small))
    with pytest.raises(ValueError, match="needs 64 tokens per forward; max_batch_tokens is 40"):
        batcher.submit(text_to_video(texts[0], 16, 2, 8, 8), num_steps=2, guidance=3.0)


def test_cancelled_jobs_stop_at_the_next_step_and_the_others_are_untouched(model):
    """Catches a cancelled job still stepped (or its result published), and its leaving changing
    the others' results."""
    texts = _texts(4, 5, 6, seed=3)
    requests = [text_to_video(t, 16, 2, 4, 4, seed=i) for i, t in enumerate(texts)]
    batcher = StepBatcher(model)
    jobs = [batcher.submit(r, num_steps=4, guidance=3.0) for r in requests]
    batcher.step()
    assert batcher.cancel(jobs[1].id) and not batcher.cancel(jobs[1].id) and not batcher.cancel(999)
    batcher.run()
    assert jobs[1].status == "cancelled" and jobs[1].step == 1
    assert batcher.samples_per_forward == [6, 4, 4, 4]
    for i in (0, 2):
        assert torch.equal(jobs[i].latent, _alone(model, requests[i], num_steps=4, guidance=3.0))
    queued = batcher.submit(requests[0], num_steps=2, guidance=3.0)
    assert batcher.cancel(queued.id) and batcher.idle


def test_clean_frame_jobs_batch_with_the_others_and_equal_alone(model):
    """Wan 2.2 TI2V's image-to-video (a clean first frame whose tokens see timestep 0): the step's
    timesteps become per token for every job; catches any job's result changing with that (the time
    MLP must give a value the same embedding per token as per sample)."""
    texts = _texts(4, 5, seed=4)
    image = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(8))
    requests = [
        image_to_video(image, texts[0], frames=3, clean=True, seed=1),
        text_to_video(texts[1], 16, 2, 4, 6, seed=2),
    ]
    batcher = StepBatcher(model)
    jobs = [batcher.submit(r, num_steps=3, guidance=2.5) for r in requests]
    batcher.run()
    for job, request in zip(jobs, requests):
        assert torch.equal(job.latent, _alone(model, request, num_steps=3, guidance=2.5))


def test_image_conditioned_jobs_equal_alone():
    """Wan 2.1 I2V's image states: catches their keys / values missing from the batched text_kv."""
    torch.manual_seed(0)
    config = DiTConfig(num_heads=2, head_dim=24, num_layers=2, ffn_dim=96, text_dim=32, freq_dim=32,
                       image_dim=20, added_kv_proj_dim=48)  # fmt: skip
    model = DiT(config).eval()
    g = torch.Generator().manual_seed(5)
    requests = [text_to_video(t, 16, 2, 4, 4, seed=i, image=torch.randn(n, 20, generator=g))
                for i, (t, n) in enumerate(zip(_texts(4, 6), (3, 5)))]  # fmt: skip
    batcher = StepBatcher(model)
    jobs = [batcher.submit(r, num_steps=3, guidance=2.0) for r in requests]
    batcher.run()
    for job, request in zip(jobs, requests):
        assert torch.equal(job.latent, _alone(model, request, num_steps=3, guidance=2.0))


def test_a_job_with_nothing_to_denoise_ends_as_it_starts_and_a_failed_forward_fails_its_jobs(model):
    """Catches an SDEdit job at strength 0 never reported done (it holds no step), and jobs left
    in progress forever when their shared forward raised."""
    texts = _texts(3, 4, seed=6)
    video = torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(9))
    batcher = StepBatcher(model)
    still = batcher.submit(sdedit(video, texts[0], 0.0), num_steps=2)
    moving = batcher.submit(text_to_image(texts[1], 16, 2, 2), num_steps=2)
    assert batcher.step() == [still] and still.status == "completed" and torch.equal(still.latent, video)
    assert moving.status == "in_progress"

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    model.forward_packed = broken  # an instance attribute over the method, removed below
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            batcher.step()
    finally:
        del model.forward_packed
    assert moving.status == "failed" and "out of memory" in moving.error and batcher.idle


@pytest.mark.bad_input
def test_bad_jobs_are_refused_when_submitted(model):
    """Catches a job that would fail inside a shared forward (taking every other job down with it)."""
    (text,) = _texts(4)
    batcher = StepBatcher(model)
    cases = [(text_to_video(torch.randn(4, 8), 16, 1, 2, 2), {}, "text must be"),
             (text_to_video(text, 8, 1, 2, 2), {}, "8 channels; the model takes 16"),
             (text_to_video(text, 16, 1, 3, 2), {}, "is not divisible by the patch"),
             (text_to_video(text, 16, 1, 2, 2), {"guidance": -1.0}, "guidance must be >= 0"),
             (text_to_video(text, 16, 1, 2, 2), {"guidance": float("nan")}, "finite"),
             (text_to_video(text, 16, 1, 2, 2), {"num_steps": 0}, "num_steps must be >= 1"),
             (text_to_video(text, 16, 1, 2, 2, image=torch.randn(2, 4)), {}, "image-conditioned")]  # fmt: skip
    for request, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            batcher.submit(request, **kwargs)
    with pytest.raises(ValueError, match="max_batch_tokens must be a positive int"):
        StepBatcher(model, max_batch_tokens=0)
    assert batcher.idle and not batcher.jobs
