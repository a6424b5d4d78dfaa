"""A rerun of `oodbench run` redoes nothing that is done: a calibration fitted on the current
weights is kept, and results covering every configured detector and OOD set on those weights
are not scored again (`--rescore` scores them again). "Done" is judged by content — weights,
code and calibration digests and what metrics.json holds — not by file times."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml
from conftest import make_digits_run
from typer.testing import CliRunner

from oodbench.cli import app
from oodbench.data import DataContext
from oodbench.pipeline import calibrate_run, run_state, score_run
from oodbench.runs import Run

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def _bench(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((REPO / "oodbench" / "benchmarks" / "digits.yaml").read_text())
    cfg.update(name="resume", detectors=["msp", "energy"], losses=["softmax"], seeds=[0])
    cfg["train"]["epochs"] = 1
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stamps(run: Path) -> tuple[int, int]:
    return (os.stat(run / "calibration.json").st_mtime_ns,
            os.stat(run / "metrics.json").st_mtime_ns)


def test_a_rerun_keeps_up_to_date_results_and_rescore_redoes_them(tmp_path):
    bench = _bench(tmp_path)
    first = CliRunner().invoke(app, ["run", str(bench)], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    run = tmp_path / "runs" / "resume" / "softmax-seed0"
    before = _stamps(run)

    again = CliRunner().invoke(app, ["run", str(bench)], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert _stamps(run) == before  # neither file was rewritten
    assert "(kept: fitted on these weights)" in again.output
    assert "scored resume/softmax/seed0: kept" in again.output

    # a kept calibration still shows its warnings (here: a temperature at its search bound)
    _edit(run / "calibration.json", lambda c: c.update(at_bound=True, bound="lower"))
    warned = CliRunner().invoke(app, ["run", str(bench)], catch_exceptions=False)
    assert "(kept: fitted on these weights)" in warned.output
    assert "stopped at the lower search bound" in " ".join(warned.output.split())
    before = _stamps(run)

    forced = CliRunner().invoke(app, ["run", str(bench), "--rescore"], catch_exceptions=False)
    assert forced.exit_code == 0, forced.output
    after = _stamps(run)
    assert after[0] != before[0] and after[1] != before[1]
    assert "kept" not in forced.output


def _digits_run(tmp_path: Path, detectors: list[str]) -> Run:
    run = make_digits_run(tmp_path / "run")
    cfg = run.config().to_dict()
    cfg["benchmark"]["detectors"] = detectors
    run.config_path.write_text(yaml.safe_dump(cfg))
    return Run.open(run.path)


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_run_state_follows_the_content_of_the_run_folder(tmp_path):
    run = _digits_run(tmp_path, ["msp", "energy"])
    ctx = DataContext.resolve(tmp_path / "data")
    assert not run_state(run).calibrated and not run_state(run).scored

    cal = calibrate_run(run, ctx, CPU)
    state = run_state(run)
    assert state.calibrated and not state.scored
    assert state.calibration == {k: v for k, v in cal.items()
                                 if k not in ("forward_log", "images_forwarded")}

    score_run(run, ctx, CPU, ["msp"])  # one of the two configured detectors
    assert not run_state(run).scored
    score_run(run, ctx, CPU, ["energy"])  # merged: now both, on every OOD set
    assert run_state(run).scored

    saved = run.metrics_path.read_text()
    _edit(run.metrics_path, lambda m: m["detectors"]["energy"]["ood"].popitem())
    assert not run_state(run).scored  # an OOD set missing for one detector
    run.metrics_path.write_text(saved)

    def nan_scores(m: dict) -> None:  # a set left out because its scores were not finite
        name = next(iter(m["detectors"]["energy"]["ood"]))
        del m["detectors"]["energy"]["ood"][name]
        m["detectors"]["energy"]["nonfinite"] = {name: 3}

    _edit(run.metrics_path, nan_scores)
    assert run_state(run).scored  # scoring again would give the same NaNs
    run.metrics_path.write_text(saved)
    _edit(run.metrics_path, lambda m: m.update(code="0" * 64))
    assert not run_state(run).scored  # scored by other forward code
    run.metrics_path.write_text(saved)
    _edit(run.calibration_path, lambda c: c.update(temperature=c["temperature"] * 2))
    state = run_state(run)
    assert state.calibrated and not state.scored  # metrics hold another calibration
    _edit(run.calibration_path, lambda c: c.update(weights="0" * 64))
    assert run_state(run) == type(state)(False, False)  # fitted on other weights


def test_new_weights_make_every_step_stale(tmp_path):
    run = _digits_run(tmp_path, ["msp"])
    ctx = DataContext.resolve(tmp_path / "data")
    calibrate_run(run, ctx, CPU)
    score_run(run, ctx, CPU)
    assert run_state(run).scored
    state = torch.load(run.checkpoint_path, weights_only=True)
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    torch.save(state, run.checkpoint_path)
    assert not run_state(run).calibrated and not run_state(run).scored


def test_dry_run_shows_where_each_run_stands_and_writes_nothing(tmp_path):
    from test_run_lock import held_elsewhere

    from oodbench.workflow import BenchmarkRequest, plan_benchmark

    bench = _bench(tmp_path)
    cfg = yaml.safe_load(bench.read_text())
    cfg["seeds"] = [0, 1]
    bench.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["run", str(bench), "--dry-run"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.output.count("train → calibrate → score") == 2 and "2 of 2 run(s)" in r.output
    assert not (tmp_path / "runs").exists()  # nothing was written

    assert CliRunner().invoke(app, ["run", str(bench)]).exit_code == 0
    plans = plan_benchmark(BenchmarkRequest(str(bench)))
    assert [(p.label, p.stands, p.todo) for p in plans] == [
        (f"resume/softmax/seed{s}", "trained, calibrated and scored", ()) for s in (0, 1)]

    ckpt_path = tmp_path / "runs" / "resume" / "softmax-seed1" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt.update(finished=False, epoch=0, step=3, history=[])
    torch.save(ckpt, ckpt_path)
    with held_elsewhere(ckpt_path.parent / "run.lock") as holder:
        r = CliRunner().invoke(app, ["run", str(bench), "--dry-run"], catch_exceptions=False)
    text = " ".join(r.output.split())
    assert "0/1 epochs trained, 3 steps into the next" in text
    assert f"skip it: in use by pid {holder.pid}" in text
    assert "1 of 2 run(s) have work left, 1 of them in use by other processes" in text
    plans = plan_benchmark(BenchmarkRequest(str(bench), rescore=True))
    assert plans[0].todo == ("calibrate", "score")
    assert plans[1].todo == ("train (resume)", "calibrate", "score")
    ckpt_path.write_bytes(b"not a checkpoint")  # what `run` would stop on, shown in its row
    r = CliRunner().invoke(app, ["run", str(bench), "--dry-run"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "unreadable: cannot read checkpoint" in text and "stop with exit 2" in text


def test_an_interrupted_run_exits_143_or_130_and_says_how_to_continue(tmp_path, monkeypatch):
    """SIGTERM reaches `run` as Terminated from the training loop (which saved first), Ctrl-C
    as KeyboardInterrupt: the command names the fix and exits with the shell's code."""
    import oodbench.workflow as workflow
    from oodbench.errors import Terminated

    bench = _bench(tmp_path)
    for raised, code in ((Terminated(), 143), (KeyboardInterrupt(), 130)):
        def stop(*args: object, raised: BaseException = raised, **kwargs: object) -> None:
            raise raised

        monkeypatch.setattr(workflow, "train_run", stop)
        r = CliRunner().invoke(app, ["run", str(bench)])
        assert r.exit_code == code, r.output
        assert "interrupted. Run the same command again" in " ".join(r.output.split())
