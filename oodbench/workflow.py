"""The commands' work as library functions: resume-or-create a training run, pick the runs a
command acts on, and the whole-benchmark loop of `oodbench run`. The CLI parses options, calls
one of these and prints; a user's own script calls the same functions.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oodbench.checkpoint_import import (
    file_sha256,
    import_checkpoint,
    imported_from,
    imported_sha256,
    resolve_checkpoint,
)
from oodbench.config import BenchmarkConfig, CheckpointEntry, RunConfig
from oodbench.data import DataContext
from oodbench.data.availability import require_benchmark_data
from oodbench.distributed import launch, on_main, refuse_under_torchrun, world
from oodbench.errors import OodbenchError
from oodbench.experiment import (
    check_benchmark_sets,
    check_run_config,
    load_checked_benchmark,
    pick_device,
    with_absolute_folders,
)
from oodbench.pipeline import RunState, calibrate_run, run_state, score_run
from oodbench.runs import Run, RunInUse, default_run_dir, load_checkpoint
from oodbench.scoring import ProgressFactory, no_progress
from oodbench.train import StepReporter, check_batch_split, make_criterion, train

Say = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


@dataclass
class TrainRequest:
    """What `oodbench train` was asked; None = the benchmark's (or the built-in) default."""

    benchmark: str | None = None
    loss: str | None = None
    seed: int | None = None
    epochs: int | None = None
    run_dir: Path | None = None
    loss_options: dict[str, Any] = field(default_factory=dict)
    runs_root: Path = Path("runs")

    @property
    def explicit(self) -> bool:
        return (self.benchmark, self.loss, self.seed, self.epochs) != (None,) * 4 or bool(
            self.loss_options)


def run_config(bench: BenchmarkConfig, loss: str, seed: int, epochs: int | None = None,
               loss_options: dict[str, Any] | None = None) -> RunConfig:
    """A run's resolved config, checked (loss and its options) before anything is written."""
    from oodbench.losses import LOSSES
    from oodbench.models import check_block_activation

    check_block_activation(bench.model, LOSSES.get(loss).block_activation, loss)
    bench = with_absolute_folders(bench)  # a relative folder: means the same images later
    if epochs is not None:
        bench.train.epochs = epochs
        bench.train.validate()
    cfg = RunConfig(bench, loss, seed, {**bench.loss_options.get(loss, {}), **(loss_options or {})})
    make_criterion(cfg)  # bad loss options fail here, before the run folder exists
    return cfg


def prepare_run(req: TrainRequest, ctx: DataContext) -> Run:
    """The run folder `train` works in: the existing one (resume), or a new one whose config
    is written only after the config and the benchmark's data were checked. Under torchrun
    rank 0 prepares it and the other ranks open the same folder (rank 0's input error is
    every rank's)."""
    if world().distributed:
        return Run.open(on_main(lambda: _prepare_run(req, ctx).path))
    return _prepare_run(req, ctx)


def _prepare_run(req: TrainRequest, ctx: DataContext) -> Run:
    if req.run_dir is not None and (req.run_dir / "config.yaml").exists() and not req.explicit:
        run = Run.open(req.run_dir)
        make_criterion(check_run_config(run.config(), str(run.config_path)))
        return run
    bench = load_checked_benchmark(req.benchmark or "digits")
    cfg = run_config(bench, req.loss or "dismax", 0 if req.seed is None else req.seed,
                     req.epochs, req.loss_options)
    require_benchmark_data(bench, ctx)
    check_benchmark_sets(cfg, ctx)  # every set it will score, before the model is trained
    return Run.create(req.run_dir or default_run_dir(cfg, req.runs_root), cfg)


def train_run(run: Run, ctx: DataContext, device: torch.device,
              reporter: StepReporter | None = None,
              mixed_precision: bool | None = None,
              compile_model: bool = False) -> list[dict[str, Any]]:
    """Train (or resume) a prepared run; a finished run returns its stored history. The run
    folder is held meanwhile (`Run.hold`; under torchrun by rank 0, whose refusal every rank
    raises), so a second process training it gets `RunInUse` instead of sharing a checkpoint."""
    with contextlib.ExitStack() as stack:
        on_main(lambda: stack.enter_context(run.hold()))
        if run.is_trained():
            return list(run.require_checkpoint().get("history", []))
        return train(run, ctx, device, reporter, mixed_precision=mixed_precision,
                     compile_model=compile_model)


