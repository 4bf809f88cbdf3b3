"""Input validation shared by the public ops.

Every failure is an exception naming the argument and the bad value: ``TypeError`` for a wrong
dtype or type, ``ValueError`` for a wrong shape, device or content. Checks on tensor *values*
(cu_seqlens monotone, grid_thw against lengths) read a few integers back to the host; they run in
eager mode only, never while torch.compile traces (no host sync in a compiled graph), and
``FASTDIT_CHECK_INPUTS=0`` (the ``check_inputs`` setting) turns them off in eager mode too, and
so does :func:`values_checked` for a caller (the DiT) that has validated a whole batch once.
"""

import threading
from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import is_fake

from fastdit import settings

_state = threading.local()


@contextmanager
def values_checked():
    """Within this block (this thread), ops skip their checks of a batch's index tensors: the
    caller has done them.

    The DiT validates its PackedBatch once per forward instead of once per op call, which on a
    GPU saves a dozen host syncs per layer (and on a CPU the checks' Python time, which at small
    sizes rivals the math). Skipped: ``cu_seqlens`` / ``grid_thw`` / ``token_offset`` /
    ``max_seqlen``, shapes and values alike (what :meth:`PackedBatch.validate` covers, or what an
    op derives itself from a dense shape). The activations' shape, dtype and device checks still run.
    """
    previous = getattr(_state, "trusted", False)
    _state.trusted = True
    try:
        yield
    finally:
        _state.trusted = previous


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The largest token position (t*h*w of a grid, a token offset) the ops accept: positions are
# int64 in every kernel, so this bound keeps offset + index and t*h*w far from overflow.
MAX_POSITION = 2**31 - 1


def check_values_enabled(*tensors: torch.Tensor) -> bool:
    """Whether to read the values of ``tensors`` back for a check: not while compiling, not
    inside :func:`values_checked`, not with ``FASTDIT_CHECK_INPUTS=0``, and never for meta or
    fake tensors (shape propagation), which have no values to read."""
    if getattr(_state, "trusted", False) or torch.compiler.is_compiling():
        return False
    if any(t.device.type == "meta" or is_fake(t) for t in tensors):
        return False
    return settings.get().check_inputs


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(
    name: str,
    t: object,
    *,
    ndims: tuple[int, ...] | None = None,
    dtypes: tuple[torch.dtype, ...] | None = FLOAT_DTYPES,
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndims is not None and t.dim() not in ndims:
        dims = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(_dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {_dtype_name(t.dtype)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of the other inputs)")
    return t


def check_same_dtype(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        listing = ", ".join(f"{n}={_dtype_name(t.dtype)}" for n, t in zip(names, tensors))
        joined = ", ".join(names[:-1]) + f" and {names[-1]}"
        raise TypeError(f"{joined} must share one dtype, got {listing}")


def check_cu_seqlens(name: str, cu: object, total: int, device: torch.device, *, min_len: int = 0) -> torch.Tensor:
    """cu_seqlens: (B+1,) int32 on ``device``, cu[0] == 0, non-decreasing, cu[-1] == total.

    ``min_len=1`` also rejects empty samples (attention has no defined output for them).
    """
    if getattr(_state, "trusted", False):
        return cu
    check_tensor(name, cu, ndims=(1,), dtypes=(torch.int32,), device=device)
    if cu.shape[0] < 2:
        raise ValueError(f"{name} must have B+1 >= 2 entries, got shape {tuple(cu.shape)}")
    if check_values_enabled(cu):
        values = cu.tolist()
        if values[0] != 0:
            raise ValueError(f"{name}[0] must be 0, got {values[0]}")
        lengths = [b - a for a, b in zip(values[:-1], values[1:])]
        bad = [i for i, n in enumerate(lengths) if n < min_len]
        if bad:
            i = bad[0]
            what = "non-decreasing" if lengths[i] < 0 else f"sample lengths >= {min_len}"
            raise ValueError(f"{name} must be {what}: {name}[{i}]={values[i]}, {name}[{i + 1}]={values[i + 1]}")
        if values[-1] != total:
            raise ValueError(f"{name}[-1] must equal the number of packed tokens {total}, got {values[-1]}")
    return cu


def check_max_seqlen(name: str, max_seqlen: object, cu: torch.Tensor) -> int:
    if getattr(_state, "trusted", False):
        return max_seqlen
    if isinstance(max_seqlen, torch.Tensor) or not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool):
        raise TypeError(f"{name} must be a Python int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"{name} must be >= 0, got {max_seqlen}")
    if check_values_enabled(cu):
        longest = int((cu[1:] - cu[:-1]).max().item())
        if max_seqlen < longest:
            raise ValueError(f"{name}={max_seqlen} is smaller than the longest sample ({longest} tokens)")
    return max_seqlen


def check_grid_thw(grid_thw: object, cu: torch.Tensor) -> torch.Tensor:
    """grid_thw: (B, 3) int32 or int64 on cu's device, every entry >= 1.

    t*h*w need not equal a sample's length: tokens beyond t*h*w get no rotation, and a sample may
    hold fewer tokens than t*h*w (a shard of a longer sequence, placed by token_offset).
    """
    if getattr(_state, "trusted", False):
        return grid_thw
    check_tensor("grid_thw", grid_thw, ndims=(2,), dtypes=(torch.int32, torch.int64), device=cu.device)
    batch = cu.shape[0] - 1
    if grid_thw.shape != (batch, 3):
        raise ValueError(
            f"grid_thw must have shape (B, 3) = ({batch}, 3) to match cu_seqlens, got {tuple(grid_thw.shape)}"
        )
    if check_values_enabled(grid_thw):
        rows = grid_thw.tolist()
        for b, row in enumerate(rows):
            if min(row) < 1:
                raise ValueError(f"grid_thw[{b}] must be >= 1 on every axis, got {row}")
            tokens = row[0] * row[1] * row[2]  # Python ints: exact, whatever the values
            if tokens > MAX_POSITION:
                raise ValueError(
                    f"grid_thw[{b}] = {row} has t*h*w = {tokens} positions, more than {MAX_POSITION} (2^31 - 1): "
                    "a grid that large is a corrupt grid, not a video"
                )
    return grid_thw


def check_token_offset(token_offset: object, batch: int, device: torch.device) -> torch.Tensor | None:
    if token_offset is None or getattr(_state, "trusted", False):
        return token_offset
    check_tensor("token_offset", token_offset, ndims=(1,), dtypes=(torch.int32, torch.int64), device=device)
    if token_offset.shape[0] != batch:
        raise ValueError(f"token_offset must have shape (B,) = ({batch},), got {tuple(token_offset.shape)}")
    if check_values_enabled(token_offset) and batch:
        low, high = int(token_offset.min().item()), int(token_offset.max().item())
        if low < 0:
            raise ValueError(f"token_offset must be >= 0, got min {low}")
        if high > MAX_POSITION:
            raise ValueError(f"token_offset must be <= {MAX_POSITION} (2^31 - 1), got max {high}")
    return token_offset


NORMS = ("layer", "rms")


def check_norm_args(norm: str, eps: float) -> None:
    """A modulation's ``norm`` (``layer`` or ``rms``) and positive ``eps``."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
