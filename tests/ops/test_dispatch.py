import logging

import pytest
import torch

from fastdit import ops
from fastdit.ops import dispatch
from fastdit.ops.dispatch import Backend, BackendNotSupportedError, register_backend, select_backend, set_priority
from tests.conftest import packed_cu

PUBLIC_OPS = [
    "rope3d",
    "rope3d_qk",
    "adaln_modulate",
    "gated_residual",
    "gated_residual_modulate",
    "varlen_attention",
    "attention",
    "causal_conv3d",
    "rms_norm_silu",
    "rms_norm",
]


@pytest.fixture
def toy_op(monkeypatch):
    """A throwaway op with a fast backend that only takes cuda fp16, to drive the dispatcher."""
    monkeypatch.setattr(dispatch, "_BACKENDS", dict(dispatch._BACKENDS))
    monkeypatch.setattr(dispatch, "_PRIORITY", dict(dispatch._PRIORITY))
    dispatch._log_fallback_once.cache_clear()
    register_backend(Backend("toy", "reference", lambda: "ref", devices=None, dtypes=(torch.float32, torch.float16)))
    register_backend(
        Backend(
            "toy",
            "triton",
            lambda: "fast",
            devices=("cuda",),
            dtypes=(torch.float16,),
            check=lambda inputs: [] if inputs.get("head_dim") == 64 else [f"head_dim {inputs.get('head_dim')} != 64"],
        )
    )
    return "toy"


def test_every_public_op_has_a_reference_backend():
    for name in PUBLIC_OPS:
        assert "reference" in ops.backends(name)
        assert callable(getattr(ops, name))


def test_priority_order_picks_first_fitting(toy_op):
    cuda = torch.device("cuda")
    assert select_backend(toy_op, {"device": cuda, "dtype": torch.float16, "head_dim": 64}).name == "triton"
    assert select_backend(toy_op, {"device": cuda, "dtype": torch.float32, "head_dim": 64}).name == "reference"
    set_priority(toy_op, ["reference", "triton"])
    assert select_backend(toy_op, {"device": cuda, "dtype": torch.float16, "head_dim": 64}).name == "reference"


def test_gpu_fallback_is_logged_once_with_reasons(toy_op, caplog):
    inputs = {"device": torch.device("cuda"), "dtype": torch.float16, "head_dim": 96}
    with caplog.at_level(logging.WARNING, logger="fastdit"):
        select_backend(toy_op, inputs)
        select_backend(toy_op, inputs)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "runs the reference backend" in messages[0] and "head_dim 96 != 64" in messages[0]


def test_gpu_reference_without_fast_backend_is_logged(toy_op, monkeypatch, caplog):
    monkeypatch.setitem(dispatch._BACKENDS, toy_op, {"reference": dispatch._BACKENDS[toy_op]["reference"]})
    with caplog.at_level(logging.WARNING, logger="fastdit"):
        select_backend(toy_op, {"device": torch.device("cuda"), "dtype": torch.float16, "head_dim": 64})
    assert [r.getMessage() for r in caplog.records] == [
        "fastdit.toy on cuda runs the reference backend: no fast backend exists for this op yet"
    ]


def test_cpu_reference_is_silent(toy_op, caplog):
    with caplog.at_level(logging.WARNING, logger="fastdit"):
        select_backend(toy_op, {"device": torch.device("cpu"), "dtype": torch.float16, "head_dim": 64})
    assert not caplog.records


def test_forced_backend_that_does_not_fit_raises_with_reasons(toy_op):
    inputs = {"device": torch.device("cpu"), "dtype": torch.float32, "head_dim": 96}
    with pytest.raises(
        BackendNotSupportedError, match=r"'triton' \(from backend= argument\).*device cpu.*dtype float32"
    ):
        select_backend(toy_op, inputs, backend="triton")
    with pytest.raises(BackendNotSupportedError, match="does not exist for this op"):
        select_backend(toy_op, inputs, backend="cuda")


def test_env_forces_backend(toy_op, set_setting):
    inputs = {"device": torch.device("cuda"), "dtype": torch.float16, "head_dim": 64}
    set_setting(backend="reference")
    assert select_backend(toy_op, inputs).name == "reference"
    set_setting(backend="toy=reference,rope3d=reference")
    assert select_backend(toy_op, inputs).name == "reference"
    # A global name applies only to ops that have that backend ...
    set_setting(backend="cuda")
    assert select_backend(toy_op, inputs).name == "triton"
    # ... a per-op name must exist.
    set_setting(backend="toy=cuda")
    with pytest.raises(BackendNotSupportedError, match="FASTDIT_BACKEND=toy=cuda"):
        select_backend(toy_op, inputs)


