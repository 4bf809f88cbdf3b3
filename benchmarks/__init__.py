"""fastdit's benchmarks, installed as ``fastdit.benchmarks``; ``fastdit bench`` runs the suite.

Each benchmark module has ``add_arguments(parser)`` and ``run(args, device) -> Report``; results
are written as JSON rows (and a PNG) under ``--out`` (default ``~/.cache/fastdit/bench``, see
``harness.default_out_dir``).
"""

from fastdit.benchmarks import attention, dit_step, memory_ops, vae, vae_ops

SUITE = {"memory_ops": memory_ops, "attention": attention, "dit_step": dit_step, "vae": vae, "vae_ops": vae_ops}

__all__ = ["SUITE"]
