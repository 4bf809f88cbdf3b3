import json
import os
import re

import pytest
import torch

from fastdit import settings
from fastdit.cli import info_text, main

THREADS = torch.get_num_threads()


def test_info_lists_the_fastdit_switches_in_effect():
    with settings.override(attn_ws=True):
        assert "switches: " in info_text() and "FASTDIT_ATTN_WS=1" in info_text()
    assert "switches: none set (defaults)" in info_text()


def test_info_lists_every_op_and_why_cuda_is_unavailable():
    text = info_text()
    for op in ("rope3d", "adaln_modulate", "gated_residual", "varlen_attention", "causal_conv3d"):
        assert op in text
    assert "fastdit._C" in text
    assert re.search(r"varlen_attention +reference +available", text)
    # every attention provider is listed, installed or not, with the reason it cannot run here
    for provider in ("sdpa_flash", "cudnn", "sdpa_efficient", "flash_attn", "xformers"):
        assert re.search(rf"varlen_attention +{provider} +(available|unavailable: .+)", text), provider
    assert "attention policy: " in text and "auto varlen_attention on " in text


def test_info_names_the_attention_policy_file_and_a_missing_one(tmp_path):
    """Catches: info printing a stale policy line (the setting's file ignored), or hiding that none exists."""
    assert "attention policy: none for cpu" in info_text()
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"device_type": "cpu", "device": "cpu", "source": {"command": "test"},
                                "choices": {"attention/float32-d16-s64-full": "reference"}}))  # fmt: skip
    with settings.override(attn_policy=str(path)):
        assert f"attention policy: {path} (1 measured shapes on cpu)" in info_text()


def test_bench_tiny_writes_json_rows(tmp_path, capsys):
    args = ["bench", "--suite", "dit_step", "--device", "cpu", "--out", str(tmp_path), "--providers", "fastdit-eager"]
    assert main(args) == 0
    data = json.loads((tmp_path / "dit_step_cpu.json").read_text())
    assert data["complete"] is True
    env = data["environment"]
    assert {"device", "torch", "triton", "date", "command", "switches", "versions", "cpu_caches"} <= set(env)
    assert env["threads"] == 1 and "loadavg_start" in env and "loadavg_end" in env  # one thread on a CPU by default
    assert torch.get_num_threads() == THREADS  # and the caller's own setting restored after
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_tflops"] > 0
    (row,) = data["rows"]
    assert row["provider"] == "fastdit-eager" and row["ms"] > 0 and row["tflops"] > 0
    assert row["runs"] >= 3 and row["spread_pct"] >= 0
    assert "tiny 64x64x9 S=48 L=16" in row["shape"]
    out = capsys.readouterr().out
    assert "fastdit-eager" in out and "pct_of_matmul" in out


def test_report_saves_rows_as_they_come(tmp_path):
    """A run killed half way leaves its measured rows on disk, marked incomplete."""
    from fastdit.benchmarks.harness import Report

    ceilings = {"copy_gbps": 1.0, "matmul_tflops": 1.0, "matmul_dtype": "float32"}
    report = Report("demo", torch.device("cpu"), ceilings, autosave_dir=str(tmp_path))
    report.add("a", "shape 1", 2.0, flops=4e9)
    saved = json.loads((tmp_path / "demo_cpu.json").read_text())
    assert saved["complete"] is False and [r["provider"] for r in saved["rows"]] == ["a"]
    report.add("b", "shape 1", 3.0)
    assert len(json.loads((tmp_path / "demo_cpu.json").read_text())["rows"]) == 2
    report.write(str(tmp_path))
    assert json.loads((tmp_path / "demo_cpu.json").read_text())["complete"] is True
    assert not list(tmp_path.glob("*.partial"))


def test_bench_packed_mixed_batch_rows(tmp_path):
    args = ["bench", "--suite", "dit_step", "--device", "cpu", "--out", str(tmp_path), "--providers", "fastdit-packed"]
    assert main(args) == 0
    rows = json.loads((tmp_path / "dit_step_cpu.json").read_text())["rows"]
    assert [r["provider"] for r in rows] == ["fastdit-packed", "fastdit-one-by-one"]
    assert rows[0]["shape"] == rows[1]["shape"] and rows[0]["shape"].startswith("mixed ")
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in rows)


