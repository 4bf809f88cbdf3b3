"""Declarative backend dispatch (after xformers' fmha dispatch).

Each (op, backend) pair is a :class:`Backend` that states the devices and dtypes it runs on, any
further constraint as ``check(inputs) -> reasons``, and why it is unavailable if it cannot run at all (a missing
``fastdit._C`` disables only ``cuda``). The dispatcher walks the op's priority list and takes the
first backend with no reasons. ``backend=`` or ``FASTDIT_BACKEND`` force one; a forced backend
that does not fit raises :class:`BackendNotSupportedError` with its reasons.

``FASTDIT_BACKEND`` (the ``backend`` setting, :mod:`fastdit.settings`) is either one name
(``reference``), forced on every op that has such a backend, or per op
(``rope3d=triton,varlen_attention=reference``), which raises for an op that lacks the named backend.

A backend declares every form of its op together: the forward ``fn``, the explicit ``backward``
of ops whose backward is public (attention's, for ring attention) and the ``inplace`` forward
where one exists. Its kernel variants (tiles autotuned or fixed, TMA, warp specialization) come
from the settings through its ``variant`` function and reach the kernels as arguments: the
:class:`Choice` that :func:`choose` returns holds the backend and its variant, and every form is
called through it. Per-shape policies (a benchmark's measured winners) take part in the same
choice. The rules are in docs/design.md, "Dispatch".
"""

import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from fastdit import settings

logger = logging.getLogger("fastdit")

BACKEND_NAMES = ("cuda", "triton", "cudnn", "sdpa_flash", "sdpa_efficient", "flash_attn", "xformers", "torch",
                 "reference")  # fmt: skip
# Until an H100 benchmark decides per op, Triton (proven under the interpreter) goes before the
# CUDA kernels (compiled in CI, not yet run on a GPU). ``torch`` (PyTorch's own fused ops: SDPA,
# F.layer_norm / F.rms_norm, complex-multiply RoPE) is what a device without our kernels runs,
# so fastdit is never slower there than the code it replaces; the ``reference`` is the oracle and
# comes last. set_priority overrides per op.
DEFAULT_PRIORITY = ("triton", "cuda", "torch", "reference")
# What a GPU runs when none of its fast backends fits: logged once per (op, reason) there.
FALLBACK_BACKENDS = ("torch", "reference")


class BackendNotSupportedError(ValueError):
    """No (or not the forced) backend can run the op on these inputs; the message says why."""


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    ``fn`` takes the op's normalized arguments (see the op module). ``check`` receives the
    ``inputs`` summary the op builds (always ``device`` and ``dtype``, plus op-specific keys
    such as ``head_dim``) and returns the reasons it cannot run them.
    """

    op: str
    name: str
    fn: Callable[..., Any]
    devices: tuple[str, ...] | None  # None: any device
    dtypes: tuple[torch.dtype, ...]
    check: Callable[[dict], list[str]] | None = None
    # Why the backend cannot run at all in this process (no fastdit._C, no Triton), or None.
    # A plain value fixed at registration, so torch.compile traces no availability probe.
    unavailable: str | None = None
    # Devices on which the dispatcher may pick this backend by itself (None: all of ``devices``).
    # Triton under TRITON_INTERPRET=1 runs on CPU when forced, but is never chosen there.
    auto_devices: tuple[str, ...] | None = None
    # The in-place forward (same arguments as ``fn``, writes into its first inputs), or None.
    inplace: Callable[..., Any] | None = None
    # The op's explicit backward form (for ops that expose one, like varlen_attention_backward),
    # or None. Autograd of ``fn`` is registered with ``fn`` and uses the same backend.
    backward: Callable[..., Any] | None = None
    # settings -> the kernel-variant keyword arguments every form of this backend takes.
    variant: Callable[[settings.Settings], dict] | None = None

    def variant_args(self, values: settings.Settings | None = None) -> dict:
        """The variant arguments the current (or given) settings select for this backend."""
        return {} if self.variant is None else self.variant(settings.get() if values is None else values)

    def auto_selectable(self, device: torch.device) -> bool:
        return self.auto_devices is None or device.type in self.auto_devices

    def not_supported_reasons(self, inputs: dict) -> list[str]:
        if self.unavailable is not None:
            return [self.unavailable]
        reasons = []
        device = inputs["device"]
        if self.devices is not None and device.type not in self.devices:
            reasons.append(f"device {device.type} not in {list(self.devices)}")
        if inputs["dtype"] not in self.dtypes:
            names = [str(d).replace("torch.", "") for d in self.dtypes]
            reasons.append(f"dtype {str(inputs['dtype']).replace('torch.', '')} not in {names}")
        if self.check is not None and not reasons:
            reasons.extend(self.check(inputs))
        return reasons


_BACKENDS: dict[str, dict[str, Backend]] = {}
# (op, forced name, id(settings), inputs) -> (settings, Choice): eager calls choose once per kind of
# call. Emptied whenever a backend, priority or policy changes; a new settings object (override)
# misses by identity.
_CHOICES: dict[tuple, tuple] = {}
_CHOICES_LIMIT = 4096
_PRIORITY: dict[str, list[str]] = {}
# Per-shape choices measured by a benchmark: op -> fn(inputs) -> backend name or None.
_SHAPE_POLICY: dict[str, Callable[[dict], str | None]] = {}
_POLICY_SOURCE: dict[str, str] = {}


def register_backend(backend: Backend) -> Backend:
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend name {backend.name!r}; expected one of {BACKEND_NAMES}")
    _BACKENDS.setdefault(backend.op, {})[backend.name] = backend
    _CHOICES.clear()
    _PRIORITY.setdefault(backend.op, list(DEFAULT_PRIORITY))
    return backend


def set_priority(op: str, names: Sequence[str]) -> None:
    """Order in which the dispatcher tries ``op``'s backends (decided by the H100 benchmarks)."""
    unknown = [n for n in names if n not in BACKEND_NAMES]
    if unknown:
        raise ValueError(f"unknown backend names {unknown}; expected some of {BACKEND_NAMES}")
    _PRIORITY[op] = list(names)
    _CHOICES.clear()


