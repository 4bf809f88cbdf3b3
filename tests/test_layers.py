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
