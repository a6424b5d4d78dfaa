"""Is a difference real? The paired bootstrap (metrics), the tie sets of the main tables, the
significance of `--compare` deltas and the seed-count warnings, on fabricated scores whose
verdict is known: a large difference (significant) and none (identical scores / identical
distributions: not significant)."""

import json
from pathlib import Path

import numpy as np
import pytest
from jsonschema_lite import errors
from test_report import SCHEMA, invoke, report_json

from oodbench.metrics import _weighted_aurocs, ood_metrics, paired_bootstrap_auroc
from oodbench.report import build_report, compare, find_metrics, load_metrics

OOD = {"near1": "near", "far1": "far"}
N_IN, N_OUT = 300, 200


# ---------------------------------------------------------------------------- the statistic
def test_weighted_auroc_is_the_auroc_of_the_resampled_scores():
    rng = np.random.default_rng(0)
    pos = np.round(rng.normal(1, 1, 120), 1)  # rounded: ties between and within the sets
    neg = np.round(rng.normal(0, 1, 80), 1)
    w_pos = rng.integers(0, 3, (4, 120)).astype(float)
    w_neg = rng.integers(0, 3, (4, 80)).astype(float)
    got = _weighted_aurocs(pos, neg, w_pos, w_neg)
    for b in range(4):
        want = ood_metrics(np.repeat(pos, w_pos[b].astype(int)),
                           np.repeat(neg, w_neg[b].astype(int)))["auroc"]
        assert got[b] == pytest.approx(want, abs=1e-12)
    ones = _weighted_aurocs(pos, neg, np.ones((1, 120)), np.ones((1, 80)))
    assert ones[0] == pytest.approx(ood_metrics(pos, neg)["auroc"], abs=1e-12)


def test_identical_scores_differ_by_exactly_zero():
    rng = np.random.default_rng(1)
    s_in, s_out = rng.normal(1, 1, N_IN), rng.normal(0, 1, N_OUT)
    d = paired_bootstrap_auroc(s_in, [s_out], s_in.copy(), [s_out.copy()], 100)
    assert np.all(d == 0.0)


def test_large_difference_is_significant_and_same_distribution_is_not():
    rng = np.random.default_rng(2)
    weak_in, weak_out = rng.normal(0.3, 1, N_IN), rng.normal(0, 1, N_OUT)
    strong_in, strong_out = rng.normal(3, 1, N_IN), rng.normal(0, 1, N_OUT)
    d = paired_bootstrap_auroc(weak_in, [weak_out], strong_in, [strong_out], 300, seed=0)
    lo, hi = np.quantile(d, [0.025, 0.975])
    assert lo > 0.2  # b − a: the strong detector is far better
    assert d.mean() == pytest.approx(ood_metrics(strong_in, strong_out)["auroc"]
                                     - ood_metrics(weak_in, weak_out)["auroc"], abs=0.02)
    # another draw of the same distribution: the 95 % interval covers 0
    other_in, other_out = rng.normal(0.3, 1, N_IN), rng.normal(0, 1, N_OUT)
    d = paired_bootstrap_auroc(weak_in, [weak_out], other_in, [other_out], 300, seed=0)
    lo, hi = np.quantile(d, [0.025, 0.975])
    assert lo < 0 < hi


def test_pairing_needs_the_same_samples():
    s = np.zeros(5)
    with pytest.raises(ValueError, match="same samples"):
        paired_bootstrap_auroc(s, [s], np.zeros(6), [s], 10)
    with pytest.raises(ValueError, match="same samples"):
        paired_bootstrap_auroc(s, [s], s, [np.zeros(4)], 10)


