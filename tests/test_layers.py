"""The layering rules of docs/design.md, read from the imports of every module."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_OPS = {"dispatch", "validation", "_common", "_registry"}


def imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def modules(folder: str):
    return sorted((ROOT / folder).glob("*.py"))


OP_MODULES = [p for p in modules("fastdit/ops") if p.stem not in SHARED_OPS | {"__init__"}]
# An op split over several modules: each may import the others of its own group only.
OP_GROUPS = {"attention": {"attention", "attention_providers", "attention_policy"}}


def _group(stem: str) -> set[str]:
    return next((group for group in OP_GROUPS.values() if stem in group), {stem})


@pytest.mark.parametrize("path", OP_MODULES, ids=lambda p: p.name)
def test_an_op_imports_no_other_op(path):
    others = {f"fastdit.ops.{p.stem}" for p in modules("fastdit/ops")} - {f"fastdit.ops.{s}" for s in SHARED_OPS}
    own = {f"fastdit.ops.{stem}" for stem in _group(path.stem)}
    named = {n for n in imports(path) if n != "fastdit.ops"}  # `from fastdit.ops import x` names x itself
    assert not named & (others - own)


@pytest.mark.parametrize("path", modules("fastdit/ops"), ids=lambda p: p.name)
def test_an_op_imports_no_private_reference_name(path):
    reference = [name for name in imports(path) if name.startswith("fastdit.reference.")]
    assert not [name for name in reference if name.rsplit(".", 1)[-1].startswith("_")]


@pytest.mark.parametrize("path", modules("fastdit/reference"), ids=lambda p: p.name)
def test_the_reference_uses_no_fast_path(path):
    assert not {n for n in imports(path) if n.startswith(("fastdit.ops", "fastdit.kernels", "fastdit.models"))}


@pytest.mark.parametrize("path", modules("kernels"), ids=lambda p: p.name)
def test_kernels_know_nothing_of_ops_models_or_settings(path):
    banned = ("fastdit.ops", "fastdit.models", "fastdit.settings", "fastdit.runtime", "fastdit.integrations")
    assert not {n for n in imports(path) if n.startswith(banned) or n == "fastdit.settings"}
    assert "os.environ" not in path.read_text(encoding="utf-8") or path.name == "launch.py"


def _private_names(folder: str) -> set[str]:
    """Names a package keeps to itself: its functions, classes and attributes starting with one ``_``."""
    names = set()
    for path in modules(folder):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


OUTSIDE_MODELS = [p for p in sorted(ROOT.glob("fastdit/**/*.py")) if "models" not in p.parts] + modules("benchmarks")


@pytest.mark.parametrize("path", OUTSIDE_MODELS, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_outside_the_models_uses_their_private_names(path):
    """The runtime, export, integrations and benchmarks call models through documented methods
    (``forward_validated``, ``attention_hook``, ``decode_patchified``, ...), never a ``_private``
    one: a model's internals can then change without breaking them. ``self._x`` (the caller's own
    attribute of the same name) is not a use."""
    private = _private_names("fastdit/models")
    used = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr in private:
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                used.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastdit.models"):
            used += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.startswith("_")]
    assert not used, used
