"""The install layout: fastdit.kernels from kernels/, nothing at the root shadowing a published
package, and setup.py's CUDA build decisions."""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import fastdit.benchmarks.suite
import fastdit.kernels.launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The import names a checkout's root may hold (a package folder with __init__.py, or a module).
OURS = {"fastdit", "tests", "setup"}


def _setup_module():
    spec = importlib.util.spec_from_file_location("fastdit_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines helpers only: setup() runs under __main__
    return module


def test_kernels_and_benchmarks_install_under_fastdit():
    """Catches: the fastdit/kernels link pointing elsewhere, or an __init__.py creeping back."""
    for name, package in (("kernels", fastdit.kernels), ("benchmarks", fastdit.benchmarks)):
        (folder,) = package.__path__  # a namespace package inside fastdit: one folder, no __init__
        assert package.__file__ is None
        assert os.path.realpath(folder) == os.path.realpath(os.path.join(ROOT, name))
    assert "attention" in fastdit.benchmarks.suite.SUITE
    reason = fastdit.kernels.launch.triton_missing()
    assert reason is None or "triton" in reason


def _root_import_names() -> set[str]:
    names = set()
    for entry in os.listdir(ROOT):
        path = os.path.join(ROOT, entry)
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "__init__.py")):
            names.add(entry)
        elif entry.endswith(".py"):
            names.add(entry.removesuffix(".py"))
    return names


def test_nothing_at_the_root_takes_an_import_name_of_another_distribution():
    """Catches: `kernels/__init__.py` (or a `benchmarks/__init__.py`, a `utils.py`) at the root,
    which Python run from a checkout imports instead of the published package of that name."""
    names = _root_import_names()
    assert names <= OURS, f"importable from the repository root: {sorted(names - OURS)}"
    assert not {"kernels", "benchmarks"} & names
    owners = importlib.metadata.packages_distributions()
    taken = {name: owners[name] for name in names if set(owners.get(name, ())) - {"fastdit"}}
    assert not taken, f"root import names owned by installed distributions: {taken}"


def _from_root(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` run from the repository root, as a user of a clone runs Python."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_published_kernels_package_and_diffusers_pipelines_from_the_repository_root():
    """Catches the 2026-12-05 break: transformers imports PyPI's `kernels`; from the root it got
    ours and every diffusers pipeline import failed (`cannot import name 'CUDAProperties'`)."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        dist = None  # PyPI's kernels is not installed here (transformers >= 5 installs it)
    diffusers = importlib.util.find_spec("diffusers") is not None
    if dist is None and not diffusers:
        pytest.skip("neither PyPI's kernels nor diffusers is installed here")
    code = "import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec and spec.origin)"
    if diffusers:
        code += "; from diffusers import WanPipeline, AutoencoderKLWan; print('diffusers ok')"
    done = _from_root(code)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    if dist is not None:
        where = os.path.realpath(lines[0])
        assert where == os.path.realpath(str(dist.locate_file("kernels/__init__.py"))), where
        assert not where.startswith(os.path.realpath(ROOT) + os.sep)
    if diffusers:
        assert lines[-1] == "diffusers ok"


def test_python_m_fastdit_runs_from_the_repository_root():
    done = subprocess.run([sys.executable, "-m", "fastdit", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bench" in done.stdout


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


def test_every_package_of_the_tree_is_in_the_wheel():
    """Catches a new sub-package (``fastdit/models/wan``) missing from pyproject's explicit package
    list: an editable install imports it from the checkout, a wheel would not contain it."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {
        os.path.relpath(folder, ROOT).replace(os.sep, ".")
        for folder, _, files in os.walk(os.path.join(ROOT, "fastdit"))
        if "__init__.py" in files and "__pycache__" not in folder
    }
    assert found - listed == set(), sorted(found - listed)
