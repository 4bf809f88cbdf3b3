"""``PackedBatch``: videos and images of different sizes and text lengths as one token sequence."""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from einops import rearrange

from fastdit import settings
from fastdit.ops.validation import (
    check_cu_seqlens,
    check_grid_thw,
    check_max_seqlen,
    check_tensor,
    check_token_offset,
    check_values_enabled,
)


def patchify(latent: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """(C, T, H, W) -> (T' H' W', C pt ph pw): tokens in (t, h, w) row-major order.

    The feature order (c, pt, ph, pw) matches a Conv3d weight ``(hidden, C, pt, ph, pw)`` flattened,
    so the patch embedding is that weight as a Linear.
    """
    pt, ph, pw = patch_size
    return rearrange(latent, "c (t pt) (h ph) (w pw) -> (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)


def unpatchify(tokens: torch.Tensor, grid: Sequence[int], patch_size: Sequence[int], channels: int) -> torch.Tensor:
    """(T' H' W', pt ph pw C) -> (C, T, H, W), the layout of Wan's head projection (channels last)."""
    pt, ph, pw = patch_size
    t, h, w = grid
    return rearrange(
        tokens, "(t h w) (pt ph pw c) -> c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw, c=channels
    )


def check_timestep(name: str, timestep: torch.Tensor) -> None:
    """A diffusion time is a real number: bool and complex tensors are refused by name (a bool
    would run as 0 / 1, a complex one would lose its imaginary part in the sinusoidal features)."""
    if timestep.dtype == torch.bool or timestep.is_complex():
        raise TypeError(f"{name} must hold real numbers (float or int), got {timestep.dtype}")


@dataclass
class PackedBatch:
    """A DiT batch in the packed ("varlen") layout of docs/design.md, "The packed batch".

    Attributes:
        tokens: ``(total, C_in * pt * ph * pw)`` patchified latents of all samples, concatenated.
        cu_seqlens: ``(B+1,)`` int32 token boundaries; ``max_seqlen`` the longest sample.
        grid_thw: ``(B, 3)`` int32 post-patch (t, h, w) per sample.
        timestep: ``(B,)`` diffusion time per sample, or ``(total,)`` per token (Wan 2.2 TI2V's
            expanded timesteps: a clean conditioning frame's tokens at 0).
        text: ``(total_text, text_dim)`` text embeddings of all samples, concatenated.
        cu_seqlens_text: ``(B+1,)`` int32 text boundaries; ``max_seqlen_text`` the longest.
        patch_size: (pt, ph, pw) the tokens were cut with.
        token_offset: optional ``(B,)`` int32 global index of each sample's first token (shards).
        image: optional ``(total_image, image_dim)`` image-encoder states of all samples (Wan 2.1
            I2V's CLIP tokens), with ``cu_seqlens_image`` ``(B+1,)`` and ``max_seqlen_image``.
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    grid_thw: torch.Tensor
    timestep: torch.Tensor
    text: torch.Tensor
    cu_seqlens_text: torch.Tensor
    max_seqlen_text: int
    patch_size: tuple[int, int, int]
    token_offset: torch.Tensor | None = None
    image: torch.Tensor | None = None
    cu_seqlens_image: torch.Tensor | None = None
    max_seqlen_image: int = 0
    # The boundaries as host ints, by kind ("tokens", "text", "image"), when the builder knew them
    # (from_samples, from_dense): what bounds() returns without reading the device tensors back.
    host_bounds: dict | None = field(default=None, compare=False, repr=False)

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    def bounds(self, kind: str = "tokens") -> tuple[int, ...]:
        """The ``(B+1,)`` boundaries of ``kind`` (``"tokens"``, ``"text"``, ``"image"``) as host ints:
        the builder's copy, else read back from the device once (a sync; refused inside a CUDA
        graph capture, where the builder's copy must exist)."""
        if kind not in ("tokens", "text", "image"):
            raise ValueError(f"kind must be 'tokens', 'text' or 'image', got {kind!r}")
        known = (self.host_bounds or {}).get(kind)
        if known is not None:
            return known
        cu = {"tokens": self.cu_seqlens, "text": self.cu_seqlens_text, "image": self.cu_seqlens_image}[kind]
        if cu is None:
            raise ValueError(f"this batch has no {kind} boundaries")
        if cu.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"PackedBatch.bounds({kind!r}) would read cu_seqlens back during a CUDA graph "
                               "capture: build the batch with from_samples / from_dense (they keep them on the "
                               "host)")  # fmt: skip
        bounds = tuple(int(v) for v in cu.tolist())
        self.host_bounds = {**(self.host_bounds or {}), kind: bounds}
        return bounds

    @classmethod
    def from_samples(
        cls,
        latents: Sequence[torch.Tensor],
        timesteps: torch.Tensor | Sequence[float],
        texts: Sequence[torch.Tensor],
        patch_size: Sequence[int] = (1, 2, 2),
        images: Sequence[torch.Tensor] | None = None,
    ) -> "PackedBatch":
        """Pack per-sample ``latents[i]: (C, T_i, H_i, W_i)`` and ``texts[i]: (L_i, text_dim)``
        (and, for an I2V model, ``images[i]: (L_image_i, image_dim)``, one per sample).

        An image is a latent with ``T = 1``. Each T, H, W must be divisible by the patch size.
        """
        if not latents or len(latents) != len(texts):
            raise ValueError(f"need one text per latent and at least one sample, got {len(latents)} and {len(texts)}")
        patch_size = tuple(int(p) for p in patch_size)
        device = latents[0].device
        channels = latents[0].shape[0]
        grids, token_lists = [], []
        for i, latent in enumerate(latents):
            check_tensor(f"latents[{i}]", latent, dtypes=None)
            if latent.device != device:
                raise ValueError(f"latents[{i}] is on {latent.device}, latents[0] on {device}: one device per batch")
            if latent.dim() != 4 or latent.shape[0] != channels:
                raise ValueError(f"latents[{i}] must be (C={channels}, T, H, W), got {tuple(latent.shape)}")
            if any(n % p for n, p in zip(latent.shape[1:], patch_size)):
                raise ValueError(f"latents[{i}] (T, H, W) = {tuple(latent.shape[1:])} is not divisible by {patch_size}")
            grids.append([n // p for n, p in zip(latent.shape[1:], patch_size)])
            token_lists.append(patchify(latent, patch_size))
        for i, text in enumerate(texts):
            check_tensor(f"texts[{i}]", text, dtypes=None)
            if text.dim() != 2 or text.shape[0] < 1:
                raise ValueError(f"texts[{i}] must be (L >= 1, text_dim), got {tuple(text.shape)}")
            if text.shape[1] != texts[0].shape[-1]:
                raise ValueError(
                    f"texts[{i}] has text_dim {text.shape[1]}, texts[0] {texts[0].shape[-1]}: one width per batch"
                )
            if text.device != device:
                raise ValueError(f"texts[{i}] is on {text.device}, the latents on {device}: one device per batch")
        image_fields = {}
        if images is not None:
            if len(images) != len(latents):
                raise ValueError(f"need one image per latent, got {len(images)} for {len(latents)}")
            for i, image in enumerate(images):
                check_tensor(f"images[{i}]", image, ndims=(2,), dtypes=None, device=device)
                if image.shape[0] < 1 or image.shape[1] != images[0].shape[1]:
                    raise ValueError(f"images[{i}] must be (L >= 1, image_dim = {images[0].shape[1]}), "
                                     f"got {tuple(image.shape)}")  # fmt: skip
            image_lengths = [m.shape[0] for m in images]
            image_fields = dict(image=torch.cat(list(images)), cu_seqlens_image=cu_seqlens_of(image_lengths, device),
                                max_seqlen_image=max(image_lengths))  # fmt: skip
        lengths = [t.shape[0] for t in token_lists]
        text_lengths = [t.shape[0] for t in texts]
        timestep = torch.as_tensor(timesteps, device=device)
        check_timestep("timesteps", timestep)
        total = sum(t.shape[0] for t in token_lists)
        if timestep.shape not in ((len(latents),), (total,)):
            raise ValueError(
                f"timesteps must be per sample ({len(latents)},) or per token ({total},), got {tuple(timestep.shape)}"
            )
        host = {"tokens": _running(lengths), "text": _running(text_lengths)}
        if images is not None:
            host["image"] = _running(image_lengths)
        return cls(
            host_bounds=host,
            tokens=torch.cat(token_lists),
            cu_seqlens=cu_seqlens_of(lengths, device),
            max_seqlen=max(lengths),
            grid_thw=torch.tensor(grids, dtype=torch.int32, device=device),
            timestep=timestep,
            text=torch.cat(list(texts)),
            cu_seqlens_text=cu_seqlens_of(text_lengths, device),
            max_seqlen_text=max(text_lengths),
            patch_size=patch_size,
            **image_fields,
        )

    @classmethod
    def from_dense(
        cls,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        patch_size: Sequence[int] = (1, 2, 2),
        image: torch.Tensor | None = None,
    ) -> "PackedBatch":
        """Pack a same-size batch ``latents (B, C, T, H, W)``, ``timestep (B,)``, ``text (B, L, text_dim)``
        and, for an I2V model, ``image (B, L_image, image_dim)``.

        Needs no host sync, so a compiled ``DiT.forward`` traces it into its graph.
        """
        batch, _, frames, height, width = latents.shape
        pt, ph, pw = patch_size
        if frames % pt or height % ph or width % pw:
            raise ValueError(f"latents (T, H, W) = {(frames, height, width)} is not divisible by {tuple(patch_size)}")
        grid = (frames // pt, height // ph, width // pw)
        seqlen = grid[0] * grid[1] * grid[2]
        device = latents.device
        tokens = rearrange(latents, "b c (t pt) (h ph) (w pw) -> (b t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)
        text_len = text.shape[1]
        image_fields = {}
        if image is not None:
            n = image.shape[1]
            cu_image = torch.arange(0, (batch + 1) * n, n, dtype=torch.int32, device=device)
            image_fields = dict(image=image.reshape(batch * n, image.shape[-1]), cu_seqlens_image=cu_image,
                                max_seqlen_image=n)  # fmt: skip
        host = {"tokens": tuple(range(0, (batch + 1) * seqlen, seqlen)),
                "text": tuple(range(0, (batch + 1) * text_len, text_len))}  # fmt: skip
        if image is not None:
            host["image"] = tuple(range(0, (batch + 1) * image.shape[1], image.shape[1]))
        return cls(
            host_bounds=host,
            tokens=tokens,
            cu_seqlens=torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device),
            max_seqlen=seqlen,
            grid_thw=torch.tensor([grid], dtype=torch.int32, device=device).expand(batch, 3).contiguous(),
            timestep=timestep,
            text=text.reshape(batch * text_len, text.shape[-1]),
            cu_seqlens_text=torch.arange(0, (batch + 1) * text_len, text_len, dtype=torch.int32, device=device),
            max_seqlen_text=text_len,
            patch_size=tuple(patch_size),
            **image_fields,
        )

    def validate(self) -> "PackedBatch":
        """Check every field against the others (shapes, dtypes, boundaries, lengths); returns self.

        Reads the boundaries back to the host once; the DiT calls this once per forward.
        """
        total, total_text = self.tokens.shape[0], self.text.shape[0]
        device = self.tokens.device
        check_tensor("tokens", self.tokens, ndims=(2,))
        check_tensor("text", self.text, ndims=(2,), device=device)
        check_cu_seqlens("cu_seqlens", self.cu_seqlens, total, device, min_len=1)
        check_cu_seqlens("cu_seqlens_text", self.cu_seqlens_text, total_text, device, min_len=1)
        batch = self.batch_size
        if self.cu_seqlens_text.shape[0] != batch + 1:
            raise ValueError(f"cu_seqlens_text describes {self.cu_seqlens_text.shape[0] - 1} samples, tokens {batch}")
        check_max_seqlen("max_seqlen", self.max_seqlen, self.cu_seqlens)
        check_max_seqlen("max_seqlen_text", self.max_seqlen_text, self.cu_seqlens_text)
        check_grid_thw(self.grid_thw, self.cu_seqlens)
        check_token_offset(self.token_offset, batch, device)
        if (self.image is None) != (self.cu_seqlens_image is None):
            raise ValueError("image and cu_seqlens_image go together")
        if self.image is not None:
            check_tensor("image", self.image, ndims=(2,), device=device)
            check_cu_seqlens("cu_seqlens_image", self.cu_seqlens_image, self.image.shape[0], device, min_len=1)
            if self.cu_seqlens_image.shape[0] != batch + 1:
                raise ValueError(
                    f"cu_seqlens_image describes {self.cu_seqlens_image.shape[0] - 1} samples, tokens {batch}"
                )
            check_max_seqlen("max_seqlen_image", self.max_seqlen_image, self.cu_seqlens_image)
        if self.host_bounds and check_values_enabled(self.cu_seqlens):  # the builder's host copy must be the boundaries
            kinds = [(k, cu) for k, cu in (("tokens", self.cu_seqlens), ("text", self.cu_seqlens_text),
                                           ("image", self.cu_seqlens_image))
                     if cu is not None and self.host_bounds.get(k) is not None]  # fmt: skip
            read = torch.cat([cu.to(torch.int64) for _, cu in kinds]).tolist() if kinds else []  # one sync for all
            for kind, cu in kinds:
                device_bounds, read = tuple(read[: cu.shape[0]]), read[cu.shape[0] :]
                if device_bounds != tuple(self.host_bounds[kind]):
                    raise ValueError(f"host_bounds[{kind!r}] = {tuple(self.host_bounds[kind])} disagrees with the "
                                     "batch's boundaries")  # fmt: skip
        check_tensor("timestep", self.timestep, ndims=(1,), dtypes=None, device=device)
        check_timestep("timestep", self.timestep)
        if self.timestep.shape[0] not in (batch, total):
            raise ValueError(
                f"timestep must be per sample (B,) = ({batch},) or per token (total,) = ({total},), "
                f"got {tuple(self.timestep.shape)}"
            )
        return self

    def unpack(self, out: torch.Tensor, channels: int) -> list[torch.Tensor]:
        """Packed model output ``(total, pt ph pw C)`` -> per-sample ``(C, T, H, W)`` latents."""
        bounds = self.cu_seqlens.tolist()
        grids = self.grid_thw.tolist()
        volume = math.prod(self.patch_size)
        if out.dim() != 2 or out.shape[0] != bounds[-1] or out.shape[1] != volume * channels:
            raise ValueError(
                f"out must be the packed prediction (total, pt*ph*pw*C) = ({bounds[-1]}, {volume * channels}) "
                f"for channels={channels}, got {tuple(out.shape)}"
            )
        for i, (grid, start, end) in enumerate(zip(grids, bounds[:-1], bounds[1:])):
            if math.prod(grid) != end - start:
                raise ValueError(
                    f"grid_thw[{i}] = {grid} has {math.prod(grid)} tokens but sample {i} has {end - start}: "
                    "unpack needs t*h*w tokens per sample"
                )
        return [
            unpatchify(out[bounds[i] : bounds[i + 1]], grids[i], self.patch_size, channels)
            for i in range(self.batch_size)
        ]


def _running(lengths: Sequence[int]) -> tuple[int, ...]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return tuple(out)


def per_sample(fn, x: torch.Tensor, bounds: Sequence[int] | None) -> torch.Tensor:
    """``fn(x)`` for a row-wise ``fn`` (a Linear, an MLP) computed sample by sample when the
    ``batch_invariant`` setting is on (the default): each sample's rows ``x[bounds[i]:bounds[i+1]]``
    are their own call, so a sample's result is bitwise what it would be alone, whatever else is
    in the batch (a matmul's rounding otherwise depends on how many rows it is given and where a
    row sits among them). ``bounds`` None or one sample: one call. See docs/design.md, "Batch
    invariance"."""
    if bounds is None or len(bounds) <= 2 or not settings.get().batch_invariant:
        return fn(x)
    if bounds[0] != 0 or bounds[-1] != x.shape[0]:
        raise ValueError(f"bounds must run from 0 to x's {x.shape[0]} rows, got {bounds[0]}..{bounds[-1]}")
    return torch.cat([fn(x[start:end]) for start, end in zip(bounds[:-1], bounds[1:])])


def cu_seqlens_of(lengths: Sequence[int], device: torch.device) -> torch.Tensor:
    """``(B+1,)`` int32 boundaries ``[0, n0, n0+n1, ...]`` of samples of these lengths."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)
