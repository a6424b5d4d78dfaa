"""ODIN (Liang et al., ICLR 2018): temperature scaling plus input preprocessing.

x̃ = x − ε · sign(−∇ₓ log S_ŷ(x; T)) / std   (on the normalised input; ŷ = the predicted class)
score = max_c S_c(x̃; T),   S(x; T) = softmax(f(x) / T)

Defaults T = 1000, ε = 0.0014 (the paper's CIFAR values). Cost per sample: one forward with
gradient, one input-only backward (parameters frozen), one forward on x̃: about three forward
passes, batched. ODIN's own T replaces the run's calibrated temperature.

Selection (hyperparameter `selection`), never on OOD data unless asked:
- "none": the given T and ε.
- "id": T fixed, ε maximising the mean score on in-distribution validation data (the
  Generalized-ODIN criterion; T cannot be chosen this way, a lower T always wins).
- "fgsm": (T, ε) maximising the AUROC of validation samples vs FGSM-perturbed copies of them.
- "ood": (T, ε) maximising the AUROC of validation samples vs a user-supplied OOD validation set.
For each T, one backward pass serves the whole ε grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from oodbench.detectors.base import DETECTORS, Detector, DetectorInput
from oodbench.detectors.gradients import (
    GRAD_BATCH,
    choose,
    frozen,
    input_batches,
    input_gradient,
    negatives,
    require_model,
    signed_step,
    subsample,
)

T_GRID = [1.0, 10.0, 100.0, 1000.0]
EPS_GRID = [0.0, 0.0005, 0.001, 0.0014, 0.002, 0.0024, 0.005, 0.01, 0.05, 0.1, 0.2]


def odin_scores(data: DetectorInput, temperature: float, epsilons: list[float],
                batch_size: int = GRAD_BATCH) -> np.ndarray:
    """Scores of every sample for each ε (len(ε) × N), one gradient per batch."""
    require_model(data, "ODIN")
    model = data.model
    out = np.empty((len(epsilons), len(data)))
    with frozen(model):
        for sl, x in input_batches(data, batch_size):
            def loss(z: torch.Tensor) -> torch.Tensor:
                logits = model(z) / temperature
                return F.cross_entropy(logits, logits.argmax(dim=1).detach(), reduction="sum")

            g = input_gradient(loss, x)  # ∇ₓ(−log S_ŷ)
            with torch.no_grad():
                for i, eps in enumerate(epsilons):
                    z = signed_step(data, x, g, eps) if eps else x
                    p = torch.softmax(model(z).double() / temperature, dim=1)
                    out[i, sl] = p.max(dim=1).values.cpu().numpy()
    return out


@DETECTORS.register("odin")
class ODIN(Detector):
    summary = "ODIN: temperature scaling + input preprocessing (T=1000, ε=0.0014)"
    needs = frozenset({"grad"})
    hparams: dict[str, Any] = {"T": 1000.0, "epsilon": 0.0014, "selection": "none",
                               "T_grid": T_GRID, "eps_grid": EPS_GRID,
                               "search_samples": 1000, "batch_size": GRAD_BATCH}
    selection_modes = ("none", "id", "fgsm", "ood")

    def select(self, val: DetectorInput, ood_val: DetectorInput | None = None) -> None:
        mode = self.selection_mode
        if mode == "none":
            return
        n = int(self.params["search_samples"])
        val = subsample(val, n)
        neg = negatives(mode, val, None if ood_val is None else subsample(ood_val, n))
        temps = [float(self.params["T"])] if mode == "id" else list(self.params["T_grid"])
        eps = [float(e) for e in self.params["eps_grid"]]
        bs = int(self.params["batch_size"])
        candidates = {}
        for t in temps:
            pos = odin_scores(val, t, eps, bs)
            negs = None if neg is None else odin_scores(neg, t, eps, bs)
            for i, e in enumerate(eps):
                candidates[(t, e)] = (pos[i], None if negs is None else negs[i])
        (t, e), table = choose(candidates, mode)
        self.params.update(T=t, epsilon=e)
        self.selection = {"mode": mode, "chosen": {"T": t, "epsilon": e},
                          "criterion": "mean in-dist score" if mode == "id" else "AUROC",
                          "validation": val.name, "n": len(val),
                          "negatives": None if neg is None else neg.name, "table": table}

    def score(self, data: DetectorInput) -> np.ndarray:
        return odin_scores(data, float(self.params["T"]), [float(self.params["epsilon"])],
                           int(self.params["batch_size"]))[0]
