"""A cold `score` against a conventional loop and against the floor, in one process, on the same
tensors, at the same batch size.

Detectors: msp, maxlogit, entropy, energy, odin (T = 1000, ε = 0.0014) and mahalanobis
(penultimate features, fitted on the train split), over the in-distribution test set + one OOD
set.
- oodbench: the scoring phases of `oodbench score` (fit, the shared forward per set, score) on
  a fresh cache folder.
- conventional: what a hand-written evaluation does — each detector runs its own forward passes
  (four logit scores: one pass each; ODIN: forward, backward, perturbed forward; Mahalanobis:
  a train pass to fit, then its own pass over each set).
- floor: one plain forward of each set + the train-split forward + ODIN's own gradient steps
  (its backward and perturbed forward, timed inside the conventional ODIN loop).
Each is run `--repeats` times, alternating, and the medians are compared. The script also
checks that both paths give the same scores.

Data: the pretrained ResNet-20 (akamaster) on cifar10-jpeg test vs tinyimagenet-resize from
../shared/data (or $OODBENCH_DATA), subsampled with --n-test / --n-train; without the real
data, a randomly initialised smallcnn8 on digits vs gaussian noise (labelled as such).

Usage: PYTHONPATH=. python benchmarks/speed_score.py [--n-test 2000 --n-train 10000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from oodbench.cache import OutputCache
from oodbench.config import OODSet
from oodbench.data import DataContext, ImageSet, InputTransform
from oodbench.experiment import in_distribution_info, load_in_distribution, load_ood
from oodbench.pipeline import load_run
from oodbench.runs import Run
from oodbench.scoring import (
    EvalSet,
    SetBundle,
    build_detectors,
    fit_select,
    forward_eval,
    plan,
    score_sets,
)

LOGIT_DETECTORS = ("msp", "maxlogit", "entropy", "energy")
DETECTORS = [*LOGIT_DETECTORS, "odin", "mahalanobis"]
T, EPS = 1000.0, 0.0014


def data_root() -> Path | None:
    for p in (os.environ.get("OODBENCH_DATA"),
              Path(__file__).resolve().parents[2] / "shared" / "data"):
        if p and Path(p).is_dir():
            return Path(p)
    return None


def setup_run(folder: Path) -> tuple[Run, DataContext, str, str]:
    """The run to score, its data context, and the OOD dataset (with a description)."""
    from oodbench.checkpoint_import import import_checkpoint

    root = data_root()
    ctx = DataContext.resolve(root, folder / "data-cache")
    ckpt = root / "models/akamaster-resnet-cifar10/resnet20-12fca82f.th" if root else None
    if ckpt is not None and ckpt.exists():
        run, _ = import_checkpoint(ckpt, "resnet20", "cifar10-jpeg", folder / "run")
        return run, ctx, "tinyimagenet-resize", "pretrained ResNet-20, cifar10-jpeg test"
    from oodbench.config import RunConfig, load_benchmark
    from oodbench.experiment import build_model

    cfg = RunConfig(load_benchmark("digits"), "softmax", 0, {})
    run = Run.create(folder / "run", cfg)
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict(), "finished": True}, run.checkpoint_path)
    return run, ctx, "gaussian", "random-init smallcnn8, digits test (no real data found)"


def subset(data: ImageSet, n: int) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    return data.subset(torch.randperm(len(data), generator=g)[:n].sort().values)


def load_bundle(run: Run, ctx: DataContext, ood_name: str, n_test: int, n_train: int
                ) -> SetBundle:
    cfg = run.config()
    tf = InputTransform.for_model(in_distribution_info(cfg))
    test = EvalSet(subset(load_in_distribution(cfg, "test", ctx), n_test), tf, "test")
    train = EvalSet(subset(load_in_distribution(cfg, "train", ctx), n_train), tf, "train")
    data, otf = load_ood(cfg, OODSet(dataset=ood_name), ctx)
    return SetBundle(test, [EvalSet(subset(data, n_test), otf, "ood", "far")], train)


def oodbench_score(run: Run, sets: SetBundle, batch: int, cache: Path) -> tuple[float, dict]:
    """The phases of `oodbench score` on a cold cache; returns (seconds, scores)."""
    tic = time.perf_counter()
    lr = load_run(run, torch.device("cpu"), batch_size=batch)
    lr.cache = OutputCache(cache)
    p = plan(build_detectors(DETECTORS, {"odin": {"T": T, "epsilon": EPS}}),
             lr.model.block_names)
    fit_select(lr, p, sets)
    scores = score_sets(lr, p, [forward_eval(lr, p, s) for s in sets.evaluated])
    return time.perf_counter() - tic, {n: s.per_set for n, s in scores.items()}


# --------------------------------------------------------------------- the conventional loop
def batches(es: EvalSet, batch: int):
    for i in range(0, len(es.data), batch):
        yield es.transform(es.data.images[i:i + batch])


@torch.no_grad()
def logit_score(model, es: EvalSet, name: str, batch: int) -> np.ndarray:
    out = []
    for x in batches(es, batch):
        logits = model(x).double()
        log_p = logits.log_softmax(1)
        out.append({"msp": log_p.max(1).values.exp(), "maxlogit": logits.max(1).values,
                    "entropy": (log_p.exp() * log_p).sum(1),
                    "energy": logits.logsumexp(1)}[name])
    return torch.cat(out).numpy()


def odin_score(model, es: EvalSet, batch: int, parts: dict[str, float]) -> np.ndarray:
    """ODIN as its paper's code does it, timing the backward + perturbed forward apart."""
    std = torch.tensor(es.transform.std).view(1, -1, 1, 1)
    out = []
    for p_ in model.parameters():
        p_.requires_grad_(False)
    for x in batches(es, batch):
        x.requires_grad_(True)
        logits = model(x) / T
        tic = time.perf_counter()
        loss = F.cross_entropy(logits, logits.argmax(1), reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            p = torch.softmax(model(x - EPS * g.sign() / std).double() / T, dim=1)
        parts["odin_own"] += time.perf_counter() - tic
        out.append(p.max(1).values)
    return torch.cat(out).numpy()


@torch.no_grad()
def features(model, es: EvalSet, batch: int) -> torch.Tensor:
    return torch.cat([model.backbone.forward_features(x)[0] for x in batches(es, batch)])


def mahalanobis(model, train: EvalSet, sets: list[EvalSet], batch: int) -> dict[str, np.ndarray]:
    f = features(model, train, batch).double()
    y = train.data.labels
    means = torch.stack([f[y == c].mean(0) for c in range(int(y.max()) + 1)])
    centred = f - means[y]
    precision = torch.linalg.pinv(centred.T @ centred / len(f), hermitian=True)
    out = {}
    for es in sets:
        d = features(model, es, batch).double()[:, None, :] - means[None]
        out[es.name] = (-torch.einsum("ncd,de,nce->nc", d, precision, d).min(1).values).numpy()
    return out


def conventional(model, sets: SetBundle, batch: int) -> tuple[float, dict, dict]:
    parts = {"odin_own": 0.0}
    tic = time.perf_counter()
    scores = {n: {es.name: logit_score(model, es, n, batch) for es in sets.evaluated}
              for n in LOGIT_DETECTORS}
    scores["odin"] = {es.name: odin_score(model, es, batch, parts) for es in sets.evaluated}
    scores["mahalanobis"] = mahalanobis(model, sets.train, sets.evaluated, batch)
    return time.perf_counter() - tic, scores, parts


@torch.no_grad()
def plain_forward(model, es: EvalSet, batch: int) -> float:
    tic = time.perf_counter()
    for x in batches(es, batch):
        model(x)
    return time.perf_counter() - tic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-test", type=int, default=2000, help="samples of the test and OOD sets")
    ap.add_argument("--n-train", type=int, default=10000, help="train samples (Mahalanobis fit)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--all-gradient-free", action="store_true",
                    help="instead: every gradient-free detector on a cold and a warm cache")
    a = ap.parse_args()
    if a.all_gradient_free:
        return all_gradient_free(a)
    with tempfile.TemporaryDirectory() as tmp:
        run, ctx, ood, what = setup_run(Path(tmp))
        sets = load_bundle(run, ctx, ood, a.n_test, a.n_train)
        model = load_run(run, torch.device("cpu"), batch_size=a.batch_size).model
        times: dict[str, list[float]] = {"oodbench": [], "conventional": [], "floor": []}
        for r in range(a.repeats):
            seconds, ours = oodbench_score(run, sets, a.batch_size, Path(tmp) / f"cache{r}")
            times["oodbench"].append(seconds)
            seconds, theirs, parts = conventional(model, sets, a.batch_size)
            times["conventional"].append(seconds)
            times["floor"].append(sum(plain_forward(model, es, a.batch_size)
                                      for es in [sets.train, *sets.evaluated])
                                  + parts["odin_own"])
        report(a, what, ood, sets, times, ours, theirs)


def report(a, what: str, ood: str, sets: SetBundle, times: dict, ours: dict, theirs: dict
           ) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model/data: {what} vs {ood}; {len(sets.test.data)} test + "
          f"{len(sets.ood[0].data)} OOD samples, {len(sets.train.data)} train samples; "
          f"batch {a.batch_size}; {torch.get_num_threads()} threads; medians of {a.repeats}")
    for k, v in times.items():
        print(f"  {k:13s} {med[k]:8.2f} s   ({', '.join(f'{x:.2f}' for x in v)})")
    print(f"speed-up over the conventional loop: {med['conventional'] / med['oodbench']:.2f}×"
          "  (target ≥ 1.8×)")
    print(f"oodbench / floor: {med['oodbench'] / med['floor']:.3f}×  (target ≤ 1.15×)")
    for name in DETECTORS:
        diff = max(float(np.max(np.abs(ours[name][k] - theirs[name][k]) /
                            (np.abs(theirs[name][k]) + 1e-12))) for k in theirs[name])
        print(f"  {name:12s} max relative score difference vs the conventional loop: {diff:.1e}")


