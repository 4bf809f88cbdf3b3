"""Registration helpers the ops' backends share: the triton backend entry, explicit fakes under
the interpreter, and custom-op signatures written once (docs/design.md, "Dispatch")."""

import inspect

import torch

from fastdit.kernels.launch import interpreting, triton_devices, triton_missing
from fastdit.ops.dispatch import Backend, register_backend
from fastdit.ops.validation import FLOAT_DTYPES


def interpreter_fake(op, fake_fn) -> None:
    """Give a triton_op an explicit fake implementation when kernels run under TRITON_INTERPRET=1.

    On GPUs torch derives a triton_op's fake from its body (the kernel launch is skipped under
    fake tensors); the interpreter's launcher is not recognised there and would run on meta
    tensors, so CPU tests register the obvious fake instead.
    """
    if interpreting():
        op.register_fake(fake_fn)


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreter_reasons(inputs: dict) -> list[str]:
    """What the Triton interpreter (TRITON_INTERPRET=1, kernels run through numpy on the CPU)
    cannot compute: bfloat16, which numpy does not have (the kernels' results came back wrong)."""
    if interpreting() and inputs.get("dtype") == torch.bfloat16:
        return ["bfloat16 under TRITON_INTERPRET=1: the interpreter runs on numpy, which has no bfloat16"]
    return []


def register_triton_backend(op: str, fn, **kwargs) -> None:
    """The ``triton`` backend of ``op``: CUDA (and CPU under the interpreter, when forced).

    ``fn`` is None where Triton is missing; the backend then reports why it is unavailable.
    """
    kwargs.setdefault("dtypes", TRITON_DTYPES)
    check = kwargs.pop("check", None)
    kwargs["check"] = lambda inputs: _interpreter_reasons(inputs) + (check(inputs) if check is not None else [])
    register_backend(
        Backend(
            op,
            "triton",
            fn,
            devices=triton_devices(),
            unavailable=triton_missing(),
            auto_devices=("cuda",),
            **kwargs,
        )
    )


def register_torch_backend(op: str, fn, **kwargs) -> None:
    """The ``torch`` backend of ``op``: the op written with PyTorch's own fused ops (SDPA,
    ``F.layer_norm`` / ``F.rms_norm``, ``addcmul``, a complex multiply for RoPE), in the op's
    contract (float32 statistics, output in the input dtype).

    The dispatcher picks it by itself on CPUs, where fastdit has no kernels, so a CPU run is as fast
    as the PyTorch code it replaces; on GPUs it runs when forced (``backend="torch"``) until a
    measured policy ranks it among the vendor providers. Plain compositions of aten ops need no
    custom op: autograd and torch.compile see through them.
    """
    kwargs.setdefault("devices", None)
    kwargs.setdefault("dtypes", FLOAT_DTYPES)
    register_backend(Backend(op, "torch", fn, auto_devices=("cpu",), **kwargs))


def signature(params, returns) -> inspect.Signature:
    """A custom op's Python signature from ``[(name, annotation), ...]`` (a third element: the
    default): written once per op and shared by every backend's registration (torch infers the
    schema from it)."""
    kind, empty = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty
    return inspect.Signature(
        [inspect.Parameter(p[0], kind, annotation=p[1], default=p[2] if len(p) > 2 else empty) for p in params],
        return_annotation=returns,
    )


def typed(impl, sig: inspect.Signature):
    """``impl(*args)`` as a function with signature ``sig`` (what torch.library reads)."""

    count = len(sig.parameters)

    def op(*args, **kwargs):
        if not kwargs and len(args) == count:  # how torch calls an op's kernel: every argument, in order
            return impl(*args)
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return impl(*bound.args)

    op.__signature__ = sig
    op.__name__ = op.__qualname__ = getattr(impl, "__name__", "op")
    return op
