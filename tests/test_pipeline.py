"""The scoring pipeline as it really runs: what reaches a fit, how many model calls a score makes,
OOD validation kept apart from the test sets, and the phases called one by one from Python."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_digits_run

from oodbench.config import RunConfig, load_benchmark
from oodbench.data import DataContext, InputTransform
from oodbench.detectors import DETECTORS
from oodbench.errors import OodbenchError
from oodbench.experiment import build_model, load_in_distribution, load_ood
from oodbench.models import Classifier
from oodbench.pipeline import score_run
from oodbench.runs import Run

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def digits_run(tmp_path) -> Run:
    return make_digits_run(tmp_path / "runs" / "r")


def _row_hashes(images: torch.Tensor) -> set[str]:
    rows = images.reshape(len(images), -1).cpu().numpy()
    return {hashlib.sha256(r.tobytes()).hexdigest() for r in rows}


def _ood_test_hashes(run: Run) -> set[str]:
    cfg = run.config()
    ctx = DataContext.resolve("unused")
    out: set[str] = set()
    for o in cfg.benchmark.ood:
        out |= _row_hashes(load_ood(cfg, o, ctx)[0].images)
    return out


def _record_fit_inputs(monkeypatch, names: list[str]) -> list[set[str]]:
    """Per fit/select call, the content hashes of the images behind every DetectorInput."""
    seen: list[set[str]] = []
    for name in names:
        cls = DETECTORS.get(name)
        for method in ("fit", "select"):
            original = getattr(cls, method)

            def wrapped(self, *args, _original=original, **kwargs):
                for a in args:
                    if a is not None and a.images is not None:
                        seen.append(_row_hashes(a.images.images))
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(cls, method, wrapped)
    return seen


def test_no_fit_or_selection_sees_an_ood_test_image(digits_run, monkeypatch):
    """Compared by image content, not by dataset name (train, val and test of `digits` share
    one name)."""
    dets = ["msp", "odin", "mahalanobis", "mahalanobis-ensemble", "intermediate-misp"]
    seen = _record_fit_inputs(monkeypatch, dets)
    m = score_run(digits_run, DataContext.resolve("unused"), CPU, dets, selection="fgsm",
                  params={"odin": {"T_grid": [1000.0], "eps_grid": [0.0, 0.0014],
                                   "search_samples": 100},
                          "mahalanobis": {"eps_grid": [0.0, 0.001], "search_samples": 100},
                          "mahalanobis-ensemble": {"search_samples": 100}})
    assert seen, "fit / select were never called"
    ood = _ood_test_hashes(digits_run)
    cfg = digits_run.config()
    test = _row_hashes(load_in_distribution(cfg, "test", DataContext.resolve("unused")).images)
    for hashes in seen:
        assert not hashes & ood and not hashes & test
    for d in ("odin", "mahalanobis", "mahalanobis-ensemble"):
        assert m["detectors"][d]["selection"]["negatives"] == "fgsm(digits)"
        assert set(m["detectors"][d]["ood"]) == {"patches", "gaussian", "uniform"}


def test_ood_validation_is_disjoint_from_every_test_set(digits_run, monkeypatch):
    seen = _record_fit_inputs(monkeypatch, ["odin"])
    m = score_run(digits_run, DataContext.resolve("unused"), CPU, ["odin"], selection="ood",
                  ood_validation="gaussian",
                  params={"odin": {"T_grid": [1000.0], "eps_grid": [0.0, 0.0014],
                                   "search_samples": 100}})
    assert m["detectors"]["odin"]["selection"]["negatives"] == "gaussian-validation"
    ood = _ood_test_hashes(digits_run)
    assert len(seen) == 2 and all(not h & ood for h in seen)  # val, and gaussian's val split


def test_ood_validation_without_a_free_split_is_refused(digits_run):
    with pytest.raises(OodbenchError, match="cannot also validate"):
        score_run(digits_run, DataContext.resolve("unused"), CPU, ["odin"], selection="ood",
                  ood_validation="patches")


def test_overlapping_ood_validation_is_refused_by_content():
    from oodbench.data import ImageSet
    from oodbench.data.embedded import DIGITS_INFO
    from oodbench.scoring import EvalSet, check_disjoint

    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    tf = InputTransform.for_model(DIGITS_INFO)
    labels = torch.full((3,), -1)
    val = EvalSet(ImageSet("v", images[:3], labels, DIGITS_INFO), tf, "ood-validation")
    other = EvalSet(ImageSet("x", images[3:], labels, DIGITS_INFO), tf, "ood")
    clash = EvalSet(ImageSet("y", images[2:5], labels, DIGITS_INFO), tf, "ood")
    check_disjoint(val, [other])  # disjoint: accepted
    with pytest.raises(OodbenchError, match="shares 1 image"):
        check_disjoint(val, [other, clash])


@pytest.fixture
def model_calls(monkeypatch):
    """Images through the model, counted on the class (independently of oodbench's counter)."""
    calls = {"images": 0}
    forward_all, forward = Classifier.forward_all, Classifier.forward

    def counting_all(self, x, *a, **k):
        calls["images"] += len(x)
        return forward_all(self, x, *a, **k)

    def counting(self, x):
        calls["images"] += len(x)
        return forward(self, x)

    monkeypatch.setattr(Classifier, "forward_all", counting_all)
    monkeypatch.setattr(Classifier, "forward", counting)
    return calls


def test_a_second_score_calls_the_model_only_for_gradient_detectors(digits_run, model_calls):
    ctx = DataContext.resolve("unused")
    first = score_run(digits_run, ctx, CPU, ["msp", "energy", "mahalanobis"], batch_size=128)
    assert model_calls["images"] > 0 and first["images_forwarded"] == model_calls["images"]
    model_calls["images"] = 0
    again = score_run(digits_run, ctx, CPU, ["msp", "entropy", "mahalanobis"], batch_size=128)
    assert model_calls["images"] == 0 and again["images_forwarded"] == 0
    assert all("from the cache" in line for line in again["forward_log"])
    with_odin = score_run(digits_run, ctx, CPU, ["msp", "odin"], batch_size=128)
    assert model_calls["images"] > 0 and with_odin["images_forwarded"] == model_calls["images"]


def test_odin_with_gradient_free_detectors_costs_no_extra_pass(digits_run, model_calls):
    """On a cold cache, ODIN alone and ODIN + msp/energy/mahalanobis-on-a-block make the same
    model calls on the test and OOD sets: ODIN's clean forward fills the cache."""
    import shutil

    ctx = DataContext.resolve("unused")
    score_run(digits_run, ctx, CPU, ["odin"], batch_size=128)
    alone = model_calls["images"]
    odin_alone = np.load(digits_run.scores_dir / "odin" / "gaussian.npy")
    shutil.rmtree(digits_run.cache_dir)
    model_calls["images"] = 0
    m = score_run(digits_run, ctx, CPU, ["odin", "msp", "energy", "intermediate-misp"],
                  batch_size=128)
    assert model_calls["images"] == alone
    np.testing.assert_array_equal(np.load(digits_run.scores_dir / "odin" / "gaussian.npy"),
                                  odin_alone)
    assert m["detectors"]["msp"]["cost"] >= 1.0 and m["detectors"]["odin"]["cost"] > 1.5


def test_odin_scores_from_the_shared_forward_equal_standalone_scores(digits_run):
    """The pipeline's batched shared forward and the detector's own `score` agree."""
    from oodbench.detectors import DetectorInput, create

    ctx = DataContext.resolve("unused")
    score_run(digits_run, ctx, CPU, ["odin"], batch_size=64)
    cfg = digits_run.config()
    data, tf = load_ood(cfg, cfg.benchmark.ood[1], ctx)
    model = build_model(cfg)
    model.load_state_dict(torch.load(digits_run.checkpoint_path, weights_only=True)["model"])
    standalone = create("odin")(DetectorInput(data.name, None, data.labels, model=model.eval(),
                                              images=data, transform=tf, device=CPU))
    saved = np.load(digits_run.scores_dir / "odin" / f"{data.name}.npy")
    np.testing.assert_allclose(saved, standalone.astype(np.float32), rtol=1e-6, atol=1e-7)


def test_phases_run_one_by_one_from_python(digits_run):
    """What `score_run` strings together, a user can call step by step."""
    from oodbench.pipeline import load_run
    from oodbench.scoring import (
        build_detectors,
        fit_select,
        forward_eval,
        load_sets,
        plan,
        score_sets,
    )

    lr = load_run(digits_run, CPU, batch_size=100)
    p = plan(build_detectors(["maxlogit", "mahalanobis"]), lr.model.block_names)
    assert p.eval_keys == {"logits", "features"} and p.fitting == ["mahalanobis"]
    sets = load_sets(digits_run.config(), p, DataContext.resolve("unused"), CPU)
    fit_select(lr, p, sets)
    results = [forward_eval(lr, p, s) for s in sets.evaluated]
    scores = score_sets(lr, p, results)
    logits = results[0].outputs.logits.double()
    np.testing.assert_allclose(scores["maxlogit"].per_set["digits"],
                               logits.max(dim=1).values.numpy())


def _phase_scores(run: Run, names: list[str], train_rows: int | None = None, **params
                  ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Per-sample scores through the phases of `score` (float64, unrounded) and the cached
    features of the train and evaluated sets; `train_rows` fits on the first rows of the train
    split only (another bank)."""
    from oodbench.pipeline import load_run
    from oodbench.scoring import (
        EvalSet,
        build_detectors,
        fit_select,
        forward_eval,
        load_sets,
        plan,
        score_sets,
    )

    lr = load_run(run, CPU, batch_size=100)
    p = plan(build_detectors(names, params), lr.model.block_names)
    sets = load_sets(run.config(), p, DataContext.resolve("unused"), CPU)
    if train_rows is not None:
        tr = sets.train
        sets.train = EvalSet(tr.data.subset(torch.arange(train_rows)), tr.transform, "train")
    fit_select(lr, p, sets)
    results = [forward_eval(lr, p, s) for s in sets.evaluated]
    scores = score_sets(lr, p, results)
    feats = {r.set.name: r.outputs.features.numpy() for r in results}
    feats["train"] = lr.entry(sets.train).load(()).features.numpy()
    _phase_scores.last = scores  # the DetectorScores (seconds, cost) of this call
    return {n: s.per_set for n, s in scores.items()}, feats


def _unit_rows(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def test_nearest_neighbour_search_is_stored_and_reused_bit_for_bit(digits_run, monkeypatch):
    """A second score reuses each set's stored top-K (no search), with the same numbers; a
    smaller k is a slice of it; another bank (train data) misses and searches again."""
    from sklearn.neighbors import NearestNeighbors

    from oodbench.detectors.knn import KNN, NNGuide

    searches: list[str] = []
    for cls in (KNN, NNGuide):
        def counted(self, data, _derive=cls.derive):
            searches.append(data.name)
            return _derive(self, data)
        monkeypatch.setattr(cls, "derive", counted)
    names = ["knn", "nnguide"]
    cold, feats = _phase_scores(digits_run, names)
    sets = list(cold["knn"])
    assert len(searches) == 2 * len(sets)
    stored = list(digits_run.cache_dir.glob("*/derived/*.npy"))
    assert len(stored) == 2 * len(sets)
    assert {f.name.split("-")[0] for f in stored} == {"knn.topk", "nnguide.topk"}
    searches.clear()
    warm, _ = _phase_scores(digits_run, names)
    assert searches == []
    for n in names:
        for s in sets:
            assert np.array_equal(warm[n][s], cold[n][s]), (n, s)
    # k = 5 ≤ K = 200: a slice of the stored top-K, checked against an exact search
    k5, _ = _phase_scores(digits_run, ["knn"], knn={"k": 5})
    assert searches == []
    nn = NearestNeighbors(n_neighbors=5).fit(_unit_rows(feats["train"]))
    for s in sets:
        dist = nn.kneighbors(_unit_rows(feats[s]))[0][:, -1]
        np.testing.assert_allclose(k5["knn"][s], -dist, rtol=1e-5, atol=1e-5)
    # another bank: every set is searched again, into new files
    other, _ = _phase_scores(digits_run, names, train_rows=300)
    assert len(searches) == 2 * len(sets)
    assert len(list(digits_run.cache_dir.glob("*/derived/*.npy"))) == 4 * len(sets)
    assert not np.array_equal(other["knn"][sets[0]], cold["knn"][sets[0]])


def test_a_stored_search_still_counts_in_the_detectors_cost(digits_run, monkeypatch):
    """KNN's cost is the method's, not the cache's: a warm score, which reads each set's stored
    top-K instead of searching, counts the seconds the search took when it was stored (the
    search is made to take 0.25 s a set, so the bound cannot come from anything else)."""
    from oodbench.detectors.knn import KNN

    def slow(self, data, _derive=KNN.derive):
        time.sleep(0.25)
        return _derive(self, data)

    monkeypatch.setattr(KNN, "derive", slow)
    _phase_scores(digits_run, ["knn"])
    cold = _phase_scores.last["knn"]
    n_sets = len(cold.per_set)
    monkeypatch.setattr(KNN, "derive", lambda self, data: pytest.fail("searched again"))
    _phase_scores(digits_run, ["knn"])
    warm = _phase_scores.last["knn"]
    assert cold.seconds >= 0.25 * n_sets and warm.seconds >= 0.25 * n_sets


def test_every_detector_is_also_judged_as_a_confidence(digits_run):
    """metrics.json holds misclassification / risk–coverage figures per detector, computed from
    the saved scores and the classifier's correctness (recomputed here with scikit-learn)."""
    from sklearn.metrics import roc_auc_score


    m = score_run(digits_run, DataContext.resolve("unused"), CPU, ["msp", "energy"])
    entry = digits_run.cache_dir / m["cache_keys"]["digits"]
    logits, labels = np.load(entry / "logits.npy"), np.load(entry / "labels.npy")
    correct = logits.argmax(1) == labels
    for det in ("msp", "energy"):
        s = np.load(digits_run.scores_dir / det / "digits.npy").astype(np.float64)
        sel = m["detectors"][det]["selective"]["in_distribution"]
        assert sel["misclassification_auroc"] == pytest.approx(roc_auc_score(correct, s),
                                                               abs=1e-6)
        err = ~correct[np.argsort(-s, kind="stable")]
        k = np.arange(1, len(s) + 1)
        assert sel["aurc"] == pytest.approx(np.mean(np.cumsum(err) / k), abs=1e-3)
        assert set(m["detectors"][det]["selective"]["with_ood"]) == {"patches", "gaussian",
                                                                    "uniform"}
    assert set(m["classification"]["selective_msp"]) == {"uncalibrated"}


def test_a_refusing_detector_is_na_with_its_reason_and_oracle_is_labelled(tmp_path):
    """On a DisMax (prototype-head) run, ReAct refuses: n/a with the reason in metrics.json and
    the report; on a linear head an --oracle selection is labelled in the report."""
    import json

    from typer.testing import CliRunner

    from oodbench.cli import app
    from oodbench.train import train

    runs = {}
    for loss in ("dismax", "softmax"):
        bench = load_benchmark("digits")
        bench.train.epochs = 1
        runs[loss] = Run.create(tmp_path / "runs" / loss, RunConfig(bench, loss, 0, {}))
        train(runs[loss], DataContext.resolve("unused"), CPU)
    m = score_run(runs["dismax"], DataContext.resolve("unused"), CPU, ["msp", "react"])
    assert m["detectors"]["react"]["applicable"] is False
    assert "linear head" in m["detectors"]["react"]["reason"]
    m = score_run(runs["softmax"], DataContext.resolve("unused"), CPU, ["react"],
                  oracle="patches")
    sel = m["detectors"]["react"]["selection"]
    assert sel["oracle"] is True and sel["negatives"] == "patches"
    r = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "-f", "json", "--no-write"])
    assert r.exit_code == 0, r.output
    rows = {(x["loss"], x["detector"]): x for x in json.loads(r.stdout)["groups"][0]["rows"]}
    assert "linear head" in rows[("dismax", "react")]["not_applicable"]
    assert rows[("softmax", "react [oracle: patches]")]["oracle"] == "patches"
    r = CliRunner().invoke(app, ["score", str(runs["dismax"].path), "--detector", "react"])
    assert r.exit_code == 0, r.output
    assert "react: n/a, ReAct recomputes the logits" in " ".join(r.output.split())
    # in the tables the refusal is named under the table, not a row of empty cells
    r = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "-f", "markdown",
                                 "--no-write"])
    assert r.exit_code == 0, r.output
    assert "| dismax | react |" not in r.stdout and "| dismax | msp |" in r.stdout
    assert "n/a (the detector refuses this loss's head; each reason in report.json): " \
           "dismax: react_" in r.stdout