def launch_training(req: TrainRequest, ctx: DataContext, device: str, nproc: int,
                    mixed_precision: bool | None = None, compile_model: bool = False,
                    say: Say = _quiet) -> int:
    """`oodbench train --nproc-per-node N`: check the input and prepare the run folder here
    (bad input exits 2 before any process starts), then train it as N torchrun processes
    (`oodbench train --run-dir RUN` each); returns torchrun's exit code."""
    if world().distributed:
        raise OodbenchError("--nproc-per-node given inside a torchrun job",
                            "drop --nproc-per-node (torchrun already started the processes)")
    if nproc < 1:
        raise OodbenchError(f"--nproc-per-node must be >= 1, got {nproc}")
    dev = pick_device(device)
    if dev.type == "cuda" and (dev.index is not None or nproc > torch.cuda.device_count()):
        raise OodbenchError(f"--nproc-per-node {nproc} on {device}: each process takes one of "
                            f"the {torch.cuda.device_count()} GPU(s), cuda:0 upward",
                            "pass --device cuda with at most that many processes")
    run = prepare_run(req, ctx)
    check_batch_split(run.config().benchmark.train.batch_size, nproc)
    with run.hold():  # another process holding the run: RunInUse before any process starts
        pass
    argv = ["train", "--run-dir", str(run.path.resolve()), "--data-root",
            str(ctx.root.resolve()), "--device", device]
    if mixed_precision is not None:
        argv.append("--mixed-precision" if mixed_precision else "--no-mixed-precision")
    if compile_model:
        argv.append("--compile")
    say(f"{run.path}: training as {nproc} torchrun processes on {dev.type}")
    return launch(argv, nproc)


def find_runs(runs_root: Path = Path("runs"), benchmark: str | None = None,
              loss: str | None = None, seed: int | None = None) -> list[Run]:
    """The run folders under `runs_root` (those holding a config.yaml), narrowed by benchmark
    name, loss and seed; an error naming the command that makes one when none matches."""
    root = Path(runs_root)
    found = [Run(p.parent) for p in sorted(root.rglob("config.yaml"))] if root.is_dir() else []
    chosen = []
    for run in found:
        cfg = run.config()
        if ((benchmark is None or cfg.benchmark.name == benchmark)
                and (loss is None or cfg.loss == loss) and (seed is None or cfg.seed == seed)):
            chosen.append(run)
    if not chosen:
        narrowed = ", ".join(f"{k} {v}" for k, v in (("benchmark", benchmark), ("loss", loss),
                                                     ("seed", seed)) if v is not None)
        raise OodbenchError(
            f"no run under {root}/" + (f" matches {narrowed}" if narrowed else ""),
            "train one first: `oodbench train --loss dismax` (or pass a run folder, or "
            "--runs-root)")
    return chosen


@dataclass
class BenchmarkRequest:
    """What `oodbench run` was asked."""

    benchmark: str = "digits"
    losses: list[str] | None = None
    seeds: int | None = None
    epochs: int | None = None
    runs_root: Path = Path("runs")
    compile_model: bool = False  # torch.compile each run's training forward
    rescore: bool = False  # calibrate and score finished runs again even when up to date


def _run_configs(req: BenchmarkRequest) -> tuple[BenchmarkConfig, list[RunConfig]]:
    """The benchmark and the config of each of its (loss × seed) runs, checked."""
    bench = load_checked_benchmark(req.benchmark)
    losses = req.losses or bench.losses
    if req.seeds is not None and not 1 <= req.seeds <= len(bench.seeds):
        raise OodbenchError(
            f"--seeds {req.seeds}: benchmark {bench.name} has {len(bench.seeds)} seed"
            f"{'s' * (len(bench.seeds) != 1)} {bench.seeds}",
            f"pass --seeds N with 1 ≤ N ≤ {len(bench.seeds)} (the first N are run), or add "
            "seeds to the benchmark file's `seeds:`")
    seeds = bench.seeds[:req.seeds] if req.seeds else bench.seeds
    return bench, [run_config(copy.deepcopy(bench), loss, seed, req.epochs)
                   for loss in losses for seed in seeds]


