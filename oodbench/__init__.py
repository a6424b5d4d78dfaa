"""oodbench: benchmark out-of-distribution detection for image classifiers.

The package is usable without the CLI: losses (`oodbench.losses`), detectors
(`oodbench.detectors`), models (`oodbench.models`) and metrics (`oodbench.metrics`) are plain
PyTorch / NumPy objects. The CLI (`oodbench.cli`) only wires them together over run folders.
"""

__version__ = "0.1.0"
