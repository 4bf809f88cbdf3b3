"""CUDA graphs for the DiT step: capture once per shape bucket, replay every step.

A step of a 30-layer DiT launches a few hundred kernels; at small sizes (images, short clips,
CFG pairs) the launch overhead and Python dispatch are a large share of the step. A CUDA graph
replays the whole launch sequence at once. The packed batch's sizes decide the kernels' grids,
so graphs are keyed by a *bucket*: the token and text totals, the batch size, the longest sample
and text, the dtypes, and the identity of the precomputed text keys / values. Everything else
(per-sample lengths in ``cu_seqlens``, grids, timesteps, the latents) is data the kernels read,
copied into the captured input buffers before each replay.

Requirements: a CUDA model on backends that never synchronise with the host (the Triton and
CUDA ops; the ``reference`` backend is rejected), no autograd. Captured graphs hold their
activations' memory for as long as they live: ``max_buckets`` bounds how many are kept.
"""

from collections import OrderedDict
from dataclasses import fields, replace

import torch

from fastdit import settings
from fastdit.models.packing import PackedBatch
from fastdit.ops.validation import values_checked


class GraphedDiT:
    """``forward_packed`` of a :class:`fastdit.models.DiT` as CUDA graph replays.

    Args:
        model: the DiT, on a CUDA device, in eval mode.
        max_buckets: graphs kept at once (least recently used dropped first).
        warmup: eager runs before a capture (Triton compiles and autotunes outside the graph).

    Call it like ``model.forward_packed(batch, text_kv=None)``. The returned tensor is a copy, so
    it stays valid after the next replay. ``text_kv`` tensors must stay alive (and unchanged in
    address) while graphs captured with them are in use: the sampler's per-run cache does this.
    """

    def __init__(self, model, max_buckets: int = 8, warmup: int = 2):
        param = next(model.parameters())
        if param.device.type != "cuda":
            raise ValueError(f"GraphedDiT needs a CUDA model, got one on {param.device}")
        if getattr(model, "backend", None) == "reference":
            raise ValueError("GraphedDiT cannot capture the reference backend (it reads tensors back to the host)")
        self.model = model
        self.max_buckets = max_buckets
        self.warmup = warmup
        self.graphs: OrderedDict = OrderedDict()
        self.captures = 0

    @staticmethod
    def bucket(batch: PackedBatch, text_kv) -> tuple:
        return (
            tuple(batch.tokens.shape),
            tuple(batch.text.shape),
            batch.batch_size,
            batch.max_seqlen,
            batch.max_seqlen_text,
            batch.tokens.dtype,
            batch.text.dtype,
            batch.token_offset is None,
            tuple(batch.timestep.shape),
            None if batch.image is None else (tuple(batch.image.shape), batch.max_seqlen_image),
            None if text_kv is None else id(text_kv),
            # batch-invariant models run per-sample matmuls: one graph per set of sample boundaries
            (batch.bounds("tokens"), batch.bounds("text")) if settings.get().batch_invariant else None,
        )

    def _capture(self, batch: PackedBatch, text_kv):
        static = replace(batch, **{f.name: getattr(batch, f.name).clone() for f in fields(batch)
                                   if isinstance(getattr(batch, f.name), torch.Tensor)})  # fmt: skip
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad(), values_checked():
            for _ in range(self.warmup):
                self.model.forward_validated(static, text_kv)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), values_checked(), torch.cuda.graph(graph):
            out = self.model.forward_validated(static, text_kv)
        self.captures += 1
        return graph, static, out

    def __call__(self, batch: PackedBatch, text_kv=None) -> torch.Tensor:
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters()):
            raise RuntimeError("GraphedDiT runs inference only: call it under torch.no_grad()")
        batch.validate()
        key = self.bucket(batch, text_kv)
        if key not in self.graphs:
            if len(self.graphs) >= self.max_buckets:
                self.graphs.popitem(last=False)
            self.graphs[key] = self._capture(batch, text_kv)
        self.graphs.move_to_end(key)
        graph, static, out = self.graphs[key]
        for f in fields(batch):
            value = getattr(batch, f.name)
            if isinstance(value, torch.Tensor):
                getattr(static, f.name).copy_(value)
        graph.replay()
        return out.clone()
