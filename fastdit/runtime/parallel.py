"""Sequence parallelism for the DiT on torch.distributed: Ulysses, Ring, both (USP), and CFG parallel.

Layout of a group of ``P = cfg * ulysses * ring`` ranks (rank ``g`` of the group):

- ``c = g // (U R)``: the sample group. A batch of ``B`` samples is cut into ``cfg`` contiguous
  chunks of ``B / cfg`` samples (the sampler packs the conditional samples first, then the
  unconditional ones, so ``cfg=2`` puts the two CFG branches on two rank groups).
- ``j = (g // U) % R``: the ring shard. The chunk's packed tokens are cut into ``R`` shards of
  balanced token counts, whatever the sample boundaries (a sample may straddle shards).
- ``u = g % U``: the Ulysses rank. Each ring shard is cut again into ``U`` balanced sub-shards.

Every rank holds the whole batch (replicated input) and computes its sub-shard: its tokens, with
each piece of a sample keeping the sample's grid, timestep, text and global position
(``token_offset``), so RoPE and modulation are exact. Only self-attention needs other ranks:

- Ulysses: an all-to-all turns (tokens of my sub-shard, all heads) into (tokens of the ring
  shard, my heads), attention runs on whole ring shards for a subset of heads, and the inverse
  all-to-all comes back. Heads are split unevenly when U does not divide them (12 heads on 8
  ranks: 2, 2, 2, 2, 1, 1, 1, 1); a rank may get none.
- Ring: each rank keeps its queries; key / value shards travel around the ring of R ranks; each
  step attends the local queries to the visiting keys of the same samples (fastdit's varlen
  attention with LSE) and merges the partial results by log-sum-exp. The backward runs the
  ring again with the global output and LSE (flash-attn's ring backward): exact gradients.

The output is gathered so every rank returns the whole packed prediction. Gradients: the
gather's backward keeps each rank's own rows, so each rank's parameter gradients are its
shard's contribution; :func:`all_reduce_gradients` sums them (== the single-process gradients).

Transport is torch.distributed only (NCCL on GPUs, gloo on CPUs). gloo's all-to-all needs equal
chunks, so chunks are padded to the largest one. A differing configuration across ranks and a
batch that differs across ranks (a fingerprint of the whole batch) raise on every rank; a dead or
hung rank surfaces as the process group's error or timeout (``init_process_group(timeout=...)``,
which the subgroups created here inherit), never a silent hang.
"""

import hashlib
import math
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fastdit import ops
from fastdit.models.packing import PackedBatch, cu_seqlens_of
from fastdit.ops import dispatch
from fastdit.ops.validation import values_checked

# ---- the shard plan ---------------------------------------------------------------------------------


