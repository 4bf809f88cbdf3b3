import pytest
import torch
from torch import nn

from fastdit.models import DiT, preset
from fastdit.runtime import (
    FlowMatchSampler,
    SampleRequest,
    connect,
    explicit_sigmas,
    extend,
    flow_shift_sigmas,
    image_to_video,
    loop,
    sdedit,
    text_to_image,
    text_to_video,
)
from tests.conftest import rel_err


class ExactVelocity(nn.Module):
    """The exact rectified-flow velocity toward a fixed target: v = (x - target) / sigma."""

    def __init__(self, target: float):
        super().__init__()
        self.target = target
        self.anchor = nn.Parameter(torch.zeros(()))  # device / dtype for the sampler
        self.config = preset("tiny").replace(patch_size=(1, 1, 1), in_channels=4, out_channels=4)
        self.calls = []

    def forward_packed(self, batch):
        self.calls.append(batch.batch_size)
        sigma = batch.timestep[0] / 1000.0  # every sample shares the step's sigma
        return (batch.tokens - self.target) / sigma


def test_sigma_schedule():
    linear = flow_shift_sigmas(4, 1.0)
    torch.testing.assert_close(linear, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    shifted = flow_shift_sigmas(10, 5.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and (shifted[1:] < shifted[:-1]).all()
    assert (shifted[1:-1] > flow_shift_sigmas(10, 1.0)[1:-1]).all()  # more time at high noise
    with pytest.raises(ValueError, match="num_steps"):
        flow_shift_sigmas(0, 1.0)


@pytest.mark.parametrize("steps, shift, guidance", [(1, 1.0, 1.0), (7, 3.0, 5.0), (20, 5.0, 2.5)])
def test_euler_lands_on_the_target_with_the_exact_velocity(steps, shift, guidance):
    model = ExactVelocity(target=0.5)
    text = torch.randn(3, 32)
    out = FlowMatchSampler(model, num_steps=steps, shift=shift, guidance=guidance)(
        [SampleRequest((4, 2, 3, 5), text, seed=1), SampleRequest((4, 1, 2, 2), text, seed=2)]
    )
    for x in out:
        torch.testing.assert_close(x, torch.full_like(x, 0.5), atol=1e-5, rtol=0)
    # one packed forward per step, conditional + unconditional together when guided
    assert model.calls == [2 * (2 if guidance != 1.0 else 1)] * steps


class RecordSigmas(ExactVelocity):
    def forward_packed(self, batch):
        self.calls.append((batch.batch_size, round(float(batch.timestep[0]), 3)))
        return (batch.tokens - self.target) / (batch.timestep[0] / 1000.0)


def test_explicit_sigmas_run_as_given_and_guidance_one_has_no_unconditional_pass():
    model = RecordSigmas(target=-0.25)
    request = SampleRequest((4, 2, 2, 2), torch.randn(3, 32), negative_text=torch.randn(3, 32))
    (x,) = FlowMatchSampler(model, sigmas=[1.0, 0.9375, 0.8333, 0.625], guidance=1.0)([request])
    torch.testing.assert_close(x, torch.full_like(x, -0.25), atol=1e-5, rtol=0)
    assert model.calls == [(1, 1000.0), (1, 937.5), (1, 833.3), (1, 625.0)]  # batch 1: no negative pass
    torch.testing.assert_close(explicit_sigmas([0.5, 0.2, 0.0]), torch.tensor([0.5, 0.2, 0.0], dtype=torch.float64))
    # lightx2v's 4-step list [1000, 750, 500, 250] with shift 5 is exactly --steps 4 --shift 5
    lightx2v = [5 * s / (1 + 4 * s) for s in (1.0, 0.75, 0.5, 0.25)]
    torch.testing.assert_close(flow_shift_sigmas(4, 5.0), explicit_sigmas(lightx2v))


@pytest.mark.bad_input
@pytest.mark.parametrize("sigmas", [[], [0.0], [1.5, 0.5], [0.5, 0.5], [0.2, 0.6], [1.0, -0.1], [float("nan")]])
def test_bad_sigma_lists(sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        explicit_sigmas(sigmas)


def tiny():
    torch.manual_seed(0)
    model = DiT(preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def run(requests, steps=3):
    return FlowMatchSampler(tiny(), num_steps=steps, shift=3.0, guidance=4.0)(requests)


def test_known_frames_are_exactly_preserved():
    text = torch.randn(4, 32)
    image = torch.randn(16, 1, 2, 4)
    clip_a, clip_b = torch.randn(16, 2, 2, 4), torch.randn(16, 1, 2, 4)
    requests = [
        image_to_video(image, text, frames=3, seed=1),
        extend(clip_a, text, extra_frames=2, seed=2),
        extend(clip_a, text, extra_frames=1, backward=True, seed=3),
        connect(clip_a, clip_b, text, gap_frames=2, seed=4),
    ]
    i2v, forward, backward, joined = run(requests)
    assert torch.equal(i2v[:, :1], image)
    assert torch.equal(forward[:, :2], clip_a)
    assert torch.equal(backward[:, 1:], clip_a)
    assert torch.equal(joined[:, :2], clip_a) and torch.equal(joined[:, 4:], clip_b)
    assert not torch.equal(joined[:, 2], torch.zeros_like(joined[:, 2]))  # the gap was generated


def test_loop_ties_the_last_frame_to_the_first():
    (out,) = run([loop(torch.randn(3, 32), channels=16, frames=4, height=2, width=4, seed=5)])
    assert torch.equal(out[:, -1], out[:, 0])


def test_sdedit_strength_zero_returns_the_input_and_one_is_text_to_video():
    text, latent = torch.randn(3, 32), torch.randn(16, 2, 2, 4)
    unchanged, full, t2v = run(
        [sdedit(latent, text, 0.0, seed=7), sdedit(latent, text, 1.0, seed=7), text_to_video(text, 16, 2, 2, 4, seed=7)]
    )
    assert torch.equal(unchanged, latent)
    assert rel_err(full, t2v) < 1e-6
    (partial,) = run([sdedit(latent, text, 0.4, seed=7)])
    assert rel_err(partial, latent) < rel_err(t2v, latent)  # closer to its input than a fresh sample


def test_mixed_batch_equals_per_sample_runs_and_seeds_are_deterministic():
    texts = [torch.randn(n, 32) for n in (3, 6, 2)]
    requests = [
        text_to_video(texts[0], 16, 3, 2, 4, seed=11),
        text_to_image(texts[1], 16, 4, 2, seed=12),
        image_to_video(torch.randn(16, 1, 2, 2), texts[2], frames=2, seed=13),
    ]
    together = run(requests)
    for request, out in zip(requests, together):
        (alone,) = run([request])
        assert out.shape == request.shape
        assert rel_err(out, alone) < 1e-5
    again = run(requests)
    for a, b in zip(together, again):
        assert torch.equal(a, b)
    (other_seed,) = run([text_to_video(texts[0], 16, 3, 2, 4, seed=99)])
    assert rel_err(other_seed, together[0]) > 1e-2


@pytest.mark.parametrize(
    "request_kwargs, match",
    [
        (dict(shape=(16, 2, 2)), "must be .C, T, H, W."),
        (dict(shape=(16, 2, 2, 4), known=torch.zeros(16, 2, 2, 4)), "known and known_frames go together"),
        (dict(shape=(16, 2, 2, 4), init=torch.zeros(16, 1, 2, 4)), "init must have the latent shape"),
        (dict(shape=(16, 2, 2, 4), strength=0.5), "needs an init latent"),
        (dict(shape=(16, 2, 2, 4), init=torch.zeros(16, 2, 2, 4), strength=1.5), "strength must be in"),
    ],
)
@pytest.mark.bad_input
def test_bad_requests(request_kwargs, match):
    request = SampleRequest(text=torch.randn(2, 32), **request_kwargs)
    with pytest.raises(ValueError, match=match):
        run([request])


def test_two_experts_switch_at_the_boundary_with_their_own_guidance():
    high, low = RecordSigmas(target=0.3), RecordSigmas(target=0.3)
    request = SampleRequest((4, 1, 2, 2), torch.randn(3, 32), seed=3)
    sampler = FlowMatchSampler(high, sigmas=[1.0, 0.95, 0.9, 0.5, 0.2], guidance=3.0, model_2=low,
                               boundary_ratio=0.9, guidance_2=1.0)  # fmt: skip
    (x,) = sampler([request])
    torch.testing.assert_close(x, torch.full_like(x, 0.3), atol=1e-5, rtol=0)
    # t >= 900 on the high-noise expert with CFG (batch 2), below on the low-noise one without (batch 1)
    assert high.calls == [(2, 1000.0), (2, 950.0), (2, 900.0)]
    assert low.calls == [(1, 500.0), (1, 200.0)]


def test_offloading_keeps_only_the_active_expert_on_the_device(monkeypatch):
    high, low = RecordSigmas(target=0.0), RecordSigmas(target=0.0)
    moves = []
    for name, m in (("high", high), ("low", low)):
        monkeypatch.setattr(m, "to", lambda device, _name=name, _m=m: moves.append((_name, str(device))) or _m)
    sampler = FlowMatchSampler(high, num_steps=4, shift=1.0, model_2=low, boundary_ratio=0.5, offload_experts=True,
                               guidance=1.0)  # fmt: skip
    sampler([SampleRequest((4, 1, 2, 2), torch.randn(3, 32))])
    # steps at t = 1000, 750, 500 on the high-noise expert, 250 on the low-noise one: one move per switch
    # (the sampling device here is the CPU, so "on" is cpu too)
    assert moves == [("low", "cpu"), ("high", "cpu"), ("high", "cpu"), ("low", "cpu")]
    assert [c[1] for c in high.calls] == [1000.0, 750.0, 500.0] and [c[1] for c in low.calls] == [250.0]


@pytest.mark.bad_input
def test_expert_arguments_are_checked():
    model = RecordSigmas(target=0.0)
    with pytest.raises(ValueError, match="go together"):
        FlowMatchSampler(model, model_2=model)
    with pytest.raises(ValueError, match="go together"):
        FlowMatchSampler(model, boundary_ratio=0.5)
    with pytest.raises(ValueError, match="boundary_ratio must be in"):
        FlowMatchSampler(model, model_2=model, boundary_ratio=1.5)
    with pytest.raises(ValueError, match="needs model_2"):
        FlowMatchSampler(model, guidance_2=2.0)


@pytest.mark.bad_input
def test_expert_values_and_disagreeing_experts_are_refused_before_the_first_step():
    """Catches boundary_ratio "0.5" reaching a comparison (TypeError from deep inside), NaN
    guidance passing every bound check (NaN video), and two experts of different widths failing
    only once the sampler switches to the second, steps into the run."""
    model = RecordSigmas(target=0.0)
    with pytest.raises(TypeError, match="boundary_ratio must be a number, got str '0.5'"):
        FlowMatchSampler(model, model_2=model, boundary_ratio="0.5")
    for name in ("guidance", "shift"):
        with pytest.raises(ValueError, match=f"{name} must be finite, got nan"):
            FlowMatchSampler(model, **{name: float("nan")})
    with pytest.raises(ValueError, match="guidance_2 must be finite"):
        FlowMatchSampler(model, model_2=model, boundary_ratio=0.5, guidance_2=float("inf"))
    with pytest.raises(TypeError, match="guidance must be a number, got bool"):
        FlowMatchSampler(model, guidance=True)
    wide = RecordSigmas(target=0.0)
    wide.config = wide.config.replace(text_dim=48)
    with pytest.raises(ValueError, match="cannot take turns on the same latents: text_dim: 32 vs 48"):
        FlowMatchSampler(model, model_2=wide, boundary_ratio=0.5)
    assert model.calls == [] and wide.calls == []


@pytest.mark.bad_input
def test_a_text_width_that_is_not_the_models_is_named():
    """Catches the width check missing under cache_text: the text's keys and values were computed
    by a raw matmul that failed with shapes and no argument name."""
    dit = DiT(preset("tiny"), backend="reference").eval()
    for cache_text in (True, False):
        sampler = FlowMatchSampler(dit, num_steps=1, cache_text=cache_text)
        request = SampleRequest((16, 1, 2, 2), torch.randn(3, 40))
        with pytest.raises(ValueError, match=r"requests\[0\].text has width 40, model's text_dim: 32"):
            sampler([request])
        request = SampleRequest((16, 1, 2, 2), torch.randn(3, 32), negative_text=torch.randn(2, 8))
        with pytest.raises(ValueError, match=r"requests\[0\].negative_text has width 8"):
            sampler([request])


@pytest.mark.bad_input
@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64])
def test_bool_and_complex_timesteps_are_refused(dtype):
    """Catches a timestep dtype check that lets a bool run as 0 / 1 or a complex one lose its
    imaginary part in the sinusoidal features (both gave a result before)."""
    from fastdit.models import PackedBatch

    dit = DiT(preset("tiny"), backend="reference").eval()
    latents, text = torch.randn(1, 16, 1, 2, 2), torch.randn(1, 3, 32)
    timestep = torch.ones(1, dtype=dtype)
    with pytest.raises(TypeError, match=f"timestep must hold real numbers .float or int., got {dtype}"):
        dit(latents, timestep, text)
    with pytest.raises(TypeError, match="timesteps must hold real numbers"):
        PackedBatch.from_samples([latents[0]], timestep, [text[0]], (1, 2, 2))


@pytest.mark.bad_input
def test_an_image_request_to_a_text_to_video_model_is_named():
    """Catches the image states reaching a T2V model's missing image embedder (a NoneType call in
    text_kv, which the sampler runs before the forward's own check)."""
    dit = DiT(preset("tiny"), backend="reference").eval()
    request = SampleRequest((16, 1, 2, 2), torch.randn(3, 32), image=torch.randn(4, 8))
    for cache_text in (True, False):
        with pytest.raises(ValueError, match="has no image conditioning .image_dim is None"):
            FlowMatchSampler(dit, num_steps=1, cache_text=cache_text)([request])
