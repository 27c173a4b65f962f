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


def test_no_function_is_longer_than_a_screen():
    """Every function of the package reads on one screen (~60 lines); the recipe, for one, reads in parts."""
    long = []
    for path in sorted((ROOT / "src" / "qatune").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                where = path.relative_to(ROOT / "src" / "qatune")
                long.append(f"{where}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []


def _public_definitions() -> dict[str, list[str]]:
    """Each public top-level function or class name of src/qatune -> the modules that define it (a re-export by
    import is no definition)."""
    defined: dict[str, list[str]] = {}
    for path in sorted((ROOT / "src" / "qatune").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                    and not node.name.startswith("_")):
                defined.setdefault(node.name, []).append(str(path.relative_to(ROOT / "src")))
    return defined


def test_no_public_name_is_defined_in_two_modules():
    """A name says one thing: `load_model` is qatune's public loader, not also the base-model loader."""
    assert {name: where for name, where in _public_definitions().items() if len(where) > 1} == {}


def _modules_after(code: str) -> set[str]:
    """The qatune modules a fresh interpreter has imported after running `code`."""
    script = f"import sys\n{code}\nprint('\\n'.join(m for m in sys.modules if m.startswith('qatune')))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return set(result.stdout.split())


def _above(modules: set[str], *packages: str) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


def test_importing_a_low_layer_imports_nothing_above_it():
    """`import qatune.data, qatune.models` loads only those layers and the ones below (the package's own
    `__init__` exports lazily); the check can fail: importing the recipe does load training."""
    high = ("qatune.training", "qatune.compare", "qatune.cli", "qatune.bench", "qatune.evaluation")
    assert _above(_modules_after("import qatune.data, qatune.models"), *high) == []
    assert _above(_modules_after("import qatune"), *high) == []
    assert "qatune.training.recipe" in _modules_after("import qatune.training.recipe")


def test_the_public_names_still_work():
    modules = _modules_after("import qatune\n"
                             "assert qatune.load_model.__module__ == 'qatune.generation.runs'\n"
                             "assert qatune.train_model.__name__ == 'train_model'\n"
                             "assert issubclass(qatune.ConfigError, qatune.QatuneError)\n"
                             "assert set(qatune.__all__) <= set(dir(qatune)), dir(qatune)\n"
                             "assert qatune.__version__\n"
                             "from qatune import load_tokenizer, count_parameters, load_config\n"
                             "from qatune.evaluation import evaluate\n"
                             "from qatune.cli import main\n"
                             "try:\n    qatune.no_such_name\nexcept AttributeError:\n    pass\n"
                             "else:\n    raise SystemExit('no AttributeError')")
    assert "qatune.training.recipe" in modules


def test_every_module_is_named_in_the_design_notes():
    """docs/DESIGN.md's table names each module by its path under src/qatune (`runs/layout.py`), so a new module
    is placed and described when it is added."""
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    package = ROOT / "src" / "qatune"
    modules = [path.relative_to(package).as_posix() for path in sorted(package.rglob("*.py"))
               if path.name not in ("__init__.py", "__main__.py")]
    assert modules and [m for m in modules if f"`{m}`" not in design] == []