def benchmark_runs(req: BenchmarkRequest, ctx: DataContext) -> list[Run]:
    """Every (loss × seed) run of the benchmark, prepared (folders created only after every
    config and the data were checked, so a bad option leaves no half-made folder)."""
    bench, configs = _run_configs(req)
    require_benchmark_data(bench, ctx)
    check_benchmark_sets(configs[0], ctx)  # the data are the same for every loss and seed
    return [Run.create(default_run_dir(cfg, req.runs_root), cfg) for cfg in configs]


def prepared_runs(req: BenchmarkRequest, ctx: DataContext,
                  say: Say = _quiet) -> tuple[BenchmarkConfig, list[Run]]:
    """The benchmark and its run folders, ready for calibrate and score once trained: the
    imported checkpoints of a benchmark with `checkpoints:`, else every (loss × seed) run."""
    bench = load_checked_benchmark(req.benchmark)
    if bench.checkpoints:
        return bench, imported_runs(req, bench, ctx, say)
    return bench, benchmark_runs(req, ctx)


def run_label(bench: BenchmarkConfig, run: Run) -> str:
    """How a run is named in messages: `loss/seedN`, or an imported checkpoint's name."""
    if bench.checkpoints:
        return run.path.name
    cfg = run.config()
    return f"{cfg.loss}/seed{cfg.seed}"


def _imported_dir(req: BenchmarkRequest, bench: BenchmarkConfig, entry: CheckpointEntry) -> Path:
    return req.runs_root / bench.name / entry.name


def _refuse_training_options(req: BenchmarkRequest, bench: BenchmarkConfig) -> None:
    given = [flag for flag, value in (("--loss", req.losses), ("--seeds", req.seeds),
                                      ("--epochs", req.epochs)) if value not in (None, [])]
    if given:
        verb = "does" if len(given) == 1 else "do"
        raise OodbenchError(
            f"{', '.join(given)} {verb} not apply: benchmark {bench.name} scores the imported "
            f"checkpoints it lists ({', '.join(e.name for e in bench.checkpoints)}), it trains "
            "nothing", f"drop {', '.join(given)}")


def imported_runs(req: BenchmarkRequest, bench: BenchmarkConfig, ctx: DataContext,
                  say: Say = _quiet) -> list[Run]:
    """The run folder of each of the benchmark's `checkpoints:`, importing those not imported
    yet (every file is found before any folder is made). A folder holding other weights is
    an error, not overwritten."""
    _refuse_training_options(req, bench)
    require_benchmark_data(bench, ctx)
    check_benchmark_sets(RunConfig(bench, "softmax", bench.seeds[0]), ctx)
    files = [resolve_checkpoint(e, ctx.root) for e in bench.checkpoints]
    runs = []
    for entry, path in zip(bench.checkpoints, files, strict=True):
        run = Run(_imported_dir(req, bench, entry))
        if not run.checkpoint_path.exists():
            say(f"importing {path} ({entry.model}) → {run.path}")
            run = import_checkpoint(path, entry.model, req.benchmark, run.path, entry.seed)[0]
        elif problem := _import_problem(run, bench, entry, path):
            raise OodbenchError(f"{run.path} {problem[0]}", problem[1])
        runs.append(run)
    return runs


