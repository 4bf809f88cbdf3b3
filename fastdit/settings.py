"""fastdit's run-time settings: every ``FASTDIT_*`` switch, read once, typed and validated.

The environment is read in this module only, once, when fastdit is imported. Code reads the
current values with :func:`get`; tests, benchmarks and programs change them with
:func:`override` (a context manager), never by editing ``os.environ``. No traced op reads
either: the ops read the settings when they choose a backend (:mod:`fastdit.ops.dispatch`) and
pass kernel variants to the launchers as arguments. See docs/design.md, "Settings".

=========================  ==================  ===============================================
variable                   field               meaning
=========================  ==================  ===============================================
FASTDIT_BACKEND            backend             force a backend: ``triton`` (every op that has
                                               it) or per op ``rope3d=triton,attention=cudnn``
FASTDIT_CHECK_INPUTS       check_inputs        ``0``: skip the value checks that read tensors
                                               back to the host (shape checks always run)
FASTDIT_CONV_POLICY        conv_policy         a per-shape causal_conv3d policy JSON
FASTDIT_ATTN_POLICY        attn_policy         a per-device attention policy JSON (instead of
                                               the packaged file for this device, if any)
FASTDIT_CONV_AUTOTUNE      conv_autotune       ``0``: the conv kernel's fixed tiles
FASTDIT_CONV_TMA           conv_tma            ``1``: conv weight tiles by TMA
FASTDIT_ATTN_AUTOTUNE      attn_autotune       ``0``: attention's fixed tiles
FASTDIT_ATTN_PERSISTENT    attn_persistent     ``1``: persistent attention forward schedule
FASTDIT_ATTN_TMA           attn_tma            ``1``: attention K / V by TMA
FASTDIT_ATTN_WS            attn_ws             ``1``: warp-specialized attention forward
FASTDIT_ATTN_BWD_WS        attn_bwd_ws         ``1``: warp-specialized attention backward
FASTDIT_STRICT             strict              ``1``: a call no fastdit path can serve raises
                                               instead of being reported and run elsewhere
FASTDIT_BATCH_INVARIANT    batch_invariant     ``0``: models run each matmul over the whole
                                               packed batch (faster, but a sample's result
                                               then depends on its batch mates by rounding)
=========================  ==================  ===============================================

Booleans are ``0`` or ``1`` (also ``false`` / ``true``, ``off`` / ``on``, any case). A bad value
raises at import; an unknown ``FASTDIT_*`` name is warned about once. Two names are read
elsewhere, at build time by ``setup.py`` (``FASTDIT_SKIP_CUDA_BUILD``, ``FASTDIT_CUDA_ARCHS``),
and one by the test suite's CUDA emulation (``FASTDIT_EMULATION_CACHE``): they are known here so
as not to be warned about, and mean nothing at run time.
"""

import dataclasses
import os
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

PREFIX = "FASTDIT_"
# Read by setup.py (build) and tests/cuda_emulation.py, never by the package at run time.
OTHER_NAMES = ("FASTDIT_SKIP_CUDA_BUILD", "FASTDIT_CUDA_ARCHS", "FASTDIT_EMULATION_CACHE")

_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The values fastdit runs with; the defaults are those of an empty environment."""

    backend: str = ""
    check_inputs: bool = True
    conv_policy: str = ""
    attn_policy: str = ""
    conv_autotune: bool = True
    conv_tma: bool = False
    attn_autotune: bool = True
    attn_persistent: bool = False
    attn_tma: bool = False
    attn_ws: bool = False
    attn_bwd_ws: bool = False
    strict: bool = False
    batch_invariant: bool = True


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
DEFAULTS = Settings()


def env_name(field: str) -> str:
    """The environment variable of a settings field: ``attn_ws`` -> ``FASTDIT_ATTN_WS``."""
    return PREFIX + field.upper()


def _parse(field: str, text: str):
    kind = FIELDS[field].type
    if kind in (bool, "bool"):
        value = text.strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise ValueError(f"{env_name(field)}={text!r}: expected 0 or 1 (or true / false, on / off)")
    return text.strip()


def from_environ(environ: Mapping[str, str], *, warn_unknown: bool = True) -> Settings:
    """The settings an environment describes (unset names keep their defaults).

    Raises ValueError for a value of the wrong type; warns once per call about ``FASTDIT_*``
    names this version does not know (a misspelled switch would otherwise do nothing)."""
    known = {env_name(f): f for f in FIELDS}
    values = {}
    unknown = []
    for key, text in sorted(environ.items()):
        if not key.startswith(PREFIX):
            continue
        if key in known:
            values[known[key]] = _parse(known[key], text)
        elif key not in OTHER_NAMES:
            unknown.append(key)
    if unknown and warn_unknown:
        names = ", ".join(unknown)
        warnings.warn(
            f"unknown fastdit setting(s) {names} ignored; known: {', '.join(sorted(known))}",
            UserWarning,
            stacklevel=2,
        )
    return Settings(**values)


def _check_types(changes: Mapping[str, object]) -> None:
    for field, value in changes.items():
        if field not in FIELDS:
            raise TypeError(f"unknown fastdit setting {field!r}; known: {sorted(FIELDS)}")
        kind = FIELDS[field].type
        expected = bool if kind in (bool, "bool") else str
        if not isinstance(value, expected):
            raise TypeError(f"setting {field} must be a {expected.__name__}, got {value!r}")


_lock = threading.Lock()
_current = from_environ(os.environ)


def get() -> Settings:
    """The settings in force now (the environment at import, changed by :func:`override`)."""
    return _current


@contextmanager
def override(**changes) -> Iterator[Settings]:
    """Run a block with some settings changed, process-wide; they are restored after it.

    ``with settings.override(attn_ws=True): ...`` is what ``FASTDIT_ATTN_WS=1`` would do for the
    whole process. Field names and types are checked. Nesting works; overrides are not
    per-thread (a setting is a property of the process, as the environment was).
    """
    global _current
    _check_types(changes)
    with _lock:
        previous = _current
        _current = dataclasses.replace(previous, **changes)
    try:
        yield _current
    finally:
        with _lock:
            _current = previous


def as_environ(values: Settings | None = None) -> dict[str, str]:
    """The ``FASTDIT_*`` variables that reproduce ``values`` (default the current settings) in a
    new process: only the fields that differ from the defaults (for ``fastdit info``, benchmark
    metadata and the environment of a subprocess)."""
    values = get() if values is None else values
    out = {}
    for field in FIELDS:
        value = getattr(values, field)
        if value != getattr(DEFAULTS, field):
            out[env_name(field)] = ("1" if value else "0") if isinstance(value, bool) else value
    return out


def from_switches(switches: Mapping[str, str]) -> dict[str, object]:
    """Override arguments for a mapping of ``FASTDIT_*`` names to their text values, such as a
    benchmark provider's ``{"FASTDIT_ATTN_WS": "1"}``: unknown names raise."""
    known = {env_name(f): f for f in FIELDS}
    unknown = sorted(set(switches) - set(known))
    if unknown:
        raise ValueError(f"unknown fastdit setting(s) {unknown}; known: {sorted(known)}")
    return {known[key]: _parse(known[key], text) for key, text in switches.items()}
