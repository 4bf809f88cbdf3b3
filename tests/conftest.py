import os

import pytest
import torch

# Errors on bad input must not depend on the environment the tests run in (fastdit reads its
# settings from the environment once, at import: clear them before that).
for _name in [k for k in os.environ if k.startswith("FASTDIT_") and k != "FASTDIT_EMULATION_CACHE"]:
    os.environ.pop(_name)
# Without a GPU, Triton kernels run on CPU tensors through the interpreter (set before any kernel
# module is imported: Triton decides at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Backends the CPU tests sweep (torch: PyTorch's own ops, the CPU default); Triton is skipped
# where it is not installed.
try:
    import triton  # noqa: F401

    CPU_BACKENDS = ["reference", "torch", "triton"]
except ImportError:
    CPU_BACKENDS = ["reference", "torch"]


# Triton kernels run on CPU tensors only under the interpreter (the default without a GPU).
TRITON_ON_CPU = "triton" in CPU_BACKENDS and os.environ.get("TRITON_INTERPRET") == "1"


# Under pytest-xdist every worker gets an equal share of the cores for torch's threads (and so do
# the processes the tests spawn): two workers of two threads each on two cores spend their time
# in OpenMP's spin-waits (the suite ran 10% faster on one thread per worker).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(_threads)

# The tests that take 10 s or more on a 2-core machine (measured 2026-12-05), started first so that
# the workers finish together instead of one picking up a long test at the end.
SLOW_FIRST = (
    "tests/kernels/test_compile_sm90.py::test_compile_in_subprocess",
    "tests/models/test_vae_fast.py::test_vae_on_triton_matches_reference_fp32_and_fp16",
    "tests/runtime/test_parallel.py",
    "tests/serve/test_load.py",
    "tests/test_export.py",
    "tests/ops/test_strided_inputs.py::test_every_argument_as_a_view[adaln",
    "tests/test_cli.py",
    "tests/test_readme_python.py::test_the_readme_python_blocks_run_as_written",
)


def pytest_sessionstart(session):
    """Build the CUDA emulation (tests/cuda_emulation.py: half a minute of g++ on a fresh machine)
    in the background from the start, instead of in the first test that needs it while the other
    workers wait for it (a file lock lets one process build; the library is cached by content)."""
    import threading

    from tests import cuda_emulation

    if cuda_emulation.unavailable() is None:
        threading.Thread(target=_build_quietly, args=(cuda_emulation,), daemon=True).start()


def _build_quietly(cuda_emulation) -> None:
    try:
        cuda_emulation.build()
    except Exception:  # noqa: BLE001 - the tests that load it build again and report the error
        pass


def _needs_emulation(item) -> bool:
    """Whether a test runs the emulated CUDA kernels (tests/cuda_emulation.py)."""
    callspec = getattr(item, "callspec", None)
    params = [] if callspec is None else [v for v in callspec.params.values() if isinstance(v, str)]
    return (
        "emulated_cuda_on_cpu" in getattr(item, "fixturenames", ())
        or "cuda_emulation" in item.nodeid
        or "cuda_backends" in item.nodeid
        or "cuda" in params
    )


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (-m gpu tests run on the H100 machine)")
    skip_interp = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (set when there is no GPU)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "triton_cpu" in item.keywords and "gpu" not in item.keywords and not TRITON_ON_CPU:
            item.add_marker(skip_interp)

    def rank(item):
        if _needs_emulation(item):
            return len(SLOW_FIRST) + 1  # last: the CUDA emulation builds in the background meanwhile
        return next((i for i, prefix in enumerate(SLOW_FIRST) if item.nodeid.startswith(prefix)), len(SLOW_FIRST))

    items.sort(key=rank)  # stable: the rest keep their order


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


@pytest.fixture
def set_setting():
    """Change fastdit.settings for one test, restored after it: ``set_setting(attn_ws=True)``
    (what ``FASTDIT_ATTN_WS=1`` does for a process); later calls in the same test stack."""
    import contextlib

    from fastdit import settings

    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(settings.override(**changes))


@pytest.fixture
def emulated_cuda_on_cpu(monkeypatch):
    """The cuda backends dispatchable on CPU tensors, running the emulated csrc/ kernels
    (tests/cuda_emulation.py; the caller skips where it is unavailable)."""
    import dataclasses

    from fastdit.ops import dispatch
    from tests import cuda_emulation

    cuda_emulation.load()
    table = {op: dict(backends) for op, backends in dispatch._BACKENDS.items()}
    for op, backends in table.items():
        if "cuda" in backends:
            fn = backends["cuda"].fn or getattr(torch.ops.fastdit, f"{op}_cuda").default  # rope: the op itself
            backends["cuda"] = dataclasses.replace(backends["cuda"], fn=fn, devices=None, unavailable=None)
    monkeypatch.setattr(dispatch, "_BACKENDS", table)
