"""The import rule of docs/architecture.md: a module imports only its own package and
lower layers, and no stage package imports another stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import amoc

PACKAGE = Path(amoc.__file__).parent

LAYERS = {  # top-level name under amoc -> layer (docs/architecture.md)
    **dict.fromkeys(
        ["errors", "version", "config", "io", "schedule", "stopping", "checkpoint", "distributed", "runtime"], 0
    ),
    "data": 1,
    "nets": 2,
    "attacks": 3,
    "training": 4,
    **dict.fromkeys(["pretrain", "downstream", "evaluate", "robustness", "report", "presets"], 5),
    **dict.fromkeys(["cli", "__main__", "__init__"], 6),
}
STAGE_LAYER = 5


def top_name(path: Path) -> str:
    """amoc/pretrain/step.py -> "pretrain"; amoc/config.py -> "config"; amoc/__init__.py -> "__init__"."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported(path: Path) -> set[str]:
    """Top-level amoc names a module imports ("__init__" for the package root itself)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from amoc import io` names the submodule io; `from amoc import __version__` the root
            modules = [f"amoc.{a.name}" for a in node.names] if node.module == "amoc" else [node.module]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "amoc":
                name = parts[1] if len(parts) > 1 else "__init__"
                names.add(name if name in LAYERS else "__init__")
    return names


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    assert {top_name(p) for p in MODULES} <= set(LAYERS), {top_name(p) for p in MODULES} - set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path):
    me = top_name(path)
    for name in imported(path) - {me}:
        assert LAYERS[name] <= LAYERS[me], (
            f"{path.relative_to(PACKAGE)} ({me}, layer {LAYERS[me]}) imports "
            f"{name} (layer {LAYERS[name]}): a lower layer may not import a higher one"
        )
        assert not (LAYERS[me] == LAYERS[name] == STAGE_LAYER), (
            f"{path.relative_to(PACKAGE)}: stage {me} imports stage {name}; move the shared piece down a layer"
        )


def test_the_rule_catches_a_stage_importing_another(tmp_path, monkeypatch):
    """The checker itself: an upward import and a stage-to-stage import are both found."""
    fake = PACKAGE / "pretrain" / "stage.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "from amoc.report import stage\nimport amoc.cli\n")
    assert imported(fake) == {"report", "cli"}
