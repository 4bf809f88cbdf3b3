"""``fastdit serve`` on more than one device (``torchrun``): rank 0 serves HTTP and runs the
:class:`~fastdit.serve.engine.Engine`; every rank holds the same :class:`StepBatcher` over the
sequence-parallel DiT and runs every packed forward.

At each step boundary rank 0 sends the boundary's changes (jobs submitted, jobs cancelled, as
:func:`~fastdit.serve.engine.apply_events` takes them) to every rank; each rank applies them to its
own batcher, so every rank admits the same jobs and builds the same packed batch (the
sequence-parallel forward compares the batches' fingerprints and raises on every rank should they
differ). Rank 0 sends at least every 0.2 s while idle, so the other ranks wait in a collective that
returns, never in one that times out; at shutdown it sends ``closed``.

Prompt and image encoding and the VAE decode run on rank 0 only. Under sequence parallelism a
request's tokens are cut across ranks at points that depend on the whole batch, so the batch
invariance of one device does not hold: a request's video may differ in its last bits between
being served alone and beside others (docs/serving.md).
"""

import logging

import torch.distributed as dist

from fastdit.runtime.batcher import StepBatcher

log = logging.getLogger("fastdit.serve")


class Replicas:
    """Rank 0's side: each step boundary's events to every rank of ``group``."""

    def __init__(self, group=None):
        self.group = group
        self.src = dist.get_global_rank(group, 0) if group is not None else 0
        self.size = dist.get_world_size(group)

    def send(self, events: list[tuple]) -> None:
        dist.broadcast_object_list([events, False], src=self.src, group=self.group)

    def close(self) -> None:
        dist.broadcast_object_list([[], True], src=self.src, group=self.group)


def follow(batcher: StepBatcher, group=None) -> int:
    """A rank other than 0: apply rank 0's events and step as it does, until rank 0 closes.
    Returns the number of steps run."""
    from fastdit.serve.engine import apply_events

    src = dist.get_global_rank(group, 0) if group is not None else 0
    steps = 0
    while True:
        message = [None, None]
        dist.broadcast_object_list(message, src=src, group=group)
        events, closed = message
        if closed:
            return steps
        apply_events(batcher, events)  # a refused submission is refused on rank 0 too
        if batcher.idle:
            continue
        try:
            batcher.step()
        except Exception as err:  # noqa: BLE001 - the same forward raised on every rank; rank 0 reports it
            log.error("a packed forward failed on this rank: %s: %s", type(err).__name__, err)
        steps += 1