# ------------------------------------------------- every gradient-free detector at once
def gradient_free_names() -> list[str]:
    """Every detector that scores from cached outputs alone (no model run at scoring)."""
    from oodbench.detectors import DETECTORS

    return [n for n, c in DETECTORS.items() if "grad" not in c.needs]


def timed_score(run: Run, sets: SetBundle, batch: int, cache: Path) -> dict[str, float]:
    """One `score` of every gradient-free detector; its phases' wall times."""
    lr = load_run(run, torch.device("cpu"), batch_size=batch)
    lr.cache = OutputCache(cache)
    p = plan(build_detectors(gradient_free_names()), lr.model.block_names)
    tic = time.perf_counter()
    setup = fit_select(lr, p, sets)
    fit_done = time.perf_counter()
    results = [forward_eval(lr, p, s) for s in sets.evaluated]
    forward_done = time.perf_counter()
    scores = score_sets(lr, p, results)
    end = time.perf_counter()
    fit_own = sum(v for d in setup.seconds.values() for v in d.values())
    slowest = sorted(scores, key=lambda n: -scores[n].seconds)[:3]
    return {"total": end - tic, "fit phase": fit_done - tic, "fits_own": fit_own,
            "eval forward": forward_done - fit_done, "detectors": end - forward_done,
            "n": len(scores), "refused": len(p.not_applicable),
            "slowest": {n: scores[n].seconds for n in slowest}}


