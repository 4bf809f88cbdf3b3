"""The work behind ``fastdit serve``: three threads around one :class:`StepBatcher`.

- **intake**: a stored job's prompt through the text encoder (the job's prompt and negative prompt
  in one batch, as ``fastdit generate`` encodes them, so the bits are the same), its image through
  the VAE encoder (image-to-video), then into the batcher;
- **the DiT loop**: :meth:`StepBatcher.step` over and over, one packed forward for every active
  job; progress to the store, finished latents to the decoder;
- **decode**: the VAE decode of a finished latent, the MP4 under its content name, the store.

Text encoding and decoding never run on the DiT loop's thread. On a GPU the three threads share
the device's default stream: their Python overlaps, their kernels queue one after another. On a
CPU every torch op runs on one thread the three hand it to (``Engine._torch``: two threads'
OpenMP teams on the same cores halve the speed of every op); MP4 encoding, the store and HTTP
overlap it.

A restarted server runs every job the store holds as queued or in progress again from its first
step; sampling is deterministic (the same seed, the same bits, batch invariance), so the video is
the one the first run would have made.
"""

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from fastdit.models.wan.image_encoder import ImageEncoder
from fastdit.runtime.batcher import Job, StepBatcher
from fastdit.runtime.generate import (
    GenerationRequest,
    decode_video,
    diffusion_request,
    encode_image,
    encode_prompt,
    load_models,
    model_dtype,
    prompt_encoder,
    read_video,
    video_frames,
    write_video,
)
from fastdit.serve.metrics import Metrics
from fastdit.serve.replicas import Replicas
from fastdit.serve.spec import Limits, RequestError, ServedModel
from fastdit.serve.store import ContentFiles, JobRecord, JobStore

log = logging.getLogger("fastdit.serve")
BAR = 20  # characters of a job's progress bar in the log


class QueueFull(RequestError):
    def __init__(self, limit: int):
        super().__init__(429, f"the queue is full ({limit} open jobs, --max-queue); retry later", None,
                         "queue_full", "rate_limit_error")  # fmt: skip


def apply_events(batcher: StepBatcher, events: list[tuple]) -> list[tuple[str, Job | Exception]]:
    """Apply a step boundary's changes to ``batcher``, in order: ``("cancel", batcher job id)`` and
    ``("submit", job id, SampleRequest, schedule kwargs)``. Every rank applies the same events to
    its own batcher, so their batches stay the same. Returns each submission's job or the error
    that refused it."""
    outcomes = []
    for event in events:
        if event[0] == "cancel":
            batcher.cancel(event[1])
            continue
        _, job_id, sample, schedule = event
        try:
            outcomes.append((job_id, batcher.submit(sample, **schedule)))
        except Exception as err:  # noqa: BLE001 - the job fails with the reason; the server goes on
            outcomes.append((job_id, err))
    return outcomes


def serving_batcher(base: GenerationRequest, max_batch_tokens: int, group=None):
    """``(StepBatcher, Models)`` of a server: the base request's models, the batcher over the DiT,
    sequence-parallel (Ulysses over every rank of ``group``) on more than one rank. Every rank of a
    multi-rank server calls this, in the same order (the sequence-parallel setup is collective)."""
    models = load_models(base, model_dtype(base.device))
    if models.dit_2 is not None:
        raise ValueError("fastdit serve runs one-expert checkpoints; Wan 2.2 A14B's two experts are not batched by "
                         "the step batcher yet")  # fmt: skip
    dit = models.dit
    if group is not None:
        import torch.distributed as dist

        from fastdit.runtime.parallel import apply_sequence_parallel

        dit = apply_sequence_parallel(dit, group, ulysses=dist.get_world_size(group))
    return StepBatcher(dit, max_batch_tokens), models


