"""Temperature scaling (Guo et al. 2017): one scalar T per model, logits / T, fitted on the
held-out validation split of the training data (never the test split).

The objective is NLL by default, or 15-bin ECE (the DisMax paper's choice). The search is over
log T in [log 0.01, log 100]: a coarse grid first (ECE is piecewise constant in T, so a local
optimiser alone can stall on a flat step), then a bounded 1-D minimisation (Brent) between the
grid neighbours of the best grid point. Stopping at a bound is reported, since it usually means
the validation split is too small or the model is degenerate (e.g. constant logits); a split
classified without error leaves T = 1 (see `fit_temperature`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from oodbench.errors import OodbenchError
from oodbench.metrics import classification_metrics, ece, nll

T_BOUNDS = (0.01, 100.0)
OBJECTIVES = {"nll": nll, "ece": ece}
GRID_POINTS = 81  # on log T: ~0.115 apart, i.e. T steps of ~12 %
BOUND_TOLERANCE = 1e-3  # in log T


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, objective: str = "nll",
                    bounds: tuple[float, float] = T_BOUNDS) -> dict[str, Any]:
    """Returns {temperature, objective, objective_before, objective_after, at_bound, bound,
    fitted, before, after}, where before/after are accuracy, ECE and NLL on these logits.
    `fitted` False: the split is classified perfectly and the search ran to the lower bound, so
    T = 1 is kept (no temperature is identifiable from such a split)."""
    if objective not in OBJECTIVES:
        raise OodbenchError(f"unknown calibration objective {objective!r}", "use nll or ece")
    if len(labels) == 0:
        raise OodbenchError("no validation samples to calibrate on")
    fn = OBJECTIVES[objective]
    logits = logits.detach().double().cpu()
    labels = labels.cpu()

    def f(log_t: float) -> float:
        return fn(logits, labels, math.exp(log_t))

    lo, hi = (math.log(b) for b in bounds)
    grid = np.linspace(lo, hi, GRID_POINTS)
    values = [f(x) for x in grid]
    i = int(np.argmin(values))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, GRID_POINTS - 1)]
    res = minimize_scalar(f, bounds=(a, b), method="bounded", options={"xatol": 1e-5})
    best_x, best_v = (float(res.x), float(res.fun)) if res.fun <= values[i] else (grid[i],
                                                                                  values[i])
    bound = None
    # at a bound, or on a plateau reaching it: a perfectly separated split has NLL exactly 0
    # (in float64) for every T below some value, and the optimum found there means nothing
    if best_x - lo < BOUND_TOLERANCE or values[0] <= best_v:
        bound = "lower"
    elif hi - best_x < BOUND_TOLERANCE or values[-1] <= best_v:
        bound = "upper"
    before = classification_metrics(logits, labels, 1.0)
    # every sample right: NLL (and ECE) fall without limit as T → 0, so the "fit" is the bound
    # and would make the test NLL explode on the first error; no temperature is fitted
    fitted = not (bound == "lower" and before["accuracy"] == 1.0)
    t = float(math.exp(best_x)) if fitted else 1.0
    return {"temperature": t, "objective": objective, "objective_before": f(0.0),
            "objective_after": best_v if fitted else f(0.0), "at_bound": bound is not None,
            "bound": bound, "bounds": list(bounds), "fitted": fitted, "before": before,
            "after": classification_metrics(logits, labels, t)}