def set_shape_policy(op: str, policy: Callable[[dict], str | None] | None, source: str = "set_shape_policy") -> None:
    """Let ``policy(inputs)`` name the backend for particular shapes of ``op`` (a benchmark's
    per-shape winners), as a name or as ``(name, where it was measured)``; None from it, or a
    backend that cannot run the inputs, falls back to the
    priority list. ``policy=None`` removes it. A forced backend still wins over the policy."""
    _CHOICES.clear()
    if policy is None:
        _SHAPE_POLICY.pop(op, None)
        _POLICY_SOURCE.pop(op, None)
    else:
        _SHAPE_POLICY[op] = policy
        _POLICY_SOURCE[op] = source


def shape_policies() -> dict[str, str]:
    """op -> where its per-shape policy comes from (for ``fastdit info``)."""
    return dict(_POLICY_SOURCE)


def backends(op: str) -> dict[str, Backend]:
    """The registered backends of ``op``, by name."""
    if op not in _BACKENDS:
        raise KeyError(f"unknown op {op!r}; known: {sorted(_BACKENDS)}")
    return dict(_BACKENDS[op])


def ops() -> list[str]:
    return sorted(_BACKENDS)


def priority(op: str) -> list[str]:
    return [n for n in _PRIORITY.get(op, DEFAULT_PRIORITY) if n in _BACKENDS.get(op, {})]


def _parse_env(value: str) -> tuple[str | None, dict[str, str]]:
    """'reference' -> ('reference', {}); 'rope3d=triton,attention=reference' -> (None, {...})."""
    value = value.strip()
    if not value:
        return None, {}
    if "=" not in value:
        return value, {}
    per_op = {}
    for item in value.split(","):
        if not item.strip():
            continue
        op, _, name = item.partition("=")
        per_op[op.strip()] = name.strip()
    return None, per_op


def forced_backend(op: str, backend: str | None) -> tuple[str | None, str]:
    """The backend forced for ``op`` and where it came from: the ``backend=`` argument, else the
    enclosing :class:`model_backend` block (where the op has that backend), else the ``backend``
    setting."""
    if backend is not None:
        return backend, "backend= argument"
    scope = getattr(_SCOPE, "value", None)
    if scope is not None and scope[0] in _BACKENDS.get(op, {}):
        return scope[0], f"{scope[1]}(backend={scope[0]!r})"
    value = settings.get().backend
    global_name, per_op = _parse_env(value)
    if op in per_op:
        return per_op[op], f"FASTDIT_BACKEND={value}"
    if global_name is not None and global_name in _BACKENDS.get(op, {}):
        return global_name, f"FASTDIT_BACKEND={global_name}"
    return None, ""


