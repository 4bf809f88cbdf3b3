"""Step-level batching: every sampler step of every active job in ONE packed DiT forward.

A :class:`StepBatcher` holds jobs of any size, length, schedule, guidance and mode (each a
:class:`~fastdit.runtime.sampler.SampleRequest` with its own sigmas and guidance scale). Each
:meth:`StepBatcher.step` admits queued jobs at the step boundary (first come, first served, within
a token budget per forward), runs one packed forward over all active jobs (the conditional and
unconditional samples of classifier-free guidance included, each job's at its own timestep), moves
each job one Euler step along its own schedule and retires the jobs that finished or were
cancelled. With the ``batch_invariant`` setting (the default) a job's latent is bitwise the one
:class:`~fastdit.runtime.sampler.FlowMatchSampler` gives it alone, whatever ran beside it
(tests/runtime/test_batcher.py).

Admission: jobs start in submission order; a job waits while the active jobs' tokens plus its own
would pass ``max_batch_tokens``, and no later job overtakes it (no starvation). A job larger than
the budget on its own is refused when submitted.
"""

import itertools
import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fastdit.models.packing import PackedBatch
from fastdit.runtime.sampler import (
    FlowMatchSampler,
    SampleRequest,
    explicit_sigmas,
    flow_shift_sigmas,
    start_state,
)

STATUSES = ("queued", "in_progress", "completed", "failed", "cancelled")


@dataclass(eq=False)
class Job:
    """One request in a :class:`StepBatcher`: its schedule, guidance and state.

    ``status``: ``queued``, ``in_progress``, ``completed``, ``failed`` or ``cancelled``;
    ``progress``: steps done / steps; ``latent``: the result once completed (float32, on the
    model's device); ``error``: why it failed."""

    id: int
    request: SampleRequest
    sigmas: torch.Tensor  # (steps + 1,) float64, from 1 (or the SDEdit strength) down to 0
    guidance: float
    tokens: int  # packed tokens this job adds to a forward (both CFG samples)
    status: str = "queued"
    step: int = 0  # the next step to run
    latent: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    error: str | None = None
    kv: list | None = field(default=None, repr=False)  # its text keys / values, per block

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def progress(self) -> float:
        return self.step / self.steps

    @property
    def cfg(self) -> bool:
        return self.guidance != 1.0