def _import_problem(run: Run, bench: BenchmarkConfig, entry: CheckpointEntry,
                    path: Path) -> tuple[str, str] | None:
    """Why an existing folder cannot serve as `entry`'s run (what it holds, the fix), or None:
    `run` stops on it and `run --dry-run` shows it, so both judge alike."""
    if imported_sha256(run) != file_sha256(path):  # by content: the data root may move
        source = imported_from(run)
        held = (f"weights imported from {source} (a file with other contents)" if source else
                "weights trained here")
        return (f"holds other weights than checkpoint {entry.name!r} ({path}): {held}",
                "move that folder away, or give the entry another `name:`")
    if not _same_import(run, bench, entry):
        return (f"holds another configuration: {entry.name!r} imported under a benchmark "
                "whose model, detectors, sets or options have changed since",
                "delete that folder to import and score it again")
    return None


def _same_import(run: Run, bench: BenchmarkConfig, entry: CheckpointEntry) -> bool:
    """The folder's config is what importing `entry` under `bench` makes (the normalisation
    comes from the checkpoint's format, so it is taken from the folder)."""
    held = run.config()
    made = copy.deepcopy(bench)
    made.model, made.losses, made.checkpoints = entry.model, ["softmax"], []
    made.normalization = held.benchmark.normalization
    return held.seed == entry.seed and held.benchmark.to_dict() == made.to_dict()


@dataclass(frozen=True)
class RunPlan:
    """Where one run of a benchmark stands and what `oodbench run` would do with it."""

    label: str
    path: Path
    stands: str
    todo: tuple[str, ...]  # the steps `run` would take, in order; () = nothing left
    holder: str | None = None  # another process holding the folder: `run` would skip it


def plan_benchmark(req: BenchmarkRequest, ctx: DataContext | None = None) -> list[RunPlan]:
    """`oodbench run --dry-run`: each run's state and the steps `run` would take, judged as
    `run` judges them (`pipeline.run_state`), writing nothing. `ctx`: where a benchmark's
    `checkpoints:` are found (default: the usual data root)."""
    bench = load_checked_benchmark(req.benchmark)
    if bench.checkpoints:
        _refuse_training_options(req, bench)
        ctx = ctx or DataContext.resolve()
        return [_plan_imported(f"{bench.name}/{e.name}", Run(_imported_dir(req, bench, e)),
                               bench, e, req.rescore, ctx) for e in bench.checkpoints]
    return [_plan_one(cfg, default_run_dir(cfg, req.runs_root), req.rescore)
            for cfg in _run_configs(req)[1]]


def _plan_imported(label: str, run: Run, bench: BenchmarkConfig, entry: CheckpointEntry,
                   rescore: bool, ctx: DataContext) -> RunPlan:
    try:
        path = resolve_checkpoint(entry, ctx.root)
    except OodbenchError as e:
        return RunPlan(label, run.path, e.message, ("stop with exit 2",))
    if not run.checkpoint_path.exists():
        return RunPlan(label, run.path, "not imported", ("import", "calibrate", "score"))
    try:
        if problem := _import_problem(run, bench, entry, path):
            return RunPlan(label, run.path, problem[0], ("stop with exit 2",))
        return _plan_finished(label, run, load_checkpoint(run.checkpoint_path), rescore,
                              run.in_use(), "imported")
    except OodbenchError as e:
        return RunPlan(label, run.path, f"unreadable: {e}", ("stop with exit 2",))


def _plan_one(cfg: RunConfig, path: Path, rescore: bool) -> RunPlan:
    label = f"{cfg.benchmark.name}/{cfg.loss}/seed{cfg.seed}"
    try:
        return _plan_of(label, cfg, Run(path), rescore)
    except OodbenchError as e:  # what `run` would stop on (exit 2), shown in its row
        return RunPlan(label, path, f"unreadable: {e}", ("stop with exit 2",))


def _plan_of(label: str, cfg: RunConfig, run: Run, rescore: bool) -> RunPlan:
    path, every = run.path, ("train", "calibrate", "score")
    if not run.config_path.exists():
        return RunPlan(label, path, "not started", every)
    if run.config().to_dict() != cfg.to_dict():
        return RunPlan(label, path, "holds another configuration", ("stop with exit 2",))
    holder, n = run.in_use(), cfg.benchmark.train.epochs
    if not run.checkpoint_path.exists():
        return RunPlan(label, path, "not started", every, holder)
    ckpt = load_checkpoint(run.checkpoint_path)
    if not ckpt.get("finished"):
        step = f", {ckpt['step']} steps into the next" if ckpt.get("step") else ""
        return RunPlan(label, path, f"{ckpt['epoch']}/{n} epochs trained{step}",
                       ("train (resume)", "calibrate", "score"), holder)
    return _plan_finished(label, run, ckpt, rescore, holder, "trained")