def test_shifted_test_sets_are_scored_as_in_distribution_under_covariate_shift(digits_run):
    """digits.yaml has a `shift:` section: each corruption × severity is a copy of the test set
    (labels kept); accuracy per set, and per detector the shift as OOD and full-spectrum."""
    from sklearn.metrics import roc_auc_score

    m = score_run(digits_run, DataContext.resolve("unused"), CPU, ["msp"])
    shift = digits_run.config().benchmark.shift
    names = {f"shift-{c}-{s}" for c in shift.corruptions for s in shift.severities}
    assert set(m["shift"]) == names
    for c in ("contrast", "gaussian_blur"):
        acc = [m["shift"][f"shift-{c}-{s}"]["classification"]["accuracy"] for s in (1, 5)]
        assert acc[1] < acc[0], c  # accuracy falls with severity
    rec = m["detectors"]["msp"]["shift"]["shift-contrast-3"]
    s_in = np.load(digits_run.scores_dir / "msp" / "digits.npy").astype(np.float64)
    s_sh = np.load(digits_run.scores_dir / "msp" / "shift-contrast-3.npy").astype(np.float64)
    s_ood = np.load(digits_run.scores_dir / "msp" / "gaussian.npy").astype(np.float64)
    want = roc_auc_score(np.r_[np.ones(len(s_in)), np.zeros(len(s_sh))], np.r_[s_in, s_sh])
    assert rec["as_ood"]["auroc"] == pytest.approx(want, abs=1e-4)
    spectrum = np.r_[s_in, s_sh]
    want = roc_auc_score(np.r_[np.ones(len(spectrum)), np.zeros(len(s_ood))],
                         np.r_[spectrum, s_ood])
    assert rec["full_spectrum"]["gaussian"]["auroc"] == pytest.approx(want, abs=1e-4)
    assert set(m["detectors"]["msp"]["ood"]) == {"patches", "gaussian", "uniform"}
    # ... and the report shows them (schema-valid JSON, severity tables in Markdown)
    import json

    from jsonschema_lite import errors
    from typer.testing import CliRunner

    from oodbench.cli import app

    r = CliRunner().invoke(app, ["report", str(digits_run.path), "-f", "json", "--no-write"])
    doc = json.loads(r.stdout)
    schema = json.loads((Path(__file__).parents[1] / "oodbench" / "schemas" /
                         "report.schema.json").read_text())
    assert errors(doc, schema) == []
    group = doc["groups"][0]
    assert set(group["classification"]["softmax"]["shift"]) == names
    assert group["rows"][0]["shift"]["shift-contrast-3"]["as_ood_auroc"]["mean"] == (
        pytest.approx(rec["as_ood"]["auroc"]))
    md = CliRunner().invoke(app, ["report", str(digits_run.path), "-f", "markdown",
                                  "--no-write"]).stdout
    assert "covariate shift: accuracy (%) by severity" in md and "full-spectrum AUROC" in md
