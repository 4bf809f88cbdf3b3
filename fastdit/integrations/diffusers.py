"""fastdit as a drop-in backend for diffusers: an attention backend for any diffusers model
(``enable()`` then diffusers' ``set_attention_backend("fastdit")``, or
``DIFFUSERS_ATTN_BACKEND=fastdit``), and :func:`patch`, which also reaches the processors that
call torch SDPA themselves and, for Wan 2.1 / 2.2 (``WanPipeline`` with one or two experts,
``WanImageToVideoPipeline``, ``WanTransformer3DModel``, ``AutoencoderKLWan``), the fused RoPE,
adaLN and VAE. Tested with diffusers 0.36 to 0.42 (CI runs these tests on 0.42 and on 0.36.0, the
oldest supported release; 0.35 and older differ in the rope module and the VAE's output clamp,
and :func:`patch` warns on a version outside the range). Everything that touches diffusers'
private attention registry is in ``_diffusers_registry``; docs/design.md ("The diffusers
integration") describes the mask reading, the routing and context parallelism.

What :func:`patch` changes, each reversibly (:func:`unpatch` undoes them in reverse order):

- ``attention``: fastdit's ``ops.attention`` becomes a diffusers attention backend named
  ``"fastdit"`` in diffusers' own dispatcher (``attention_dispatch``), and every dispatching
  attention processor of the transformer is pointed at it, as ``set_attention_backend`` would
  (but without changing diffusers' process-wide default); modules whose code calls torch SDPA
  (or the dispatcher's default) themselves run inside :class:`SDPAOnFastdit`. diffusers' backend
  enum is closed, so fastdit adds one member to it, once per process.
- ``rope``: the transformer's ``rope`` module returns the patch grid instead of per-token cos /
  sin tables, and the self-attention processors apply the q / k RMSNorm and the 3D RoPE in one
  ``ops.rope3d_qk`` call (angles computed in-kernel, never a ``[S, D]`` table).
- ``adaln``: each ``WanTransformerBlock.forward`` runs on ``ops.adaln_modulate``,
  ``ops.gated_residual`` and the fused ``ops.gated_residual_modulate`` (cross-attention residual
  plus the FFN's modulation in one pass) instead of diffusers' fp32 elementwise chains.
- ``vae``: ``AutoencoderKLWan``'s ``_encode`` / ``_decode`` run fastdit's ``CausalVAE`` sharing the
  module's weights (no copy), channels-last with the fused norm + SiLU; diffusers' tiling settings
  (``enable_tiling``) carry over (Wan 2.2's patchified VAE runs diffusers' own code while tiling
  is on).

Diffusers' LoRA adapters (PEFT layers inside the linear modules) keep working: the patch calls
the modules, never their weights directly.

The patched objects keep their classes, parameters and call signatures: ``pipe(...)`` is called
unchanged.

Where fastdit has no kernel for the device (a CPU: the dispatcher's choice is the ``torch``
backend, PyTorch's own ops, which is what diffusers' code already runs), the patched transformer
parts run diffusers' own code for that call, so a patched model is never slower than the
unpatched one; the dispatcher's choice is recorded in ``dispatch.trace()`` and said once per op
and device in the log. A backend forced with ``patch(backend=...)`` always runs fastdit's ops. The
VAE runs fastdit's ``CausalVAE`` on every device (on CPUs its oneDNN convs are faster than
diffusers' own).
"""

import copy
import functools
import inspect
import itertools
import logging
import os
import re
import sys
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from fastdit import ops
from fastdit.integrations import _diffusers_registry as _registry
from fastdit.models.wan.block import block_modulation, wan_block
from fastdit.ops import dispatch
from fastdit.ops.dispatch import backends_for, device_choice, model_backend
from fastdit.ops.validation import values_checked

logger = logging.getLogger("fastdit")

BACKEND_NAME = "fastdit"
_PATCHES_ATTR = "_fastdit_patches"
# The fastdit ops a patched transformer and VAE call (patch(backend=...) is applied to each).
PATCH_OWNER = "fastdit.patch"  # how traces name a patched model's choice
PATCH_OPS = ("attention", "rope3d_qk", "rope3d_qk_norm", "adaln_modulate", "gated_residual", "gated_residual_modulate")
# diffusers (major, minor) releases patch() is tested with: [first, past the last)
SUPPORTED_DIFFUSERS = ((0, 36), (0, 43))


def _warn_if_untested_diffusers() -> None:
    import diffusers

    found = re.match(r"(\d+)\.(\d+)", diffusers.__version__)
    first, past = SUPPORTED_DIFFUSERS
    if found is None or not first <= (int(found[1]), int(found[2])) < past:
        warnings.warn(
            f"fastdit.patch is tested with diffusers {first[0]}.{first[1]} to {past[0]}.{past[1] - 1}, "
            f"found {diffusers.__version__}: the patch may fail or change outputs",
            UserWarning,
            stacklevel=3,
        )


@dataclass
class _Change:
    description: str
    undo: Callable[[], None]


def _set_attr(obj, name: str, value, description: str) -> _Change:
    """Set ``obj.name`` on the instance; undo restores the instance attribute, or removes it when
    the value came from the class (so the object is exactly as before)."""
    had_own = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)

    def undo():
        if had_own:
            setattr(obj, name, old)
        else:
            delattr(obj, name)

    return _Change(description, undo)


@cache
def _log_native_once(op: str, device: str) -> None:
    logger.info("fastdit.patch: no fastdit kernel runs %s on %s: the patched module runs diffusers' own code there "
                "(PyTorch's ops, the dispatcher's 'torch' choice)", op, device)  # fmt: skip


def _runs_native(op: str, x: torch.Tensor, forced: str | None = None) -> bool:
    """True where the dispatcher would run ``op`` on PyTorch's own ops (no backend forced: by
    ``forced``, the enclosing ``model_backend`` block or the settings; and no fastdit kernel for
    x's device and dtype): diffusers' code is then the same math, without fastdit's wrappers. The
    choice is recorded in open traces."""
    if forced is None:
        forced, _ = dispatch.forced_backend(op, None)
    if forced is not None or device_choice(op, x.device, x.dtype) != "torch":
        return False
    _log_native_once(op, x.device.type)
    return True


# ---- attention: a backend in diffusers' dispatcher ---------------------------------------------


# An additive mask value this far below its row's largest masks its key: exp(-1e4 + O(1 logits)) is 0
# in float32, so diffusers' -10000 (LTX, LTX2, SanaVideo) and finfo.min mask exactly as -inf does.
# A constant added to every kept key of a row (Cosmos passes a mask of ones) changes nothing.
_MASKED_BELOW = -1e4


