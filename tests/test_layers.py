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


def _private_names(paths) -> set[str]:
    """Names modules keep to themselves: their functions, classes and attributes starting with one ``_``."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


MODELS = ROOT / "fastdit" / "models"
FAMILIES = sorted(p.parent for p in MODELS.glob("*/__init__.py"))  # fastdit/models/wan, ...
SHARED_MODELS = modules("fastdit/models")  # the family interface, packing, weights


def _owners(path: pathlib.Path) -> list[pathlib.Path]:
    """The model packages whose private names ``path`` may use: its own family, or the shared
    models modules for a module among them."""
    return [f for f in FAMILIES if f in path.parents] or ([MODELS] if path.parent == MODELS else [])


def _package_of(module: str) -> pathlib.Path:
    """The family package a ``fastdit.models...`` module name is in (else the shared models)."""
    dotted = {f: str(f.relative_to(ROOT)).replace("/", ".") for f in FAMILIES}
    return next((f for f, name in dotted.items() if module == name or module.startswith(name + ".")), MODELS)


ALL_MODULES = sorted(ROOT.glob("fastdit/**/*.py")) + modules("benchmarks")


@pytest.mark.parametrize("path", ALL_MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_outside_a_model_family_uses_its_private_names(path):
    """The runtime, export, integrations, benchmarks, the shared models modules and other families
    call a family's models through documented methods (``forward_validated``, ``attention_hook``,
    ``decode_patchified``, ...), never a ``_private`` one: a model's internals can then change
    without breaking them. ``self._x`` (the caller's own attribute of the same name) is not a use."""
    owners = _owners(path)
    foreign = [f for f in [*FAMILIES, MODELS] if f not in owners]
    private = _private_names(p for f in foreign for p in (f.rglob("*.py") if f != MODELS else SHARED_MODELS))
    private -= _private_names([path])  # the module's own names of the same spelling
    used = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr in private:
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                used.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastdit.models"):
            if _package_of(node.module) not in owners:
                used += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.startswith("_")]
    assert not used, used


@pytest.mark.parametrize("path", [p for p in SHARED_MODELS if p.name != "__init__.py"], ids=lambda p: p.name)
def test_the_shared_models_modules_know_no_family(path):
    """The family interface, packing and weights serve every family: importing one (say
    ``fastdit.models.wan``) from them would make a second family a branch in shared code. (The
    package's ``__init__`` re-exports the first family's classes.)"""
    families = [str(f.relative_to(ROOT)).replace("/", ".") for f in FAMILIES]
    found = sorted(m for m in imports(path) if any(m == f or m.startswith(f + ".") for f in families))
    assert not found, found


def test_every_family_is_registered_and_found_by_the_registry():
    """Catches a family package that never calls register_family (its checkpoints would be
    "unknown"), and the layering tests above silently checking no family at all."""
    from fastdit.models import families

    assert FAMILIES, "no model family package found under fastdit/models"
    assert sorted(families()) == sorted(f.name for f in FAMILIES)


BELOW_THE_SERVER = [p for folder in ("fastdit/ops", "fastdit/models", "fastdit/runtime", "fastdit/reference",
                                     "fastdit/export", "fastdit/integrations", "kernels")
                    for p in sorted((ROOT / folder).rglob("*.py"))]  # fmt: skip


@pytest.mark.parametrize("path", BELOW_THE_SERVER, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_below_the_server_imports_it(path):
    """``fastdit serve`` sits on the runtime; a runtime or model module importing it would tie the
    library to FastAPI and a job store."""
    assert not {n for n in imports(path) if n.startswith("fastdit.serve")}


@pytest.mark.parametrize("path", modules("fastdit/serve"), ids=lambda p: p.name)
def test_the_server_imports_no_private_name(path):
    """The server runs requests through ``fastdit generate``'s public stages (``load_models``,
    ``encode_prompt``, ``diffusion_request``, ``decode_video``, ...), never a ``_private`` helper."""
    foreign = [n for n in imports(path) if n.startswith("fastdit.") and not n.startswith("fastdit.serve")]
    assert not [n for n in foreign if n.rsplit(".", 1)[-1].startswith("_")]
