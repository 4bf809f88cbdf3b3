"""fastdit: fast kernels and runtime for video diffusion transformers.

Layers, bottom up: ``fastdit.settings`` (the FASTDIT_* switches, read once),
``fastdit.kernels`` (Triton), ``fastdit._C`` (CUDA, optional), ``fastdit.ops`` (public ops and
backend dispatch), ``fastdit.reference`` (the parity oracle), ``fastdit.models`` (DiT, VAE),
``fastdit.benchmarks``. docs/design.md describes them.
"""

__version__ = "0.1.0"

from fastdit import ops, settings  # noqa: E402  (ops registers the fastdit:: custom ops)
from fastdit.integrations._diffusers_registry import requested_backend as _requested  # noqa: E402

if _requested() is not None:  # DIFFUSERS_ATTN_BACKEND=fastdit: registered before diffusers reads it
    from fastdit.integrations.diffusers import enable_from_environment

    enable_from_environment()


def patch(target, attention=True, rope=True, adaln=True, vae=True, backend=None) -> list[str]:
    """Run a diffusers pipeline / transformer (every attention call; Wan's RoPE and adaLN too) /
    Wan VAE on fastdit's ops in place; returns the changes and what was left, and why. See
    :mod:`fastdit.integrations.diffusers`."""
    from fastdit.integrations.diffusers import patch as _patch

    return _patch(target, attention=attention, rope=rope, adaln=adaln, vae=vae, backend=backend)


def unpatch(target) -> None:
    """Undo :func:`patch` exactly."""
    from fastdit.integrations.diffusers import unpatch as _unpatch

    _unpatch(target)


__all__ = ["__version__", "ops", "patch", "settings", "unpatch"]