def test_bench_cold_start_has_no_cpu_row_and_its_child_runs_outside_the_checkout(tmp_path, monkeypatch, capsys):
    """Catches a cold-start row on a CPU (nothing compiles there, so "empty kernel caches" would
    be a false claim), a child run from the repository root (where a checkout could shadow an
    installed package) and a child on other weights than the other providers'."""
    import subprocess

    from fastdit.benchmarks import dit_step
    from fastdit.models import DiT, preset

    args = ["bench", "--suite", "dit_step", "--device", "cpu", "--out", str(tmp_path), "--providers",
            "fastdit-cold-start"]  # fmt: skip
    assert main(args) == 0
    assert json.loads((tmp_path / "dit_step_cpu.json").read_text())["rows"] == []
    assert "no row on a CPU: nothing compiles there" in capsys.readouterr().out

    seen = []
    real_run = subprocess.run

    def spy(cmd, **kwargs):
        env = kwargs["env"]
        caches = [
            os.listdir(env[k]) if os.path.isdir(env[k]) else [] for k in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")
        ]
        seen.append((kwargs["cwd"], env, caches))
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(dit_step.subprocess, "run", spy)
    config = preset("tiny")
    torch.manual_seed(3)
    model = DiT(config).eval()
    weights = model.state_dict()
    cold = dit_step.cold_first_step("tiny", (5, 32, 32), 4, torch.float32, torch.device("cpu"),
                                    {"FASTDIT_ATTN_AUTOTUNE": "0"}, weights=weights)  # fmt: skip
    ((cwd, env, caches),) = seen
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert os.path.realpath(cwd) != os.path.realpath(root) and caches == [[], []]
    assert env["TRITON_CACHE_DIR"].startswith(cwd) and env["FASTDIT_ATTN_AUTOTUNE"] == "0"
    assert cold["step_ms"] > 0 and 0 < cold["first_step_s"] < cold["process_s"] and cold["build_s"] >= 0
    channels, t, h, w = dit_step.latent_shape(config, 5, 32, 32)
    gen = torch.Generator(device="cpu").manual_seed(0)  # the child's inputs
    latents, text = torch.randn(1, channels, t, h, w, generator=gen), torch.randn(1, 4, config.text_dim, generator=gen)
    with torch.inference_mode():
        expect = model(latents, torch.tensor([500.0]), text)
    assert torch.allclose(cold["output"], expect, rtol=1e-5, atol=1e-6)  # the same weights


@pytest.mark.bad_input
def test_bench_rejects_unknown_provider(tmp_path):
    with pytest.raises(SystemExit, match="unknown providers"):
        main(["bench", "--suite", "dit_step", "--out", str(tmp_path), "--providers", "tensorrt"])


def test_bench_memory_ops_rows_for_every_provider(tmp_path):
    """Every provider a user can get, each group with a copy of its own bytes; no row for Triton's
    CPU interpreter (a path nobody gets) and none for the reference oracle."""
    args = ["bench", "--suite", "memory_ops", "--device", "cpu", "--quick", "--out", str(tmp_path),
            "--mem-grid", "1,2,4"]  # fmt: skip
    assert main(args + ["--mem-ops", "rope3d_qk,gated_residual_modulate"]) == 0
    data = json.loads((tmp_path / "memory_ops_cpu.json").read_text())
    seen = {(r["provider"], r["shape"].split(" S=")[0]) for r in data["rows"]}
    for op in ("rope3d_qk", "gated_residual_modulate"):
        for provider in ("eager", "torch.compile", "fastdit-torch", "copy"):
            assert (provider, f"{op} fwd") in seen and (provider, f"{op} bwd") in seen
    assert not {p for p, _ in seen} - {"eager", "torch.compile", "fastdit-torch", "copy"}
    for row in data["rows"]:
        assert row["gbps"] > 0 and row["pct_of_copy"] == pytest.approx(100 * row["copy_same_bytes_ms"] / row["ms"],
                                                                      rel=2e-3)  # fmt: skip


def test_bench_attention_rows(tmp_path):
    args = ["bench", "--suite", "attention", "--device", "cpu", "--quick", "--out", str(tmp_path)]
    policy_path = str(tmp_path / "policy.json")
    assert main(args + ["--attn-seqlens", "33", "--attn-head-dims", "16", "--attn-mask-seqlen", "50",
                        "--policy-out", policy_path]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "attention_cpu.json").read_text())["rows"]
    providers = {r["provider"] for r in rows}
    # no interpreter rows, no GPU-only variants, no oracle; the two mask forms' two providers
    assert providers == {"sdpa-math", "fastdit-torch", "sdpa-masked", "fastdit-varlen-from-mask"}
    assert {r["shape"].split(" ")[0] + " " + r["shape"].split(" ")[1] for r in rows} == {
        "fwd dense", "bwd dense", "fwd packed", "bwd packed", "fwd key-padding", "fwd valid_q"}  # fmt: skip
    assert all(r["tflops"] > 0 and r["runs"] >= 5 and r["status"] == "ok" for r in rows)
    for form in ("key-padding", "valid_q & valid_k"):
        masked = {r["provider"]: r for r in rows if form in r["shape"]}
        assert masked["sdpa-masked"]["flops"] == masked["fastdit-varlen-from-mask"]["flops"]  # the same work counted
    # the policy it wrote: the measured fastdit providers per key, read back by the dispatcher
    # (catches writer and reader keys that disagree: a policy that never decides anything)
    policy = json.loads(open(policy_path).read())
    assert policy["choices"] == {
        "attention/float32-d16-s64-full": "torch",
        "varlen_attention/float32-d16-s128-full": "torch",
    }
    assert (
        policy["ms"]["attention/float32-d16-s64-full"]["torch"] > 0 and policy["source"]["torch"] == torch.__version__
    )
    from fastdit import ops
    from fastdit.ops import dispatch

    q = torch.randn(1, 33, 2, 16)
    with settings.override(attn_policy=policy_path), dispatch.trace() as log:
        ops.attention(q, q, q)
    assert log.sources[("attention", "torch")] == f"policy: {policy_path}"


