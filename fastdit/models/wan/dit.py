"""The DiT of Wan 2.1 (Sora-style: a transformer over spacetime patches) on fastdit.ops.

Semantics are docs/design.md's reference: the block of :mod:`fastdit.models.wan.block`
(adaLN-modulated self-attention with q/k RMSNorm across heads and 3D RoPE, cross-attention to the
text, an adaLN-modulated GELU(tanh) FFN, gated residuals) on fastdit's ops; a modulated head. Every sample of a
packed batch keeps its own size, timestep and text. ``DiT(config, backend="reference")`` runs
every op on the plain-PyTorch reference and is the parity oracle for the fast backends.
"""

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from fastdit import ops, settings
from fastdit.models.family import BackendChoice, SequenceParallelPlan
from fastdit.models.packing import PackedBatch, check_timestep, per_sample
from fastdit.models.wan.block import block_modulation, head_modulation, wan_block
from fastdit.models.wan.config import DiTConfig, preset
from fastdit.ops.dispatch import on_model_backend
from fastdit.ops.validation import check_tensor, values_checked

# The fastdit ops the DiT calls.
MODEL_OPS = ("rope3d_qk_norm", "varlen_attention", "adaln_modulate", "gated_residual", "rms_norm")


def timestep_features(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[cos(t f), sin(t f)]``, ``f_i = max_period^(-i / (dim/2))``, in float32.

    diffusers' ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`` exactly.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    angle = timestep.float()[:, None] * torch.exp(exponent)[None, :]
    features = torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)
    return F.pad(features, (0, 1)) if dim % 2 else features


class ImageEmbedding(nn.Module):
    """Wan 2.1 I2V's projection of the CLIP image states into the DiT's width:
    ``LayerNorm -> Linear -> GELU -> Linear -> LayerNorm``, both norms affine in float32 (eps 1e-5),
    diffusers' ``WanImageEmbedding`` without the FLF2V position embedding."""

    def __init__(self, image_dim: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(image_dim)
        self.ff_in = nn.Linear(image_dim, image_dim)
        self.ff_out = nn.Linear(image_dim, hidden)
        self.norm2 = nn.LayerNorm(hidden)

    @staticmethod
    def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps).to(
            x.dtype
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self._norm(self.norm1, image.to(self.ff_in.weight.dtype))
        return self._norm(self.norm2, self.ff_out(F.gelu(self.ff_in(x))))

    def mlp(self, image: torch.Tensor, bounds=None) -> torch.Tensor:
        """:meth:`forward` sample by sample (:func:`per_sample`) over ``bounds``."""
        return per_sample(self, image, bounds)


class Attention(nn.Module):
    """Multi-head attention with q/k RMSNorm across heads; self (with 3D RoPE) or cross (with the
    I2V model's added image keys / values when ``image``)."""

    def __init__(self, config: DiTConfig, image: bool = False):
        super().__init__()
        hidden = config.hidden
        self.num_heads, self.head_dim, self.eps = config.num_heads, config.head_dim, config.eps
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.o = nn.Linear(hidden, hidden)
        self.q_norm = nn.Parameter(torch.ones(hidden))
        self.k_norm = nn.Parameter(torch.ones(hidden))
        if image:
            self.add_k = nn.Linear(config.added_kv_proj_dim, hidden)
            self.add_v = nn.Linear(config.added_kv_proj_dim, hidden)
            self.add_k_norm = nn.Parameter(torch.ones(hidden))
        # Self-attention routed elsewhere while DiT.attention_hook(fn) is active (a sequence-parallel
        # step): fn(q, k, v, batch) -> out, or None for plain attention.
        self.sequence_parallel = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.num_heads, self.head_dim)

    def forward_self(self, x: torch.Tensor, batch: PackedBatch, config: DiTConfig):
        rows = batch.bounds("tokens")
        # q/k RMSNorm across heads and 3D RoPE in one op (one kernel on the Triton backend).
        q, k = ops.rope3d_qk(
            self._heads(per_sample(self.q, x, rows)),
            self._heads(per_sample(self.k, x, rows)),
            batch.grid_thw,
            batch.cu_seqlens,
            theta=config.rope_theta,
            axes_dim=config.rope_axes_dim,
            interleaved=config.rope_interleaved,
            token_offset=batch.token_offset,
            q_norm_weight=self.q_norm,
            k_norm_weight=self.k_norm,
            norm_eps=self.eps,
        )
        v = self._heads(per_sample(self.v, x, rows))
        cu, n = batch.cu_seqlens, batch.max_seqlen
        out = None
        if self.sequence_parallel is not None:  # None outside a sequence-parallel step: plain attention
            out = self.sequence_parallel(q, k, v, batch)
        if out is None:
            out = ops.varlen_attention(q, k, v, cu, cu, n, n)
        return per_sample(self.o, out.flatten(1), rows)

    def text_kv(self, context: torch.Tensor, image_context: torch.Tensor | None = None, text_bounds=None,
                image_bounds=None) -> tuple:  # fmt: skip
        """Cross-attention keys (RMS-normed) and values of the text tokens, (total_text, H, D) each;
        then, for the I2V model, those of the image tokens (its added projections and norm).
        Projections sample by sample over the bounds (:func:`per_sample`)."""
        k = ops.rms_norm(per_sample(self.k, context, text_bounds), self.k_norm, eps=self.eps)
        kv = (self._heads(k), self._heads(per_sample(self.v, context, text_bounds)))
        if image_context is None:
            return kv
        k_img = ops.rms_norm(per_sample(self.add_k, image_context, image_bounds), self.add_k_norm, eps=self.eps)
        return kv + (self._heads(k_img), self._heads(per_sample(self.add_v, image_context, image_bounds)))

    def forward_cross(self, x: torch.Tensor, kv: tuple, batch: PackedBatch):
        # q's RMSNorm across heads, with its weight, in one pass (one kernel on the Triton backend)
        rows = batch.bounds("tokens")
        q = self._heads(ops.rms_norm(per_sample(self.q, x, rows), self.q_norm, eps=self.eps))
        cu, n = batch.cu_seqlens, batch.max_seqlen
        out = ops.varlen_attention(q, kv[0], kv[1], cu, batch.cu_seqlens_text, n, batch.max_seqlen_text)
        if len(kv) == 4:  # I2V: attention to the image tokens, added (diffusers: text + image, then to_out)
            image = ops.varlen_attention(q, kv[2], kv[3], cu, batch.cu_seqlens_image, n, batch.max_seqlen_image)
            out = out + image
        return per_sample(self.o, out.flatten(1), rows)


