"""csrc/ built for the CPU: the CUDA kernels' own source, run by ``csrc/cuda_emulation.h``.

``load()`` compiles every ``csrc/*.cu`` and ``csrc/*.cpp`` with g++ and ``-DFASTDIT_CUDA_EMULATION``
into one shared library, loads it (the ``fastdit::*_cuda`` ops, registered for CPU tensors), and
registers the same fake and autograd functions ``fastdit.ops`` registers for the real extension.
The library is cached by content under ``$FASTDIT_EMULATION_CACHE`` (default ``~/.cache/fastdit``):
about half a minute to build on two cores, nothing when the sources have not changed.

Only for a process without the real ``fastdit._C`` (both define the ``fastdit`` op library).
"""

import fcntl
import hashlib
import importlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils import cpp_extension

CSRC = Path(__file__).resolve().parents[1] / "csrc"
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-fno-strict-aliasing", "-Wno-unknown-pragmas"]


def unavailable() -> str | None:
    """Why the emulation cannot run here, or None."""
    from fastdit._extension import cuda_extension_missing

    if cuda_extension_missing() is None:
        return "the real fastdit._C is loaded (the GPU tests cover the CUDA backends here)"
    if shutil.which("g++") is None:
        return "g++ not found"
    return None


def _sources() -> list[Path]:
    return sorted([*CSRC.glob("*.cu"), *CSRC.glob("*.cpp")])


def _compile_flags() -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in [str(CSRC), *cpp_extension.include_paths()]]
    return [*FLAGS, "-DFASTDIT_CUDA_EMULATION", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes]


def _cache_dir() -> Path:
    """$FASTDIT_EMULATION_CACHE, else ~/.cache/fastdit, else (read-only home) the temp directory."""
    if "FASTDIT_EMULATION_CACHE" in os.environ:
        return Path(os.environ["FASTDIT_EMULATION_CACHE"])
    home = Path.home() / ".cache" / "fastdit"
    try:
        home.mkdir(parents=True, exist_ok=True)
        return home if os.access(home, os.W_OK) else Path(tempfile.gettempdir()) / "fastdit"
    except OSError:
        return Path(tempfile.gettempdir()) / "fastdit"


def _library_path() -> Path:
    digest = hashlib.sha256(torch.__version__.encode())
    digest.update(" ".join(_compile_flags()).encode())
    for src in sorted([*_sources(), *CSRC.glob("*.h"), *CSRC.glob("*.cuh")]):
        digest.update(src.name.encode() + src.read_bytes())
    return _cache_dir() / f"cuda_emulation_{digest.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile csrc/ for the CPU (cached); returns the shared library's path."""
    target = _library_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One build at a time (the test workers of one run all want it): the others wait, then load it.
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            _build(target)
    return target


def _build(target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects, jobs = [], []
        for src in _sources():
            obj = Path(tmp) / f"{src.name}.o"
            cmd = ["g++", "-x", "c++", *_compile_flags(), "-c", str(src), "-o", str(obj)]
            jobs.append((src, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
            objects.append(str(obj))
        for src, job in jobs:
            log, _ = job.communicate()
            if job.returncode != 0:
                raise RuntimeError(f"g++ failed on {src.name} (CUDA emulation build):\n{log}")
        lib_dir = cpp_extension.library_paths()[0]
        link = ["g++", "-shared", "-pthread", *objects, f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}", "-lc10",
                "-ltorch_cpu", "-ltorch", "-o", str(Path(tmp) / "lib.so")]  # fmt: skip
        done = subprocess.run(link, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"linking the CUDA emulation failed:\n{done.stderr}")
        os.replace(Path(tmp) / "lib.so", target)


@lru_cache(maxsize=1)
def load() -> Path:
    """Build, load and register the emulated ``fastdit::*_cuda`` ops once per process."""
    path = build()
    torch.ops.load_library(str(path))
    # The modules, not the public functions of the same names that fastdit.ops exports.
    importlib.import_module("fastdit.ops.rope3d")._register_cuda_ops()
    importlib.import_module("fastdit.ops.adaln_modulate")._register_cuda_op()
    importlib.import_module("fastdit.ops.gated_residual")._register_cuda_op()
    return path
