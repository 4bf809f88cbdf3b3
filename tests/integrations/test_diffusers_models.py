"""Every diffusers video transformer (and the image ones that share their attention code), built
from a tiny random config and patched by ``fastdit.patch``: every attention call its default
backend ran is served by fastdit (none escapes to torch SDPA, none is reported as a fallback),
text-padding masks run on the varlen kernel, and forward and input gradients equal the unpatched
model's (fp32, rel err <= 1e-5). The README's support table is this survey's output
(scripts/diffusers_support.py)."""

import re

import pytest

pytest.importorskip("diffusers", reason="the drop-in survey needs `pip install -e .[diffusers]`")

import diffusers  # noqa: E402

from tests.integrations.tiny_diffusers import MODELS, survey  # noqa: E402

# Video transformers of the newest diffusers that the survey does not build yet, and why.
NOT_SURVEYED = {
    "AnyFlowFARTransformer3DModel": "its causal chunk attention needs diffusers' flex backend (a BlockMask), which "
    "fastdit.patch leaves and names; FlexAttention has no CPU backward for the survey's gradients",
    "Kandinsky6SRTransformer3DModel": "its NABLA sparse attention is a flex-attention BlockMask on diffusers' flex "
    "backend, which fastdit.patch leaves and names (tests/integrations/test_diffusers_registry.py)",
    "WanAnimate2Transformer3DModel": "takes per-sample lists of latents and a KV cache it fills in one pass and "
    "reads in the next; the survey's harness runs one forward on tensors",
}


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("spec", MODELS, ids=[m.cls for m in MODELS])
def test_every_attention_call_is_served_and_the_model_is_unchanged(spec, backend):
    """Catches a processor that bypasses diffusers' dispatcher running torch SDPA silently (escaped),
    a mask form sent to the fallback (reported), a text-padding mask run dense instead of varlen,
    and any semantic drift (scale, GQA, causal alignment, mask reading) in output or gradients.
    The 'reference' backend is fastdit's own float math, so a zero error cannot come from torch
    running the same kernel twice."""
    if not hasattr(diffusers, spec.cls):
        pytest.skip(f"diffusers {diffusers.__version__} has no {spec.cls}")
    result = survey(spec, backend=backend)
    assert result.error is None, result.error
    assert result.native_sdpa_calls > 0
    assert result.served >= result.native_sdpa_calls, (result.served, result.native_sdpa_calls)
    assert result.escaped == 0 and result.fallbacks == 0, (result.escaped, result.fallbacks)
    assert result.varlen == result.native_masked  # every masked call on the varlen kernel
    assert result.accurate(), (result.out_err, result.grad_err, result.against_exact)
    # the patch says what it changed and what it left
    assert any("fastdit" in line for line in result.changes)
    if spec.cls != "WanTransformer3DModel":
        assert any("left" in line and "RoPE and adaLN" in line for line in result.changes)


def test_the_survey_covers_every_video_transformer_of_this_diffusers():
    """Catches a video transformer added by a new diffusers release that nobody surveyed: each
    ``*Transformer3DModel`` is either built here or named with a reason."""
    video = {n for n in dir(diffusers) if re.fullmatch(r"\w+Transformer3DModel", n)}
    surveyed = {m.cls for m in MODELS}
    missing = sorted(video - surveyed - set(NOT_SURVEYED))
    assert not missing, f"video transformers neither surveyed nor listed: {missing}"


def _support_script():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "diffusers_support.py")
    spec = importlib.util.spec_from_file_location("diffusers_support", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cells(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]


def test_the_readme_support_table_is_this_survey():
    """Catches a README table edited by hand or left behind by a change: every cell but the two
    error columns must equal a fresh survey's (the errors may differ in the last digit across
    machines' BLAS), and the README's errors must be within 1e-5 or state the exact-attention check."""
    script = _support_script()
    readme = script.current()
    measured_with = re.search(r"Measured with diffusers ([\d.]+)\.", readme)
    assert measured_with, "the table lost its diffusers version line"
    if measured_with.group(1) != diffusers.__version__:
        pytest.skip(f"the README's table is measured with diffusers {measured_with.group(1)}")
    fresh = _cells("\n".join(script.rows()))
    stated = _cells(readme)
    assert [row[:-2] for row in stated] == [row[:-2] for row in fresh]
    for row in stated[1:]:  # within 1e-5, or as close to exact attention as the default (said in the cell)
        assert all(float(cell.split()[0]) <= 1e-5 or "exact attention" in cell for cell in row[-2:]), row