def test_attention_variant_environment_is_exact_and_restored(set_setting):
    from fastdit.benchmarks.attention import variant_environment, with_variants

    set_setting(attn_tma=True)  # a stray switch must not leak into other variants
    with variant_environment({"attn_ws": True}):
        assert settings.get().attn_ws and not settings.get().attn_tma
    assert settings.get().attn_tma and not settings.get().attn_ws
    providers = with_variants({"sdpa-cudnn": len, "fastdit-triton": abs})
    assert list(providers)[:2] == ["sdpa-cudnn", "fastdit-triton"]
    assert providers["fastdit-triton"] == (abs, {}, True)
    assert providers["fastdit-triton+ws"] == (abs, {"attn_ws": True}, False)


def test_bench_vae_rows(tmp_path):
    args = ["bench", "--suite", "vae", "--device", "cpu", "--quick", "--out", str(tmp_path)]
    assert main(args + ["--vae-size", "32x32x5", "--vae-providers", "fastdit-eager,diffusers-eager"]) == 0
    rows = json.loads((tmp_path / "vae_cpu.json").read_text())["rows"]
    assert {(r["provider"], r["shape"].split()[0]) for r in rows} >= {
        ("fastdit-eager", "decode"),
        ("fastdit-eager", "encode"),
    }
    assert all(r["ms"] > 0 for r in rows)


def _flags(parser):
    """(parser, action) for every option of every (sub)command."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _flags(sub)
        elif action.option_strings and action.dest != "help":
            yield parser, action


def test_every_flag_has_help_with_its_default_and_no_markup():
    from fastdit.cli import build_parser

    parser = build_parser()
    flags = list(_flags(parser))
    assert len(flags) > 40
    for sub, action in flags:
        where = f"{sub.prog} {action.option_strings[0]}"
        assert action.help and action.help.strip(), f"{where} has no help text"
        assert "``" not in action.help and ":class:" not in action.help, f"{where}: reStructuredText in its help"
        assert not sub.allow_abbrev, f"{sub.prog} accepts abbreviated flags"
    text = parser._subparsers._group_actions[0].choices["generate"].format_help()
    assert "(default: 64x96)" in text and "(default: 5.0)" in text and "--prompt PROMPT" in text
    assert "``" not in parser.format_help()


def test_bench_writes_outside_the_checkout_by_default_and_names_a_missing_matplotlib(tmp_path, monkeypatch, capsys):
    import importlib.util

    from fastdit.benchmarks import harness
    from fastdit.cli import build_parser

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert build_parser().parse_args(["bench"]).out == str(tmp_path / "cache" / "fastdit" / "bench")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    args = ["bench", "--suite", "dit_step", "--device", "cpu", "--providers", "fastdit-eager"]
    assert main(args) == 0
    assert "no PNG plots: matplotlib is not installed" in capsys.readouterr().err
    assert (tmp_path / "cache" / "fastdit" / "bench" / "dit_step_cpu.json").exists()
    assert harness.matplotlib_missing() is not None


def test_commands_other_than_bench_import_no_benchmark_code():
    """Catches `fastdit generate` / `info` / `export` importing the whole benchmark suite (and its
    plotting and harness code) just to build the parser."""
    import subprocess
    import sys

    code = (
        "import sys; from fastdit.cli import build_parser, main; build_parser(bench=False); main(['info']); "
        "print('LOADED', sorted(m for m in sys.modules if m.startswith('fastdit.benchmarks')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED []" in out.stdout, out.stdout[-500:]
    with pytest.raises(SystemExit):  # and `fastdit bench` still has its suites' flags
        main(["bench", "--suite", "nope"])
