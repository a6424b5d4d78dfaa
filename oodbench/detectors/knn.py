"""Nearest-neighbour detectors on penultimate features, with an exact chunked search.

- `knn` (Sun, Ming, Zhu & Li, "Out-of-Distribution Detection with Deep Nearest Neighbors",
  ICML 2022): z = f / ‖f‖₂ for train and test features; score(x) = −‖z(x) − z_(k)‖₂, the
  negated distance to the k-th nearest normalised train feature. k = 50 is the paper's
  CIFAR-10 value (full train set; also OpenOOD's CIFAR-10 config).
- `nnguide` (Park, Jung & Teoh, "Nearest Neighbor Guidance for Out-of-Distribution Detection",
  ICCV 2023): bank vectors gᵢ = E(xᵢ) · zᵢ (normalised train features scaled by their energy
  E = logsumexp(logits)); guidance(x) = mean of the k largest inner products z(x)·gᵢ;
  score(x) = E(x) · guidance(x). k = 100 as OpenOOD's config; OpenOOD/the paper subsample the
  bank for ImageNet (1%), here the full train set is the bank (CIFAR scale). Energies use the
  raw logits (T = 1), as the paper.

The bank is N×D by nature; it is stored in float32 (4·N·D bytes: 100 MiB for CIFAR-10 with
D = 512) and searched exactly (`streaming.topk_scores`: query chunk × bank chunk products with a
running top-k). For KNN the search maximises 2 q·b − ‖b‖² (⇔ minimises ‖q − b‖²) and the
distance is recovered as sqrt(‖q‖² − that), so a zero feature (normalised to 0) is handled
exactly too. Both detectors need no linear head: they apply to prototype heads as they are.
`fit` reads no hyperparameter (k is used at scoring), so a grid over k needs one fit.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from oodbench.detectors import streaming
from oodbench.detectors.base import DETECTORS, Detector, DetectorInput, HParam
from oodbench.detectors.streaming import (
    features_of,
    l2_normalise,
    logits_of,
    rows,
    topk_scores,
)
from oodbench.errors import OodbenchError


class _BankDetector(Detector):
    requires_fit = True
    applies_to_prototype_heads: ClassVar[bool | str] = True

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.bank: torch.Tensor | None = None  # N×D float32

    def _check_k(self) -> int:
        k = int(self.params["k"])
        assert self.bank is not None
        if k > len(self.bank):
            name = self.registered_name()
            raise OodbenchError(f"{name}.k = {k} exceeds the {len(self.bank)} training samples",
                                f"pass -p {name}.k={len(self.bank)} or smaller")
        return k

    def _fill_bank(self, train: DetectorInput, scale: Any = None) -> torch.Tensor:
        """Fill the float32 bank (normalised rows, optionally scaled) and return their squared
        norms ‖b‖² (float32, from float64 sums). One float64 chunk buffer is reused for every
        step, in place: the fit holds the bank plus one chunk, never a float64 copy of the
        bank nor fresh temporaries per chunk (which the allocator would keep)."""
        feats = features_of(train, self.registered_name())
        n, chunk = len(feats), streaming.CHUNK
        bank = torch.empty(tuple(feats.shape), dtype=torch.float32)
        sq = torch.empty(n, dtype=torch.float32)
        buf = torch.empty((min(chunk, n), *bank.shape[1:]), dtype=torch.float64)
        for i in range(0, n, chunk):
            x = buf[:min(chunk, n - i)]
            x.copy_(torch.as_tensor(np.asarray(feats[i:i + len(x)])))
            l2_normalise(x, out=x)
            if scale is not None:
                x.mul_(scale(i, len(x))[:, None])
            part = bank[i:i + len(x)]
            part.copy_(x)  # rounds to float32
            sq[i:i + len(x)] = x.copy_(part).pow_(2).sum(1)
        self.bank = bank
        return sq


@DETECTORS.register("knn", paper="Sun et al., ICML 2022 (deep KNN)")
class KNN(_BankDetector):
    """−(distance to the k-th nearest L2-normalised train feature) (Sun et al. 2022)."""

    summary = "KNN: minus the distance to the k-th nearest normalised train feature"
    needs = frozenset({"features"})
    hparams = {"k": HParam(50, int, ge=1, doc="neighbour rank (paper: 50 on CIFAR-10)")}
    grid: ClassVar[dict[str, list]] = {"k": [1, 5, 10, 50, 100, 200]}

    def fit(self, train: DetectorInput) -> KNN:
        self.bank_sq = self._fill_bank(train)
        self.fitted = True
        return self

    def score(self, data: DetectorInput) -> np.ndarray:
        k = self._check_k()
        assert self.bank is not None
        out = []
        for _, x in rows(features_of(data, "knn")):
            q = l2_normalise(x).float()
            best = topk_scores(2 * q, self.bank, k, offset=self.bank_sq)[:, -1]
            d2 = (q.double() ** 2).sum(1) - best.double()
            out.append(-d2.clamp_min(0).sqrt())
        return torch.cat(out).numpy() if out else np.empty(0)


@DETECTORS.register("nnguide", paper="Park et al., ICCV 2023 (NNGuide)")
class NNGuide(_BankDetector):
    """energy(x) · mean top-k of z(x)·(energyᵢ zᵢ) over the train bank (Park et al. 2023)."""

    summary = "NNGuide: energy times its mean top-k similarity to energy-scaled train features"
    needs = frozenset({"logits", "features"})
    hparams = {"k": HParam(100, int, ge=1, doc="neighbours averaged (OpenOOD: 100)")}
    grid: ClassVar[dict[str, list]] = {"k": [1, 10, 50, 100, 200]}

    def fit(self, train: DetectorInput) -> NNGuide:
        logits = logits_of(train, "nnguide")

        def energy(i: int, n: int) -> torch.Tensor:
            return torch.logsumexp(torch.as_tensor(np.asarray(logits[i:i + n])).double(), 1)

        self._fill_bank(train, energy)
        self.fitted = True
        return self

    def score(self, data: DetectorInput) -> np.ndarray:
        k = self._check_k()
        assert self.bank is not None
        logits = logits_of(data, "nnguide")
        out = []
        for i, x in rows(features_of(data, "nnguide")):
            guide = topk_scores(l2_normalise(x).float(), self.bank, k).double().mean(1)
            e = torch.logsumexp(torch.as_tensor(np.asarray(logits[i:i + len(x)])).double(), 1)
            out.append(e * guide)
        return torch.cat(out).numpy() if out else np.empty(0)