class DiTBlock(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        hidden = config.hidden
        self.config = config
        self.self_attn = Attention(config)
        self.cross_attn = Attention(config, image=config.image_conditioned)
        self.cross_norm = nn.LayerNorm(hidden, eps=config.eps) if config.cross_attn_norm else None
        self.ffn_in = nn.Linear(hidden, config.ffn_dim)
        self.ffn_out = nn.Linear(config.ffn_dim, hidden)
        # (shift, scale, gate) of self-attention, then of the FFN; added to the per-sample projection.
        self.modulation = nn.Parameter(torch.randn(1, 6, hidden) / hidden**0.5)

    def forward(self, x, text_kv, mod, batch: PackedBatch):
        """One block over a packed batch; its ops run on the backend of the enclosing
        :class:`fastdit.ops.dispatch.model_backend` block (the DiT's own, in :meth:`DiT.forward_validated`)."""
        return wan_block(_PackedLayers(self, text_kv, batch), x, block_modulation(self.modulation, mod))


class _PackedLayers:
    """The Wan block's primitives (:class:`fastdit.models.wan.block.WanBlockLayers`) on fastdit's
    ops over a packed batch."""

    def __init__(self, block: DiTBlock, text_kv, batch: PackedBatch):
        self.block, self.text_kv, self.batch = block, text_kv, batch

    def modulate(self, x, shift, scale):
        eps, cu = self.block.config.eps, self.batch.cu_seqlens
        return ops.adaln_modulate(x, shift, scale, cu, norm="layer", eps=eps)

    def self_attention(self, h):
        return self.block.self_attn.forward_self(h, self.batch, self.block.config)

    def gated_residual(self, x, y, gate):
        return ops.gated_residual(x, y, gate, self.batch.cu_seqlens)

    def cross_norm(self, x):
        norm = self.block.cross_norm
        if norm is None:
            return x
        return F.layer_norm(x.float(), (x.shape[-1],), norm.weight.float(), norm.bias.float(), norm.eps).to(x.dtype)

    def cross_attention(self, h):
        return self.block.cross_attn.forward_cross(h, self.text_kv, self.batch)

    def residual_modulate(self, x, y, shift, scale):
        x = x + y
        return x, self.modulate(x, shift, scale)

    def ffn(self, h):
        block = self.block
        return per_sample(lambda x: block.ffn_out(F.gelu(block.ffn_in(x), approximate="tanh")), h,
                          self.batch.bounds("tokens"))  # fmt: skip


class DiT(BackendChoice, nn.Module):
    """Wan 2.1 DiT. Build with ``DiT(config)``, ``DiT.from_preset(name)`` or ``DiT.from_diffusers(...)``.

    ``backend``: None lets the dispatcher choose per op (the fast kernels on a GPU);
    ``"reference"`` runs every op on the plain-PyTorch oracle; ``"triton"`` / ``"cuda"`` force
    that backend on every op that has one (the others keep the dispatcher's choice). It reaches
    the ops one way: every public method that computes runs inside
    ``dispatch.model_backend(self.backend)`` (docs/design.md, "Dispatch"); :meth:`set_backend`
    changes it.
    """

    BACKEND_OPS = MODEL_OPS

    def __init__(self, config: DiTConfig, backend: str | None = None):
        super().__init__()
        self.config = config
        self.set_backend(backend)
        hidden = config.hidden
        # Conv3d with kernel = stride = patch is a Linear over each flattened patch (c, pt, ph, pw).
        self.patch_embed = nn.Linear(config.in_channels * config.patch_volume, hidden)
        self.time_in = nn.Linear(config.freq_dim, hidden)
        self.time_out = nn.Linear(hidden, hidden)
        self.time_proj = nn.Linear(hidden, 6 * hidden)
        self.text_in = nn.Linear(config.text_dim, hidden)
        self.text_out = nn.Linear(hidden, hidden)
        self.image_embed = ImageEmbedding(config.image_dim, hidden) if config.image_conditioned else None
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.num_layers))
        self.head_modulation = nn.Parameter(torch.randn(1, 2, hidden) / hidden**0.5)
        self.head_proj = nn.Linear(hidden, config.out_channels * config.patch_volume)

    @classmethod
    def from_preset(cls, name: str, backend: str | None = None) -> "DiT":
        """A randomly initialised DiT of a named preset (``tiny``, ``wan2.1-1.3b``, ``wan2.1-14b``)."""
        return cls(preset(name), backend=backend)

    @classmethod
    def from_diffusers(cls, source, *, config: DiTConfig | None = None, backend: str | None = None,
                       dtype: torch.dtype | None = None, device=None) -> "DiT":  # fmt: skip
        """Load Wan 2.1 weights in diffusers format, in place (built on the meta device, each
        weight read into its own storage in ``dtype`` on ``device``); see
        :func:`fastdit.models.weights.load_diffusers_dit`."""
        from fastdit.models.wan.weights import load_diffusers_dit

        return load_diffusers_dit(cls, source, config=config, backend=backend, dtype=dtype, device=device)

    def load_lora(self, source, scale: float = 1.0, name: str | None = None) -> str:
        """Fuse a LoRA into the weights (no step-time cost); returns its name for :meth:`unload_lora`.

        ``source``: a ``.safetensors`` path or a state dict, in diffusers / PEFT keys or any layout
        diffusers' Wan LoRA loader converts (original Wan ``diffusion_model.*.lora_down / lora_up /
        alpha``); see :mod:`fastdit.models.wan.lora`. ``scale`` multiplies the update (diffusers'
        ``set_adapters(weights=...)``). Several LoRAs add up. A ``WeightLoadError`` names the keys
        that fit no module of this model, before any weight changes.
        """
        if not hasattr(self, "_lora_stack"):
            from fastdit.models.wan.lora import LoraStack

            self._lora_stack = LoraStack()
        return self._lora_stack.load(self, source, scale, name)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (or all, ``name=None``): its weights are rewritten without it, and once
        none is left every weight is bitwise what it was before the first :meth:`load_lora`."""
        stack = getattr(self, "_lora_stack", None)
        if stack is None:
            if name is not None:
                raise KeyError(f"no LoRA named {name!r} is loaded; loaded: []")
            return
        stack.unload(self, name)

    @property
    def loras(self) -> dict[str, float]:
        """The fused LoRAs: name -> scale, in load order."""
        stack = getattr(self, "_lora_stack", None)
        return {} if stack is None else {name: scale for name, (scale, _) in stack.adapters.items()}

    def embed_conditions(self, timestep: torch.Tensor, bounds=None, *, by_value: bool = False):
        """(temb (N, C), block modulation (N, 6, C) float32) for ``timestep (N,)``, per sample or per
        token (then every op takes its rows per token): once per step, shared by every block.
        ``bounds``: the rows' sample boundaries (per-sample timesteps: every row its own; per-token:
        the token boundaries), run sample by sample (:func:`per_sample`); None: one call.
        ``by_value`` (per-token timesteps, batch-invariant): the MLP runs once per distinct value,
        alone, and rows take their value's result, so a row's embedding is bitwise the one a
        per-sample timestep of that value gets (eager only: under torch.compile or a CUDA graph
        capture, which cannot read the values back, ``bounds`` apply)."""
        dtype = self.time_in.weight.dtype

        def mlp(t):
            temb = self.time_out(F.silu(self.time_in(timestep_features(t, self.config.freq_dim).to(dtype))))
            return torch.cat([temb, self.time_proj(F.silu(temb))], dim=1)

        capturing = timestep.is_cuda and torch.cuda.is_current_stream_capturing()
        if by_value and settings.get().batch_invariant and not torch.compiler.is_compiling() and not capturing:
            values, inverse = torch.unique(timestep, return_inverse=True)
            out = per_sample(mlp, values, tuple(range(values.shape[0] + 1)))[inverse]
        else:
            out = per_sample(mlp, timestep, bounds)
        hidden = self.config.hidden
        return out[:, :hidden], out[:, hidden:].float().unflatten(1, (6, -1))

    @on_model_backend
    def text_kv(self, text: torch.Tensor, image: torch.Tensor | None = None, *, text_bounds=None,
                image_bounds=None) -> list[tuple]:  # fmt: skip
        """Every block's cross-attention (keys, values) for packed text ``(total_text, text_dim)``,
        and for the I2V model's packed image states ``image (total_image, image_dim)`` also the
        image (keys, values): ``(k, v)`` or ``(k, v, k_image, v_image)`` per block.

        They depend on the text (and image) only, not on the step: a sampler computes them once per
        run and passes them to each :meth:`forward_packed` (``text_kv=``), saving the text MLP and
        two ``L x C x C`` projections per block per step. ``text_bounds`` / ``image_bounds``: the
        samples' boundaries (:meth:`conditioning_bounds`), for batch-invariant projections.
        """
        check_tensor("text", text, ndims=(2,))
        if image is not None:
            check_tensor("image", image, ndims=(2,), device=text.device)
        self._check_conditioning(text, image, "text", "image")
        context = per_sample(self.text_context, text, text_bounds)
        image_context = None if image is None else self.image_embed.mlp(image, image_bounds)
        return [block.cross_attn.text_kv(context, image_context, text_bounds, image_bounds) for block in self.blocks]

    @staticmethod
    def conditioning_bounds(batch: PackedBatch) -> dict:
        """``text_bounds`` / ``image_bounds`` of ``batch`` for :meth:`text_kv`."""
        return {"text_bounds": batch.bounds("text"),
                "image_bounds": None if batch.image is None else batch.bounds("image")}  # fmt: skip

    def text_context(self, text: torch.Tensor) -> torch.Tensor:
        """The text MLP: ``(..., text_dim)`` encoder states -> ``(..., hidden)`` cross-attention context."""
        return self.text_out(F.gelu(self.text_in(text.to(self.text_in.weight.dtype)), approximate="tanh"))

    def forward_packed(self, batch: PackedBatch, text_kv: list | None = None) -> torch.Tensor:
        """Packed batch -> packed prediction ``(total, pt ph pw C_out)``; ``batch.unpack`` splits it.

        ``text_kv``: :meth:`text_kv` of ``batch.text``, precomputed (``batch.text`` is then unused).
        In eager mode the batch is validated once here, and the ops skip their per-call value
        checks (no host sync per layer); under torch.compile no value check runs at all.
        """
        if torch.compiler.is_compiling():
            return self.forward_validated(batch, text_kv)
        batch.validate()
        self.check_batch(batch)
        if text_kv is not None and len(text_kv) != len(self.blocks):
            raise ValueError(f"text_kv has {len(text_kv)} entries; the model has {len(self.blocks)} blocks")
        with values_checked():
            return self.forward_validated(batch, text_kv)

    def check_batch(self, batch: PackedBatch) -> None:
        """A ``ValueError`` naming the field when a (validated) batch does not fit this model."""
        cfg = self.config
        if tuple(batch.patch_size) != tuple(cfg.patch_size):
            raise ValueError(f"batch.patch_size {tuple(batch.patch_size)} differs from the model's {cfg.patch_size}")
        width = cfg.in_channels * math.prod(cfg.patch_size)
        if batch.tokens.shape[1] != width:
            raise ValueError(
                f"batch.tokens must be (total, in_channels * pt * ph * pw) = (total, {width}), "
                f"got {tuple(batch.tokens.shape)}"
            )
        self._check_conditioning(batch.text, batch.image, "batch.text", "batch.image")

    def _check_conditioning(self, text, image, text_name: str, image_name: str) -> None:
        """Text width and image states against the config (shared by a batch and :meth:`text_kv`)."""
        cfg = self.config
        if text.shape[1] != cfg.text_dim:
            raise ValueError(
                f"{text_name} must be (total_text, text_dim) = (total_text, {cfg.text_dim}), got {tuple(text.shape)}"
            )
        if cfg.image_conditioned and image is None:
            raise ValueError("this is an image-to-video DiT (image_dim set): pass image_embeds / the batch's image")
        if not cfg.image_conditioned and image is not None:
            raise ValueError(f"{image_name} was given, but this DiT has no image conditioning (image_dim is None)")
        if image is not None and image.shape[1] != cfg.image_dim:
            raise ValueError(
                f"{image_name} must be (total_image, image_dim) = (total_image, {cfg.image_dim}), "
                f"got {tuple(image.shape)}"
            )

    def sequence_parallel_plan(self) -> SequenceParallelPlan:
        """What sequence parallelism needs from this DiT (:class:`fastdit.models.family.SequenceParallelPlan`):
        every op but self-attention is token-wise, text and image states are replicated, and
        Ulysses splits ``num_heads`` heads."""
        return SequenceParallelPlan(heads=self.config.num_heads)

    @contextmanager
    def attention_hook(self, fn):
        """Route every block's self-attention through ``fn(q, k, v, batch) -> out | None``
        inside the block (q / k / v: this call's tokens, all heads; None from fn: plain attention),
        and remove it on leaving, whatever happened: how a sequence-parallel wrapper runs its own
        attention without owning the model's modules. Hooks do not nest."""
        blocks = [block.self_attn for block in self.blocks]
        if any(attn.sequence_parallel is not None for attn in blocks):
            raise RuntimeError("an attention hook is already installed on this DiT (hooks do not nest)")
        for attn in blocks:
            attn.sequence_parallel = fn
        try:
            yield self
        finally:
            for attn in blocks:
                attn.sequence_parallel = None

    @on_model_backend
    def forward_validated(self, batch: PackedBatch, text_kv: list | None = None) -> torch.Tensor:
        """:meth:`forward_packed` without its checks: for callers that validated ``batch``
        (``batch.validate()``, :meth:`check_batch`) and run it under ``values_checked()`` (a
        sequence-parallel step on its local shard, a CUDA graph capture, which must not sync).
        Every op runs inside ``model_backend(self.backend)`` (``@on_model_backend``)."""
        rows = batch.bounds("tokens")
        x = per_sample(self.patch_embed, batch.tokens.to(self.patch_embed.weight.dtype), rows)
        per_row = batch.timestep.shape[0] == batch.batch_size  # per-sample timesteps: a row each
        if per_row:
            temb, mod = self.embed_conditions(batch.timestep, tuple(range(batch.batch_size + 1)))
        else:
            temb, mod = self.embed_conditions(batch.timestep, rows, by_value=True)
        if text_kv is None:
            text_kv = self.text_kv(batch.text, batch.image, **self.conditioning_bounds(batch))
        for block, kv in zip(self.blocks, text_kv):
            x = block(x, kv, mod, batch)
        shift, scale = head_modulation(self.head_modulation, temb)
        x = ops.adaln_modulate(x, shift, scale, batch.cu_seqlens, norm="layer", eps=self.config.eps)
        return per_sample(self.head_proj, x, rows)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                image_embeds: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Dense batch -> ``(B, C_out, T, H, W)``.

        Args: ``latents (B, C, T, H, W)``, ``timestep (B,)`` or per token ``(B, S)`` (S = the
        patch grid's t h w, Wan 2.2 TI2V), ``text (B, L, text_dim)``;
        ``image_embeds (B, L_image, image_dim)`` for the I2V model: the CLIP image encoder's
        penultimate hidden states, diffusers' ``encoder_hidden_states_image``.

        Matches diffusers' ``WanTransformer3DModel(latents, timestep, text,
        encoder_hidden_states_image=image_embeds)[0]`` for the same weights.
        """
        batch = self.dense_batch(latents, timestep, text, image_embeds)
        return self.dense_output(self.forward_packed(batch), latents)

    def dense_batch(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                    image_embeds: torch.Tensor | None = None) -> PackedBatch:  # fmt: skip
        """:meth:`forward`'s arguments checked against the config (a ``ValueError`` naming the
        argument, before any compute) and packed."""
        cfg = self.config
        check_tensor("latents", latents, ndims=(5,))
        check_tensor("text", text, ndims=(3,), device=latents.device)
        check_tensor("timestep", timestep, ndims=(1, 2), dtypes=None, device=latents.device)
        check_timestep("timestep", timestep)
        batch = latents.shape[0]
        if latents.shape[1] != cfg.in_channels:
            raise ValueError(
                f"latents must have in_channels = {cfg.in_channels} channels (B, C, T, H, W), "
                f"got {tuple(latents.shape)}"
            )
        if text.shape[0] != batch or text.shape[2] != cfg.text_dim:
            raise ValueError(
                f"text must be (B, L, text_dim) = ({batch}, L, {cfg.text_dim}) for latents {tuple(latents.shape)}, "
                f"got {tuple(text.shape)}"
            )
        if text.shape[1] < 1:
            raise ValueError(f"text must have at least one token (B, L >= 1, text_dim), got {tuple(text.shape)}")
        pt, ph, pw = cfg.patch_size  # (no generator expressions: torch.compile traces this)
        tokens = (latents.shape[2] // pt) * (latents.shape[3] // ph) * (latents.shape[4] // pw)
        if timestep.shape not in ((batch,), (batch, tokens)):
            raise ValueError(
                f"timestep must be (B,) = ({batch},) or per token (B, S) = ({batch}, {tokens}), "
                f"got {tuple(timestep.shape)}"
            )
        timestep = timestep.reshape(-1)
        if image_embeds is not None or cfg.image_conditioned:
            if not cfg.image_conditioned:
                raise ValueError("image_embeds given, but this DiT has no image conditioning (image_dim is None)")
            if image_embeds is None:
                raise ValueError(f"this image-to-video DiT needs image_embeds (B, L_image, {cfg.image_dim})")
            check_tensor("image_embeds", image_embeds, ndims=(3,), device=latents.device)
            if image_embeds.shape[0] != batch or image_embeds.shape[2] != cfg.image_dim or image_embeds.shape[1] < 1:
                raise ValueError(
                    f"image_embeds must be (B, L_image >= 1, image_dim) = ({batch}, L_image, {cfg.image_dim}), "
                    f"got {tuple(image_embeds.shape)}"
                )
        return PackedBatch.from_dense(latents, timestep, text, cfg.patch_size, image=image_embeds)

    def dense_output(self, out: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The packed prediction of :meth:`dense_batch`'s batch as ``(B, C_out, T, H, W)``."""
        pt, ph, pw = self.config.patch_size
        _, _, frames, height, width = latents.shape
        return rearrange(
            out,
            "(b t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
            b=latents.shape[0],
            t=frames // pt,
            h=height // ph,
            w=width // pw,
            pt=pt,
            ph=ph,
            pw=pw,
        )
