"""The install layout: fastdit.kernels from kernels/, and setup.py's CUDA build decisions."""

import importlib.util
import os

import torch

import fastdit.benchmarks
import fastdit.kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_module():
    spec = importlib.util.spec_from_file_location("fastdit_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines helpers only: setup() runs under __main__
    return module


def test_kernels_and_benchmarks_install_under_fastdit():
    assert os.path.basename(os.path.dirname(fastdit.kernels.__file__)) == "kernels"
    assert os.path.basename(os.path.dirname(fastdit.benchmarks.__file__)) == "benchmarks"
    reason = fastdit.kernels.triton_missing()
    assert reason is None or "triton" in reason


def test_cuda_build_skip_reasons(monkeypatch):
    setup = _setup_module()
    monkeypatch.setenv("FASTDIT_SKIP_CUDA_BUILD", "1")
    assert setup._cuda_skip_reason() == "FASTDIT_SKIP_CUDA_BUILD=1"
    monkeypatch.delenv("FASTDIT_SKIP_CUDA_BUILD")
    if torch.version.cuda is None:
        assert "CPU build" in setup._cuda_skip_reason()
    assert setup._extensions() == ([], {}) or torch.version.cuda is not None


def test_cuda_arch_flags_and_jobs():
    setup = _setup_module()
    assert setup._gencode_flags("90a") == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert setup._gencode_flags("80; 90a,100a") == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_100a,code=sm_100a",
    ]
    assert 1 <= setup._default_max_jobs() <= (os.cpu_count() or 1)
