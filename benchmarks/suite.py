"""The benchmarks ``fastdit bench`` runs, by suite name.

``benchmarks/`` installs as ``fastdit.benchmarks`` (a namespace package, like ``fastdit.kernels``:
nothing at the repository root is a top-level ``benchmarks`` package; docs/design.md, "Layout").

Each benchmark module has ``add_arguments(parser)`` and ``run(args, device) -> Report``; results
are written as JSON rows (and a PNG) under ``--out`` (default ``~/.cache/fastdit/bench``, see
``harness.default_out_dir``).
"""

from fastdit.benchmarks import attention, dit_step, memory_ops, vae, vae_ops

SUITE = {"memory_ops": memory_ops, "attention": attention, "dit_step": dit_step, "vae": vae, "vae_ops": vae_ops}

__all__ = ["SUITE"]