class StepBatcher:
    """Run many sampling jobs as one packed forward per step.

    Args:
        model: a DiT (``forward_packed``, ``text_kv``, ``config``), in eval mode on its device.
        max_batch_tokens: the most packed tokens one forward may hold (CFG samples count twice).

    Thread-safe: :meth:`submit` and :meth:`cancel` may be called from other threads (an HTTP
    server's) while one thread calls :meth:`step`.
    """

    def __init__(self, model, max_batch_tokens: int = 1 << 16):
        if not isinstance(max_batch_tokens, int) or isinstance(max_batch_tokens, bool) or max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be a positive int, got {max_batch_tokens!r}")
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self.queue: deque[Job] = deque()
        self.active: list[Job] = []
        self.jobs: dict[int, Job] = {}
        self.forwards = 0  # packed forwards run, and what they held (for metrics)
        self.samples_per_forward: list[int] = []
        self.tokens_per_forward: list[int] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # ---- submitting and cancelling -----------------------------------------------------------------

    def submit(self, request: SampleRequest, *, num_steps: int = 30, shift: float = 5.0, guidance: float = 5.0,
               sigmas: Sequence[float] | None = None) -> Job:  # fmt: skip
        """Queue ``request`` with its own schedule (``num_steps`` / ``shift``, or explicit ``sigmas``)
        and guidance; returns its :class:`Job`. Everything is checked here, before it is queued."""
        request.validate(0)
        config = self.model.config
        for name, text in (("text", request.text), ("negative_text", request.negative_text)):
            if text is not None and (text.dim() != 2 or text.shape[-1] != config.text_dim or text.shape[0] < 1):
                raise ValueError(f"{name} must be (L >= 1, {config.text_dim}), got {tuple(text.shape)}")
        if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number, got {guidance!r}")
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        schedule = flow_shift_sigmas(num_steps, shift) if sigmas is None else explicit_sigmas(sigmas)
        channels, frames, height, width = request.shape
        pt, ph, pw = config.patch_size
        if frames % pt or height % ph or width % pw:
            raise ValueError(
                f"latent (T, H, W) = {(frames, height, width)} is not divisible by the patch {(pt, ph, pw)}"
            )
        in_channels = channels + (0 if request.condition is None else request.condition.shape[0])
        if in_channels != config.in_channels:
            raise ValueError(
                f"the latent (and condition) have {in_channels} channels; the model takes {config.in_channels}"
            )
        if (request.image is not None) != bool(getattr(config, "image_conditioned", False)):
            raise ValueError("an image-conditioned model needs request.image, and only such a model takes one")
        tokens = (frames // pt) * (height // ph) * (width // pw) * (2 if guidance != 1.0 else 1)
        if tokens > self.max_batch_tokens:
            raise ValueError(f"this job needs {tokens} tokens per forward; max_batch_tokens is {self.max_batch_tokens}")
        job = Job(next(self._ids), request, schedule, float(guidance), tokens)
        with self._lock:
            self.jobs[job.id] = job
            self.queue.append(job)
        return job

    def cancel(self, job_id: int) -> bool:
        """Cancel a queued job now, a running one at the next step boundary; False if unknown or
        already ended."""
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None or job.status not in ("queued", "in_progress"):
                return False
            job.status = "cancelled"
            if job in self.queue:
                self.queue.remove(job)
            return True

    @property
    def idle(self) -> bool:
        return not self.queue and not self.active

    # ---- running ----------------------------------------------------------------------------------

    def _admit(self) -> list[Job]:
        """Drop ended jobs from the active set, start what fits; returns the jobs that ended as they
        started (SDEdit at strength 0: nothing to denoise)."""
        ended = []
        with self._lock:
            for job in self.active:
                if job.status != "in_progress":
                    job.kv = None  # cancelled: its text keys / values are not needed again
            self.active = [j for j in self.active if j.status == "in_progress"]
            used = sum(j.tokens for j in self.active)
            while self.queue and used + self.queue[0].tokens <= self.max_batch_tokens:
                job = self.queue.popleft()
                used += job.tokens
                self._start(job)
                (self.active if job.status == "in_progress" else ended).append(job)
        return ended

    def _start(self, job: Job) -> None:
        """Noise, the SDEdit start and the known frames, as FlowMatchSampler does."""
        job.noise, job.latent, job.step = start_state(job.request, job.sigmas, next(self.model.parameters()).device)
        job.status = "in_progress"
        if job.step >= job.steps:  # strength 0: nothing to denoise
            job.status = "completed"

    @torch.no_grad()
    def step(self) -> list[Job]:
        """Admit what fits, run one packed forward over every active job, advance each one step;
        returns the jobs that completed in this step. Should the forward raise, every job in it is
        marked ``failed`` with the error, and the error propagates."""
        done = self._admit()
        jobs = list(self.active)
        if not jobs:
            return done
        model = self.model
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        per_token = any(job.request.clean_known for job in jobs)  # Wan 2.2 TI2V: a clean frame's tokens at 0
        inputs, texts, images, timesteps, kvs = [], [], [], [], []
        for job in jobs:
            request, sigma = job.request, float(job.sigmas[job.step])
            x = job.latent if request.condition is None else torch.cat([job.latent, request.condition.to(device)])
            negative = torch.zeros_like(request.text) if request.negative_text is None else request.negative_text
            pair = [request.text, negative] if job.cfg else [request.text]
            image = None if request.image is None else [request.image.to(device, dtype)] * len(pair)
            if job.kv is None:  # the job's text keys / values, once (bitwise what its batch would give)
                alone = PackedBatch.from_samples([x.to(dtype)] * len(pair), [0.0] * len(pair),
                                                 [t.to(device, dtype) for t in pair], model.config.patch_size,
                                                 images=image)  # fmt: skip
                job.kv = model.text_kv(alone.text, alone.image, **model.conditioning_bounds(alone))
            images += image or []
            inputs += [x] * len(pair)
            texts += pair
            if per_token:  # then every job's tokens get theirs, so one batch holds one timestep layout
                timesteps += [FlowMatchSampler._token_timesteps(request, job.latent.shape, model.config.patch_size,
                                                                sigma)] * len(pair)  # fmt: skip
            else:
                timesteps += [sigma * 1000.0] * len(pair)
            kvs.append(job.kv)
        timestep = torch.cat(timesteps).to(device) if per_token else torch.tensor(timesteps, device=device)
        batch = PackedBatch.from_samples([x.to(dtype) for x in inputs], timestep, [t.to(device, dtype) for t in texts],
                                         model.config.patch_size, images=images or None)  # fmt: skip
        # every block's (k, v[, k_image, v_image]): the jobs' own rows, in the batch's order
        text_kv = [tuple(torch.cat(parts) for parts in zip(*(kv[block] for kv in kvs))) for block in range(len(kvs[0]))]
        try:
            out = batch.unpack(model.forward_packed(batch, text_kv=text_kv).float(), model.config.out_channels)
        except Exception as err:
            with self._lock:
                for job in jobs:
                    job.status, job.error, job.kv = "failed", f"{type(err).__name__}: {err}", None
                self.active = []
            raise
        self.forwards += 1
        self.samples_per_forward.append(len(inputs))
        self.tokens_per_forward.append(batch.tokens.shape[0])
        index = 0
        for job in jobs:
            if job.cfg:
                cond, uncond = out[index], out[index + 1]
                velocity = uncond + job.guidance * (cond - uncond)
                index += 2
            else:
                velocity = out[index]
                index += 1
            sigma, sigma_next = float(job.sigmas[job.step]), float(job.sigmas[job.step + 1])
            x = job.latent + (sigma_next - sigma) * velocity
            job.latent = FlowMatchSampler._impose(job.request, x, job.noise, sigma_next)
            with self._lock:
                job.step += 1
                if job.status == "in_progress" and job.step == job.steps:
                    job.status = "completed"
                    job.kv = None
                    done.append(job)
        return done

    def run(self, max_steps: int | None = None) -> None:
        """Step until every job ended (or ``max_steps`` steps ran)."""
        for _ in range(max_steps) if max_steps is not None else itertools.count():
            if self.idle:
                return
            self.step()
