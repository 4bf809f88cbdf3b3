"""Runtime: sampling over the models (flow matching, CFG, the Sora-report generation modes), step-level
batching of many jobs (StepBatcher), CUDA graphs, sequence parallelism."""

from fastdit.runtime.batcher import Job, StepBatcher
from fastdit.runtime.graphs import GraphedDiT
from fastdit.runtime.modes import (
    connect,
    extend,
    image_to_video,
    loop,
    sdedit,
    text_to_image,
    text_to_video,
    wan_image_to_video,
)
from fastdit.runtime.parallel import SequenceParallelDiT, all_reduce_gradients, apply_sequence_parallel
from fastdit.runtime.sampler import FlowMatchSampler, SampleRequest, explicit_sigmas, flow_shift_sigmas

__all__ = [
    "FlowMatchSampler",
    "GraphedDiT",
    "Job",
    "SampleRequest",
    "SequenceParallelDiT",
    "StepBatcher",
    "all_reduce_gradients",
    "apply_sequence_parallel",
    "connect",
    "explicit_sigmas",
    "extend",
    "flow_shift_sigmas",
    "image_to_video",
    "loop",
    "sdedit",
    "text_to_image",
    "text_to_video",
    "wan_image_to_video",
]
