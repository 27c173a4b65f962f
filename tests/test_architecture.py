"""The package's layers (pyproject.toml, `[tool.importlinter]`): the contract holds, and it would catch a cycle."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=package_parent, env=env, capture_output=True, text=True)


def test_the_layers_hold():
    result = _lint_imports(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """models importing training (a cycle: training imports models) fails the check, even inside a function."""
    shutil.copytree(ROOT / "src" / "qatune", tmp_path / "qatune", ignore=shutil.ignore_patterns("__pycache__"))
    config = tmp_path / "qatune" / "models" / "config.py"
    config.write_text(config.read_text() + "\n\ndef _cycle():\n    from qatune.training.recipe import train_model\n"
                      "    return train_model\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "qatune.models.config -> qatune.training.recipe" in result.stdout


def test_qatune_own_imports_sit_at_the_top_of_each_file():
    """Imports of qatune's own modules inside functions would hide a cycle from a reader (not from the linter)."""
    offenders = []
    for path in sorted((ROOT / "src" / "qatune").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.startswith((" ", "\t")) and line.lstrip().startswith(("from qatune", "import qatune", "from .")):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_no_function_in_training_is_longer_than_a_screen():
    """The recipe reads in parts: every function of `qatune.training` fits on one screen (~60 lines)."""
    long = []
    for path in sorted((ROOT / "src" / "qatune" / "training").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []


def _public_definitions() -> dict[str, list[str]]:
    """Each public top-level function or class name of src/qatune -> the modules that define it (a re-export by
    import is no definition)."""
    defined: dict[str, list[str]] = {}
    for path in sorted((ROOT / "src" / "qatune").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            public = not node.name.startswith("_") if hasattr(node, "name") else False
            if public and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.setdefault(node.name, []).append(str(path.relative_to(ROOT / "src")))
    return defined


def test_no_public_name_is_defined_in_two_modules():
    """A name says one thing: `load_model` is qatune's public loader, not also the base-model loader."""
    assert {name: where for name, where in _public_definitions().items() if len(where) > 1} == {}