def _call_site() -> str:
    """The first frame outside fastdit and diffusers' attention dispatch: the processor that called
    (frames walked directly: ``inspect.stack`` would read every caller's source)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if "/fastdit/" not in name and not name.endswith("attention_dispatch.py"):
            return f"{os.path.basename(name)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


@dataclass
class MaskRows:
    """Which keys each query sees under a mask: ``keys`` (B', Sk) for every query of a sample
    (key padding), seen only by ``queries`` (B', Sq) when given (the other queries see no key:
    HunyuanVideo 1.5's ``valid_q & valid_k``); or ``rows`` (B', Sq, Sk), one row per query. B'
    is 1 for a mask shared by the batch."""

    keys: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    rows: torch.Tensor | None = None


def mask_rows(attn_mask: torch.Tensor, batch: int, heads: int, seq_q: int, seq_k: int):
    """``(MaskRows, None)``: ``attn_mask`` read as the keys each query keeps, or ``(None, reason)``
    for a mask fastdit cannot serve exactly. One host sync for every check; a boolean mask is read
    by reductions only (no copy of a ``[B, 1, Sq, Sk]`` mask).

    Key padding is what most video DiTs in diffusers pass: boolean ``[B, 1, 1, Sk]``, boolean
    ``[B, 1, Sq, Sk]`` repeating it per query, additive ``[B, H, 1, Sk]`` with 0 on kept keys and
    -10000 / -inf on padded ones, or ``[B, Sk]`` (which diffusers' native backend reads as
    ``[B, 1, 1, Sk]``); padding may sit anywhere in the sequence (QwenImage puts text first).
    HunyuanVideo 1.5 passes ``valid_q & valid_k``; HunyuanVideo's token refiner the same with key
    0 forced on (rows differ). An additive mask is read relative to each row's largest value
    (softmax ignores a constant per row): Cosmos' all-ones mask masks nothing, a row of -10000
    everywhere sees every key, as in SDPA. Masks that differ between heads and additive biases are
    not served."""
    mask = attn_mask
    if mask.dim() == 2 and tuple(mask.shape) == (batch, seq_k):
        mask = mask[:, None, None, :]
    if mask.dim() > 4:
        return None, f"a {mask.dim()}-D attn_mask"
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    b, h, q, k = mask.shape
    if b not in (1, batch) or h not in (1, heads) or q not in (1, seq_q) or k != seq_k:
        return None, f"an attn_mask of shape {tuple(attn_mask.shape)} that does not broadcast to (B, H, Sq, Sk)"
    if mask.dtype != torch.bool and not mask.is_floating_point():
        return None, f"an attn_mask of dtype {mask.dtype}"
    checks = []
    if mask.dtype == torch.bool:
        keep = mask
    else:  # softmax is shift-invariant per row: a key is masked when it sits >= 1e4 below the row's top
        top = mask.amax(dim=-1, keepdim=True)
        keep = (mask > top + _MASKED_BELOW) & (mask != float("-inf"))
        # the kept keys of a row share one value; +inf (NaN in SDPA's softmax) is a bias too
        checks.append(((mask == top) | ~keep).all() & ~torch.isposinf(top).any())
    if h > 1:
        checks.append((keep == keep[:, :1]).all())
    keep = keep[:, 0]
    if q > 1:
        valid_q, keys, same = _row_structure(keep)
        # valid_q & valid_k: every query that sees a key sees the same keys (the sample's first such row)
        checks.append((same | ~valid_q).all())
        checks.append((valid_q | ~keys.any(dim=1, keepdim=True)).all())  # and every query sees them
    found = torch.stack(checks).tolist() if checks else []
    if mask.is_floating_point() and not found.pop(0):
        return None, "an additive attn_mask whose kept keys differ within a row (a bias, not padding)"
    if h > 1 and not found.pop(0):
        return None, "an attn_mask that differs between heads"
    if q == 1:
        return MaskRows(keys=keep[:, 0]), None
    outer, all_queries = found
    if outer:
        return MaskRows(keys=keys, queries=None if all_queries else valid_q), None
    return MaskRows(rows=keep), None


def _row_structure(keep: torch.Tensor):
    """For a boolean ``keep`` (B', Sq, Sk): which queries see any key, the first such row of each
    sample (row 0 where none does), and which rows equal it. Two passes over the mask, read eight
    keys per int64 word where the layout allows (CPU reductions over bool are ~10x slower)."""
    try:
        words = keep.view(torch.int64)  # needs Sk % 8 == 0 and word-aligned strides
    except RuntimeError:
        words = keep
    valid_q = words.amax(dim=2) != 0 if words.dtype == torch.int64 else keep.view(torch.uint8).amax(dim=2) != 0
    first = valid_q.to(torch.uint8).argmax(dim=1)
    samples = torch.arange(keep.shape[0], device=keep.device)
    same = (words == words[samples, first][:, None, :]).all(dim=2)
    return valid_q, keep[samples, first], same


def key_padding(attn_mask: torch.Tensor, batch: int, heads: int, seq_q: int, seq_k: int):
    """``(keep (B, Sk) bool, why_not)``: ``attn_mask`` as a per-sample key-padding mask, or
    ``(None, reason)`` (see :func:`mask_rows`)."""
    found, why_not = mask_rows(attn_mask, batch, heads, seq_q, seq_k)
    if found is None:
        return None, why_not
    if found.keys is None or found.queries is not None:
        return None, "an attn_mask that differs between queries"
    return found.keys.expand(batch, seq_k), None


def _padded_attention(query, key, value, keep, scale, backend, with_lse=False):
    """Attention of every query over its sample's kept keys (``keep`` (B, Sk)), as one packed
    varlen call: padded keys are skipped, not computed and masked. A sample with no kept key gives
    out 0 (what SDPA gives) and lse -inf. ``with_lse``: also return the (B, S, H) log-sum-exp."""
    batch, seq_q, heads, dim = query.shape
    live, lengths = _live_samples(keep)
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    if not live:
        out = query.new_zeros(batch, seq_q, heads, value.shape[-1])
        return (out, query.new_full((batch, seq_q, heads), float("-inf"), dtype=lse_dtype)) if with_lse else out
    if len(live) < batch:  # samples without a kept key are left out of the call
        index = torch.tensor(live, device=query.device)
        query, key, value, keep = (t[index] for t in (query, key, value, keep))
    cu_q = torch.arange(0, (len(live) + 1) * seq_q, seq_q, dtype=torch.int32, device=query.device)
    cu_k = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=query.device)
    with values_checked():  # cu_seqlens built here from host ints
        packed, packed_lse = ops.varlen_attention(query.reshape(-1, heads, dim), key[keep], value[keep], cu_q, cu_k,
                                                  seq_q, max(lengths), softmax_scale=scale, return_lse=True,
                                                  backend=backend)  # fmt: skip
    out = packed.view(len(live), seq_q, heads, -1)
    lse = packed_lse.view(heads, len(live), seq_q).permute(1, 2, 0).to(lse_dtype)
    if len(live) < batch:
        full_out = out.new_zeros(batch, *out.shape[1:]).index_copy(0, index, out)
        full_lse = lse.new_full((batch, seq_q, heads), float("-inf")).index_copy(0, index, lse)
        out, lse = full_out, full_lse
    return (out, lse) if with_lse else out


# A mask whose rows differ is served when its packed keys (each group of equal rows gathers its own
# kept keys) stay within this many times the batch's keys: HunyuanVideo's masks need ~1x; a
# causal mask would need Sq / 2 times and is refused.
_ROW_GROUP_KEYS = 2


def _query_key_padded(query, key, value, valid_q, valid_k, scale, backend):
    """Attention where query i of a sample sees that sample's valid keys if it is itself valid,
    and nothing (output 0, as SDPA) otherwise: one varlen call over the valid queries and keys."""
    batch, seq_q, heads, dim = query.shape
    counts = torch.cat([valid_q.sum(dim=1), valid_k.sum(dim=1)]).tolist()  # the one host sync
    q_counts, k_counts = counts[:batch], counts[batch:]
    out = query.new_zeros(batch * seq_q, heads, value.shape[-1])
    live = [b for b in range(batch) if q_counts[b] and k_counts[b]]
    if not live:
        return out.view(batch, seq_q, heads, -1)
    q_rows = valid_q.reshape(-1).nonzero(as_tuple=True)[0]
    lengths_q, lengths_k = [q_counts[b] for b in live], [k_counts[b] for b in live]
    cu_q = torch.tensor([0, *itertools.accumulate(lengths_q)], dtype=torch.int32, device=query.device)
    cu_k = torch.tensor([0, *itertools.accumulate(lengths_k)], dtype=torch.int32, device=query.device)
    packed = ops.varlen_attention(query.reshape(batch * seq_q, heads, dim)[q_rows], key[valid_k], value[valid_k],
                                  cu_q, cu_k, max(lengths_q), max(lengths_k), softmax_scale=scale,
                                  backend=backend)  # fmt: skip
    return out.index_copy(0, q_rows, packed).view(batch, seq_q, heads, -1)


def _row_group_attention(query, key, value, keep, scale, backend):
    """Attention under a mask whose rows differ (``keep`` (B' in {1, B}, Sq, Sk)): queries with
    equal rows form one varlen sample over that row's kept keys; rows with no kept key give 0
    (what SDPA gives). Returns ``(out, None)`` or ``(None, reason)``."""
    batch, seq_q, heads, dim = query.shape
    seq_k = key.shape[1]
    rows = keep.expand(batch, seq_q, seq_k).reshape(batch * seq_q, seq_k)
    # equal rows hash equal; a collision of different rows is caught by the exact check below
    weights = torch.rand(seq_k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hashed = rows.to(torch.float64) @ weights.to(rows.device)
    sample = torch.arange(batch, device=rows.device).repeat_interleave(seq_q)
    groups, inverse = torch.unique(torch.stack([sample.to(torch.float64), hashed]), dim=1, return_inverse=True)
    count = groups.shape[1]
    index = torch.arange(batch * seq_q, device=rows.device)
    first = torch.full((count,), batch * seq_q, device=rows.device).scatter_reduce(0, inverse, index, "amin")
    group_rows = rows[first]
    q_counts, k_counts = torch.bincount(inverse, minlength=count), group_rows.sum(dim=1)
    exact, *sizes = torch.cat([(rows == group_rows[inverse]).all().reshape(1).long(), q_counts, k_counts]).tolist()
    q_sizes, k_sizes = sizes[:count], sizes[count:]
    if not exact:
        return None, "an attn_mask whose rows could not be grouped exactly"
    if sum(k_sizes) > _ROW_GROUP_KEYS * batch * seq_k:
        return None, f"an attn_mask with {count} distinct query rows (not padding: e.g. causal or block-sparse)"
    live = [g for g in range(count) if k_sizes[g]]
    out = query.new_zeros(batch * seq_q, heads, value.shape[-1])
    if not live:
        return out.view(batch, seq_q, heads, -1), None
    has_keys = torch.tensor([k > 0 for k in k_sizes], device=rows.device)
    order = torch.argsort(inverse, stable=True)  # queries grouped, groups in order
    q_rows = order[has_keys[inverse[order]]]
    group, column = group_rows.nonzero(as_tuple=True)  # kept keys, group by group
    k_rows = groups[0].long()[group] * seq_k + column
    flat_k, flat_v = key.reshape(batch * seq_k, *key.shape[2:]), value.reshape(batch * seq_k, *value.shape[2:])
    live_q, live_k = [q_sizes[g] for g in live], [k_sizes[g] for g in live]
    cu_q = torch.tensor([0, *itertools.accumulate(live_q)], dtype=torch.int32, device=rows.device)
    cu_k = torch.tensor([0, *itertools.accumulate(live_k)], dtype=torch.int32, device=rows.device)
    packed_q = query.reshape(batch * seq_q, heads, dim)[q_rows]
    packed = ops.varlen_attention(packed_q, flat_k[k_rows], flat_v[k_rows], cu_q, cu_k, max(live_q), max(live_k),
                                  softmax_scale=scale, backend=backend)  # fmt: skip
    return out.index_copy(0, q_rows, packed).view(batch, seq_q, heads, -1), None


def _parallel_sdpa_mode():
    """The active torch function mode that parallelizes torch SDPA calls (para-attn's Ulysses /
    Ring / Unified modes), or None. Such a mode sees only ``F.scaled_dot_product_attention`` calls:
    one that fastdit served itself would attend over this rank's shard alone. Not looked up while
    torch.compile traces (a graph break per attention call otherwise)."""
    if torch.compiler.is_compiling():
        return None
    for mode in torch.overrides._get_current_function_mode_stack():
        if type(mode).__module__.split(".")[0] == "para_attn":
            return mode
    return None


def _sdpa(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    extra = {"enable_gqa": True} if enable_gqa else {}  # para-attn's handlers take no enable_gqa
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         attn_mask=attn_mask, is_causal=is_causal, scale=scale, **extra)  # fmt: skip
    return out.transpose(1, 2)


def fastdit_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                      backend: str | None = None):  # fmt: skip
    """diffusers' backend contract, with torch SDPA's semantics: q (B, S, H, D), k / v
    (B, S_kv, H_kv, D) -> (B, S, H, D); ``backend``: the fastdit backend :func:`patch` chose for
    the attention ops (None: the dispatcher).

    Key-padding masks run on the packed varlen kernel (padded keys skipped), as do masks whose
    query rows fall into a few groups (HunyuanVideo's ``valid_q & valid_k``); causal masks are
    aligned top-left when S != S_kv, as SDPA's; grouped-query heads need ``enable_gqa=True``, as in
    SDPA; dropout is refused. Any other mask is reported (once per call site and reason, counted in
    ``fastdit.ops.dispatch.fallbacks()``) and run by torch SDPA, or refused under FASTDIT_STRICT=1.
    Under para-attn's context-parallel modes (which see torch SDPA calls only) the call is handed to
    para-attn through torch SDPA: right, not silently local to this rank's shard; reported unless
    the mode was built with ``attn_func=sdpa_on_fastdit`` (then fastdit runs it after para-attn's
    all-to-all)."""
    if dropout_p:
        raise ValueError(f"fastdit attention: dropout_p={dropout_p} is not served (inference kernels); pass 0")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"fastdit attention: q, k, v must be (B, S, H, D), got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")  # fmt: skip
    batch, seq_q, heads, _ = query.shape
    seq_k, heads_k = key.shape[1], key.shape[2]
    if heads_k != heads and not enable_gqa:
        raise ValueError(f"fastdit attention: {heads} query heads and {heads_k} key heads need enable_gqa=True "
                         "(as torch SDPA)")  # fmt: skip
    if attn_mask is not None and is_causal:
        raise ValueError("fastdit attention: attn_mask and is_causal together (torch SDPA refuses them too)")
    parallel = _parallel_sdpa_mode()
    if parallel is not None:  # the call goes through para-attn's all-to-all / ring
        if getattr(parallel, "_attn_func", None) is not sdpa_on_fastdit:  # para-attn then runs torch SDPA
            dispatch.report_fallback("attention", _call_site(), f"para-attn's {type(parallel).__name__} is active "
                                     "and parallelizes torch SDPA calls only (give it attn_func=sdpa_on_fastdit)",
                                     "para-attn")  # fmt: skip
        return _sdpa(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    if attn_mask is not None:
        # on every device, CPUs too: skipping the padded keys beats computing and masking them
        found, why_not = mask_rows(attn_mask, batch, heads, seq_q, seq_k)
        if found is not None and found.rows is None:
            keys = found.keys.expand(batch, seq_k)
            if found.queries is None:
                return _padded_attention(query, key, value, keys, scale, backend)
            queries = found.queries.expand(batch, seq_q)
            return _query_key_padded(query, key, value, queries, keys, scale, backend)
        if found is not None:
            out, why_not = _row_group_attention(query, key, value, found.rows, scale, backend)
            if out is not None:
                return out
        dispatch.report_fallback("attention", _call_site(), why_not, "torch SDPA")
        return _sdpa(query, key, value, attn_mask, False, scale, enable_gqa)
    if _runs_native("attention", query, backend):  # SDPA is the torch backend's own kernel
        return _sdpa(query, key, value, None, is_causal, scale, enable_gqa)
    if is_causal and seq_q != seq_k:
        # SDPA aligns causal masks top-left (query i sees keys 0..i); fastdit's kernels bottom-right.
        if seq_q < seq_k:  # keys past the last query are seen by no one
            return ops.attention(query, key[:, :seq_q], value[:, :seq_q], softmax_scale=scale, causal=True,
                                 backend=backend)  # fmt: skip
        head = ops.attention(query[:, :seq_k], key, value, softmax_scale=scale, causal=True, backend=backend)
        tail = ops.attention(query[:, seq_k:], key, value, softmax_scale=scale, causal=False, backend=backend)
        return torch.cat([head, tail], dim=1)  # queries past the last key see every key
    return ops.attention(query, key, value, softmax_scale=scale, causal=is_causal, backend=backend)


def attention_backend_name(backend: str | None = None) -> str:
    """The diffusers attention backend that runs ``ops.attention`` on fastdit ``backend``:
    ``"fastdit"`` (the dispatcher's choice) or ``"fastdit_<backend>"``."""
    return BACKEND_NAME if backend is None else f"{BACKEND_NAME}_{backend}"


def _backend_of_name(name: str) -> str | None:
    """The fastdit backend a diffusers backend name asks for (inverse of attention_backend_name)."""
    if name == BACKEND_NAME:
        return None
    suffix = name[len(BACKEND_NAME) + 1 :] if name.startswith(BACKEND_NAME + "_") else None
    if suffix not in dispatch.BACKEND_NAMES:
        choices = [BACKEND_NAME] + [attention_backend_name(b) for b in sorted(dispatch.BACKEND_NAMES)]
        raise ValueError(f"unknown fastdit attention backend {name!r}; choose from {choices}")
    return suffix


def enable(backend: str | None = None) -> str:
    """Make ``"fastdit"`` a diffusers attention backend; returns its name. Then, with diffusers' own
    API: ``pipe.transformer.set_attention_backend("fastdit")`` or ``with attention_backend("fastdit"):``.
    ``backend`` forces one fastdit backend for those calls (the name is then ``"fastdit_<backend>"``);
    an unknown one is refused here, not at the first forward."""
    return register_attention_backend(backend).value


def enable_from_environment() -> str | None:
    """Serve ``DIFFUSERS_ATTN_BACKEND=fastdit`` (or ``fastdit_<backend>``): register that backend
    and make it diffusers' process default; returns its name, or None when the variable names
    another backend. A fastdit name with an unknown suffix is refused (ValueError). ``import
    fastdit`` calls this when the variable names fastdit."""
    name = _registry.requested_backend()
    if name is None:
        return None
    member = register_attention_backend(_backend_of_name(name))
    _registry.set_default(member)
    return member.value


def register_attention_backend(backend: str | None = None):
    """Add ``"fastdit"`` (or, for a forced fastdit ``backend``, ``"fastdit_<backend>"``) to
    diffusers' attention backends, with context-parallel support (idempotent); returns the enum
    member."""
    if backend is not None and backend not in dispatch.BACKEND_NAMES:
        raise ValueError(f"unknown fastdit backend {backend!r}; choose from {sorted(dispatch.BACKEND_NAMES)} or None")
    member = _registry.member(attention_backend_name(backend))
    if not _registry.is_registered(member):

        def run(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                return_lse=False, _parallel_config=None):  # fmt: skip
            if _parallel_config is not None and getattr(_parallel_config, "context_parallel_config", None) is not None:
                return _context_parallel(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                         return_lse, _parallel_config, backend)  # fmt: skip
            if return_lse:
                return attention_with_lse(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                          backend)  # fmt: skip
            return fastdit_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend)

        _registry.register(member, run, context_parallel=True)
    return member


# ---- the log-sum-exp, and diffusers' context parallelism (Ulysses / Ring) ----------------------------


def attention_with_lse(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False, backend=None):  # fmt: skip
    """``(out (B, S, H, D), lse (B, S, H) float32)``: what diffusers' backends return with
    ``return_lse=True``. A key-padding mask runs on the varlen kernel (a sample with no kept key:
    out 0, lse -inf); other masks, dropout and causal with S != S_kv are refused by name (no torch
    path returns the log-sum-exp for them to fall back on)."""
    keep = _check_lse_call(query, key, attn_mask, dropout_p, is_causal, enable_gqa, "return_lse=True")
    if keep is not None:
        return _padded_attention(query, key, value, keep, scale, backend, with_lse=True)
    out, lse = ops.attention(query, key, value, softmax_scale=scale, causal=is_causal, return_lse=True,
                             backend=backend)  # fmt: skip
    return out, lse.transpose(1, 2)


def _check_lse_call(query, key, attn_mask, dropout_p, is_causal, enable_gqa, what: str, sharded_heads=False):
    """The checks of a call that must return the log-sum-exp; returns the key-padding ``keep``
    (B, S_kv) of ``attn_mask``, or None without a mask. ``sharded_heads``: the call holds a slice
    of the model's heads (Ulysses)."""
    if dropout_p:
        raise ValueError(f"fastdit attention: dropout_p={dropout_p} is not served (inference kernels); pass 0")
    if is_causal and query.shape[1] != key.shape[1]:
        raise dispatch.BackendNotSupportedError(
            f"fastdit attention with {what}: causal attention with S != S_kv (top-left aligned) is not served"
        )
    if key.shape[2] != query.shape[2] and not enable_gqa:
        raise ValueError(f"fastdit attention: {query.shape[2]} query heads and {key.shape[2]} key heads need "
                         "enable_gqa=True (as torch SDPA)")  # fmt: skip
    if attn_mask is None:
        return None
    if is_causal:
        raise ValueError("fastdit attention: attn_mask and is_causal together (torch SDPA refuses them too)")
    batch, seq_q, heads = query.shape[:3]
    if sharded_heads and attn_mask.dim() == 4 and attn_mask.shape[1] not in (1, heads):
        # Ulysses gave this rank a slice of the heads, not of a per-head mask (LTX's [B, H, 1, Sk]):
        # one that is the same for every head serves them all
        if not bool((attn_mask == attn_mask[:, :1]).all()):
            raise dispatch.BackendNotSupportedError(
                f"fastdit attention with {what}: an attn_mask that differs between heads is not served"
            )  # fmt: skip
        attn_mask = attn_mask[:, :1]
    keep, why_not = key_padding(attn_mask, batch, heads, seq_q, key.shape[1])
    if keep is None:
        raise dispatch.BackendNotSupportedError(
            f"fastdit attention with {what}: {why_not} is not served (only key-padding masks return a "
            "log-sum-exp); run this model on diffusers' native backend"
        )  # fmt: skip
    return keep


def _live_samples(keep):
    counts = keep.sum(dim=1).tolist()  # the one host sync
    live = [i for i, n in enumerate(counts) if n]
    return live, [counts[i] for i in live]


def _cp_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None, *,
                   backend=None):  # fmt: skip
    """diffusers' forward-op contract for its templated Ulysses / Ring: one block of keys, the
    (B, S, H) log-sum-exp a ring step merges with; a key-padding mask (Ulysses) on the varlen
    kernel."""
    keep = _check_lse_call(query, key, attn_mask, dropout_p, is_causal, enable_gqa, "context parallelism",
                           sharded_heads=True)  # fmt: skip
    if keep is None:
        out, lse = ops.attention(query, key, value, softmax_scale=scale, causal=is_causal, return_lse=True,
                                 backend=backend)  # fmt: skip
        lse = lse.transpose(1, 2)
    else:
        out, lse = _padded_attention(query, key, value, keep, scale, backend, with_lse=True)
    if _save_ctx:
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.fastdit_scale, ctx.fastdit_causal, ctx.fastdit_backend = scale, is_causal, backend
        ctx.fastdit_keep = keep
    return (out, lse) if return_lse else out


def _cp_backward_op(ctx, grad_out, *args, query=None, key=None, value=None, out=None, lse=None, **kwargs):
    """diffusers' backward-op contract: ``(dq, dk, dv)`` of one key block; a ring passes the
    rotated block and the merged (global) ``out`` / ``lse``, so each block's share is exact."""
    saved = ctx.saved_tensors
    query, key, value, out, lse = (s if t is None else t for s, t in zip(saved, (query, key, value, out, lse)))
    batch, seq_q, heads, dim = query.shape
    seq_k = key.shape[1]
    keep = getattr(ctx, "fastdit_keep", None)
    if keep is None:
        index, kept, lengths = None, None, [seq_k] * batch
    else:
        live, lengths = _live_samples(keep)
        index = torch.tensor(live, device=query.device)
        kept = keep[index]
    dq, dk, dv = (torch.zeros_like(t) for t in (query, key, value))
    if not lengths:
        return dq, dk, dv

    def rows(t):  # the live samples, packed
        return (t if index is None else t[index]).reshape(-1, *t.shape[2:])

    keys, values = (rows(t) if kept is None else t[index][kept] for t in (key, value))
    count = len(lengths)
    lse_rows = (lse if index is None else lse[index]).reshape(count, seq_q, heads).permute(2, 0, 1)
    cu_q = torch.arange(0, (count + 1) * seq_q, seq_q, dtype=torch.int32, device=query.device)
    cu_k = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=query.device)
    with values_checked():  # cu_seqlens built here from host ints
        dq_rows, dk_rows, dv_rows = ops.varlen_attention_backward(
            rows(grad_out.to(query.dtype)), rows(query), keys, values, rows(out.to(query.dtype)),
            lse_rows.reshape(heads, -1).float().contiguous(), cu_q, cu_k, seq_q, max(lengths),
            softmax_scale=ctx.fastdit_scale, causal=ctx.fastdit_causal, backend=ctx.fastdit_backend,
        )  # fmt: skip
    if index is None:
        return dq_rows.view(query.shape), dk_rows.view(key.shape), dv_rows.view(value.shape)
    dq[index] = dq_rows.view(count, seq_q, heads, dim)
    for full, packed in ((dk, dk_rows), (dv, dv_rows)):
        block = full.new_zeros(count, *full.shape[1:])
        block[kept] = packed
        full[index] = block
    return dq, dk, dv


def _context_parallel(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                      parallel_config, backend):  # fmt: skip
    if attn_mask is not None and parallel_config.context_parallel_config.ring_degree > 1:
        raise dispatch.BackendNotSupportedError(
            "fastdit attention with Ring context parallelism: an attn_mask is not served (diffusers' Ring passes "
            "each key block the whole mask); use Ulysses, or run this model on diffusers' native backend"
        )  # fmt: skip
    return _registry.context_parallel_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
        functools.partial(_cp_forward_op, backend=backend), _cp_backward_op, parallel_config,
    )  # fmt: skip


def _attention_modules(model):
    """diffusers' attention modules: the mixin's, the legacy ``Attention``, and any other module
    that runs a ``processor`` (``MochiAttention``)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    kinds = (AttentionModuleMixin, Attention)
    return [m for m in model.modules() if isinstance(m, kinds) or callable(getattr(m, "processor", None))]


# ---- processors and modules that call torch SDPA themselves -------------------------------------
# Many diffusers processors (AttnProcessor2_0: HunyuanVideo's token refiner, Latte; CogVideoX's and
# ConsisID's; Mochi's and MochiAttentionPool; Allegro's; EasyAnimate's; JointAttnProcessor2_0: SD3)
# call F.scaled_dot_product_attention directly, never diffusers' dispatcher, so a backend cannot
# reach them. fastdit runs such a module's forward inside a torch function mode that serves its
# SDPA calls with fastdit_attention (torch SDPA's contract, so the module's code is unchanged).


def sdpa_on_fastdit(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False, backend: str | None = None):  # fmt: skip
    """``torch.nn.functional.scaled_dot_product_attention``'s contract ((N, H, L, E) or (N, L, E)
    q / k / v; a mask broadcast from the right against (N, H, L, S)) served by
    :func:`fastdit_attention`. Other layouts are reported and run by torch SDPA (refused under
    FASTDIT_STRICT=1)."""
    dims = {query.dim(), key.dim(), value.dim()}
    if dims not in ({4}, {3}) or (attn_mask is not None and attn_mask.dim() > 4):
        dispatch.report_fallback("attention", _call_site(), f"a torch SDPA call on {sorted(dims)}-D tensors",
                                 "torch SDPA")  # fmt: skip
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)  # fmt: skip
    three_d = dims == {3}
    if three_d:  # (N, L, E): one head
        query, key, value = (t.unsqueeze(1) for t in (query, key, value))
    if attn_mask is not None:
        if three_d and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)  # (N, L, S) against (N, 1, L, S)
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    out = fastdit_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask, dropout_p,
                            is_causal, scale, enable_gqa, backend).transpose(1, 2)  # fmt: skip
    return out.squeeze(1) if three_d else out


class SDPAOnFastdit(torch.overrides.TorchFunctionMode):
    """Inside this mode, ``F.scaled_dot_product_attention`` calls run on :func:`sdpa_on_fastdit`
    (fastdit ``backend``; None: the dispatcher's choice); every other torch call is untouched."""

    def __init__(self, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return sdpa_on_fastdit(*args, **kwargs, backend=self.backend)
        return func(*args, **kwargs)


@cache
def _code_calls_attention(function) -> bool:
    """Whether ``function``'s source calls torch SDPA or diffusers' dispatcher (True when its
    source cannot be read: the routing is then installed, harmless where no attention runs)."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return True
    return "scaled_dot_product_attention" in source or "dispatch_attention_fn" in source


def _route_forward(module, backend: str | None, member):
    """``module.forward`` with its attention calls on fastdit: torch SDPA calls through
    :class:`SDPAOnFastdit`, and diffusers dispatcher calls that name no backend (processors without
    ``_attention_backend``, as Cosmos') through the fastdit backend made the default for the call;
    ``patch(backend=...)`` reaches the ops as a ``model_backend`` block around the call."""
    inner = module.forward  # the class's, or an instance attribute another hook set (accelerate)

    def forward(*args, **kwargs):
        with model_backend(backend, PATCH_OWNER), SDPAOnFastdit(), _registry.default(member):
            return inner(*args, **kwargs)

    return forward


# Processors that need one diffusers backend for what they pass it, and why: left as they are.
_NEEDS_THEIR_BACKEND = {
    "AnyFlowCausalAttnProcessor": "its causal chunk mask is a flex-attention BlockMask that only diffusers' flex "
    "backend takes",
    "Kandinsky6SRAttnProcessor": "its NABLA sparsity is a flex-attention BlockMask that only diffusers' flex backend "
    "takes",
}


# Packages whose processors split attention across ranks themselves (xDiT): fastdit leaves them,
# since serving their calls locally would attend over one rank's shard.
_PARALLEL_PACKAGES = ("xfuser",)


def _patch_attention(model, prefix: str, backend: str | None) -> tuple[list[_Change], list[str]]:
    """Point every dispatching processor at the fastdit backend and route the SDPA calls of the
    modules that bypass the dispatcher; returns (changes, what was left and why)."""
    member = register_attention_backend(backends_for(backend, ("attention",))["attention"])
    attention_modules = _attention_modules(model)
    dispatching, routed, left, needs, parallel = [], {}, {}, {}, {}
    for module in attention_modules:
        processor = getattr(module, "processor", None)
        kind = type(processor).__name__
        if type(processor).__module__.split(".")[0] in _PARALLEL_PACKAGES:
            parallel[kind] = parallel.get(kind, 0) + 1
        elif kind in _NEEDS_THEIR_BACKEND:
            needs[kind] = needs.get(kind, 0) + 1
        elif processor is not None and hasattr(processor, "_attention_backend"):
            dispatching.append(_set_attr(processor, "_attention_backend", member, ""))
        elif processor is not None and _code_calls_attention(type(processor).__call__):
            routed.setdefault(kind, []).append(module)
        else:
            left[kind] = left.get(kind, 0) + 1
    seen = set(map(id, attention_modules))
    for module in model.modules():  # modules outside the processors that call SDPA (MochiAttentionPool)
        if id(module) not in seen and module is not model and _code_calls_attention(type(module).forward):
            routed.setdefault(type(module).__name__, []).append(module)
    changes = list(dispatching)
    if dispatching:
        changes[0].description = (f"{prefix}: {len(dispatching)} attention processors -> diffusers backend "
                                  f"'{member.value}'")  # fmt: skip
    for kind, modules in routed.items():
        group = [_set_attr(m, "forward", _route_forward(m, backend, member), "") for m in modules]
        group[0].description = (f"{prefix}: {len(modules)} {kind} (calls torch SDPA or the dispatcher's default "
                                "itself) -> fastdit attention")  # fmt: skip
        changes += group
    notes = [f"{prefix}: left {n} {kind}: it computes attention without torch SDPA or diffusers' dispatcher"
             for kind, n in left.items()]  # fmt: skip
    notes += [f"{prefix}: left {n} {kind}: {_NEEDS_THEIR_BACKEND[kind]}" for kind, n in needs.items()]
    notes += [f"{prefix}: left {n} {kind}: xDiT's processor runs its own sequence-parallel attention (served there, "
              "not by fastdit)" for kind, n in parallel.items()]  # fmt: skip
    return changes, notes


# ---- rope: the 3D RoPE (and q / k RMSNorm) fused --------------------------------------------------


class WanRopeGrid:
    """What the patched ``rope`` module returns: the post-patch grid, for ops.rope3d_qk."""

    def __init__(self, grid_thw: torch.Tensor, theta: float, axes_dim: tuple[int, int, int]):
        self.grid_thw, self.theta, self.axes_dim = grid_thw, theta, axes_dim


def _rope_forward(rope_module, theta: float, backend: str | None):
    axes = (rope_module.t_dim, rope_module.h_dim, rope_module.w_dim)

    def forward(hidden_states):
        with model_backend(backend, PATCH_OWNER):
            native = _runs_native("rope3d_qk_norm", hidden_states)
        if native:  # diffusers' cos / sin tables
            return type(rope_module).forward(rope_module, hidden_states)
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = rope_module.patch_size
        sizes = [frames // p_t, height // p_h, width // p_w]
        if min(sizes) < 1:  # checked here, on host ints, so the rope ops can skip their value checks
            raise ValueError(f"latents {tuple(hidden_states.shape)} are smaller than the patch size {(p_t, p_h, p_w)}")
        grid = torch.tensor([sizes] * batch, dtype=torch.int32)
        return WanRopeGrid(grid.to(hidden_states.device), theta, axes)

    return forward


class FastditWanAttnProcessor:
    """Wan's self-attention processor with the q / k RMSNorm and 3D RoPE in one fastdit op.

    Same projections, attention dispatch (``_attention_backend``) and output as diffusers'
    ``WanAttnProcessor``; only the normalisation and rotation of q and k differ in how they run.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, original, backend: str | None = None):
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)
        self.backend = backend  # patch(backend=...): the model_backend its ops run in
        # diffusers' processor, for calls whose rope module returned its own cos / sin tables (no
        # fastdit kernel on that device); a copy, so unpatch restores the original untouched.
        self.diffusers_processor = copy.copy(original)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if encoder_hidden_states is None and isinstance(rotary_emb, tuple):  # the rope module ran diffusers' code
            native = self.diffusers_processor
            native._attention_backend, native._parallel_config = self._attention_backend, self._parallel_config
            return native(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if encoder_hidden_states is not None or not isinstance(rotary_emb, WanRopeGrid):
            raise TypeError("FastditWanAttnProcessor serves Wan's self-attention with a fastdit-patched rope module")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        rope = dict(theta=rotary_emb.theta, axes_dim=rotary_emb.axes_dim)
        # The grid was built (and checked) from the latent shape by the patched rope module: the
        # op's value checks would only add a host sync per layer.
        with values_checked(), model_backend(self.backend, PATCH_OWNER):
            # The fused op reads the norms' weights itself; under accelerate's per-module hooks
            # (sequential offload) those exist only inside the norm modules' own calls.
            norms = (attn.norm_q, attn.norm_k)
            if all(isinstance(n, torch.nn.RMSNorm) and not hasattr(n, "_hf_hook") for n in norms):
                eps = attn.norm_q.eps if attn.norm_q.eps is not None else torch.finfo(query.dtype).eps
                query, key = ops.rope3d_qk(
                    query, key, rotary_emb.grid_thw, q_norm_weight=attn.norm_q.weight,
                    k_norm_weight=attn.norm_k.weight, norm_eps=eps, **rope,
                )  # fmt: skip
            else:
                query = attn.norm_q(query.flatten(2)).unflatten(2, (attn.heads, -1))
                key = attn.norm_k(key.flatten(2)).unflatten(2, (attn.heads, -1))
                query, key = ops.rope3d_qk(query, key, rotary_emb.grid_thw, **rope)
        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )  # fmt: skip
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _patch_rope(model, prefix: str, backend: str | None) -> list[_Change]:
    rope_module = getattr(model, "rope", None)
    if rope_module is None or not all(hasattr(rope_module, a) for a in ("t_dim", "h_dim", "w_dim", "patch_size")):
        raise ValueError(f"{prefix}: no Wan rotary embedding module (.rope) to patch; pass rope=False")
    theta = 10000.0  # WanRotaryPosEmbed's default; diffusers' Wan transformer never passes another
    forward = _rope_forward(rope_module, theta, backend)
    changes = [_set_attr(rope_module, "forward", forward, f"{prefix}.rope -> grid only")]
    count = 0
    for block in getattr(model, "blocks", []):
        attn = getattr(block, "attn1", None)
        if attn is None:
            continue
        changes.append(_set_attr(attn, "processor", FastditWanAttnProcessor(attn.processor, backend), ""))
        count += 1
    changes[-1].description = f"{prefix}: {count} self-attention processors -> fused q/k RMSNorm + 3D RoPE"
    return changes


# ---- adaln: the block's modulation and residuals ---------------------------------------------------


class _DiffusersLayers:
    """The Wan block's primitives (:class:`fastdit.models.wan.block.WanBlockLayers`) over a
    diffusers ``WanTransformerBlock``: its own attention modules, norms and FFN, fastdit's
    modulation and residual ops on dense ``(B, S, C)`` tensors."""

    def __init__(self, block, encoder_hidden_states, rotary_emb):
        self.block, self.text, self.rotary_emb = block, encoder_hidden_states, rotary_emb

    def modulate(self, x, shift, scale):
        return ops.adaln_modulate(x, shift, scale, norm="layer", eps=self.block.norm1.eps)

    def self_attention(self, h):
        return self.block.attn1(h, None, None, self.rotary_emb)

    def gated_residual(self, x, y, gate):
        return ops.gated_residual(x, y, gate)

    def cross_norm(self, x):
        return self.block.norm2(x.float()).type_as(x)

    def cross_attention(self, h):
        return self.block.attn2(h, self.text, None, None)

    def residual_modulate(self, x, y, shift, scale):
        # x + attn2 (a gate of ones) and the FFN's modulation of the sum, in one pass.
        return ops.gated_residual_modulate(x, y, torch.ones_like(shift), shift, scale, norm="layer",
                                           eps=self.block.norm3.eps)  # fmt: skip

    def ffn(self, h):
        return self.block.ffn(h)


def _block_forward(backend: str | None):
    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        with model_backend(backend, PATCH_OWNER):
            if _runs_native("adaln_modulate", hidden_states):
                return type(self).forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb)
            # Dense inputs whose sample boundaries the ops derive themselves: their value checks (a
            # host sync each, five per block) have nothing to find.
            with values_checked():
                layers = _DiffusersLayers(self, encoder_hidden_states, rotary_emb)
                return wan_block(layers, hidden_states, block_modulation(self.scale_shift_table, temb))

    return forward


def _patch_blocks(model, prefix: str, backend: str | None) -> list[_Change]:
    blocks = [b for b in getattr(model, "blocks", []) if hasattr(b, "scale_shift_table") and hasattr(b, "norm3")]
    if not blocks:
        raise ValueError(f"{prefix}: no Wan transformer blocks to patch; pass adaln=False")
    forward = _block_forward(backend)
    changes = [_set_attr(b, "forward", types.MethodType(forward, b), "") for b in blocks]
    changes[-1].description = f"{prefix}: {len(blocks)} blocks -> fused adaLN modulation and gated residuals"
    return changes


# ---- vae -------------------------------------------------------------------------------------------


class _SharedVAE:
    """fastdit's CausalVAE over a diffusers ``AutoencoderKLWan``'s own parameters.

    Held outside the module tree (a plain attribute, not a submodule), so the patched module's
    ``state_dict``, ``named_parameters``, ``save_pretrained`` and ``.to`` see only diffusers'
    tensors, once. Before each call it re-binds to the module's current parameter objects
    (``.to()`` under ``torch.__future__``'s overwrite flag, ``load_state_dict(assign=True)`` and
    accelerate replace them). Under accelerate's per-submodule hooks (sequential CPU offload,
    device maps) the weights exist only inside diffusers' module calls: diffusers' own
    ``_encode`` / ``_decode`` run then, said once in the log.
    """

    def __init__(self, vae, backend: str | None):
        from fastdit.models.wan.vae import CausalVAE

        self.vae = vae
        self.fast = CausalVAE.from_diffusers(vae, share_weights=True).set_backend(backend)
        self.bound = dict(vae.named_parameters())

    def current(self):
        """The CausalVAE bound to the module's parameters now, or None where diffusers must run."""
        if any(hasattr(m, "_hf_hook") for m in self.vae.modules() if m is not self.vae):
            _log_once("AutoencoderKLWan has accelerate hooks on its submodules (sequential offload / device map): "
                      "its encode / decode run diffusers' own code")  # fmt: skip
            return None
        params = dict(self.vae.named_parameters())
        if params.keys() != self.bound.keys() or any(p is not self.bound[n] for n, p in params.items()):
            self.fast.load_state_dict(self.vae.state_dict(keep_vars=True), strict=False, assign=True)
            self.bound = params
        if any(p.device.type == "meta" for p in params.values()):
            return None
        return self.fast


@cache
def _log_once(message: str) -> None:
    logger.warning("fastdit.patch: %s", message)


def _patch_vae(vae, prefix: str, backend: str | None) -> list[_Change]:
    from diffusers.models.autoencoders.vae import DecoderOutput

    from fastdit.models.wan.vae import SpatialTiling

    shared = _SharedVAE(vae, backend)
    original_encode, original_decode = vae._encode, vae._decode

    def tiling():
        if not vae.use_tiling:
            return None
        return SpatialTiling(vae.tile_sample_min_height, vae.tile_sample_min_width, vae.tile_sample_stride_height,
                             vae.tile_sample_stride_width)  # fmt: skip

    def _encode(x):
        fast = shared.current()
        return original_encode(x) if fast is None else fast.encode(x, tiling=tiling(), moments=True)

    def _decode(z, return_dict=True):
        fast = shared.current()
        if fast is None:
            return original_decode(z, return_dict=return_dict)
        out = fast.decode(z, tiling=tiling())
        return DecoderOutput(sample=out) if return_dict else (out,)

    return [
        _set_plain_attr(vae, "_fastdit_vae", shared),
        _set_attr(vae, "_encode", _encode, ""),
        _set_attr(vae, "_decode", _decode, f"{prefix}: encode / decode -> fastdit CausalVAE (shared weights)"),
    ]


def _set_plain_attr(module, name: str, value) -> _Change:
    """An instance attribute that nn.Module does not register (no submodule, no state_dict entry)."""
    object.__setattr__(module, name, value)
    return _Change("", lambda: object.__delattr__(module, name))


# ---- public -----------------------------------------------------------------------------------------


def _components(target):
    """(transformers, vaes, notes) of a pipeline, a transformer or a VAE: each part with its name,
    and a line for each part fastdit leaves (and why)."""
    from diffusers import AutoencoderKLWan
    from diffusers.models.modeling_utils import ModelMixin

    if isinstance(target, AutoencoderKLWan):
        return [], [("vae", target)], []
    if isinstance(target, ModelMixin):
        return [("transformer", target)], [], []
    transformers = [(name, getattr(target, name, None)) for name in ("transformer", "transformer_2")]
    transformers = [(n, t) for n, t in transformers if isinstance(t, ModelMixin)]
    vae = getattr(target, "vae", None)
    if not transformers and not isinstance(vae, AutoencoderKLWan):
        raise TypeError(
            "fastdit.patch takes a diffusers pipeline (with a .transformer, .transformer_2 or Wan .vae), a "
            f"diffusers model (a transformer, AutoencoderKLWan); got {type(target).__name__}"
        )
    if isinstance(vae, AutoencoderKLWan):
        return transformers, [("vae", vae)], []
    notes = [] if vae is None else [f"vae: left {type(vae).__name__}: fastdit's CausalVAE serves AutoencoderKLWan"]
    return transformers, [], notes


def patch(target, attention: bool = True, rope: bool = True, adaln: bool = True, vae: bool = True,
          backend: str | None = None) -> list[str]:  # fmt: skip
    """Run ``target`` (a diffusers pipeline, transformer or VAE) on fastdit's ops, in place.

    Args:
        target: a diffusers pipeline (its ``transformer``, ``transformer_2`` and a Wan ``vae``), a
            diffusers transformer (any ``ModelMixin``) or ``AutoencoderKLWan``.
        attention: every attention call of each transformer runs on fastdit: processors that use
            diffusers' dispatcher get the ``"fastdit"`` backend, modules that call torch SDPA
            themselves get their SDPA calls served by fastdit (:class:`SDPAOnFastdit`).
        rope, adaln: the fused q / k RMSNorm + 3D RoPE and adaLN ops (``WanTransformer3DModel``
            only; other transformers are left, said in the returned lines).
        vae: ``AutoencoderKLWan`` on fastdit's CausalVAE (other VAEs are left, said).
        backend: run every op that has this fastdit backend (``"triton"``, ``"cuda"``,
            ``"reference"``, ...) on it, attention included, and the others on the dispatcher's
            choice (as ``DiT(backend=...)`` does); default: the dispatcher picks per op.

    Returns:
        One line per change made, then one per part left as it was (``"<part>: left ..."``, with
        the reason). :func:`unpatch` restores the original exactly.
    """
    from diffusers import WanTransformer3DModel

    if getattr(target, _PATCHES_ATTR, None):
        raise RuntimeError("this object is already patched by fastdit; call fastdit.unpatch(...) first")
    _warn_if_untested_diffusers()
    backends_for(backend, PATCH_OPS)  # checks the name before anything changes
    transformers, vaes, notes = _components(target)
    changes: list[_Change] = []
    try:
        for name, model in transformers:
            wan = type(model) is WanTransformer3DModel
            if rope and wan:
                changes += _patch_rope(model, name, backend)
            if attention:
                made, left = _patch_attention(model, name, backend)
                changes += made
                notes += left
            if adaln and wan:
                changes += _patch_blocks(model, name, backend)
            if (rope or adaln) and not wan:
                notes.append(f"{name}: left {type(model).__name__}'s RoPE and adaLN: fastdit's fused ones serve "
                             "WanTransformer3DModel's blocks (diffusers' code runs them)")  # fmt: skip
        if vae:
            for name, module in vaes:
                changes += _patch_vae(module, name, backend)
    except Exception:
        for change in reversed(changes):
            change.undo()
        raise
    if not changes:
        why = "; ".join(notes) if notes else "every part is off or absent"
        raise ValueError(f"fastdit.patch changed nothing on {type(target).__name__}: {why}")
    setattr(target, _PATCHES_ATTR, changes)
    return [c.description for c in changes if c.description] + notes


def unpatch(target) -> None:
    """Undo :func:`patch` on ``target``: every attribute it set is restored or removed."""
    changes = getattr(target, _PATCHES_ATTR, None)
    if not changes:
        raise ValueError(f"{type(target).__name__} is not patched by fastdit")
    for change in reversed(changes):
        change.undo()
    delattr(target, _PATCHES_ATTR)


def is_patched(target) -> bool:
    return bool(getattr(target, _PATCHES_ATTR, None))


__all__ = [
    "BACKEND_NAME",
    "SDPAOnFastdit",
    "attention_backend_name",
    "attention_with_lse",
    "enable",
    "enable_from_environment",
    "fastdit_attention",
    "is_patched",
    "patch",
    "register_attention_backend",
    "sdpa_on_fastdit",
    "unpatch",
]
