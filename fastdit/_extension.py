"""Loading of the optional CUDA extension ``fastdit._C`` (built from csrc/ by setup.py).

The extension is loaded once, when this module is imported (``fastdit.ops`` imports it before
registering any backend); :func:`cuda_extension_missing` only reports the outcome. A missing or
unloadable extension disables only the ``cuda`` backend; the reason is kept for ``fastdit info``
and for the dispatcher's error messages.
"""

import importlib.util

import torch


def _load() -> str | None:
    """Load ``fastdit._C`` (registering its ``fastdit::*_cuda`` ops); None on success, else why not."""
    spec = importlib.util.find_spec("fastdit._C")
    if spec is None or spec.origin is None:
        return "fastdit._C is not built (no CUDA torch or nvcc at install time, or FASTDIT_SKIP_CUDA_BUILD=1)"
    if not torch.cuda.is_available():
        return "fastdit._C is built but no CUDA device is available"
    try:
        torch.ops.load_library(spec.origin)
    except Exception as err:  # e.g. built against another torch / CUDA: disable the backend, keep fastdit
        return f"fastdit._C failed to load: {type(err).__name__}: {err}"
    return None


_MISSING = _load()


def cuda_extension_missing() -> str | None:
    """None when ``fastdit._C`` is loaded (its ``fastdit::*_cuda`` ops registered), else why not."""
    return _MISSING
