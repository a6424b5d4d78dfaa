"""ODIN (Liang et al., ICLR 2018): temperature scaling plus input preprocessing.

x̃ = x − ε · sign(−∇ₓ log S_ŷ(x; T)) / std   (on the normalised input; ŷ = the predicted class)
score = max_c S_c(x̃; T),   S(x; T) = softmax(f(x) / T)

Defaults T = 1000, ε = 0.0014 (the paper's CIFAR values). Cost per sample: one forward with
gradient, one input-only backward (parameters frozen), one forward on x̃: about three forward
passes, batched. ODIN's own T replaces the run's calibrated temperature. Scoring reads no cached
output: `score_batch` takes the pipeline's shared forward with gradients (its logits serve the
loss, and ε = 0 reuses them), so ODIN pays only the backward and the forward on x̃.

Selection (hyperparameter `selection`), never on OOD data unless asked:
- "none": the given T and ε.
- "id": T fixed, ε maximising the mean score on in-distribution validation data (the
  Generalized-ODIN criterion; T cannot be chosen this way, a lower T always wins).
- "fgsm": (T, ε) maximising the AUROC of validation samples vs FGSM-perturbed copies of them.
- "ood": (T, ε) maximising the AUROC of validation samples vs a user-supplied OOD validation set.
For each T, one backward pass serves the whole ε grid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from oodbench.detectors.base import (
    DETECTORS,
    Detector,
    DetectorInput,
    HParam,
    selection_hparam,
)
from oodbench.detectors.gradients import (
    GRAD_BATCH,
    batched_forward,
    choose,
    input_grad,
    negatives,
    require_model,
    signed_step,
    subsample,
)

if TYPE_CHECKING:
    from oodbench.models.base import ModelOutput

T_GRID = (1.0, 10.0, 100.0, 1000.0)
EPS_GRID = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.0024, 0.005, 0.01, 0.05, 0.1, 0.2)
SELECTION_MODES = ("none", "id", "fgsm", "ood")


def odin_batch(data: DetectorInput, x: torch.Tensor, logits: torch.Tensor, temperature: float,
               epsilons: list[float]) -> np.ndarray:
    """len(ε) × B scores of one batch, from its logits = f(x) computed with gradients (one
    backward serves the whole ε list; ε = 0 reuses the logits)."""
    g = None
    if any(epsilons):
        scaled = logits / temperature
        g = input_grad(F.cross_entropy(scaled, scaled.argmax(dim=1).detach(), reduction="sum"),
                       x)  # ∇ₓ(−log S_ŷ)
    out = np.empty((len(epsilons), len(x)))
    with torch.no_grad():
        for i, eps in enumerate(epsilons):
            z = data.model(signed_step(data, x, g, eps)) if eps else logits.detach()
            p = torch.softmax(z.double() / temperature, dim=1)
            out[i] = p.max(dim=1).values.cpu().numpy()
    return out


def odin_scores(data: DetectorInput, temperature: float, epsilons: list[float],
                batch_size: int = GRAD_BATCH) -> np.ndarray:
    """Scores of every sample for each ε (len(ε) × N), one gradient per batch."""
    require_model(data, "ODIN")
    return batched_forward(data, (), batch_size, lambda x, out: odin_batch(
        data, x, out.logits, temperature, epsilons).T).T


@DETECTORS.register("odin", paper="Liang et al., ICLR 2018 (ODIN)")
class ODIN(Detector):
    summary = "ODIN: temperature scaling + input preprocessing (T=1000, ε=0.0014)"
    needs = frozenset({"grad"})
    hparams = {
        "T": HParam(1000.0, float, gt=0, doc="softmax temperature"),
        "epsilon": HParam(0.0014, float, ge=0, doc="input step in [0, 1] pixel units"),
        "selection": selection_hparam("none", SELECTION_MODES),
        "T_grid": HParam(T_GRID, list, gt=0, doc="temperatures tried by selection"),
        "eps_grid": HParam(EPS_GRID, list, ge=0, doc="input steps tried by selection"),
        "search_samples": HParam(1000, int, ge=1, doc="validation samples used by selection"),
        "batch_size": HParam(GRAD_BATCH, int, ge=1, doc="samples per gradient batch"),
    }
    selection_modes = SELECTION_MODES

    @property
    def uses_shared_forward(self) -> bool:
        return True

    def required_outputs(self, block_names: tuple[str, ...]) -> frozenset[str]:
        return frozenset()  # scores from the shared forward only

    def select(self, val: DetectorInput, ood_val: DetectorInput | None = None) -> None:
        mode = self.selection_mode
        if mode == "none":
            return
        p = self.params
        n = p["search_samples"]
        val = subsample(val, n)
        neg = negatives(mode, val, None if ood_val is None else subsample(ood_val, n))
        temps = [p["T"]] if mode == "id" else list(p["T_grid"])
        eps, bs = list(p["eps_grid"]), p["batch_size"]
        candidates = {}
        for t in temps:
            pos = odin_scores(val, t, eps, bs)
            negs = None if neg is None else odin_scores(neg, t, eps, bs)
            for i, e in enumerate(eps):
                candidates[(t, e)] = (pos[i], None if negs is None else negs[i])
        (t, e), table = choose(candidates, mode)
        self.selected = {"epsilon": e} if mode == "id" else {"T": t, "epsilon": e}
        self.selection = {"mode": mode, "chosen": {"T": t, "epsilon": e},
                          "criterion": "mean in-dist score" if mode == "id" else "AUROC",
                          "validation": val.name, "n": len(val),
                          "negatives": None if neg is None else neg.name, "table": table}

    def score_batch(self, x: torch.Tensor, out: ModelOutput, data: DetectorInput) -> np.ndarray:
        return odin_batch(data, x, out.logits, self.params["T"], [self.params["epsilon"]])[0]

    def score(self, data: DetectorInput) -> np.ndarray:
        require_model(data, "ODIN")
        return batched_forward(data, (), self.params["batch_size"],
                               lambda x, out: self.score_batch(x, out, data))