def balanced_bounds(start: int, end: int, parts: int) -> list[int]:
    """``parts + 1`` boundaries cutting [start, end) into parts whose sizes differ by at most 1."""
    n = end - start
    return [start + (n * i) // parts for i in range(parts + 1)]


@dataclass(frozen=True)
class Piece:
    """The part of sample ``sample`` in tokens [start, end) of the global packed sequence."""

    sample: int
    start: int
    end: int
    offset: int  # index of ``start`` within the sample


def pieces(cu: list[int], start: int, end: int) -> list[Piece]:
    """The samples' pieces inside global tokens [start, end), in order (samples with no token skipped)."""
    out = []
    for s in range(len(cu) - 1):
        a, b = max(cu[s], start), min(cu[s + 1], end)
        if a < b:
            out.append(Piece(s, a, b, a - cu[s]))
    return out


@dataclass(frozen=True)
class Layout:
    """Degrees and this rank's coordinates in the group."""

    cfg: int
    ulysses: int
    ring: int
    rank: int  # rank within the group

    @property
    def size(self) -> int:
        return self.cfg * self.ulysses * self.ring

    @property
    def coords(self) -> tuple[int, int, int]:
        u, r = self.ulysses, self.ring
        return self.rank // (u * r), (self.rank // u) % r, self.rank % u

    def group_rank(self, c: int, j: int, u: int) -> int:
        return c * self.ulysses * self.ring + j * self.ulysses + u


@dataclass
class StepPlan:
    """Token ranges of every rank for one batch (identical on every rank)."""

    cu: list[int]  # global cu_seqlens
    sub: dict[tuple[int, int, int], tuple[int, int]]  # (c, j, u) -> token range
    ring_shard: dict[tuple[int, int], tuple[int, int]]  # (c, j) -> token range


def make_plan(layout: Layout, cu: list[int]) -> StepPlan:
    batch = len(cu) - 1
    if batch % layout.cfg:
        raise ValueError(f"cfg={layout.cfg} needs a batch size divisible by it, got {batch} samples")
    per = batch // layout.cfg
    sub, ring_shard = {}, {}
    for c in range(layout.cfg):
        ring_bounds = balanced_bounds(cu[c * per], cu[(c + 1) * per], layout.ring)
        for j in range(layout.ring):
            ring_shard[(c, j)] = (ring_bounds[j], ring_bounds[j + 1])
            inner = balanced_bounds(ring_bounds[j], ring_bounds[j + 1], layout.ulysses)
            for u in range(layout.ulysses):
                sub[(c, j, u)] = (inner[u], inner[u + 1])
    return StepPlan(cu, sub, ring_shard)


def head_split(heads: int, parts: int) -> list[int]:
    """Heads per Ulysses rank: the first ``heads % parts`` ranks take one more."""
    return [heads // parts + (i < heads % parts) for i in range(parts)]


def local_batch(batch: PackedBatch, cu: list[int], cu_text: list[int], start: int, end: int):
    """The PackedBatch of global tokens [start, end): one entry per sample piece, each with its
    sample's grid, timestep, text and global position. Returns (batch, pieces)."""
    parts = pieces(cu, start, end)
    if not parts:
        return None, parts
    device = batch.tokens.device
    samples = torch.tensor([p.sample for p in parts], device=device)
    lengths = [p.end - p.start for p in parts]
    text_lengths = [cu_text[p.sample + 1] - cu_text[p.sample] for p in parts]
    offsets = torch.tensor([p.offset for p in parts], dtype=torch.int32, device=device)
    if batch.token_offset is not None:
        offsets = offsets + batch.token_offset[samples].to(torch.int32)
    return PackedBatch(
        tokens=batch.tokens[start:end],
        cu_seqlens=cu_seqlens_of(lengths, device),
        max_seqlen=max(lengths),
        grid_thw=batch.grid_thw[samples],
        timestep=batch.timestep[samples],
        text=torch.cat([batch.text[cu_text[p.sample] : cu_text[p.sample + 1]] for p in parts]),
        cu_seqlens_text=cu_seqlens_of(text_lengths, device),
        max_seqlen_text=max(text_lengths),
        patch_size=batch.patch_size,
        token_offset=offsets,
    ), parts


# ---- communication (autograd-aware) ------------------------------------------------------------------


def _all_to_all_padded(chunks: list[torch.Tensor], out_shapes: list[tuple], group) -> list[torch.Tensor]:
    """all_to_all of chunks of different shapes: each flattened and padded to the largest
    (gloo's all-to-all needs equal sizes); ``out_shapes[i]`` is what rank i sends here."""
    size = max([c.numel() for c in chunks] + [math.prod(s) for s in out_shapes] + [1])
    ref = chunks[0]
    send = ref.new_zeros((len(chunks), size))
    for i, c in enumerate(chunks):
        send[i, : c.numel()] = c.reshape(-1)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return [recv[i, : math.prod(s)].view(s) for i, s in enumerate(out_shapes)]


class _SeqToHeads(torch.autograd.Function):
    """(my tokens, all heads) -> (the ring shard's tokens, my heads) over the Ulysses group."""

    @staticmethod
    def forward(ctx, x, token_counts, head_counts, me, group):
        ctx.args = (token_counts, head_counts, me, group)
        return _seq_to_heads(x, token_counts, head_counts, me, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad.contiguous(), *ctx.args), None, None, None, None


class _HeadsToSeq(torch.autograd.Function):
    """The inverse of :class:`_SeqToHeads`."""

    @staticmethod
    def forward(ctx, x, token_counts, head_counts, me, group):
        ctx.args = (token_counts, head_counts, me, group)
        return _heads_to_seq(x, token_counts, head_counts, me, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad.contiguous(), *ctx.args), None, None, None, None


def _seq_to_heads(x, token_counts, head_counts, me, group):
    dim = x.shape[-1]
    heads = [0]
    for h in head_counts:
        heads.append(heads[-1] + h)
    chunks = [x[:, heads[i] : heads[i + 1]].contiguous() for i in range(len(head_counts))]
    shapes = [(n, head_counts[me], dim) for n in token_counts]
    return torch.cat(_all_to_all_padded(chunks, shapes, group), dim=0)


def _heads_to_seq(x, token_counts, head_counts, me, group):
    dim = x.shape[-1]
    rows = [0]
    for n in token_counts:
        rows.append(rows[-1] + n)
    chunks = [x[rows[i] : rows[i + 1]].contiguous() for i in range(len(token_counts))]
    shapes = [(token_counts[me], h, dim) for h in head_counts]
    return torch.cat(_all_to_all_padded(chunks, shapes, group), dim=1)


def _shift(tensors: list[torch.Tensor], shapes: list[list[tuple]], send_to: int, recv_from: int, group):
    """Send ``tensors`` to ``send_to`` and receive tensors of ``shapes`` from ``recv_from`` (global ranks)."""
    received = [t.new_empty(s) for t, s in zip(tensors, shapes)]
    requests = []
    for t in tensors:
        requests.append(dist.P2POp(dist.isend, t.contiguous(), send_to, group))
    for r in received:
        requests.append(dist.P2POp(dist.irecv, r, recv_from, group))
    for req in dist.batch_isend_irecv(requests):
        req.wait()
    return received


def _overlap(q_parts: list[Piece], k_parts: list[Piece]):
    """Samples in both shards: (q row range, k row range, cu_q, cu_k, max_q, max_k) or None."""
    k_index = {p.sample: i for i, p in enumerate(k_parts)}
    q_rows, k_rows, q_len, k_len = [], [], [], []
    q_pos = k_pos = 0
    k_starts = []
    for p in k_parts:
        k_starts.append(k_pos)
        k_pos += p.end - p.start
    for p in q_parts:
        n = p.end - p.start
        if p.sample in k_index:
            kp = k_parts[k_index[p.sample]]
            q_rows.append((q_pos, q_pos + n))
            k_rows.append((k_starts[k_index[p.sample]], k_starts[k_index[p.sample]] + kp.end - kp.start))
            q_len.append(n)
            k_len.append(kp.end - kp.start)
        q_pos += n
    if not q_rows:
        return None
    # the common samples are consecutive in both shards: their rows are one contiguous range each
    return (q_rows[0][0], q_rows[-1][1]), (k_rows[0][0], k_rows[-1][1]), q_len, k_len


class _RingAttention(torch.autograd.Function):
    """Non-causal varlen attention of this rank's queries over every ring shard's keys."""

    @staticmethod
    def forward(ctx, q, k, v, ring):
        out, lse = _ring_forward(q, k, v, ring)
        ctx.ring = ring
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.ring)
        return dq, dk, dv, None


@dataclass
class _Ring:
    """One ring's geometry for one step: shards' pieces, the neighbours, the op backend."""

    parts: list[list[Piece]]  # pieces of ring shard j (in ring order)
    me: int  # my index j in the ring
    ranks: list[int]  # global ranks of the ring, by j
    group: object
    scale: float
    backend: str | None

    def rows(self, j: int) -> int:
        return sum(p.end - p.start for p in self.parts[j])


def _ring_forward(q, k, v, ring: _Ring):
    size = len(ring.ranks)
    heads = q.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((heads, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    kv = [k, v]
    for step in range(size):
        owner = (ring.me - step) % size
        match = _overlap(ring.parts[ring.me], ring.parts[owner])
        if match is not None:
            (q0, q1), (k0, k1), q_len, k_len = match
            o, part_lse = ops.varlen_attention(
                q[q0:q1], kv[0][k0:k1], kv[1][k0:k1], cu_seqlens_of(q_len, q.device), cu_seqlens_of(k_len, q.device),
                max(q_len), max(k_len), softmax_scale=ring.scale, return_lse=True, backend=ring.backend,
            )  # fmt: skip
            part_lse = part_lse.float()
            new = torch.logaddexp(lse[:, q0:q1], part_lse)
            keep = torch.exp(lse[:, q0:q1] - new).nan_to_num(0.0).transpose(0, 1)[..., None]
            take = torch.exp(part_lse - new).transpose(0, 1)[..., None]
            out[q0:q1] = out[q0:q1] * keep + o.float() * take
            lse[:, q0:q1] = new
        if step + 1 < size:
            nxt, prev = ring.ranks[(ring.me + 1) % size], ring.ranks[(ring.me - 1) % size]
            shape = (ring.rows((owner - 1) % size), *k.shape[1:])
            kv = _shift(kv, [shape, shape], nxt, prev, ring.group)
    return out.to(q.dtype), lse


def _ring_backward(dout, q, k, v, out, lse, ring: _Ring):
    size = len(ring.ranks)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    carry = [k, v, torch.zeros(k.shape, dtype=torch.float32, device=k.device),
             torch.zeros(v.shape, dtype=torch.float32, device=v.device)]  # fmt: skip
    for step in range(size):
        owner = (ring.me - step) % size
        match = _overlap(ring.parts[ring.me], ring.parts[owner])
        if match is not None:
            (q0, q1), (k0, k1), q_len, k_len = match
            kb, vb = carry[0][k0:k1], carry[1][k0:k1]
            dq_b, dk_b, dv_b = ops.varlen_attention_backward(
                dout[q0:q1], q[q0:q1], kb, vb, out[q0:q1], lse[:, q0:q1].contiguous(),
                cu_seqlens_of(q_len, q.device), cu_seqlens_of(k_len, q.device), max(q_len), max(k_len),
                softmax_scale=ring.scale, backend=ring.backend,
            )  # fmt: skip
            dq[q0:q1] += dq_b.float()
            carry[2][k0:k1] += dk_b.float()
            carry[3][k0:k1] += dv_b.float()
        nxt, prev = ring.ranks[(ring.me + 1) % size], ring.ranks[(ring.me - 1) % size]
        rows = ring.rows((owner - 1) % size)
        shape = (rows, *k.shape[1:])
        if step + 1 < size:  # K, V and their fp32 dK / dV accumulators travel together
            carry = _shift(carry, [shape] * 4, nxt, prev, ring.group)
        else:  # the last hop brings each shard's dK / dV home
            carry[2], carry[3] = _shift(carry[2:], [shape] * 2, nxt, prev, ring.group)
    return dq.to(q.dtype), carry[2].to(k.dtype), carry[3].to(v.dtype)


class _GatherTokens(torch.autograd.Function):
    """all ranks' rows in group order -> the whole packed output; backward keeps my rows."""

    @staticmethod
    def forward(ctx, x, counts, me, group):
        ctx.rows = (sum(counts[:me]), sum(counts[: me + 1]))
        width = x.shape[1:]
        biggest = max(counts)
        padded = x.new_zeros((biggest, *width))
        padded[: x.shape[0]] = x
        gathered = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(gathered, padded, group=group)
        return torch.cat([g[:n] for g, n in zip(gathered, counts)])

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rows[0] : ctx.rows[1]], None, None, None


# ---- the model wrapper ----------------------------------------------------------------------------


class SequenceParallelDiT(torch.nn.Module):
    """A DiT whose ``forward_packed`` runs sequence-parallel over ``group``; built by
    :func:`apply_sequence_parallel`. Every rank passes the same batch and gets the whole output."""

    def __init__(self, model, group, layout: Layout, timeout: timedelta | None = None):
        super().__init__()
        self.model = model
        self.group = group
        self.layout = layout
        self.config = model.config
        self.plan = model.sequence_parallel_plan()
        self.global_ranks = dist.get_process_group_ranks(group) if group is not None else list(range(layout.size))
        self._ulysses_groups = {}
        if timeout is None and layout.ulysses > 1:
            timeout = group_timeout(group)
        for c in range(layout.cfg):  # every rank creates every subgroup, in the same order
            for j in range(layout.ring):
                ranks = [self.global_ranks[layout.group_rank(c, j, u)] for u in range(layout.ulysses)]
                self._ulysses_groups[(c, j)] = dist.new_group(ranks, timeout=timeout) if layout.ulysses > 1 else None
        self._step = None

    def forward(self, latents, timestep: torch.Tensor | None = None, text: torch.Tensor | None = None) -> torch.Tensor:
        """``sp(batch)``: :meth:`forward_packed`; ``sp(latents, timestep, text)``: ``DiT.forward``'s
        dense call, ``(B, C_out, T, H, W)`` on every rank."""
        if isinstance(latents, PackedBatch):
            if timestep is not None or text is not None:
                raise ValueError("pass a PackedBatch alone, or dense (latents, timestep, text)")
            return self.forward_packed(latents)
        if timestep is None or text is None:
            raise ValueError("the dense call needs (latents (B, C, T, H, W), timestep (B,), text (B, L, text_dim))")
        return self.model.dense_output(self.forward_packed(self.model.dense_batch(latents, timestep, text)), latents)

    def text_kv(self, *args, **kwargs) -> list[tuple]:
        """The wrapped DiT's :meth:`~fastdit.models.DiT.text_kv` (every rank computes the whole
        batch's; :meth:`forward_packed` takes each rank's pieces)."""
        return self.model.text_kv(*args, **kwargs)

    def conditioning_bounds(self, batch: PackedBatch) -> dict:
        return self.model.conditioning_bounds(batch)

    def forward_packed(self, batch: PackedBatch, text_kv: list | None = None) -> torch.Tensor:
        """The whole packed prediction on every rank. ``text_kv``: :meth:`text_kv` of the whole
        ``batch`` (as a sampler precomputes it); each rank keeps the rows of its pieces' samples."""
        batch.validate()
        self.model.check_batch(batch)
        if batch.image is not None:
            raise NotImplementedError("sequence parallelism does not shard Wan 2.1 I2V image states yet")
        if batch.timestep.shape[0] != batch.batch_size:
            raise NotImplementedError("sequence parallelism does not shard per-token timesteps (Wan 2.2 TI2V) yet")
        cu, cu_text = batch.cu_seqlens.tolist(), batch.cu_seqlens_text.tolist()
        self._check_same_batch(batch, cu, cu_text)
        layout = self.layout
        plan = make_plan(layout, cu)
        counts = [plan.sub[(cc, jj, uu)][1] - plan.sub[(cc, jj, uu)][0]
                  for cc in range(layout.cfg) for jj in range(layout.ring) for uu in range(layout.ulysses)]  # fmt: skip
        if min(counts) < 1:  # the plan is the same on every rank: every rank raises here
            raise ValueError(
                f"sequence parallel: {layout.size} ranks need at least one token each per sample group; "
                f"this batch gives token counts {counts}"
            )
        local, parts = local_batch(batch, cu, cu_text, *plan.sub[layout.coords])
        local_kv = None
        if text_kv is not None:
            layers = self.config.num_layers
            if len(text_kv) != layers or any(t.shape[0] != cu_text[-1] for kv in text_kv for t in kv):
                raise ValueError(f"text_kv must hold {layers} blocks of the batch's {cu_text[-1]} text rows "
                                 "(DiT.text_kv of the whole batch)")  # fmt: skip
            local_kv = [tuple(torch.cat([t[cu_text[p.sample] : cu_text[p.sample + 1]] for p in parts]) for t in kv)
                        for kv in text_kv]  # fmt: skip
        self._step = plan
        try:  # the hook lives for this call only: the model on its own runs plain attention
            with values_checked(), self.model.attention_hook(self._attention):
                out = self.model.forward_validated(local, text_kv=local_kv)
        finally:
            self._step = None
        return _GatherTokens.apply(out, counts, layout.rank, self.group)

    def _attention(self, q, k, v, local: PackedBatch):
        plan = self._step
        if plan is None:  # the wrapped model called on its own, outside forward_packed: plain attention
            return None
        layout = self.layout
        c, j, u = layout.coords
        heads = q.shape[1]
        if heads != self.plan.heads:
            raise RuntimeError(f"the model's attention hook passed {heads} heads; its plan declares {self.plan.heads}")
        scale = q.shape[-1] ** -0.5
        ulysses_group = self._ulysses_groups[(c, j)]
        if layout.ulysses > 1:
            token_counts = [plan.sub[(c, j, uu)][1] - plan.sub[(c, j, uu)][0] for uu in range(layout.ulysses)]
            head_counts = head_split(heads, layout.ulysses)
            q, k, v = (_SeqToHeads.apply(t, token_counts, head_counts, u, ulysses_group) for t in (q, k, v))
        ring_parts = [pieces(plan.cu, *plan.ring_shard[(c, jj)]) for jj in range(layout.ring)]
        if q.shape[1] == 0:
            # More Ulysses ranks than heads: this rank (and its whole ring, which shares its head
            # slice) has none; the all-to-alls still ran, so the collectives stay matched.
            out = q.new_zeros(q.shape) + 0 * (q.sum() + k.sum() + v.sum())  # keeps every backward collective
        elif layout.ring > 1:
            # the model's backend, named for the ring's backward (which runs outside its forward)
            backend = dispatch.scoped_backend("varlen_attention")
            out = _RingAttention.apply(q, k, v, self._ring(ring_parts, c, u, scale, backend))
        else:
            parts = ring_parts[0]
            cu = cu_seqlens_of([p.end - p.start for p in parts], q.device)
            longest = max(p.end - p.start for p in parts)
            out = ops.varlen_attention(q, k, v, cu, cu, longest, longest, softmax_scale=scale)
        if layout.ulysses > 1:
            out = _HeadsToSeq.apply(out, token_counts, head_counts, u, ulysses_group)
        return out

    def _ring(self, ring_parts, c, u, scale, backend) -> _Ring:
        layout = self.layout
        ranks = [self.global_ranks[layout.group_rank(c, jj, u)] for jj in range(layout.ring)]
        return _Ring(ring_parts, layout.coords[1], ranks, self.group, scale, backend)

    def _check_same_batch(self, batch: PackedBatch, cu: list[int], cu_text: list[int]) -> None:
        """Every rank must pass the same batch: compare a fingerprint, raise on every rank if not."""
        mine = batch_fingerprint(batch, cu, cu_text)
        everyone = [torch.empty_like(mine) for _ in range(self.layout.size)]
        dist.all_gather(everyone, mine, group=self.group)
        different = [r for r, t in enumerate(everyone) if not torch.equal(t, everyone[0])]
        if different:
            raise RuntimeError(
                f"sequence parallel: ranks {different} were given a different batch than rank 0 "
                "(every rank must pass the same packed batch: latents, timesteps, grids and text)"
            )


FINGERPRINT_SAMPLES = 64  # values read from each of tokens and text for the cross-rank check


def batch_fingerprint(batch: PackedBatch, cu: list[int], cu_text: list[int]) -> torch.Tensor:
    """A cheap digest of everything that decides a rank's output: boundaries, grids, offsets,
    timesteps, shapes, ``FINGERPRINT_SAMPLES`` values of the tokens and of the text (at the same
    positions on every rank) and two sums of each. SHA-256 of those, as eight 32-bit words in
    float64 (exact) on the batch's device (NCCL gathers CUDA tensors only)."""
    digest = hashlib.sha256()
    digest.update(repr((cu, cu_text, batch.grid_thw.tolist(), batch.patch_size, tuple(batch.tokens.shape),
                        tuple(batch.text.shape), None if batch.token_offset is None else batch.token_offset.tolist(),
                        str(batch.tokens.dtype), str(batch.text.dtype))).encode())  # fmt: skip
    digest.update(_bytes(batch.timestep.detach().double()))
    for t in (batch.tokens, batch.text):
        flat = t.detach().reshape(-1).double()
        if flat.numel():
            where = torch.linspace(0, flat.numel() - 1, FINGERPRINT_SAMPLES, device=flat.device).long()
            # two sums catch a change anywhere (a position-weighted one also a permutation); one
            # pass over the tokens (64 values per token in Wan) and the text, no host sync but the read
            weight = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64).remainder_(251).add_(1)
            summary = torch.cat([flat[where], torch.stack([flat.sum(), (flat * weight).sum()])])
            digest.update(_bytes(summary))
    words = [int.from_bytes(digest.digest()[i : i + 4], "little") for i in range(0, 32, 4)]
    return torch.tensor(words, dtype=torch.float64, device=batch.tokens.device)


def _bytes(t: torch.Tensor) -> bytes:
    return bytes(t.cpu().contiguous().view(torch.uint8).tolist())


def group_timeout(group) -> timedelta | None:
    """The timeout ``group`` (default: the world) was created with, for the subgroups fastdit
    creates when ``apply_sequence_parallel(timeout=)`` is not given: ``dist.new_group`` without one
    gets torch's default (30 minutes), so a hung rank would block a subgroup's collective far past
    ``init_process_group(timeout=...)``. torch has no public getter for it: this reads its
    backend's options, the one private read of the module, and None (torch's default) where that
    fails; pass ``timeout=`` to skip it."""
    pg = group if group is not None else dist.group.WORLD
    for device in getattr(pg, "_device_types", []):
        try:
            return pg._get_backend(device).options._timeout
        except (AttributeError, RuntimeError):
            continue
    return None


def apply_sequence_parallel(model, group=None, ulysses: int = 1, ring: int = 1, cfg: int = 1,
                            timeout: timedelta | None = None) -> SequenceParallelDiT:  # fmt: skip
    """Run ``model`` (a :class:`fastdit.models.DiT`) sequence-parallel over ``group``.

    Args:
        model: the DiT, replicated (same weights) on every rank of ``group``.
        group: a torch.distributed process group (default: the world). Its size must be
            ``cfg * ulysses * ring``.
        ulysses: ranks that split attention heads (all-to-all); need not divide the head count.
        ring: ranks that pass key / value shards around a ring.
        cfg: rank groups that split the batch's samples (2: the CFG branches).
        timeout: how long a collective of the Ulysses subgroups created here may wait (a hung rank
            then raises on the others); default: ``group``'s own timeout (:func:`group_timeout`).

    Returns:
        A module whose ``forward_packed(batch)`` every rank calls with the same batch, returning
        the whole packed output on every rank. The model's self-attention is re-routed in place
        (through ``DiT.attention_hook`` during each call); weights are shared, not copied.

    Raises on every rank (never hangs) when the ranks disagree on the degrees or the model.
    """
    if not dist.is_initialized():
        raise RuntimeError("apply_sequence_parallel needs torch.distributed.init_process_group(...) first")
    if not callable(getattr(model, "sequence_parallel_plan", None)):
        raise TypeError(f"{type(model).__name__} declares no sequence_parallel_plan(): only a model family's DiT "
                        "(fastdit.models.family) runs sequence-parallel")  # fmt: skip
    for name, value in (("ulysses", ulysses), ("ring", ring), ("cfg", cfg)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    size = dist.get_world_size(group)
    if timeout is not None and (not isinstance(timeout, timedelta) or timeout <= timedelta(0)):
        raise ValueError(f"timeout must be a positive datetime.timedelta or None, got {timeout!r}")
    if size != cfg * ulysses * ring:
        raise ValueError(f"the group has {size} ranks but cfg * ulysses * ring = {cfg} * {ulysses} * {ring}")
    mine = (ulysses, ring, cfg, repr(model.config), sum(p.numel() for p in model.parameters()))
    everyone = [None] * size
    dist.all_gather_object(everyone, mine, group=group)
    if any(e != everyone[0] for e in everyone):
        details = "; ".join(f"rank {r}: ulysses={e[0]} ring={e[1]} cfg={e[2]} params={e[4]}"
                            for r, e in enumerate(everyone))  # fmt: skip
        raise RuntimeError(f"sequence parallel configuration differs across ranks: {details}")
    layout = Layout(cfg, ulysses, ring, dist.get_rank(group))
    return SequenceParallelDiT(model, group, layout, timeout)


def all_reduce_gradients(model, group=None) -> None:
    """Sum every parameter's gradient over the group: after a sequence-parallel backward each
    rank holds its shard's share; the sum is the full-batch gradient on every rank. A parameter
    without a gradient on this rank joins with zeros, so the collectives always match."""
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=group)


__all__ = [
    "SequenceParallelDiT",
    "all_reduce_gradients",
    "apply_sequence_parallel",
    "balanced_bounds",
    "head_split",
    "parallel_vae_decode",
]


# ---- VAE decode split over ranks by spatial tiles --------------------------------------------------


def parallel_vae_decode(vae, z: torch.Tensor, tiling=None, group=None, chunk_frames: int = 1) -> torch.Tensor:
    """``vae.decode(z, tiling=tiling)`` with the spatial tiles shared out over the ranks of ``group``.

    Tile ``n`` (row-major) is decoded by rank ``n % P``; the decoded tiles are all-gathered and
    every rank blends them into the whole video, equal to the single-process tiled decode. Every
    rank passes the same ``z``. ``tiling`` defaults to ``SpatialTiling()``; a latent no larger
    than one tile is decoded whole on every rank.
    """
    from fastdit.models.wan.vae import SpatialTiling, blend_tiles, tile_starts, unpatchify

    tiling = tiling or SpatialTiling()
    height, width = z.shape[-2:]
    tile_in, stride_in, scale = vae.decode_tiles(tiling)  # every size from the VAE's own config
    if height <= tile_in[0] and width <= tile_in[1]:
        return vae.decode(z, chunk_frames=chunk_frames)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    tops, lefts = tile_starts(height, width, stride_in)
    tiles = [(i, j) for i in tops for j in lefts]
    frames = 1 + 4 * (z.shape[2] - 1)
    full = (scale * min(tile_in[0], height), scale * min(tile_in[1], width))
    per_rank = -(-len(tiles) // world)
    send = z.new_zeros((per_rank, z.shape[0], vae.config.pixel_channels, frames, *full))
    for slot, n in enumerate(range(rank, len(tiles), world)):
        i, j = tiles[n]
        tile = vae.decode_patchified(z[..., i : i + tile_in[0], j : j + tile_in[1]], chunk_frames)
        send[slot, ..., : tile.shape[-2], : tile.shape[-1]] = tile
    gathered = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(gathered, send, group=group)
    rows = []
    for i in tops:
        row = []
        for j in lefts:
            n = tiles.index((i, j))
            h, w = scale * min(tile_in[0], height - i), scale * min(tile_in[1], width - j)
            row.append(gathered[n % world][n // world][..., :h, :w])
        rows.append(row)
    video = blend_tiles(rows, (scale * tile_in[0], scale * tile_in[1]), (scale * stride_in[0], scale * stride_in[1]),
                        (scale * height, scale * width))  # fmt: skip
    if vae.config.patch_size != 1:
        video = unpatchify(video, vae.config.patch_size)
    return video.clamp_(-1.0, 1.0).contiguous()
