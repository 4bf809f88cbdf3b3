"""Flow-matching (rectified flow) sampler with classifier-free guidance over packed batches.

The model predicts the velocity ``v = noise - x0`` at noise level sigma (timestep = 1000 sigma,
Wan's convention); an Euler step moves ``x`` from sigma to the next sigma along ``v``. The
sigma schedule is shifted toward high noise, ``s' = shift s / (1 + (shift - 1) s)`` (SD3 / Wan).

Every request is a latent of its own size and duration with its own text, seed and conditioning,
and all requests (times two with classifier-free guidance: the conditional and unconditional
pass) go through the model as one packed batch per step. Conditioning on known latent frames
(the Sora report's image-to-video, extension, connection; Open-Sora's mask strategy) re-imposes
the known frames, noised to the current sigma with the request's own noise, after every step,
and exactly at the end. SDEdit starts a request from its input noised to ``strength``.

Noise comes from a per-request ``torch.Generator`` seeded with the request's seed, so a request
gives the same result alone or in any batch.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastdit.models.packing import PackedBatch


def flow_shift_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """(num_steps + 1,) float64 noise levels from 1 to 0, shifted toward high noise."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def explicit_sigmas(values: Sequence[float]) -> torch.Tensor:
    """``(len + 1,)`` float64 noise levels from an explicit list, e.g. a step-distilled model's
    ``[1.0, 0.9375, 0.8333, 0.625]``: taken as is (no shift), strictly decreasing in ``(0, 1]``,
    with the final 0 appended when the list does not end at 0."""
    sigmas = [float(v) for v in values]
    if sigmas and sigmas[-1] == 0.0:
        sigmas = sigmas[:-1]
    if not sigmas:
        raise ValueError("sigmas must hold at least one noise level above 0")
    if not all(0.0 < s <= 1.0 for s in sigmas) or any(b >= a for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sigmas must decrease strictly within (0, 1] (then an optional 0), got {list(values)}")
    return torch.tensor(sigmas + [0.0], dtype=torch.float64)


@dataclass
class SampleRequest:
    """One sample to generate.

    Attributes:
        shape: latent ``(C, T, H, W)``.
        text: ``(L, text_dim)`` conditional text embedding.
        negative_text: ``(L', text_dim)`` for classifier-free guidance (None: zeros like ``text``).
        seed: seeds this request's noise.
        known: ``(C, T, H, W)`` latent values of the known frames (None: none are known).
        known_frames: ``(T,)`` bool, the latent frames taken from ``known``.
        tie_last_to_first: seamless loop: the last latent frame is set to the first after every step.
        init: ``(C, T, H, W)`` SDEdit input, noised to ``strength`` then denoised (None: start from noise).
        strength: SDEdit noise level in [0, 1]; 0 returns ``init`` unchanged.
        condition: ``(C_cond, T, H, W)`` channels appended to the latent at every model call, the
            model's own conditioning (Wan 2.1 I2V: a first-frame mask and the image's latent).
        image: ``(L_image, image_dim)`` image-encoder states for an I2V model's cross-attention
            (the unconditional pass keeps them, as diffusers does).
        clean_known: the known frames stay clean (never re-noised) and their tokens are given
            timestep 0, per token: Wan 2.2 TI2V's image-to-video (diffusers' ``expand_timesteps``).
    """

    shape: tuple[int, int, int, int]
    text: torch.Tensor
    negative_text: torch.Tensor | None = None
    seed: int = 0
    known: torch.Tensor | None = None
    known_frames: torch.Tensor | None = None
    tie_last_to_first: bool = False
    init: torch.Tensor | None = None
    strength: float = 1.0
    condition: torch.Tensor | None = None
    image: torch.Tensor | None = None
    clean_known: bool = False

    def validate(self, index: int) -> None:
        shape = tuple(self.shape)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"requests[{index}].shape must be (C, T, H, W) of positive sizes, got {self.shape}")
        for name in ("known", "init"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(
                    f"requests[{index}].{name} must have the latent shape {shape}, got {tuple(value.shape)}"
                )
        if (self.known is None) != (self.known_frames is None):
            raise ValueError(f"requests[{index}]: known and known_frames go together")
        if self.known_frames is not None and tuple(self.known_frames.shape) != (shape[1],):
            raise ValueError(f"requests[{index}].known_frames must have shape (T,) = ({shape[1]},)")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"requests[{index}].strength must be in [0, 1], got {self.strength}")
        if self.init is None and self.strength != 1.0:
            raise ValueError(f"requests[{index}]: strength < 1 needs an init latent (SDEdit)")
        if self.condition is not None and (self.condition.dim() != 4 or tuple(self.condition.shape[1:]) != shape[1:]):
            raise ValueError(
                f"requests[{index}].condition must be (C_cond, T, H, W) with (T, H, W) = {shape[1:]}, "
                f"got {tuple(self.condition.shape)}"
            )
        if self.clean_known and self.known is None:
            raise ValueError(f"requests[{index}]: clean_known needs known frames")
        if self.image is not None and (self.image.dim() != 2 or self.image.shape[0] < 1):
            raise ValueError(
                f"requests[{index}].image must be (L_image >= 1, image_dim), got {tuple(self.image.shape)}"
            )


