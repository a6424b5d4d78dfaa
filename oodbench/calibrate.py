"""Temperature scaling (Guo et al. 2017): one scalar T per model, logits / T, fitted on the
held-out validation split of the training data (never the test split).

The objective is NLL by default, or 15-bin ECE (the DisMax paper's choice). The search is a
bounded 1-D minimisation over log T; hitting a bound is reported, since it usually means the
validation split is too small or the model is degenerate.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from scipy.optimize import minimize_scalar

from oodbench.errors import OodbenchError
from oodbench.metrics import classification_metrics, ece, nll

T_BOUNDS = (0.01, 100.0)
OBJECTIVES = {"nll": nll, "ece": ece}


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, objective: str = "nll"
                    ) -> dict[str, Any]:
    """Returns {temperature, objective, at_bound, before, after} (metrics on these logits)."""
    if objective not in OBJECTIVES:
        raise OodbenchError(f"unknown calibration objective {objective!r}", "use nll or ece")
    fn = OBJECTIVES[objective]
    lo, hi = (math.log(b) for b in T_BOUNDS)
    res = minimize_scalar(lambda log_t: fn(logits, labels, math.exp(log_t)), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-4})
    t = float(math.exp(res.x))
    at_bound = min(abs(res.x - lo), abs(res.x - hi)) < 1e-3
    return {"temperature": t, "objective": objective, "at_bound": bool(at_bound),
            "before": classification_metrics(logits, labels, 1.0),
            "after": classification_metrics(logits, labels, t)}
