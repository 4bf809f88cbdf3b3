"""Everything fastdit does to diffusers' private attention registry, in one place.

diffusers' attention backends live in ``diffusers.models.attention_dispatch``: a closed
``AttentionBackendName`` str-enum, the ``_AttentionBackendRegistry`` class (backend functions,
their argument names, which support context parallelism, the process default), and
``_templated_context_parallel_attention`` (Ulysses / Ring around a backend's forward / backward
ops). None of it is public API, so every use of it is here, tested on the oldest (0.36) and
newest (0.42) diffusers fastdit supports (tests/integrations/test_diffusers_registry.py, run by CI
on both).

``DIFFUSERS_ATTN_BACKEND``: diffusers reads it once, when ``attention_dispatch`` is first
imported, as ``AttentionBackendName(value)``; a name that is not yet a member makes that import
fail. :func:`attention_dispatch` imports the module with the variable read as ``"native"`` when it
names a fastdit backend, then registers that backend and makes it the default, so
``DIFFUSERS_ATTN_BACKEND=fastdit`` works whenever fastdit registers before diffusers' models are
imported (``import fastdit`` does, when the variable asks for fastdit).
"""

import os
import sys
from collections.abc import Callable
from contextlib import contextmanager

_DISPATCH_MODULE = "diffusers.models.attention_dispatch"
ENV = "DIFFUSERS_ATTN_BACKEND"


def requested_backend() -> str | None:
    """The fastdit backend name ``DIFFUSERS_ATTN_BACKEND`` asks for, or None when it asks for
    another (or none)."""
    value = os.environ.get(ENV, "")
    return value if value == "fastdit" or value.startswith("fastdit_") else None


def attention_dispatch():
    """diffusers' ``attention_dispatch`` module, imported so that a fastdit name in
    ``DIFFUSERS_ATTN_BACKEND`` does not break the import (see the module docstring)."""
    module = sys.modules.get(_DISPATCH_MODULE)
    if module is not None:
        return module
    from diffusers.utils import constants

    wanted = constants.DIFFUSERS_ATTN_BACKEND
    if wanted == "fastdit" or wanted.startswith("fastdit_"):
        constants.DIFFUSERS_ATTN_BACKEND = "native"
        try:
            import diffusers.models.attention_dispatch as module
        finally:
            constants.DIFFUSERS_ATTN_BACKEND = wanted
    else:
        import diffusers.models.attention_dispatch as module
    return module


def member(name: str):
    """The ``AttentionBackendName`` member named ``name``, added to the closed enum the way Enum
    builds its own members when it is missing (once per process)."""
    names = attention_dispatch().AttentionBackendName
    found = names._value2member_map_.get(name)
    if found is not None:
        return found
    found = str.__new__(names, name)
    found._name_, found._value_ = name.upper(), name
    names._member_map_[found._name_] = found
    names._value2member_map_[name] = found
    names._member_names_.append(found._name_)
    return found


def is_registered(backend) -> bool:
    return backend in attention_dispatch()._AttentionBackendRegistry._backends


def register(backend, fn: Callable, context_parallel: bool) -> None:
    """Register ``fn`` as ``backend``'s function; ``context_parallel``: diffusers' Ulysses / Ring
    may run it (it returns the log-sum-exp when asked)."""
    attention_dispatch()._AttentionBackendRegistry.register(backend, supports_context_parallel=context_parallel)(fn)


def supports_context_parallel(backend) -> bool:
    return attention_dispatch()._AttentionBackendRegistry._is_context_parallel_available(backend)


def set_default(backend) -> None:
    """Make ``backend`` the process default (what ``DIFFUSERS_ATTN_BACKEND`` sets)."""
    attention_dispatch()._AttentionBackendRegistry._active_backend = backend  # set_active_backend: 0.37+


@contextmanager
def default(backend):
    """``backend`` as the process default inside the block (what diffusers' own
    ``attention_backend`` context does), restored after."""
    registry = attention_dispatch()._AttentionBackendRegistry
    before = registry._active_backend
    set_default(backend)
    try:
        yield
    finally:
        set_default(before)


def default_backend():
    return attention_dispatch()._AttentionBackendRegistry.get_active_backend()[0]


def context_parallel_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                               forward_op, backward_op, parallel_config):  # fmt: skip
    """diffusers' Ulysses / Ring / both around ``forward_op`` / ``backward_op`` (diffusers' op
    contract: ``forward_op(ctx, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa,
    return_lse, _save_ctx=..., _parallel_config=...)`` with (B, S, H, D) tensors and a (B, S, H)
    log-sum-exp; ``backward_op(ctx, grad_out, query=, key=, value=, out=, lse=)``)."""
    return attention_dispatch()._templated_context_parallel_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
        forward_op=forward_op, backward_op=backward_op, _parallel_config=parallel_config,
    )  # fmt: skip