def test_nothing_fits_lists_every_backend(toy_op, monkeypatch):
    monkeypatch.setitem(dispatch._BACKENDS, toy_op, {"triton": dispatch._BACKENDS[toy_op]["triton"]})
    with pytest.raises(BackendNotSupportedError, match="no backend can run these inputs: triton: device cpu"):
        select_backend(toy_op, {"device": torch.device("cpu"), "dtype": torch.float16, "head_dim": 64})


def test_cuda_backend_reports_missing_extension_on_cpu():
    res, y, gate = torch.randn(4, 8), torch.randn(4, 8), torch.randn(1, 8)
    with pytest.raises(BackendNotSupportedError, match="backend 'cuda'.*fastdit._C"):
        ops.gated_residual(res, y, gate, packed_cu([4]), backend="cuda")


@pytest.mark.bad_input
def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="unknown backend names"):
        set_priority("rope3d", ["fastest"])


# ---- model_backend: a model-wide choice reaching every op called inside it -------------------------


def _rms_norm_backend(backend=None) -> str:
    with dispatch.trace() as log:
        ops.rms_norm(torch.randn(3, 8), torch.ones(8), eps=1e-5, backend=backend)
    return log[-1][1]


def test_model_backend_forces_ops_called_without_backend_and_restores():
    """Catches the block's choice ignored, kept after the block (a later model silently on the
    reference), or a stale eager choice cache (the cache key must include the block)."""
    assert _rms_norm_backend() == "torch"  # the CPU default
    with dispatch.trace() as log, dispatch.model_backend("reference", "MyModel"):
        ops.rms_norm(torch.randn(3, 8), torch.ones(8), eps=1e-5)
    assert log == [("rms_norm", "reference")]
    assert log.sources[("rms_norm", "reference")] == "forced by MyModel(backend='reference')"
    assert _rms_norm_backend() == "torch"
    with dispatch.model_backend("reference"):
        assert _rms_norm_backend("torch") == "torch"  # an explicit backend= still wins
        with dispatch.model_backend(None):  # None leaves the enclosing choice
            assert _rms_norm_backend() == "reference"
        with dispatch.model_backend("torch"):  # nests
            assert _rms_norm_backend() == "torch"
        assert _rms_norm_backend() == "reference"
        assert dispatch.scoped_backend("rms_norm") == "reference"
    assert dispatch.scoped_backend("rms_norm") is None


def test_model_backend_is_restored_after_an_exception_and_skips_ops_without_that_backend():
    """Catches a choice leaked by an exception inside the block, and a name forced onto an op that
    lacks it (``cudnn`` names the conv's and attention's backends, not rms_norm's)."""
    with pytest.raises(ZeroDivisionError), dispatch.model_backend("reference"):
        _ = 1 / 0
    assert _rms_norm_backend() == "torch"
    assert "cudnn" not in dispatch.backends("rms_norm")
    with dispatch.model_backend("cudnn"):
        assert _rms_norm_backend() == "torch" and dispatch.scoped_backend("rms_norm") is None


def test_model_backend_wins_over_the_setting(set_setting):
    """Catches FASTDIT_BACKEND overriding a model's explicit choice (as it never overrode backend=)."""
    set_setting(backend="torch")
    with dispatch.model_backend("reference"):
        assert _rms_norm_backend() == "reference"
    assert _rms_norm_backend() == "torch"


def test_model_backend_is_per_thread():
    """Catches a process-wide choice: a model on one thread would force its backend on another
    thread's model (the server runs models from worker threads)."""
    import threading

    inside, seen = threading.Event(), {}

    def other():
        inside.wait(timeout=30)
        seen["other"] = dispatch.forced_backend("rms_norm", None)[0]

    thread = threading.Thread(target=other)
    thread.start()
    with dispatch.model_backend("reference"):
        inside.set()
        thread.join(timeout=30)
        seen["mine"] = dispatch.forced_backend("rms_norm", None)[0]
    assert seen == {"other": None, "mine": "reference"}


@pytest.mark.bad_input
def test_model_backend_refuses_an_unknown_name():
    """Catches a typo taken for "no choice" (the model would run on the defaults, silently)."""
    with pytest.raises(ValueError, match="unknown backend 'tritn'"):
        dispatch.model_backend("tritn")


def test_model_backend_traces_under_torch_compile():
    """Catches a choice torch.compile cannot trace (a graph break per model call, or the
    block's choice lost inside a compiled region): compiled with fullgraph on the eager backend."""
    from fastdit.models import DiT, PackedBatch

    torch.manual_seed(0)
    model = DiT.from_preset("tiny", backend="reference").eval()
    batch = PackedBatch.from_samples([torch.randn(16, 1, 4, 4)], [500.0], [torch.randn(3, 32)])
    batch.validate()
    model.check_batch(batch)
    with torch.no_grad():
        eager = model.forward_validated(batch)
        compiled = torch.compile(model.forward_validated, fullgraph=True, backend="eager")
        with dispatch.trace() as log:
            out = compiled(batch)
    assert torch.equal(out, eager)
    assert log and {name for _, name in log} == {"reference"}
