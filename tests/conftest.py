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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (-m gpu tests run on the H100 machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