def _format_reasons(reasons: dict[str, list[str]]) -> str:
    return "; ".join(f"{name}: {', '.join(r)}" for name, r in reasons.items())


@lru_cache(maxsize=256)
def _log_fallback_once(op: str, chosen: str, device: str, message: str) -> None:
    logger.warning("fastdit.%s on %s runs the %s backend: %s", op, device, chosen, message)


@lru_cache(maxsize=256)
def _log_policy_unfit_once(op: str, chosen: str, where: str, reasons: str) -> None:
    logger.warning("fastdit.%s: the policy (%s) names %s, which cannot run this call (%s); the priority list "
                   "decides", op, where, chosen, reasons)  # fmt: skip


def select_backend(op: str, inputs: dict, backend: str | None = None) -> Backend:
    """Pick the backend that runs ``op`` on ``inputs`` (see the module docstring)."""
    chosen, source = _select(op, inputs, backend)
    _record(op, chosen.name, source)
    return chosen


def _record(op: str, name: str, source: str) -> None:
    for log in _TRACES:
        log.append((op, name))
        log.sources[(op, name)] = source


def _select(op: str, inputs: dict, backend: str | None) -> tuple[Backend, str]:
    """The backend and what chose it: the forcing source, ``policy: <source>`` or ``priority``."""
    table = _BACKENDS.get(op)
    if not table:
        raise KeyError(f"no backend registered for op {op!r}")
    name, source = forced_backend(op, backend)
    if name is not None:
        if name not in table:
            raise BackendNotSupportedError(
                f"fastdit.{op}: backend {name!r} (from {source}) does not exist for this op; "
                f"registered: {sorted(table)}"
            )
        reasons = table[name].not_supported_reasons(inputs)
        if reasons:
            raise BackendNotSupportedError(
                f"fastdit.{op}: backend {name!r} (from {source}) cannot run these inputs: {'; '.join(reasons)}"
            )
        return table[name], f"forced by {source}"
    policy = _SHAPE_POLICY.get(op)
    if policy is not None:
        chosen, where = policy(inputs), _POLICY_SOURCE[op]
        if isinstance(chosen, tuple):  # (name, the file it came from)
            chosen, where = chosen
        if chosen is not None:
            reasons = table[chosen].not_supported_reasons(inputs) if chosen in table else ["not a backend of this op"]
            if not reasons:
                return table[chosen], f"policy: {where}"
            _log_policy_unfit_once(op, chosen, where, "; ".join(reasons))
    rejected: dict[str, list[str]] = {}
    for candidate in priority(op):
        if not table[candidate].auto_selectable(inputs["device"]):
            continue
        reasons = table[candidate].not_supported_reasons(inputs)
        if not reasons:
            if candidate in FALLBACK_BACKENDS and inputs["device"].type == "cuda":
                # Never fall back silently on a GPU: say once which fast backend did not fit and why.
                why = _format_reasons(rejected) if rejected else "no fast backend exists for this op yet"
                _log_fallback_once(op, candidate, str(inputs["device"]), why)
            return table[candidate], "priority"
        rejected[candidate] = reasons
    raise BackendNotSupportedError(f"fastdit.{op}: no backend can run these inputs: {_format_reasons(rejected)}")