class Engine:
    """Runs a server's jobs (see the module docstring).

    Args:
        base: the server's models as a :class:`GenerationRequest` (weights or preset, device,
            model seed); each job's request is this with the job's own fields.
        store: where jobs live; videos / inputs: MP4s and uploaded images by content.
        max_batch_tokens: the batcher's token budget per forward; max_queue: open jobs at most.
        group: the process group of a multi-rank server (this is rank 0; serve/replicas.py).
    """

    def __init__(self, base: GenerationRequest, store: JobStore, videos: ContentFiles, inputs: ContentFiles, *,
                 name: str, max_batch_tokens: int, max_queue: int, limits: Limits | None = None,
                 group=None):  # fmt: skip
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.base, self.store, self.videos, self.inputs = base, store, videos, inputs
        self.max_queue, self.limits = max_queue, limits or Limits()
        self.dtype = model_dtype(base.device)
        # On a CPU all torch work (loading the models included) runs on ONE thread, a one-worker executor
        # the other threads hand it to: every op already uses all cores, and once a second thread has run
        # torch ops there are two OpenMP teams for two cores, whose workers then sleep and wake around
        # every op (measured: the same packed steps went from 3.0 s to 6.2 s for good once a second
        # thread had run them). MP4 encoding (ffmpeg), the store and HTTP still overlap the torch work.
        # On a GPU the threads call the device themselves and take turns for the VAE only (its encoder
        # and decoder share modules).
        self._cpu = ThreadPoolExecutor(1, thread_name_prefix="fastdit-torch") if base.device.type == "cpu" else None
        self._vae = threading.Lock()
        self.batcher, self.models = self._torch(serving_batcher, base, max_batch_tokens, group)
        self.replicas = None if group is None else Replicas(group)
        self.ranks = 1 if group is None else self.replicas.size
        self.text_encoder = self._torch(prompt_encoder, base, self.dtype)
        clip = base.checkpoint is not None and base.checkpoint.clip
        self.image_encoder = (self._torch(lambda: ImageEncoder.from_pretrained(base.weights, dtype=self.dtype,
                                                                               device=base.device))
                              if clip else None)  # fmt: skip
        config = self.models.dit.config
        facts = base.vae_facts
        factor = facts.spatial * max(config.patch_size[1:])
        default = (max(factor, 832 // factor * factor), max(factor, 480 // factor * factor))
        if base.preset == "tiny" and base.checkpoint is None:
            default = (96, 64)
        conditioned = bool(getattr(config, "image_conditioned", False))
        self.served = ServedModel(name, facts, tuple(config.patch_size), conditioned, default, max_batch_tokens)
        self.metrics = Metrics(store.counts, self.queue_depth)
        self._lock = threading.Lock()
        self._open: dict[str, str] = {}  # accepted, not ended: id -> queued / in_progress / decoding
        self._running: dict[str, tuple[Job, GenerationRequest]] = {}
        self._intake: queue.Queue[str] = queue.Queue()
        self._decode: queue.Queue[tuple[str, torch.Tensor, GenerationRequest]] = queue.Queue()
        # what changes the batcher, applied by the DiT loop at a step boundary (and, with more than one
        # rank, sent to every rank first so their batchers stay the same): jobs to submit, jobs to cancel
        self._arrivals: list[tuple[str, GenerationRequest, object]] = []
        self._cancels: list[int] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._logged: dict[str, int] = {}  # the last tenth of each job's progress written to the log

    # ---- the HTTP side ------------------------------------------------------------------------------

    def queue_depth(self) -> int:
        with self._lock:
            return sum(1 for state in self._open.values() if state == "queued")

    def check_capacity(self) -> None:
        """:class:`QueueFull` when ``max_queue`` jobs are open (checked again by :meth:`submit`)."""
        with self._lock:
            self._refuse_when_full()

    def _refuse_when_full(self) -> None:  # under self._lock
        if len(self._open) >= self.max_queue:
            raise QueueFull(self.max_queue)

    def submit(self, record: JobRecord) -> None:
        """Store an accepted job and queue it; :class:`QueueFull` when ``max_queue`` jobs are open."""
        with self._lock:
            self._refuse_when_full()
            self._open[record.id] = "queued"
        try:
            self.store.add(record)
        except Exception:
            with self._lock:
                self._open.pop(record.id, None)
            raise
        self._intake.put(record.id)

    def delete(self, job_id: str) -> JobRecord | None:
        """Remove a job: a running one is cancelled at the next step boundary, a queued one never
        starts, a finished one's video is removed when no other job names the same bytes."""
        record = self.store.delete(job_id)
        if record is None:
            return None
        with self._lock:
            entry = self._running.pop(job_id, None)
            was_open = self._open.pop(job_id, None) is not None
        self._logged.pop(job_id, None)
        if entry is not None:
            with self._lock:
                self._cancels.append(entry[0].id)
        if was_open:
            self.metrics.finished.labels("cancelled").inc()
        if record.video is not None and self.store.references(record.video) == 0:
            self.videos.remove(record.video)
        return record

    # ---- the threads --------------------------------------------------------------------------------

    def start(self) -> None:
        """Queue what the store holds unfinished (a restart: from the first step), start the threads."""
        self.videos.sweep_partial()
        resumed = self.store.unfinished()
        for record in resumed:
            self.store.update(record.id, status="queued", progress=0)
            with self._lock:
                self._open[record.id] = "queued"
            self._intake.put(record.id)
        if resumed:
            log.info("resuming %d unfinished job(s) from their first step", len(resumed))
        for target in (self._intake_loop, self._dit_loop, self._decode_loop):
            thread = threading.Thread(target=target, name=f"fastdit-{target.__name__.strip('_')}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; unfinished jobs stay in the store for the next start."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)
        if self._cpu is not None:
            self._cpu.shutdown(wait=False)

    def request_of(self, spec: dict) -> GenerationRequest:
        """The job's :class:`GenerationRequest`: the server's models with the job's fields."""
        inputs = [] if spec["input"] is None else [self.inputs.path(spec["input"])]
        request = dataclasses.replace(
            self.base, mode=spec["mode"], height=spec["height"], width=spec["width"], frames=spec["frames"],
            steps=spec["steps"], guidance=spec["guidance"], shift=spec["shift"], seed=spec["seed"],
            prompt=spec["prompt"], negative_prompt=spec["negative_prompt"], input_paths=inputs, inputs=[],
        )  # fmt: skip
        request.inputs = [read_video(p, request.height, request.width, request.vae_facts.temporal) for p in inputs]
        return request

    def _torch(self, fn, *args, vae: bool = False):
        """``fn(*args)`` where this server runs torch work (see ``_cpu``): on a CPU on the one torch
        thread, on a GPU here (after the VAE's turn when ``vae``)."""
        if self._cpu is not None:
            return self._cpu.submit(fn, *args).result()
        with self._vae if vae else contextlib.nullcontext():
            return fn(*args)

    def _decode_frames(self, latent: torch.Tensor, request: GenerationRequest):
        return video_frames(decode_video(self.models.vae, latent, request))

    def _encode(self, spec: dict):
        """A job's request and its batcher SampleRequest: the prompt (with its negative prompt, as
        ``fastdit generate``), the image (read, resized; CLIP, then the VAE encoder)."""
        request = self.request_of(spec)
        text, negative = encode_prompt(self.text_encoder, request)
        image = None if self.image_encoder is None else encode_image(self.image_encoder, request.input_paths[0])
        return request, diffusion_request(request, self.models, text, negative, image, self.dtype)

    def _fail(self, job_id: str, err: BaseException | str) -> None:
        message = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
        log.error("%s failed: %s", job_id, message)
        with self._lock:
            self._running.pop(job_id, None)
            was_open = self._open.pop(job_id, None) is not None
        if self.store.update(job_id, status="failed", error={"code": "generation_failed", "message": message},
                             completed_at=int(time.time())) and was_open:  # fmt: skip
            self.metrics.finished.labels("failed").inc()

    def _intake_loop(self) -> None:
        while not self._stop.is_set():
            try:
                arrived = [self._intake.get(timeout=0.2)]
            except queue.Empty:
                continue
            while True:  # what arrived together is encoded, then starts at the same step boundary
                try:
                    arrived.append(self._intake.get_nowait())
                except queue.Empty:
                    break
            ready = [item for item in map(self._prepare, arrived) if item is not None]
            with self._lock:
                self._arrivals += ready
            self._wake.set()

    def _prepare(self, job_id: str):
        """``(id, request, SampleRequest)`` of a stored job: its prompt encoded, its image (if any)
        through the VAE encoder; None when it was deleted or failed."""
        record = self.store.get(job_id)
        if record is None:  # deleted while queued
            return None
        try:
            request, sample = self._torch(self._encode, record.spec, vae=True)
        except Exception as err:  # noqa: BLE001 - the job fails with the reason; the server goes on
            self._fail(job_id, err)
            return None
        return job_id, request, sample

    def _boundary(self) -> tuple[list[tuple], dict[str, GenerationRequest]]:
        """The batcher's changes since the last step, as :func:`apply_events` takes them (jobs
        deleted meanwhile left out), and the submitted jobs' requests by id."""
        with self._lock:
            arrivals, self._arrivals = self._arrivals, []
            cancels, self._cancels = self._cancels, []
        events = [("cancel", job) for job in cancels]
        requests = {}
        for job_id, request, sample in arrivals:
            if self.store.get(job_id) is not None:
                schedule = {"num_steps": request.steps, "shift": request.shift, "guidance": request.guidance}
                events.append(("submit", job_id, sample, schedule))
                requests[job_id] = request
        return events, requests

    def _dit_loop(self) -> None:
        try:
            while not self._stop.is_set():
                events, requests = self._boundary()
                if self.replicas is not None:
                    self.replicas.send(events)
                for job_id, outcome in apply_events(self.batcher, events):
                    if isinstance(outcome, Exception):
                        self._fail(job_id, outcome)
                    else:
                        with self._lock:
                            self._running[job_id] = (outcome, requests[job_id])
                if self.batcher.idle:
                    self._wake.wait(0.2)
                    self._wake.clear()
                    continue
                self._step()
        finally:
            if self.replicas is not None:
                self.replicas.close()

    def _step(self) -> None:
        forwards, start = self.batcher.forwards, time.perf_counter()
        try:
            self._torch(self.batcher.step)
        except Exception as err:  # noqa: BLE001 - the batcher marked its jobs failed; the loop goes on
            log.exception("a packed forward failed: %s", err)
        if self.batcher.forwards > forwards:
            self.metrics.forward(self.batcher.samples_per_forward[-1], self.batcher.tokens_per_forward[-1],
                                 time.perf_counter() - start)  # fmt: skip
        self._after_step()

    def _after_step(self) -> None:
        progress = {}
        with self._lock:
            running = list(self._running.items())
        for job_id, (job, request) in running:
            if job.status == "in_progress":
                progress[job_id] = 99 * job.step // job.steps
                with self._lock:
                    if job_id in self._open:
                        self._open[job_id] = "in_progress"
            elif job.status == "completed":
                with self._lock:
                    self._running.pop(job_id, None)
                    if job_id in self._open:
                        self._open[job_id] = "decoding"
                progress[job_id] = 99
                self._decode.put((job_id, job.latent, request))
            elif job.status == "failed":
                self._fail(job_id, job.error or "the packed forward failed")
            self._log_progress(job_id, job)
        if progress:
            self.store.set_progress(progress)

    def _log_progress(self, job_id: str, job: Job) -> None:
        tenth = 10 * job.step // job.steps
        if self._logged.get(job_id) == tenth:
            return
        self._logged[job_id] = tenth
        done = BAR * job.step // job.steps
        log.info("%s [%s%s] %3d%% step %d/%d", job_id, "#" * done, "." * (BAR - done), 100 * job.step // job.steps,
                 job.step, job.steps)  # fmt: skip
        if job.status != "in_progress":
            self._logged.pop(job_id, None)

    def _decode_loop(self) -> None:
        while not self._stop.is_set():
            try:
                job_id, latent, request = self._decode.get(timeout=0.2)
            except queue.Empty:
                continue
            if self.store.get(job_id) is None:
                continue
            try:
                frames = self._torch(self._decode_frames, latent, request, vae=True)
                path = self.videos.temporary()
                write_video(path, frames)  # (on this thread: ffmpeg's encoding overlaps the torch work)
                digest = self.videos.adopt(path)
            except Exception as err:  # noqa: BLE001 - the job fails with the reason; the server goes on
                self._fail(job_id, err)
                continue
            with self._lock:
                was_open = self._open.pop(job_id, None) is not None
            if self.store.update(job_id, status="completed", progress=100, completed_at=int(time.time()),
                                 video=digest):  # fmt: skip
                if was_open:
                    self.metrics.finished.labels("completed").inc()
                log.info("%s completed: %s", job_id, self.videos.path(digest))
            elif self.store.references(digest) == 0:  # deleted while it was decoded
                self.videos.remove(digest)
