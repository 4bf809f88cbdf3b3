"""Build script for the optional CUDA extension ``fastdit._C``.

Everything else (metadata, packages) is in pyproject.toml. The extension is built only when the
installed torch has CUDA and nvcc is found; otherwise the build prints why it skipped and fastdit
installs without its ``cuda`` backend. Install with ``pip install --no-build-isolation`` so the
build sees the torch you run with.

Environment:
  FASTDIT_SKIP_CUDA_BUILD=1   never build the extension
  FASTDIT_CUDA_ARCHS          semicolon/comma separated SM targets, default "90a" (H100/H200)
  MAX_JOBS                    parallel nvcc jobs; default from cores and memory (~4 GiB per job)
"""

import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_skip_reason():
    if os.environ.get("FASTDIT_SKIP_CUDA_BUILD", "0") == "1":
        return "FASTDIT_SKIP_CUDA_BUILD=1"
    try:
        import torch
    except ImportError:
        return "torch is not importable in the build environment (install with --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def _default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8.0
    return max(1, min(cores, int(mem_gib // 4)))


def _gencode_flags(archs):
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _extensions():
    reason = _cuda_skip_reason()
    if reason is not None:
        print(f"fastdit: skipping the CUDA extension fastdit._C: {reason}; the 'cuda' backend will be unavailable")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    archs = os.environ.get("FASTDIT_CUDA_ARCHS", "90a")
    sources = sorted(
        os.path.relpath(p, HERE)
        for pattern in ("csrc/**/*.cpp", "csrc/**/*.cu")
        for p in glob.glob(os.path.join(HERE, pattern), recursive=True)
    )
    print(f"fastdit: building fastdit._C for sm_{archs} from {len(sources)} sources, MAX_JOBS={os.environ['MAX_JOBS']}")
    ext = CUDAExtension(
        name="fastdit._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "-lineinfo", *_gencode_flags(archs)],
        },
    )
    return [ext], {"build_ext": BuildExtension}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its helpers
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
