"""The benchmark harness checks what it times: a provider that raises or computes a wrong result
gets a failed row (not a time), and `fastdit bench` then exits non-zero."""

import json
import math

import pytest
import torch

from fastdit.benchmarks import harness
from fastdit.benchmarks.harness import Report, output_error
from fastdit.cli import main

CPU = torch.device("cpu")
CEILINGS = {"copy_gbps": 10.0, "matmul_tflops": 1.0, "matmul_dtype": "float32", "matmul_n": 1}


def test_measure_checks_then_times(tmp_path):
    report = Report("unit", CPU, CEILINGS, autosave_dir=str(tmp_path))
    x = torch.randn(100)
    ok = report.measure("fastdit-good", "s", lambda: x * 2, reference=x * 2, tolerance=1e-6, nbytes=800.0)
    assert ok["status"] == "ok" and ok["error"] == 0.0 and ok["ms"] > 0 and "gbps" in ok
    wrong = report.measure("fastdit-wrong", "s", lambda: x * 2.1, reference=x * 2, tolerance=1e-3)
    assert wrong["status"] == "failed" and "ms" not in wrong and wrong["error"] == pytest.approx(0.05, rel=1e-2)
    nan = report.measure("fastdit-nan", "s", lambda: x * float("nan"), reference=x, tolerance=1.0)
    assert nan["status"] == "failed" and nan["error"] == "nan"
    shape = report.measure("fastdit-shape", "s", lambda: x[:5], reference=x, tolerance=1.0)
    assert shape["status"] == "failed" and shape["error"] == "inf"

    def crash():
        raise RuntimeError("illegal memory access")

    assert report.measure("fastdit-crash", "s", crash)["status"] == "failed"

    def no_kernel():
        raise RuntimeError("No available kernel. Aborting execution.")

    assert report.measure("sdpa-flash", "s", no_kernel)["status"] == "unsupported"  # a baseline's own limit
    assert report.measure("fastdit-triton", "s", no_kernel)["status"] == "failed"  # never for fastdit
    assert [r["provider"] for r in report.failed] == ["fastdit-wrong", "fastdit-nan", "fastdit-shape",
                                                     "fastdit-crash", "fastdit-triton"]  # fmt: skip
    saved = json.loads((tmp_path / "unit_cpu.json").read_text())
    assert saved["complete"] is False and len(saved["rows"]) == 7
    assert "failed" in report.table() and report.plot(str(tmp_path / "p.png")) in (None, str(tmp_path / "p.png"))


def test_output_error_compares_tuples_elementwise():
    a, b = torch.ones(3), torch.full((3,), 2.0)
    assert output_error((a, b), (a, b)) == 0.0
    assert output_error((a, b), (a, a)) == pytest.approx(1.0)
    assert math.isinf(output_error((a,), (a, b)))


def test_bench_exits_non_zero_when_a_provider_is_wrong(tmp_path, monkeypatch, capsys):
    """fastdit's causal_conv3d made wrong by 2%: its rows fail, the others stay, the run exits 1."""
    import types

    from fastdit import ops
    from fastdit.benchmarks import vae_ops

    wrong = types.SimpleNamespace(**{name: getattr(ops, name) for name in ops.__all__})

    def conv(*args, **kwargs):
        y, cache = ops.causal_conv3d(*args, **kwargs)
        return y * 1.02, cache

    wrong.causal_conv3d = conv
    monkeypatch.setattr(vae_ops, "ops", wrong)
    monkeypatch.setattr(harness, "AUTOSAVE_DIR", None)
    code = main(["bench", "--suite", "vae_ops", "--device", "cpu", "--quick", "--out", str(tmp_path),
                 "--conv-shapes", "4,4,2,5,6", "--vae-ops", "conv3d"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "FAILED rows" in err and "fastdit-cudnn conv3d" in err
    rows = json.loads((tmp_path / "vae_ops_cpu.json").read_text())["rows"]
    failed = {r["provider"] for r in rows if r["status"] == "failed"}
    assert failed == {"fastdit-cudnn"} and all("ms" not in r for r in rows if r["status"] == "failed")
    assert {r["provider"] for r in rows if r["status"] == "ok" and r["shape"].startswith("conv3d")} == {
        "torch-ncdhw",
        "torch-channels-last",
    }


def test_providers_are_timed_round_robin_with_the_order_rotating():
    """Catches timing one provider's whole window after another's (a neighbour's pause then lands
    on one provider only): every round calls each provider once, starting one further along."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = harness.time_interleaved(fns, CPU, warmup=1, min_rounds=3, max_rounds=3, budget_s=0.0)
    assert calls[:3] == ["a", "b", "c"]  # the warm-up, in order
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    stats = harness.summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert stats["ms"] == 3.0 and stats["runs"] == 5 and stats["spread_pct"] == pytest.approx(100 * 2 / 3, rel=1e-3)


def test_memory_bound_rows_are_held_to_a_copy_of_their_own_bytes(tmp_path):
    """Catches pct_of_copy against a copy of other bytes (a 256 MiB DRAM copy for a 256 KiB
    cache-resident op gave rows of 535%): the copy runs in the same rounds, on the same bytes."""
    report = Report("unit", CPU, CEILINGS)
    x = torch.randn(1 << 16)
    nbytes = 2 * x.numel() * 4
    slow = harness.Candidate("eager", lambda: (x * 2).mul_(1.0), nbytes=nbytes)
    rows = report.compare("s", [slow], reference=x * 2, tolerance=1e-6, copy_bytes=nbytes,
                          timing={"budget_s": 0.05})  # fmt: skip
    copy, eager = rows["copy"], rows["eager"]
    assert copy["pct_of_copy"] == 100.0 and copy["gbps"] > 0
    assert eager["pct_of_copy"] == pytest.approx(100 * eager["copy_same_bytes_ms"] / eager["ms"], rel=2e-3)
    assert eager["runs"] >= 5 and "spread_pct" in eager
    fake = report.add("too-fast", "s", 0.5 * copy["ms"], nbytes=nbytes, copy_ms=copy["ms"])
    assert fake["pct_of_copy"] > 100 and "faster than a copy" in fake["note"]


def test_a_result_says_where_it_came_from():
    env = harness.environment(CPU)
    assert env["threads"] == torch.get_num_threads() and env["versions"]["fastdit"]
    assert "loadavg_start" in env and isinstance(env.get("cpu_caches"), dict)
    saved = Report("unit", CPU, CEILINGS).to_json()
    assert "loadavg_end" in saved["environment"]


def test_only_backends_the_dispatcher_may_pick_are_contenders(capsys):
    """Catches rows for paths nobody gets: the reference oracle, and Triton's CPU interpreter
    (selectable only when forced), are never timed as fastdit's speed."""
    inputs = {"device": CPU, "dtype": torch.float32, "head_dim": 64, "causal": False}
    names = harness.selectable_backends("varlen_attention", inputs)
    assert "reference" not in names and "triton" not in names and names == ["torch"]
    assert harness.selectable_backends("causal_conv3d", {"device": CPU, "dtype": torch.float32}) == ["cudnn"]
