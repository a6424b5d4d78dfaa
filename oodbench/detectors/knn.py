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

The search is the whole cost of scoring (20k queries × 45k bank: about as long as a ResNet-20
forward of those images on a CPU), so it is a derived output (`base.Derived`): each query's
top-K values, K = the largest k of the grid and of the user's value, from which any k ≤ K is a
slice (the first k of the top-K are exactly the top k: the same values, in the same order).
The pipeline stores it keyed by the train and query outputs, K, the bank's kind and this code.
Fit memory: the bank plus one reused float64 chunk buffer (see `_fill_bank`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from oodbench.detectors import streaming
from oodbench.detectors.base import DETECTORS, Derived, Detector, DetectorInput, HParam
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
    # What the bank and the search are, besides the train outputs: part of the stored top-K's
    # key (a new normalisation, bank subsampling or scaling must change these).
    bank_kind: ClassVar[str] = ""
    search: ClassVar[str] = ""

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

    def k_max(self) -> int:
        """K: the largest k a grid selection or the user's value may ask for (at most the bank
        size); one top-K search serves every k ≤ K as a slice."""
        assert self.bank is not None
        given = int(self.given.get("k", self.hparams["k"].default))
        return min(max([given, *self.grid["k"]]), len(self.bank))

    def derived_output(self) -> Derived:
        return Derived(f"{self.registered_name()}.topk",
                       {"K": self.k_max(), "bank": self.bank_kind, "search": self.search},
                       (__file__, streaming.__file__))

    def top(self, data: DetectorInput, k: int) -> torch.Tensor:
        """The k largest search values of each query, descending: the first k columns of its
        top-K (stored or computed)."""
        top = self.derived_of(data)
        assert tuple(top.shape) == (len(data), self.k_max()) and k <= top.shape[1], top.shape
        return top[:, :k]

    def _search(self, data: DetectorInput, query: Any, offset: torch.Tensor | None = None
                ) -> torch.Tensor:
        """top-K of query(q)·b − offset over the bank, per normalised query q (N × K)."""
        assert self.bank is not None
        k = self.k_max()
        parts = [topk_scores(query(l2_normalise(x).float()), self.bank, k, offset=offset)
                 for _, x in rows(features_of(data, self.registered_name()))]
        return torch.cat(parts) if parts else torch.empty(0, k)

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
    bank_kind = "l2-normalised train features, all of them"
    search = "2 q·b − ‖b‖², q the l2-normalised query"

    def fit(self, train: DetectorInput) -> KNN:
        self.bank_sq = self._fill_bank(train)
        self.fitted = True
        return self

    def derive(self, data: DetectorInput) -> torch.Tensor:
        return self._search(data, lambda q: 2 * q, self.bank_sq)

    def score(self, data: DetectorInput) -> np.ndarray:
        k = self._check_k()
        kth = self.top(data, k)[:, -1]
        out = []
        for i, x in rows(features_of(data, "knn")):
            q = l2_normalise(x).float()
            d2 = (q.double() ** 2).sum(1) - kth[i:i + len(x)].double()
            out.append(-d2.clamp_min(0).sqrt())
        return torch.cat(out).numpy() if out else np.empty(0)


@DETECTORS.register("nnguide", paper="Park et al., ICCV 2023 (NNGuide)")
class NNGuide(_BankDetector):
    """energy(x) · mean top-k of z(x)·(energyᵢ zᵢ) over the train bank (Park et al. 2023)."""

    summary = "NNGuide: energy times its mean top-k similarity to energy-scaled train features"
    needs = frozenset({"logits", "features"})
    hparams = {"k": HParam(100, int, ge=1, doc="neighbours averaged (OpenOOD: 100)")}
    grid: ClassVar[dict[str, list]] = {"k": [1, 10, 50, 100, 200]}
    bank_kind = ("l2-normalised train features × their energy logsumexp(logits) (T = 1), "
                 "all of them")
    search = "q·g, q the l2-normalised query"

    def fit(self, train: DetectorInput) -> NNGuide:
        logits = logits_of(train, "nnguide")

        def energy(i: int, n: int) -> torch.Tensor:
            return torch.logsumexp(torch.as_tensor(np.asarray(logits[i:i + n])).double(), 1)

        self._fill_bank(train, energy)
        self.fitted = True
        return self

    def derive(self, data: DetectorInput) -> torch.Tensor:
        return self._search(data, lambda q: q)

    def score(self, data: DetectorInput) -> np.ndarray:
        k = self._check_k()
        top = self.top(data, k)
        logits = logits_of(data, "nnguide")
        out = []
        for i, z in rows(logits):
            guide = top[i:i + len(z)].double().mean(1)
            out.append(torch.logsumexp(z, 1) * guide)
        return torch.cat(out).numpy() if out else np.empty(0)
