"""fastdit: fast kernels and runtime for video diffusion transformers.

Layers, bottom up: ``fastdit.kernels`` (Triton), ``fastdit._C`` (CUDA, optional),
``fastdit.ops`` (public ops and backend dispatch), ``fastdit.reference`` (the parity oracle),
``fastdit.models`` (DiT), ``fastdit.benchmarks``.
"""

__version__ = "0.1.0"

from fastdit import ops  # noqa: E402  (registers the fastdit:: custom ops)

__all__ = ["__version__", "ops"]
