"""The runnable examples run as a user runs them, and print their tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dropin_example_trains_both_losses_and_prints_auroc():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "examples" / "dropin.py")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert [(row[0], row[2]) for row in rows] == [("softmax", "msp"), ("softmax", "mmles"),
                                                 ("dismax", "msp"), ("dismax", "mmles")]
    for row in rows:
        accuracy, auroc = (float(v.rstrip("%")) for v in (row[1], row[3]))
        assert accuracy > 90.0 and 0.0 <= auroc <= 100.0