# ------------------------------------------------------------------------- through `report`
def scores_for(shift: float, seed: int, salt: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng([seed, salt])
    return rng.normal(shift, 1, N_IN), {o: rng.normal(0, 1, N_OUT) for o in OOD}


def write_run(root: Path, loss: str, seed: int, detectors: dict[str, tuple], data: str = "f"
              ) -> Path:
    """A run whose detector `name` has the scores `detectors[name]` = (in, {ood: out}), its
    metrics computed from them; `data` is the content fingerprint of every set."""
    run = root / f"{loss}-seed{seed}"
    dets = {}
    for det, (s_in, outs) in detectors.items():
        (run / "scores" / det).mkdir(parents=True, exist_ok=True)
        for name, s in {"digits": s_in, **outs}.items():
            np.save(run / "scores" / det / f"{name}.npy", s)
        dets[det] = {"ood": {o: ood_metrics(s_in, s) for o, s in outs.items()}}
    metrics = {
        "schema": "oodbench.metrics/1", "benchmark": "toy", "in_distribution": "digits",
        "model": "m", "loss": loss, "seed": seed, "ood_sets": OOD, "test_set": "digits",
        "n": {"digits": N_IN, **{o: N_OUT for o in OOD}},
        "classification": {"uncalibrated": {"accuracy": 0.9, "ece": 0.05, "nll": 0.3}},
        "detectors": dets,
        "provenance": {"datasets": {n: data * 64 for n in ("digits", *OOD)},
                       "config": {"seed": seed}},
    }
    (run / "metrics.json").parent.mkdir(parents=True, exist_ok=True)
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def three_detectors(seed: int) -> dict[str, tuple]:
    """strong and twin: the same scores up to a tiny jitter (tied); weak: far worse."""
    s_in, outs = scores_for(2.0, seed, 0)
    rng = np.random.default_rng([seed, 9])
    return {"strong": (s_in, outs),
            "twin": (s_in + rng.normal(0, 1e-3, N_IN),
                     {o: s + rng.normal(0, 1e-3, N_OUT) for o, s in outs.items()}),
            "weak": scores_for(0.3, seed, 1)}


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for seed in (0, 1, 2):
        write_run(root, "softmax", seed, three_detectors(seed))
    return root


def test_tie_set_holds_the_best_and_its_twin_not_the_weak(runs: Path):
    doc = report_json(runs, "--significance", "200")
    assert doc["significance"]["replicates"] == 200
    assert doc["significance"]["test"] == "paired bootstrap over test samples"
    (g,) = doc["groups"]
    for col in ("near1", "far1", "near", "far", "all"):
        ties = g["ties"][col]
        assert ties["best"]["detector"] in ("strong", "twin")
        assert sorted(t["detector"] for t in ties["tied"]) == ["strong", "twin"]
        tests = {t["detector"]: t for t in ties["tests"]}
        assert tests["weak"]["significant"] is True and tests["weak"]["seeds"] == [0, 1, 2]
        assert tests["weak"]["delta"] < -0.2 and tests["weak"]["ci95"][1] < 0
        twin = next(t for d, t in tests.items() if d != "weak")
        assert twin["significant"] is False
        assert twin["ci95"][0] <= 0 <= twin["ci95"][1]
    assert doc["warnings"] == []  # three seeds: enough


def test_ties_are_marked_in_the_tables(runs: Path):
    res = invoke(runs, "--significance", "100", "-f", "markdown", "--no-write",
                 "--metric", "auroc")
    assert res.exit_code == 0, res.output
    lines = {ln.split("|")[2].strip(): ln for ln in res.stdout.splitlines()
             if ln.startswith("| softmax |")}
    assert lines["strong"].count("†") == 5 and lines["twin"].count("†") == 5
    assert "†" not in lines["weak"]
    assert "paired bootstrap over test samples, 100 replicates, 95 %" in res.stdout
    assert "3 seeds [0, 1, 2]" in res.stdout


def test_without_significance_nothing_is_tested(runs: Path):
    doc = report_json(runs)
    assert doc["significance"] is None and "ties" not in doc["groups"][0]
    assert "†" not in invoke(runs, "-f", "markdown", "--no-write").stdout


def test_too_few_seeds_warn_in_json_markdown_and_terminal(tmp_path: Path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root, "softmax", seed, three_detectors(seed))
    doc = report_json(root)
    (w,) = doc["warnings"]
    assert "2 seeds (0, 1)" in w and "fewer than 3 seeds" in w
    md = invoke(root, "-f", "markdown", "--no-write").stdout
    assert "> **Warning:** toy · digits · m: 2 seeds" in md
    out = invoke(root, "--no-write").output
    assert "warning:" in out and "fewer than 3 seeds" in " ".join(out.split())


def test_compare_marks_significant_deltas(tmp_path: Path):
    """B's `weak` detector is A's `strong` one: a large, significant gain; `strong` is the same
    in both: Δ = 0, not significant."""
    for seed in (0, 1, 2):
        d = three_detectors(seed)
        write_run(tmp_path / "a", "softmax", seed, {"strong": d["strong"], "weak": d["weak"]})
        write_run(tmp_path / "b", "softmax", seed, {"strong": d["strong"], "weak": d["strong"]})
    out = tmp_path / "out"
    res = invoke("--compare", tmp_path / "a", tmp_path / "b", "--significance", "200",
                 "--output", out, "--metric", "auroc", "-f", "markdown")
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "comparison.json").read_text())
    assert errors(doc, SCHEMA) == []
    rows = {r["detector"]: r["columns"] for r in doc["groups"][0]["rows"]}
    for col in ("near1", "far1", "all"):
        assert rows["weak"][col]["auroc"]["significant"] is True
        assert rows["weak"][col]["auroc"]["ci95"][0] > 0
        assert rows["weak"][col]["auroc"]["seeds"] == [0, 1, 2]
        assert rows["strong"][col]["auroc"]["significant"] is False
        assert rows["strong"][col]["auroc"]["ci95"] == [0.0, 0.0]
    assert doc["significance"]["replicates"] == 200
    weak = next(ln for ln in res.stdout.splitlines() if ln.startswith("| softmax | weak |"))
    strong = next(ln for ln in res.stdout.splitlines() if ln.startswith("| softmax | strong |"))
    assert weak.count(" sig.") == 5 and strong.count("n.s.") == 5
    assert "paired bootstrap over test samples, 200 replicates" in res.stdout
    text = (out / "comparison.csv").read_text().splitlines()
    assert text[0].endswith("ci95_low,ci95_high,significant")