def device_choice(op: str, device: torch.device, dtype: torch.dtype, backend: str | None = None) -> str:
    """The backend ``op`` runs on for tensors of ``device`` and ``dtype``, before any check of
    their shapes: the forced one (:func:`forced_backend`), else the first backend of
    the priority list that is available and selectable there. Callers that wrap other code
    (``fastdit.patch``) use it to see whether a device has any fastdit kernel at all; it is recorded
    in open traces like a dispatch."""
    values = settings.get()
    key = ("device_choice", op, backend, getattr(_SCOPE, "value", None), id(values), device, dtype)
    cached = _CHOICES.get(key)
    if cached is not None and cached[0] is values:
        for log in _TRACES:
            log.append((op, cached[1]))
        return cached[1]
    name, _ = forced_backend(op, backend)
    if name is None:
        table = _BACKENDS.get(op, {})
        inputs = {"device": device, "dtype": dtype}
        for candidate in priority(op):
            impl = table[candidate]
            if impl.auto_selectable(device) and impl.unavailable is None and not _device_reasons(impl, inputs):
                name = candidate
                break
        else:
            raise BackendNotSupportedError(
                f"fastdit.{op}: no backend runs {str(dtype).replace('torch.', '')} on {device}"
            )
    if len(_CHOICES) >= _CHOICES_LIMIT:
        _CHOICES.clear()
    _CHOICES[key] = (values, name)
    for log in _TRACES:
        log.append((op, name))
    return name


def _device_reasons(impl: Backend, inputs: dict) -> list[str]:
    """Why ``impl`` cannot run on this device and dtype at all (its op-specific checks aside)."""
    return Backend(impl.op, impl.name, impl.fn, impl.devices, impl.dtypes).not_supported_reasons(inputs)


def backends_for(name: str | None, op_names) -> dict[str, str | None]:
    """A model-wide backend choice, per op: ``name`` where the op has it, else None (the
    dispatcher decides). So ``DiT(backend="triton")`` runs every op that has a Triton kernel on
    it and the rest on their best other backend; ``"reference"`` exists for every op."""
    if name is not None and name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES} or None")
    return {op: name if name in _BACKENDS.get(op, {}) else None for op in op_names}


# ---- a model-wide choice: the backend a model runs every op on, for the calls it makes --------------

# The model_backend() block running on this thread: (name, owner) or None. Thread-local, so two
# models called from two threads keep their own choice; torch.compile traces reads and writes of it.
_SCOPE = threading.local()


