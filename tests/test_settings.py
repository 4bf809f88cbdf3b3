"""fastdit.settings: the FASTDIT_* switches read once, typed, validated, overridden explicitly."""

import os
import pathlib
import re
import warnings

import pytest

from fastdit import settings

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_environment_is_parsed_into_typed_fields():
    parsed = settings.from_environ(
        {"FASTDIT_ATTN_WS": "1", "FASTDIT_CHECK_INPUTS": "off", "FASTDIT_BACKEND": " rope3d=triton ", "HOME": "/x"}
    )
    assert parsed.attn_ws is True and parsed.check_inputs is False and parsed.backend == "rope3d=triton"
    assert parsed.attn_tma is False and parsed.conv_autotune is True  # unset: defaults
    assert settings.from_environ({}) == settings.DEFAULTS


@pytest.mark.bad_input
def test_a_bad_value_names_the_variable():
    with pytest.raises(ValueError, match=r"FASTDIT_ATTN_TMA='yes please': expected 0 or 1"):
        settings.from_environ({"FASTDIT_ATTN_TMA": "yes please"})


@pytest.mark.bad_input
def test_an_unknown_name_is_warned_about_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settings.from_environ({"FASTDIT_ATN_WS": "1", "FASTDIT_BAKEND": "triton", "FASTDIT_SKIP_CUDA_BUILD": "1"})
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "FASTDIT_ATN_WS" in messages[0] and "FASTDIT_BAKEND" in messages[0]
    assert "FASTDIT_SKIP_CUDA_BUILD" not in messages[0]  # read by setup.py: known, not warned about


def test_override_nests_and_restores():
    before = settings.get()
    with settings.override(attn_ws=True) as outer:
        assert settings.get() is outer and outer.attn_ws
        with settings.override(attn_tma=True, attn_ws=False):
            assert settings.get().attn_tma and not settings.get().attn_ws
        assert settings.get().attn_ws and not settings.get().attn_tma
    assert settings.get() == before


def test_override_restores_after_an_error():
    before = settings.get()
    with pytest.raises(RuntimeError), settings.override(conv_tma=True):
        raise RuntimeError("inside")
    assert settings.get() == before


@pytest.mark.bad_input
def test_override_checks_names_and_types():
    with pytest.raises(TypeError, match="unknown fastdit setting 'attn_warp'"), settings.override(attn_warp=True):
        pass
    with pytest.raises(TypeError, match="attn_ws must be a bool"), settings.override(attn_ws="1"):
        pass


def test_the_environment_is_read_once(monkeypatch):
    monkeypatch.setenv("FASTDIT_ATTN_WS", "1")  # after import: no effect, by design
    assert settings.get().attn_ws is False


def test_as_environ_reproduces_the_settings():
    with settings.override(attn_ws=True, conv_policy="/tmp/p.json", check_inputs=False):
        env = settings.as_environ()
        assert env == {"FASTDIT_ATTN_WS": "1", "FASTDIT_CONV_POLICY": "/tmp/p.json", "FASTDIT_CHECK_INPUTS": "0"}
        assert settings.from_environ(env) == settings.get()
    assert settings.as_environ() == {}
    assert settings.from_switches({"FASTDIT_ATTN_WS": "1"}) == {"attn_ws": True}
    with pytest.raises(ValueError, match="unknown fastdit setting"):
        settings.from_switches({"FASTDIT_NOPE": "1"})


def test_no_other_module_reads_a_fastdit_variable():
    """The package, its kernels and benchmarks read FASTDIT_* through fastdit.settings only
    (setup.py reads its build-time names; subprocess environments are built from as_environ)."""
    pattern = re.compile(r"os\.environ(\.get)?[\[\(]\s*[\"']FASTDIT_|getenv\(\s*[\"']FASTDIT_")
    offenders = []
    for folder in ("fastdit", "kernels", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "settings.py" and path.parent.name == "fastdit":
                continue
            if pattern.search(path.read_text(encoding="utf-8")):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders
    assert "FASTDIT_" not in "".join(k for k in os.environ if k != "FASTDIT_EMULATION_CACHE")
