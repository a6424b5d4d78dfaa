"""The import-linter contracts in pyproject.toml hold, and they do catch a violation, so a lower
layer importing a higher one fails the test suite as well as CI's `lint-imports`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is not installed (pip install "
                    "-e '.[test]' installs it); the layer contracts cannot be checked")

REPO = Path(__file__).resolve().parent.parent
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(no_cache=True, no_logo=True))")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the project at `root` (its pyproject.toml and its oodbench package)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", LINT], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_import_contracts_are_kept() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(REPO / "oodbench", tmp_path / "oodbench",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


@pytest.mark.parametrize("module,line,broken", [
    # a lazy import inside a function counts like a top-level one
    ("config.py", "def _f():\n    from oodbench.models import MODELS\n",
     "Config is pure parsing: it never resolves names in a registry BROKEN"),
    ("console.py", "import oodbench.train\n",
     "The console front end does not import the trainer (only oodbench.progress) BROKEN"),
    ("detectors/base.py", "import oodbench.cache\n",
     "Detectors work on arrays: no output cache, no models, no datasets BROKEN"),
    ("metrics.py", "import oodbench.report\n",
     "Layers: a module imports only from layers below it (highest first) BROKEN"),
])
def test_a_violation_breaks_a_contract(project_copy: Path, module: str, line: str,
                                       broken: str) -> None:
    path = project_copy / "oodbench" / module
    path.write_text(path.read_text() + "\n\n" + line)
    result = lint_imports(project_copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert broken in result.stdout


def test_a_new_module_must_be_placed_in_a_layer(project_copy: Path) -> None:
    (project_copy / "oodbench" / "unplaced.py").write_text('"""Not in any layer."""\n')
    result = lint_imports(project_copy)
    assert result.returncode == 1
    assert "unplaced" in result.stdout