def test_compare_refuses_to_pair_other_data(tmp_path: Path):
    for seed in (0, 1, 2):
        d = three_detectors(seed)
        write_run(tmp_path / "a", "softmax", seed, {"strong": d["strong"]})
        write_run(tmp_path / "b", "softmax", seed, {"strong": d["strong"]},
                  data="e" if seed == 2 else "f")
    a = build_report(load_metrics(find_metrics([tmp_path / "a"])))
    b = build_report(load_metrics(find_metrics([tmp_path / "b"])))
    doc = compare(a, b, "a", "b", significance=50)
    cell = doc["groups"][0]["rows"][0]["columns"]["near1"]["auroc"]
    assert cell["seeds"] == [0, 1] and cell["significant"] is False
    assert "seed 2" in cell["skipped"] and "fingerprints differ" in cell["skipped"]
    assert any("not paired" in w and "fingerprints differ" in w for w in doc["warnings"])
    assert errors(doc, SCHEMA) == []


def test_runs_without_fingerprints_or_scores_are_not_paired(tmp_path: Path):
    for seed in (0, 1, 2):
        d = three_detectors(seed)
        write_run(tmp_path / "a", "softmax", seed, {"strong": d["strong"]})
        run = write_run(tmp_path / "b", "softmax", seed, {"strong": d["strong"]})
        m = json.loads((run / "metrics.json").read_text())
        del m["provenance"]
        (run / "metrics.json").write_text(json.dumps(m))
    a = build_report(load_metrics(find_metrics([tmp_path / "a"])))
    b = build_report(load_metrics(find_metrics([tmp_path / "b"])))
    cell = compare(a, b, "a", "b", significance=20)["groups"][0]["rows"][0]["columns"]
    assert "ci95" not in cell["far1"]["auroc"] and "fingerprints" in cell["far1"]["auroc"][
        "skipped"]


def test_rows_of_one_run_pair_without_fingerprints_and_missing_scores_skip(runs: Path):
    for seed in (0, 1, 2):
        m = json.loads((runs / f"softmax-seed{seed}" / "metrics.json").read_text())
        del m["provenance"]
        (runs / f"softmax-seed{seed}" / "metrics.json").write_text(json.dumps(m))
    (runs / "softmax-seed0" / "scores" / "weak" / "far1.npy").unlink()
    rep = build_report(load_metrics(find_metrics([runs])), significance=50)
    ties = rep.groups[0]["ties"]
    weak = next(t for t in ties["far1"]["tests"] if t["detector"] == "weak")
    assert weak["seeds"] == [1, 2] and weak["skipped"] == "seed 0: no saved scores"
    assert weak["significant"] is True
    assert next(t for t in ties["near1"]["tests"] if t["detector"] == "weak")["seeds"] == [0, 1, 2]
    assert any("no saved scores" in w for w in rep.warnings)


def test_ties_across_losses_pair_by_seed(tmp_path: Path):
    """Rows of two losses pair seed by seed when the data fingerprints agree."""
    root = tmp_path / "runs"
    for seed in (0, 1, 2):
        d = three_detectors(seed)
        write_run(root, "softmax", seed, {"msp": d["weak"]})
        write_run(root, "dismax", seed, {"msp": d["strong"]})
    rep = build_report(load_metrics(find_metrics([root])), significance=100)
    ties = rep.groups[0]["ties"]["all"]
    assert ties["best"] == {"loss": "dismax", "detector": "msp"}
    assert ties["tied"] == [ties["best"]]
    (test,) = ties["tests"]
    assert test["significant"] is True and test["seeds"] == [0, 1, 2]