class model_backend:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Run a block with ``name`` forced on every op called in it without ``backend=`` that has such
    a backend (the others keep the dispatcher's choice, as :func:`backends_for` says): the one way
    a model-wide choice (``DiT(backend=...)``, ``CausalVAE(backend=...)``, ``fastdit.patch(...,
    backend=...)``) reaches every op its modules call. An explicit ``backend=`` argument still wins;
    the choice comes before the ``FASTDIT_BACKEND`` setting. ``None`` leaves the enclosing choice
    in force; blocks nest; the choice is per thread. Traces name the owner
    (``forced by DiT(backend='triton')``). An unknown name raises ValueError on entry."""

    def __init__(self, name: str | None, owner: str = "model_backend"):
        if name is not None and name not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES} or None")
        self.name, self.owner = name, owner

    def __enter__(self):
        self.previous = getattr(_SCOPE, "value", None)
        if self.name is not None:
            _SCOPE.value = (self.name, self.owner)
        return self

    def __exit__(self, *exc):
        _SCOPE.value = self.previous
        return False


def on_model_backend(method):
    """Decorate a model's method so it runs inside ``model_backend(self.backend, <class name>)``:
    every op it calls, however deep in the model's modules, sees the model's choice."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with model_backend(self.backend, type(self).__name__):
            return method(self, *args, **kwargs)

    return run


def scoped_backend(op: str) -> str | None:
    """The backend the enclosing :class:`model_backend` block forces on ``op``: its name when the
    op has such a backend, else None (also outside any block). For code that must pass the choice
    on to a call made later, outside the block (an autograd backward)."""
    scope = getattr(_SCOPE, "value", None)
    return scope[0] if scope is not None and scope[0] in _BACKENDS.get(op, {}) else None


@dataclass(frozen=True)
class Choice:
    """A backend chosen for one call, with the kernel variant the settings select: call every
    form of the op through it, so forward, backward and in-place run the same implementation."""

    backend: Backend
    variant: dict = field(default_factory=dict)
    source: str = ""  # what chose it: "forced by ...", "policy: <file>" or "priority"

    @property
    def name(self) -> str:
        return self.backend.name

    def forward(self, *args):
        return self.backend.fn(*args, **self.variant)

    def has_inplace(self) -> bool:
        return self.backend.inplace is not None

    def inplace(self, *args):
        return self.backend.inplace(*args, **self.variant)

    def backward(self, *args):
        if self.backend.backward is None:
            raise BackendNotSupportedError(f"fastdit.{self.backend.op}: the {self.name!r} backend has no backward form")
        return self.backend.backward(*args, **self.variant)


def choose(op: str, inputs: dict, backend: str | None = None) -> Choice:
    """:func:`select_backend` and the variant the current settings select for it.

    Eager calls remember the choice per (op, forced backend, settings, inputs): the inputs
    summary is all a choice depends on, so a model's thousands of op calls walk the priority list
    once per kind of call. Traced calls (torch.compile) choose afresh, once per graph."""
    if torch.compiler.is_compiling():
        chosen, source = _select(op, inputs, backend)
        _record(op, chosen.name, source)
        return Choice(chosen, chosen.variant_args(), source)
    values = settings.get()
    # an op builds its inputs' keys in one order
    key = (op, backend, getattr(_SCOPE, "value", None), id(values), *inputs.values())
    try:
        cached = _CHOICES.get(key)
    except TypeError:  # an unhashable summary value: choose without remembering
        chosen, source = _select(op, inputs, backend)
        _record(op, chosen.name, source)
        return Choice(chosen, chosen.variant_args(values), source)
    if cached is None or cached[0] is not values:
        chosen, source = _select(op, inputs, backend)
        cached = (values, Choice(chosen, chosen.variant_args(values), source))
        if len(_CHOICES) >= _CHOICES_LIMIT:
            _CHOICES.clear()
        _CHOICES[key] = cached
    choice = cached[1]
    _record(op, choice.name, choice.source)
    return choice


def form(op: str, name: str, which: str = "fn") -> Callable[..., Any]:
    """One declared form (``fn``, ``backward``, ``inplace``) of ``op``'s backend ``name``, with
    the current variant bound: how one op's implementation uses another's (the fused q/k norm's
    backward runs rms_norm's) without importing it."""
    impl = backends(op)[name]
    fn = getattr(impl, which)
    if fn is None:
        raise BackendNotSupportedError(f"fastdit.{op}: the {name!r} backend has no {which} form")
    variant = impl.variant_args()
    return (lambda *args: fn(*args, **variant)) if variant else fn


# ---- calls a fast path could not serve: reported once per call site and reason, counted --------

_FALLBACKS: dict[tuple[str, str, str], int] = {}


def report_fallback(op: str, site: str, reason: str, ran: str) -> None:
    """Say that a call to ``op`` from ``site`` could not be served by fastdit (``reason``) and ran
    on ``ran`` instead: logged once per (op, site, reason), counted in :func:`fallbacks`, and
    recorded in open traces as ``(op, "fallback:<ran>")``. With ``FASTDIT_STRICT=1`` it raises
    :class:`BackendNotSupportedError` instead."""
    if settings.get().strict:
        raise BackendNotSupportedError(f"fastdit.{op} at {site}: {reason} (FASTDIT_STRICT=1 refuses the fallback)")
    key = (op, site, reason)
    if key not in _FALLBACKS:
        logger.warning("fastdit.%s at %s: %s; this call and those like it run on %s", op, site, reason, ran)
    _FALLBACKS[key] = _FALLBACKS.get(key, 0) + 1
    for log in _TRACES:
        log.append((op, f"fallback:{ran}"))


def fallbacks() -> dict[tuple[str, str, str], int]:
    """How many calls fell back, per (op, call site, reason), since the process started."""
    return dict(_FALLBACKS)


class TraceLog(list):
    """The ``(op, backend)`` pairs a :func:`trace` block dispatched, in order; ``sources`` says
    for each pair what made the last such choice (``"forced by backend= argument"``,
    ``"policy: <file>"``, ``"priority"``)."""

    def __init__(self):
        super().__init__()
        self.sources: dict[tuple[str, str], str] = {}


# The open trace() logs; a plain list, so torch.compile traces the (usually empty) loop over it.
_TRACES: list[TraceLog] = []


@contextmanager
def trace() -> Iterator[TraceLog]:
    """Record the ``(op, backend)`` of every dispatch made inside the block (eager calls; a
    compiled graph dispatches once, while it is traced), and in ``log.sources`` what chose it."""
    log = TraceLog()
    _TRACES.append(log)
    try:
        yield log
    finally:
        _TRACES[:] = [other for other in _TRACES if other is not log]