def start_state(request: SampleRequest, sigmas: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(noise, latent, first step)`` of a request on a schedule: its seeded noise, the latent it
    starts from (SDEdit: its input noised to the first sigma <= its strength) with the known frames
    imposed, and that step's index (0 from pure noise). The sampler and the step batcher share it."""
    gen = torch.Generator(device="cpu").manual_seed(int(request.seed))
    eps = torch.randn(request.shape, generator=gen, dtype=torch.float32).to(device)
    start = 0 if request.init is None else int((sigmas <= request.strength + 1e-12).nonzero()[0].item())
    sigma = float(sigmas[start])
    x = eps if request.init is None else (1 - sigma) * request.init.to(device).float() + sigma * eps
    return eps, FlowMatchSampler._impose(request, x, eps, sigma), start


# What two experts must agree on to take turns on the same latents and text (Wan 2.2 A14B).
EXPERT_FIELDS = ("in_channels", "out_channels", "patch_size", "text_dim", "image_dim")


def _check_experts_agree(model, model_2) -> None:
    """Refuse, before the first step, two experts that cannot sample the same latents."""
    first, second = getattr(model, "config", None), getattr(model_2, "config", None)
    if first is None or second is None:
        raise TypeError("model and model_2 must be DiTs (with a .config)")
    differ = [f"{f}: {getattr(first, f, None)} vs {getattr(second, f, None)}" for f in EXPERT_FIELDS
              if getattr(first, f, None) != getattr(second, f, None)]  # fmt: skip
    if differ:
        raise ValueError(f"model and model_2 cannot take turns on the same latents: {'; '.join(differ)}")


class FlowMatchSampler:
    """Sample latents for a batch of :class:`SampleRequest` with a DiT (``forward_packed``).

    Args:
        model: a :class:`fastdit.models.DiT` (anything with ``forward_packed`` and ``config``).
        num_steps: Euler steps from sigma = 1 to 0.
        shift: timestep shift (Wan uses 5 at 720p, 3 at 480p).
        guidance: classifier-free guidance scale; 1 runs no unconditional pass at all (what
            CFG-distilled models and LoRAs sample with).
        sigmas: an explicit schedule (:func:`explicit_sigmas`) instead of ``num_steps`` / ``shift``.
        progress: show a tqdm progress bar (if tqdm is installed).
        cache_text: compute the text's cross-attention keys and values once per run (per set of
            active requests) instead of once per step, when the model offers ``text_kv``.
        cuda_graphs: run each step as a CUDA graph replay, captured once per shape bucket
            (:class:`fastdit.runtime.GraphedDiT`; CUDA and the fast backends only).
        model_2: Wan 2.2 A14B's low-noise expert: steps whose timestep (1000 sigma) is below
            ``boundary_ratio * 1000`` run on it, the others on ``model`` (diffusers' ``WanPipeline``
            with ``transformer_2`` and ``boundary_ratio``).
        boundary_ratio: where the experts switch, in (0, 1]; needed with ``model_2``.
        guidance_2: the low-noise expert's guidance scale (None: ``guidance``).
        offload_experts: keep only the active expert on the sampling device, the other on the
            CPU (moved when the experts switch, once per run), for GPUs that cannot hold both.
    """

    def __init__(self, model, num_steps: int = 30, shift: float = 5.0, guidance: float = 5.0, progress: bool = False,
                 cache_text: bool = True, cuda_graphs: bool = False, sigmas: Sequence[float] | None = None,
                 model_2=None, boundary_ratio: float | None = None, guidance_2: float | None = None,
                 offload_experts: bool = False):  # fmt: skip
        if (model_2 is None) != (boundary_ratio is None):
            raise ValueError("model_2 and boundary_ratio go together (Wan 2.2's two experts)")
        for name, value in (("boundary_ratio", boundary_ratio), ("guidance", guidance), ("guidance_2", guidance_2),
                            ("shift", shift)):  # fmt: skip
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if boundary_ratio is not None and not 0.0 < boundary_ratio <= 1.0:
            raise ValueError(f"boundary_ratio must be in (0, 1], got {boundary_ratio}")
        if guidance_2 is not None and model_2 is None:
            raise ValueError("guidance_2 is the low-noise expert's scale: it needs model_2")
        if model_2 is not None:
            _check_experts_agree(model, model_2)
        self.model = model
        self.experts = [model] if model_2 is None else [model, model_2]
        self.boundary = None if boundary_ratio is None else float(boundary_ratio) * 1000.0
        self.sigmas = flow_shift_sigmas(num_steps, shift) if sigmas is None else explicit_sigmas(sigmas)
        self.guidance = float(guidance)
        self.guidances = [self.guidance, self.guidance if guidance_2 is None else float(guidance_2)]
        self.progress = progress
        self.offload_experts = offload_experts
        self.cache_text = cache_text and all(hasattr(m, "text_kv") for m in self.experts)
        self.forwards = [m.forward_packed for m in self.experts]
        if cuda_graphs:
            from fastdit.runtime.graphs import GraphedDiT

            self.forwards = [GraphedDiT(m) for m in self.experts]
        self.forward = self.forwards[0]
        self._resident = None  # the expert on the device, with offload_experts

    def expert(self, sigma: float) -> int:
        """0 (``model``) at timesteps >= the boundary, 1 (``model_2``) below it."""
        return 0 if self.boundary is None or sigma * 1000.0 >= self.boundary else 1

    def _activate(self, index: int, device: torch.device) -> None:
        if not self.offload_experts or self._resident == index:
            return
        self._resident = index
        for i, m in enumerate(self.experts):
            if i != index:
                m.to("cpu")
        self.experts[index].to(device)

    @torch.no_grad()
    def __call__(self, requests: Sequence[SampleRequest]) -> list[torch.Tensor]:
        if not requests:
            raise ValueError("requests must not be empty")
        for i, request in enumerate(requests):
            request.validate(i)
            text_dim = self.model.config.text_dim
            for name, text in (("text", request.text), ("negative_text", request.negative_text)):
                if text is not None and text.shape[-1] != text_dim:
                    raise ValueError(f"requests[{i}].{name} has width {text.shape[-1]}, model's text_dim: {text_dim}")
        param = next(self.model.parameters())
        device, dtype = param.device, param.dtype
        steps = len(self.sigmas) - 1
        noise, latents, starts = [], [], []
        for request in requests:
            eps, x, start = start_state(request, self.sigmas, device)
            noise.append(eps)
            latents.append(x)
            starts.append(start)

        self._resident = None
        bar = _progress(steps, self.progress)
        text_kv = {}  # per set of active requests: the text is fixed for the whole run
        for step in range(steps):
            active = [i for i, start in enumerate(starts) if start <= step]
            if active:
                sigma, sigma_next = float(self.sigmas[step]), float(self.sigmas[step + 1])
                expert = self.expert(sigma)
                self._activate(expert, device)
                velocities = self._velocities([requests[i] for i in active], [latents[i] for i in active], sigma,
                                              device, dtype, text_kv, (expert, tuple(active)), expert)  # fmt: skip
                for i, v in zip(active, velocities):
                    x = latents[i] + (sigma_next - sigma) * v
                    latents[i] = self._impose(requests[i], x, noise[i], sigma_next)
            bar.update(1)
        bar.close()
        return latents

    def _velocities(self, requests, latents, sigma, device, dtype, text_kv, key, expert=0) -> list[torch.Tensor]:
        """The guided velocity of each latent: conditional and unconditional passes in one batch."""
        model, guidance = self.experts[expert], self.guidances[expert]
        cfg = guidance != 1.0
        texts = [r.text for r in requests]
        if cfg:
            texts += [torch.zeros_like(r.text) if r.negative_text is None else r.negative_text for r in requests]
        inputs = [x if r.condition is None else torch.cat([x, r.condition.to(x.device, x.dtype)])
                  for x, r in zip(latents, requests)] * (2 if cfg else 1)  # fmt: skip
        images = None
        if any(r.image is not None for r in requests):
            if not all(r.image is not None for r in requests):
                raise ValueError("an image-conditioned batch needs an image for every request")
            images = [r.image.to(device, dtype) for r in requests] * (2 if cfg else 1)
        patch = model.config.patch_size
        if any(r.clean_known for r in requests):  # per token: a clean known frame's tokens at timestep 0
            timestep = torch.cat([self._token_timesteps(r, x.shape, patch, sigma) for r, x in zip(requests, latents)])
            timestep = timestep.repeat(2 if cfg else 1).to(device)
        else:
            timestep = torch.full((len(inputs),), sigma * 1000.0, device=device)
        batch = PackedBatch.from_samples([x.to(dtype) for x in inputs], timestep, [t.to(device, dtype) for t in texts],
                                         patch, images=images)  # fmt: skip
        kv = None
        if self.cache_text:
            if key not in text_kv:
                text_kv.clear()  # another set of requests or expert: the old keys are not needed again
                text_kv[key] = model.text_kv(batch.text, batch.image, **model.conditioning_bounds(batch))
            kv = text_kv[key]
        forward = self.forwards[expert]
        pred = forward(batch) if kv is None else forward(batch, text_kv=kv)
        out = batch.unpack(pred.float(), model.config.out_channels)
        if not cfg:
            return out
        n = len(requests)
        return [u + guidance * (c - u) for c, u in zip(out[:n], out[n:])]

    @staticmethod
    def _token_timesteps(request: SampleRequest, shape, patch, sigma: float) -> torch.Tensor:
        """``(tokens,)`` timesteps of one request's patch grid: 1000 sigma, 0 where every latent
        frame under the patch is a clean known frame."""
        _, frames, height, width = shape
        pt, ph, pw = patch
        known = torch.zeros(frames, dtype=torch.bool)
        if request.clean_known:
            known = request.known_frames.cpu().bool()
        clean = known.view(frames // pt, pt).all(dim=1)
        per_frame = torch.where(clean, 0.0, sigma * 1000.0)
        return per_frame.repeat_interleave((height // ph) * (width // pw))

    @staticmethod
    def _impose(request: SampleRequest, x: torch.Tensor, eps: torch.Tensor, sigma: float) -> torch.Tensor:
        """Re-impose the known frames (noised to sigma with the request's noise) and the loop tie."""
        if request.known is not None:
            frames = request.known_frames.to(x.device)
            known = request.known.to(x.device).float()
            noised = known if sigma == 0.0 or request.clean_known else (1 - sigma) * known + sigma * eps
            x = torch.where(frames[None, :, None, None], noised, x)
        if request.tie_last_to_first and x.shape[1] > 1:
            x = x.clone()
            x[:, -1] = x[:, 0]
        return x


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="sampling", unit="step")