def _rename_benchmark(run: Path, name: str, model: str = "m") -> None:
    m = json.loads((run / "metrics.json").read_text())
    m["benchmark"], m["model"] = name, model
    (run / "metrics.json").write_text(json.dumps(m))


def test_an_ablation_written_as_its_own_benchmark_is_compared(tmp_path: Path):
    """DisMax with and without the mosaic: two benchmark files, one data set and model. The
    groups pair by data and model, and the paired test runs on them; a third group of another
    model on either side is not paired with anything."""
    for seed in (0, 1, 2):
        d = three_detectors(seed)
        _rename_benchmark(write_run(tmp_path / "a", "dismax", seed, {"mmles": d["strong"]}),
                          "bench")
        _rename_benchmark(write_run(tmp_path / "b", "dismax", seed, {"mmles": d["weak"]}),
                          "bench-nomosaic")
        _rename_benchmark(write_run(tmp_path / "b" / "other", "dismax", seed,
                                    {"mmles": d["weak"]}), "bench-other", model="m2")
    out = tmp_path / "out"
    res = invoke("--compare", tmp_path / "a", tmp_path / "b", "--significance", "100",
                 "--output", out, "--metric", "auroc", "-f", "markdown")
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "comparison.json").read_text())
    assert errors(doc, SCHEMA) == []
    (g,) = doc["groups"]
    assert g["benchmark"] == "bench → bench-nomosaic" and g["model"] == "m"
    cell = g["rows"][0]["columns"]["all"]["auroc"]
    assert cell["significant"] is True and cell["ci95"][1] < 0 and cell["seeds"] == [0, 1, 2]
    want = np.mean([np.mean([ood_metrics(three_detectors(s)["weak"][0], o)["auroc"]
                             for o in three_detectors(s)["weak"][1].values()])
                    - np.mean([ood_metrics(three_detectors(s)["strong"][0], o)["auroc"]
                               for o in three_detectors(s)["strong"][1].values()])
                    for s in (0, 1, 2)])
    assert cell["delta"] == pytest.approx(want)
    assert "bench → bench-nomosaic" in res.stdout


def test_group_by_data_puts_benchmarks_of_one_setting_in_one_tested_table(tmp_path: Path):
    """A (softmax: strong), B (softmax: weak, an ablation of A) and C (dismax: A's scores up to a
    jitter): by data they are one table whose ties span the benchmarks; by benchmark, three."""
    for seed in (0, 1, 2):
        d = three_detectors(seed)
        for bench, loss, scores in (("bench-a", "softmax", d["strong"]),
                                    ("bench-b", "softmax", d["weak"]),
                                    ("bench-c", "dismax", d["twin"])):
            _rename_benchmark(write_run(tmp_path / bench, loss, seed, {"msp": scores}), bench)
    assert len(report_json(tmp_path)["groups"]) == 3
    doc = report_json(tmp_path, "--group-by", "data", "--significance", "200")
    (g,) = doc["groups"]
    assert g["benchmark"] == "bench-a + bench-b + bench-c"
    assert sorted(r["loss"] for r in g["rows"]) == [
        "dismax (bench-c)", "softmax (bench-a)", "softmax (bench-b)"]
    assert sorted(g["classification"]) == ["dismax (bench-c)", "softmax (bench-a)",
                                           "softmax (bench-b)"]
    for col in ("near1", "far1", "all"):
        tied = sorted(t["loss"] for t in g["ties"][col]["tied"])
        assert tied == ["dismax (bench-c)", "softmax (bench-a)"]
        weak = next(t for t in g["ties"][col]["tests"] if t["loss"] == "softmax (bench-b)")
        assert weak["significant"] is True and weak["seeds"] == [0, 1, 2]
    row = next(r for r in g["rows"] if r["loss"] == "softmax (bench-b)")
    want = np.mean([ood_metrics(three_detectors(s)["weak"][0],
                                three_detectors(s)["weak"][1]["near1"])["auroc"]
                     for s in (0, 1, 2)])
    assert row["ood"]["near1"]["auroc"]["mean"] == pytest.approx(want)
    assert errors(doc, SCHEMA) == []
    assert invoke(tmp_path, "--group-by", "model", "--no-write").exit_code == 2
