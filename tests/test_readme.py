"""What the README states about the suite stays true of the suite."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


OPTIONAL = ("diffusers", "onnx", "onnxruntime", "onnxscript", "imageio", "triton")  # modules that skip whole


def _bad_input_cases(session) -> int:
    """The suite's bad_input cases: counted from this session's own collection when it holds the
    whole suite (the README's command; every xdist worker collects it all), else collected again."""
    tests = os.path.join(ROOT, "tests")
    paths = [os.path.realpath(os.path.join(session.config.invocation_params.dir, a)) for a in session.config.args]
    whole = bool(paths) and all(p in (tests, ROOT) for p in paths)
    if whole and not session.config.getoption("-m") and not session.config.getoption("-k"):
        return sum(1 for item in session.items if item.get_closest_marker("bad_input") is not None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", "-m", "bad_input", "tests"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    collected = re.search(r"(\d+)/\d+ tests collected", proc.stdout)
    assert collected, proc.stdout[-2000:] + proc.stderr[-2000:]
    return int(collected.group(1))


def test_the_bad_input_count_in_the_readme_is_the_suites(request):
    missing = [name for name in OPTIONAL if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"the README counts the full suite; {missing} missing here")
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        stated = re.search(r"The suite tries them in (\d+) test cases", f.read())
    assert stated, "the README's reliability paragraph lost its count"
    assert int(stated.group(1)) == _bad_input_cases(request.session), "update the README's count of bad-input cases"