def _plan_finished(label: str, run: Run, ckpt: dict[str, Any], rescore: bool,
                   holder: str | None, made: str) -> RunPlan:
    state = run_state(run, ckpt)
    stands = (f"{made}, calibrated and scored" if state.scored else
              f"{made} and calibrated" if state.calibrated else made)
    todo = (("calibrate", "score") if rescore or not state.calibrated else
            ("score",) if not state.scored else ())
    return RunPlan(label, run.path, stands, todo, holder)


def run_benchmark(req: BenchmarkRequest, ctx: DataContext, device: torch.device,
                  reporter: Callable[[str], StepReporter] | None = None,
                  progress: ProgressFactory = no_progress, say: Say = _quiet) -> Path:
    """Train, calibrate and score every (loss × seed) run; finished steps are skipped, so an
    interrupted `run` continues where it stopped. Returns the benchmark's runs folder."""
    refuse_under_torchrun("oodbench run")
    bench, runs = prepared_runs(req, ctx, say)
    busy = []
    for run in runs:
        label = f"{bench.name}/{run_label(bench, run)}"
        try:
            with run.hold():
                _run_one(req, run, label, ctx, device, reporter, progress, say)
        except RunInUse as e:
            busy.append(label)
            say(f"[yellow]skipped {label}: in use by {e.holder or 'another process'}")
    if busy:
        say(f"[yellow]{len(busy)} run(s) left to the processes holding them; run this command "
            "again once they finish for the complete report")
    return runs[0].path.parent


def _run_one(req: BenchmarkRequest, run: Run, label: str, ctx: DataContext,
             device: torch.device, reporter: Callable[[str], StepReporter] | None,
             progress: ProgressFactory, say: Say) -> None:
    """One run's train, calibrate and score (each step skipped when already done)."""
    if not run.is_trained():
        n = run.config().benchmark.train.epochs
        say(f"training {label} · {n} epoch{'s' * (n != 1)} → {run.path}")
    train_run(run, ctx, device, reporter(label) if reporter else None,
              compile_model=req.compile_model)
    state = RunState(False, False) if req.rescore else run_state(run)
    cal = state.calibration or calibrate_run(run, ctx, device, "nll", progress)
    kept = " (kept: fitted on these weights)" if state.calibrated else ""
    if cal.get("fitted") is False:
        kept = " (none fitted: see the warning)" + kept.replace(": fitted on", ": made on")
    say(f"calibrated {label}: T = {cal['temperature']:.3f}{kept}")
    for warning in calibration_warnings(cal):  # a kept calibration's too: they still apply
        say(f"[yellow]warning: {warning}")
    if state.scored:
        say(f"scored {label}: kept (metrics.json covers every detector and set on these "
            "weights; --rescore scores again)")
    else:
        score_run(run, ctx, device, None, False, progress)


def calibration_warnings(res: dict[str, Any]) -> list[str]:
    out = [res["warning"]] if res.get("warning") else []
    if res.get("fitted") is False:
        out.append(f"the validation split ({res.get('n', '?')} images) is classified without "
                   "error, so NLL falls without limit as T → 0 and no temperature can be fitted "
                   "from it: T = 1 kept (calibrated = uncalibrated); calibrating needs a "
                   "validation split with errors (a larger one)")
    elif res.get("at_bound"):
        out.append(f"the temperature stopped at the {res.get('bound', '')} search bound "
                   f"{res.get('bounds', '')} (or where the objective is already as low as "
                   "there); the validation split may be too small (a "
                   "perfectly classified one drives T to its lower bound) or the model "
                   "degenerate: treat calibrated numbers with care")
    return out