def all_gradient_free(a: argparse.Namespace) -> None:
    """Cold: a fresh cache (train + val + eval forwards, every fit, every score) against one
    plain forward of the same sets + the fits' own time. Warm: the same again on the filled
    cache (fits and scores only) against a cold plain forward of the evaluated sets."""
    with tempfile.TemporaryDirectory() as tmp:
        run, ctx, ood, what = setup_run(Path(tmp))
        sets = load_bundle(run, ctx, ood, a.n_test, a.n_train)
        cfg = run.config()
        tf = sets.test.transform
        sets.val = EvalSet(subset(load_in_distribution(cfg, "val", ctx), a.n_test), tf, "val")
        model = load_run(run, torch.device("cpu"), batch_size=a.batch_size).model
        cold = timed_score(run, sets, a.batch_size, Path(tmp) / "cache")
        plain_eval = sum(plain_forward(model, es, a.batch_size) for es in sets.evaluated)
        plain_fit = sum(plain_forward(model, es, a.batch_size) for es in (sets.train, sets.val))
        warm = timed_score(run, sets, a.batch_size, Path(tmp) / "cache")
    floor = plain_eval + plain_fit + cold["fits_own"]
    print(f"model/data: {what} vs {ood}; {len(sets.test.data)} test + {len(sets.ood[0].data)} "
          f"OOD, {len(sets.train.data)} train, {len(sets.val.data)} val; batch {a.batch_size}; "
          f"{cold['n']} gradient-free detectors ({cold['refused']} refused)")
    parts = ", ".join(f"{k} {v:.2f}" for k, v in cold.items()
                      if k not in ("total", "n", "refused", "slowest"))
    print(f"  cold score {cold['total']:.2f} s  ({parts})")
    print(f"  plain forward: evaluated sets {plain_eval:.2f} s, train + val {plain_fit:.2f} s")
    print(f"cold / (plain forwards + fits' own): {cold['total'] / floor:.3f}×  (target ≤ 1.25×)")
    scoring = warm["total"] - warm["fits_own"]
    print(f"warm score {warm['total']:.2f} s, of which the fits' own {warm['fits_own']:.2f} s; "
          f"the rest ({scoring:.2f} s) / a cold plain forward of the evaluated sets: "
          f"{scoring / plain_eval:.1%}  (target ≤ 5 %)")
    slow = sum(warm["slowest"].values())
    print("  slowest detectors (warm): " + ", ".join(f"{n} {v:.2f} s"
                                                   for n, v in warm["slowest"].items())
          + f"; all others together: {(warm['detectors'] - slow) / plain_eval:.1%} of it")


if __name__ == "__main__":
    main()
