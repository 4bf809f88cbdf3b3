import os

import pytest
import torch

# Errors on bad input must not depend on the environment the tests run in.
os.environ.pop("FASTDIT_BACKEND", None)
os.environ.pop("FASTDIT_CHECK_INPUTS", None)
# Without a GPU, Triton kernels run on CPU tensors through the interpreter (set before any kernel
# module is imported: Triton decides at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Backends the CPU tests sweep; Triton is skipped where it is not installed.
try:
    import triton  # noqa: F401

    CPU_BACKENDS = ["reference", "triton"]
except ImportError:
    CPU_BACKENDS = ["reference"]


# Triton kernels run on CPU tensors only under the interpreter (the default without a GPU).
TRITON_ON_CPU = "triton" in CPU_BACKENDS and os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (-m gpu tests run on the H100 machine)")
    skip_interp = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (set when there is no GPU)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "triton_cpu" in item.keywords and "gpu" not in item.keywords and not TRITON_ON_CPU:
            item.add_marker(skip_interp)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def packed_cu(lengths, device="cpu"):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every torch.empty / empty_like during the test returns NaN (or int min), so an output
    element a kernel forgets to write fails the comparison instead of passing by luck."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            return t.fill_(float("nan"))
        if t.dtype != torch.bool and t.numel():
            return t.fill_(torch.iinfo(t.dtype).min)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
