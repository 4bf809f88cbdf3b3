"""How fastdit's Triton kernels run here: is Triton importable, are kernels interpreted on CPU,
and the launch helpers every ``kernels/<op>.py`` shares.

``kernels/`` installs as ``fastdit.kernels`` (a namespace package: no ``__init__.py``, so the
repository root never holds a top-level ``kernels`` package that would shadow PyPI's; see
docs/design.md, "Layout"). Each kernel lives in ``kernels/<op>.py`` with its autotune configs and
launcher; the registered op that calls it is ``fastdit/ops/<op>.py``. This layer knows nothing of
models. It imports Triton lazily, so ``fastdit`` imports (and runs on its other backends) where
Triton is absent.
"""

import importlib.util
import os


def triton_missing() -> str | None:
    """None when Triton can be imported, else why not (for ``fastdit info`` and the dispatcher)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as err:  # a broken install must disable the backend, not crash the import
        return f"triton failed to import: {err}"
    return None


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_devices() -> tuple[str, ...]:
    """Devices Triton kernels can run on in this process: CUDA, plus CPU under the interpreter."""
    return ("cuda", "cpu") if interpreting() else ("cuda",)


def use_device_tma_descriptors() -> None:
    """Give Triton an allocator for the global scratch its device-side TMA descriptors
    (``tl.make_tensor_descriptor``) live in; a no-op under the interpreter."""
    if interpreting():
        return
    import torch
    import triton

    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def contiguous(*tensors):
    """The tensors a launcher passes as bare pointers indexed 0, 1, 2, ... (vectors such as a norm's
    weight, cu_seqlens, grids), each made contiguous: a strided, offset or expanded (stride-0) view
    becomes a dense copy, a contiguous tensor passes through untouched, None stays None."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def launcher(kernel):
    """``kernel`` ready to launch as ``launcher(kernel)[grid](...)``: through
    ``torch.library.wrap_triton`` (visible to torch.compile and export), except under the
    interpreter, whose kernels nothing traces and which torch 2.11's ``wrap_triton`` refuses."""
    if interpreting():
        return kernel
    import torch

    return torch.library.wrap_triton(kernel)
