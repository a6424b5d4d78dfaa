"""The `oodbench` command line: thin wrappers that parse options, call one library function and
print. Every error caused by input is an `OodbenchError`, printed as one message with its fix."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from oodbench.errors import OodbenchError, interrupt_exit_code, leave_closed_pipe

app = typer.Typer(
    name="oodbench",
    help="Benchmark out-of-distribution detection for image classifiers.\n\n"
         "Typical use: `oodbench run` (train, calibrate, score and report the embedded `digits` "
         "benchmark), or step by step: `oodbench train --benchmark digits --loss dismax`, "
         "`oodbench calibrate RUN`, `oodbench score RUN`, `oodbench report runs/digits`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

DataRoot = Annotated[Path | None, typer.Option(
    "--data-root",
    metavar="DIR", help="Folder with the datasets (default: $OODBENCH_DATA, else ./data).")]
Device = Annotated[str, typer.Option(metavar="DEVICE",
    help="Torch device: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps...")]


def _plain_help_columns() -> None:
    """Recent Typer versions print a type column in --help (`<list[str]>`, `<bool>`, `<path>`)
    beside the metavar; show the metavars written here instead (`NAME`, `KEY=VALUE`), nothing
    for flags and arguments (their metavar is already in the name column). Versions without the
    hook keep their own (click-style) display."""
    core = typer.core
    for name in ("TyperOption", "TyperArgument"):
        cls = getattr(core, name, None)
        if cls is not None and hasattr(cls, "display_type_rich"):
            option = name == "TyperOption"
            cls.display_type_rich = (lambda self, ctx, option=option:
                                     (self.metavar or "") if option else "")
        if cls is not None and hasattr(cls, "_usage_display_name"):  # {NAME} → NAME, as click
            cls._usage_display_name = lambda self: (
                (self.display_name_raw if self.required else f"[{self.display_name_raw}]")
                + ("..." if self.nargs != 1 else ""))


_plain_help_columns()

REPORT_BUGS = ("this is a bug in oodbench, not in your input: please report it (an issue in the "
               "oodbench repository) with the command line and the traceback above")


def _fail(e: OodbenchError) -> None:
    from rich.markup import escape

    from oodbench.console import console

    console.print(f"[bold red]error:[/] {escape(e.message)}")  # user text is not markup
    if e.hint:
        console.print(f"[bold]fix:[/] {escape(e.hint)}")
    raise typer.Exit(2)


def command(name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command whose `OodbenchError`s print as one message with its fix and exit
    with code 2 (the one place that turns user errors into exit codes)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                result = fn(*args, **kwargs)
                _leave_group()
                return result
            except OodbenchError as e:
                _fail(e)
            except (typer.Exit, typer.Abort, SystemExit):
                raise
            except BrokenPipeError:  # `oodbench report | head`: the reader left; no bug
                leave_closed_pipe()
            except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: work saved, exit 130 / 143
                from oodbench.console import console

                console.print("[yellow]interrupted. Run the same command again: what was "
                              "finished is kept (writes are atomic), and an interrupted "
                              "training resumes from its checkpoint.")
                raise typer.Exit(interrupt_exit_code(e)) from None
            except Exception:
                from oodbench.console import errors

                errors.print_exception()
                errors.print(f"[bold red]unexpected error:[/] {REPORT_BUGS}")
                raise typer.Exit(1) from None

        return app.command(name)(wrapper)

    return decorate


def _leave_group() -> None:
    """Under torchrun, after a command succeeded: every rank done, the group closed cleanly
    (see `distributed.leave_together`). Nothing to do where torch was never imported."""
    if "oodbench.distributed" in sys.modules:
        from oodbench.distributed import leave_together

        leave_together()


RunsRoot = Annotated[Path, typer.Option(metavar="DIR",
    help="Folder holding the run folders (where `train` puts them).")]
RunDirArg = Annotated[Path | None, typer.Argument(metavar="RUN",
    help="Run folder made by `oodbench train`. Default: every run under --runs-root, "
         "narrowed by --benchmark / --loss / --seed.", show_default=False)]
BenchmarkFilter = Annotated[str | None, typer.Option(metavar="NAME",
    help="Without a run folder: only runs of this benchmark.")]
LossFilter = Annotated[str | None, typer.Option(metavar="NAME",
    help="Without a run folder: only this loss.")]
SeedFilter = Annotated[int | None, typer.Option(metavar="N",
    help="Without a run folder: only this seed.")]
BatchSize = Annotated[int | None, typer.Option(metavar="N",
    help="Inference batch size (default: the fastest one, measured once on this device).")]


CompileModel = Annotated[bool, typer.Option(
    "--compile", metavar="",
    help="torch.compile the model for training (off by default; mainly for CUDA, where it "
         "pays back its compile time on long runs).")]


NprocPerNode = Annotated[int | None, typer.Option(
    "--nproc-per-node", metavar="N",
    help="Train as N DistributedDataParallel processes on this machine (launches torchrun; gloo "
         "on CPU, nccl with one GPU each on CUDA). Not needed under `torchrun ... -m oodbench "
         "train`.")]


FailUnder = Annotated[list[str] | None, typer.Option(
    metavar="METRIC[:QUALIFIER]=VALUE",
    help="Gate METRIC[:QUALIFIER]=VALUE: exit 1 if a selected cell is below VALUE, e.g. "
         "auroc=0.90, auroc:gaussian=0.95, auroc:msp:mean=0.9, "
         "misclassification_auroc:msp=0.8 (repeatable).")]
FailOver = Annotated[list[str] | None, typer.Option(
    metavar="METRIC[:QUALIFIER]=VALUE",
    help="Gate METRIC[:QUALIFIER]=VALUE: exit 1 if a selected cell is above VALUE, e.g. "
         "fpr_at_tpr95=0.30, ece=0.05, cost:odin=3, aurc=0.05 (repeatable).")]
Significance = Annotated[int, typer.Option(
    metavar="N",
    help="Paired-bootstrap replicates over test samples (0 = off; e.g. 1000): mark the rows "
         "tied with the best per AUROC column (†), and with --compare whether each AUROC Δ is "
         "significant (95 %).")]
GroupBy = Annotated[str, typer.Option(
    metavar="KEY",
    help="What a table shares: benchmark (one table per benchmark, data set and model) or data "
         "(benchmarks of one data set and model in one table, each loss named with its "
         "benchmark, e.g. an ablation beside its base; ties tested across them).")]
Forget = Annotated[list[str] | None, typer.Option(
    metavar="NAME",
    help="Remove this detector's results from metrics.json and its saved scores, then stop "
         "(repeatable). Scoring never drops earlier results on its own.")]
Oracle = Annotated[str | None, typer.Option(
    metavar="OOD_SET",
    help="ORACLE: detectors with a hyperparameter grid select on this OOD TEST set (an upper "
         "bound no deployment can reach; recorded and labelled in the report).")]


@command()
def train(
    benchmark: Annotated[str | None, typer.Option(metavar="NAME|FILE",
        help="Benchmark name (see `oodbench list benchmarks`) or YAML file. [default: digits]")
    ] = None,
    loss: Annotated[str | None, typer.Option(metavar="NAME",
        help="Loss (see `oodbench list losses`). [default: dismax]")] = None,
    seed: Annotated[int | None, typer.Option(metavar="N",
        help="Random seed of this run. [default: 0]")
                    ] = None,
    epochs: Annotated[int | None, typer.Option(metavar="N",
        help="Override the benchmark's number of epochs.")] = None,
    run_dir: Annotated[Path | None, typer.Option(metavar="DIR",
        help="Run folder (default: RUNS_ROOT/BENCHMARK/LOSS-seedSEED). An existing one resumes.")
    ] = None,
    runs_root: RunsRoot = Path("runs"),
    data_root: DataRoot = None,
    device: Device = "auto",
    loss_option: Annotated[list[str] | None, typer.Option(
        "--loss-option", "-o", metavar="KEY=VALUE",
        help="Loss option KEY=VALUE (repeatable; YAML value), e.g. `-o entropy_weight=1e-3` "
             "or `-o fpr=false`; overrides the benchmark's loss_options.")] = None,
    mixed_precision: Annotated[bool | None, typer.Option(
        "--mixed-precision/--no-mixed-precision", metavar="",
        help="Mixed precision + channels_last (default: on for CUDA; never used on CPU).")
    ] = None,
    compile_model: CompileModel = False,
    nproc_per_node: NprocPerNode = None,
) -> None:
    """Train one model with one loss; resumes if the run folder holds an unfinished checkpoint.

    Example: `oodbench train --loss dismax` · `oodbench train --benchmark mnist --seed 1` ·
    `oodbench train --nproc-per-node 2` · `torchrun --nproc-per-node 2 -m oodbench train`
    """
    from oodbench.console import console
    from oodbench.data import DataContext
    from oodbench.workflow import TrainRequest, launch_training

    ctx = DataContext.resolve(data_root)
    req = TrainRequest(benchmark, loss, seed, epochs, run_dir, _parse_options(loss_option or []),
                       runs_root)
    if nproc_per_node is not None and nproc_per_node != 1:
        _launch(lambda: launch_training(req, ctx, device, nproc_per_node, mixed_precision,
                                        compile_model, console.print))
    else:
        _train_here(req, ctx, device, mixed_precision, compile_model)


def _train_here(req: Any, ctx: Any, device: str, mixed_precision: bool | None,
                compile_model: bool) -> None:
    """`train` in this process (one of torchrun's, or alone), printing on rank 0 only."""
    from oodbench.console import RichTrainReporter, console, make_progress
    from oodbench.distributed import join
    from oodbench.experiment import pick_device
    from oodbench.workflow import prepare_run, train_run

    dev = join(pick_device(device))  # under torchrun: this rank's device, the group joined
    run = prepare_run(req, ctx)  # both before any write
    cfg = run.config()
    label = f"{cfg.benchmark.name}/{cfg.loss}/seed{cfg.seed}"
    if run.is_trained():
        console.print(f"[green]{label} is already trained[/] ({run.path})")
        return
    n = cfg.benchmark.train.epochs
    console.print(f"training {label} · model {cfg.benchmark.model} · device {dev} · "
                  f"{n} epoch{'s' * (n != 1)} → {run.path}")
    try:
        with make_progress() as p:
            history = train_run(run, ctx, dev, RichTrainReporter(p, label), mixed_precision,
                                compile_model)
    except KeyboardInterrupt as e:
        console.print(f"[yellow]interrupted; checkpoint saved. Run the same command to resume "
                      f"({run.path}).")
        raise typer.Exit(interrupt_exit_code(e)) from None
    console.print(f"[green]done[/] {label}: val accuracy {history[-1]['val_accuracy']:.1%}")


def _launch(start: Callable[[], int]) -> None:
    """Run a torchrun launch; its exit code is ours (a Ctrl-C: 130)."""
    from oodbench.console import console

    try:
        code = start()
    except KeyboardInterrupt as e:
        console.print("[yellow]interrupted. Run the same command to resume from the last "
                      "checkpoint.")
        raise typer.Exit(interrupt_exit_code(e)) from None
    if code:
        console.print(f"[bold red]torchrun exited with code {code}[/] (its output is above)")
        raise typer.Exit(code)


def _parse_options(items: list[str]) -> dict[str, object]:
    """KEY=VALUE strings → dict, values read as YAML scalars (1e-3, false, 0.5)."""
    import contextlib

    import yaml

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OodbenchError(f"loss option {item!r} is not KEY=VALUE",
                                "write e.g. `-o entropy_weight=1e-3`")
        try:
            parsed = yaml.safe_load(value)
            if isinstance(parsed, str):  # YAML 1.1 reads 1e-3 as a string
                with contextlib.suppress(ValueError):
                    parsed = float(parsed)
            out[key.strip()] = parsed
        except yaml.YAMLError:
            raise OodbenchError(f"cannot read the value of loss option {item!r}") from None
    return out


def _runs(run_dir: Path | None, runs_root: Path, benchmark: str | None, loss: str | None,
          seed: int | None) -> list[Any]:
    """The run folder given, or every run under the runs root that matches the filters
    (printed, so the user sees what the command acts on)."""
    from oodbench.console import console
    from oodbench.runs import Run
    from oodbench.workflow import find_runs

    if run_dir is not None:
        if (benchmark, loss, seed) != (None, None, None):
            raise OodbenchError("--benchmark / --loss / --seed select runs only when no run "
                                "folder is given", "drop them, or drop the run folder")
        return [Run.open(run_dir)]
    runs = find_runs(runs_root, benchmark, loss, seed)
    console.print(f"{len(runs)} run(s) under {runs_root}/: "
                  + ", ".join(str(r.path) for r in runs))
    return runs


@command()
def calibrate(
    run_dir: RunDirArg = None,
    objective: Annotated[str, typer.Option(metavar="nll|ece",
        help="nll (default) or ece (15 bins).")] = "nll",
    runs_root: RunsRoot = Path("runs"),
    benchmark: BenchmarkFilter = None,
    loss: LossFilter = None,
    seed: SeedFilter = None,
    batch_size: BatchSize = None,
    data_root: DataRoot = None,
    device: Device = "auto",
) -> None:
    """Fit a temperature on the validation split (never the test split) and store it.

    Example: `oodbench calibrate` (every run under runs/) ·
    `oodbench calibrate runs/digits/dismax-seed0 --objective ece`
    """
    from oodbench.console import out, progress_factory
    from oodbench.data import DataContext
    from oodbench.distributed import join
    from oodbench.experiment import pick_device
    from oodbench.pipeline import calibrate_run

    ctx, dev = DataContext.resolve(data_root), join(pick_device(device))
    for run in _runs(run_dir, runs_root, benchmark, loss, seed):
        with progress_factory() as pf:
            res = calibrate_run(run, ctx, dev, objective, pf, batch_size)
        if res is None:  # a torchrun rank other than 0: its share is done, rank 0 reports
            continue
        t = Table(title=f"calibration of {run.path} on {res['split']} ({res['n']} samples)")
        for c in ("", "accuracy", "ECE", "NLL"):
            t.add_column(c, justify="right")
        for k in ("before", "after"):
            m = res[k]
            t.add_row(k, f"{m['accuracy']:.2%}", f"{m['ece']:.2%}", f"{m['nll']:.4f}")
        out.print(t)
        how = (f"objective {objective}" if res.get("fitted", True)
               else "none fitted: see the warning")
        out.print(f"temperature T = {res['temperature']:.4f} ({how}); "
                  f"stored in {run.calibration_path}")
        _warn(res)


def _warn(res: dict[str, Any]) -> None:
    from oodbench.console import console
    from oodbench.workflow import calibration_warnings

    for w in calibration_warnings(res):
        console.print(f"[yellow]warning: {w}")


@command("import-checkpoint")
def import_checkpoint(
    path: Annotated[Path, typer.Argument(metavar="CHECKPOINT",
        help="Pretrained checkpoint file (a known format).")],
    model: Annotated[str, typer.Option(metavar="NAME",
        help="The checkpoint's model, e.g. resnet20.")],
    benchmark: Annotated[str, typer.Option(metavar="NAME|FILE",
        help="Benchmark whose data and detectors the run uses (name or YAML file).")],
    run_dir: Annotated[Path | None, typer.Option(metavar="DIR",
        help="Run folder (default: runs/BENCHMARK/MODEL-FORMAT).")] = None,
) -> None:
    """Make a finished run folder from a pretrained checkpoint, ready for calibrate and score.

    Example: `oodbench import-checkpoint ../shared/data/models/akamaster-resnet-cifar10/\
resnet20-12fca82f.th --model resnet20 --benchmark cifar10-jpeg`
    """
    from oodbench.checkpoint_import import import_checkpoint as do_import
    from oodbench.console import out

    run, info = do_import(path, model, benchmark, run_dir)
    cfg = run.config()
    meta = ", ".join(f"{k} {v:g}" for k, v in info["metadata"].items())
    out.print(f"imported {info['format']} checkpoint ({model}{'; ' + meta if meta else ''}) "
              f"→ {run.path} · input normalisation {cfg.benchmark.normalization}")
    out.print(f"next: `oodbench calibrate {run.path}` and `oodbench score {run.path}`")


@command()
def score(
    run_dir: RunDirArg = None,
    detector: Annotated[list[str] | None, typer.Option(
        "--detector", "-d", metavar="NAME",
        help="Detector to score (repeatable; default: the benchmark's list).")] = None,
    calibrated: Annotated[bool, typer.Option(metavar="",
        help="Use the run's calibrated temperature in probability-based scores.")] = False,
    param: Annotated[list[str] | None, typer.Option(
        "--param", "-p", metavar="DETECTOR.NAME=VALUE",
        help="Detector hyperparameter DETECTOR.NAME=VALUE (repeatable; VALUE is YAML), e.g. "
             "odin.T=100, mahalanobis.layer=block2, odin.eps_grid=[0,0.001].")] = None,
    selection: Annotated[str | None, typer.Option(metavar="MODE",
        help="How tuned detectors (odin, mahalanobis*) choose hyperparameters / weights: none "
             "(defaults), id (in-dist validation only), fgsm (in-dist validation vs FGSM copies; "
             "no OOD data), ood (needs --ood-validation).")] = None,
    ood_validation: Annotated[str | None, typer.Option(metavar="DATASET",
        help="Dataset used as OOD validation data with --selection ood (explicit opt-in); a "
             "split disjoint from every test set is used, checked by image content.")] = None,
    forget: Forget = None,
    oracle: Oracle = None,
    runs_root: RunsRoot = Path("runs"),
    benchmark: BenchmarkFilter = None,
    loss: LossFilter = None,
    seed: SeedFilter = None,
    batch_size: BatchSize = None,
    data_root: DataRoot = None,
    device: Device = "auto",
) -> None:
    """Score detectors on the in-distribution test set and every OOD set; write metrics.json.

    Forward outputs are cached in the run folder, so scoring again (or with other gradient-free
    detectors) runs no forward pass; ODIN's clean forward also fills the cache. Under
    `torchrun --nproc-per-node N -m oodbench score ...` each set's forward pass is split across
    the processes and rank 0 alone writes and reports.

    Example: `oodbench score --detector odin` (every run under runs/) ·
    `oodbench score runs/digits/dismax-seed0 -d msp -d mmles` ·
    `oodbench score RUN -d odin --selection fgsm` · `oodbench score RUN -d odin -p odin.T=100`
    """
    from oodbench.data import DataContext
    from oodbench.distributed import join
    from oodbench.experiment import pick_device
    from oodbench.pipeline import score_run

    if selection is not None and selection not in SELECTION_MODES:
        raise OodbenchError(f"--selection {selection!r} is not a selection mode",
                            f"pass one of {', '.join(SELECTION_MODES)} (see --help)")
    runs = _runs(run_dir, runs_root, benchmark, loss, seed)
    if forget:
        _forget(runs, forget)
        return
    _warn_unreadable_metrics(runs)
    ctx, dev = DataContext.resolve(data_root), join(pick_device(device))
    params = parse_params(param)
    _score_each(runs, lambda run, pf: score_run(run, ctx, dev, detector, calibrated, pf, params,
                                                selection, ood_validation, batch_size, oracle))


def _score_each(runs: list[Any], score_one: Callable[[Any, Any], dict[str, Any] | None]
                ) -> None:
    """Score each run (`score_one(run, progress_factory)`) and print it; exit 2 at the end if
    any detector gave NaN scores (the other results are saved first)."""
    from oodbench.console import progress_factory

    bad: list[str] = []
    for run in runs:
        with progress_factory() as pf:
            m = score_one(run, pf)
        if m is None:  # a torchrun rank other than 0: its share is done, rank 0 reports
            continue
        _print_scores(run.path, m)
        bad += [f"{run.path}: {d}" for d in m["scored"] if m["detectors"][d].get("nonfinite")]
    if bad:  # results are saved, but a NaN score is an input problem: say so in the exit code
        raise OodbenchError(f"NaN/infinite scores (no metric computed): {'; '.join(bad)}",
                            "check the detector's hyperparameters (-p) and the model's outputs")


SELECTION_MODES = ("none", "id", "fgsm", "ood")


def _warn_unreadable_metrics(runs: list[Any]) -> None:
    """Scoring sets an unreadable metrics.json aside (`RUN/metrics.json.unreadable`) and keeps
    none of its results: say so before, not silently."""
    from oodbench.console import console
    from oodbench.io import read_json

    for run in runs:
        try:
            if run.metrics_path.exists():
                read_json(run.metrics_path)
        except (ValueError, UnicodeDecodeError):
            console.print(f"[yellow]warning: {run.metrics_path} is not valid JSON: scoring sets "
                          "it aside as metrics.json.unreadable, and the results it held are "
                          "not kept (score those detectors again)")


def _detectors_in(run: Any, read_json: Callable[[Path], Any]) -> list[str]:
    try:
        m = read_json(run.metrics_path) if run.metrics_path.exists() else {}
    except (ValueError, UnicodeDecodeError):
        return []
    return list(m.get("detectors", {})) if isinstance(m, dict) else []


def _forget(runs: list[Any], names: list[str]) -> None:
    from oodbench.console import console
    from oodbench.detectors import DETECTORS
    from oodbench.io import read_json
    from oodbench.pipeline import forget_detectors

    held = {d for run in runs for d in _detectors_in(run, read_json)}
    unknown = [n for n in names if n not in held and n not in DETECTORS.names()]
    if unknown:
        raise OodbenchError(f"--forget {', '.join(unknown)}: no such detector, registered or "
                            "in these runs' results", "detectors in these runs' results: "
                            f"{', '.join(sorted(held)) or 'none'}")
    for run in runs:
        gone = forget_detectors(run, names)
        console.print(f"{run.path}: removed {', '.join(gone) or 'nothing'}"
                      + (f" (not there: {', '.join(sorted(set(names) - set(gone)))})"
                         if set(names) - set(gone) else ""))


def parse_params(items: list[str] | None) -> dict[str, dict[str, object]]:
    """["odin.T=100", ...] → {"odin": {"T": 100}}; values are parsed as YAML (the detector
    types and checks them)."""
    import yaml

    out: dict[str, dict[str, object]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        det, dot, name = key.rpartition(".")
        if not (sep and dot and det and name):
            raise OodbenchError(f"bad --param {item!r}",
                                "write DETECTOR.NAME=VALUE, e.g. odin.T=100")
        try:
            out.setdefault(det, {})[name] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise OodbenchError(f"bad value in --param {item!r}: {e}") from None
    return out


def grouped_log(lines: list[str], most: int = 3) -> list[str]:
    """The forward log with the sets that had the same work on one line: 25 shifted copies of
    the test set are one line, not 25. Lines without a "set: " prefix stay as they are."""
    groups: dict[tuple[bool, str], list[str]] = {}  # (per set?, text) → the sets
    for line in lines:
        name, sep, what = line.partition(": ")
        groups.setdefault((bool(sep), what if sep else line), []).append(name)
    out = []
    for (per_set, what), names in groups.items():
        if not per_set:
            out.extend([what] * len(names))
        elif len(names) <= most:
            out.append(f"{', '.join(names)}: {what}")
        else:
            out.append(f"{len(names)} sets ({', '.join(names[:most])} … {names[-1]}): {what}")
    return out


def _print_scores(run_dir: Path, m: dict[str, Any]) -> None:
    from rich.markup import escape

    from oodbench.console import console, out

    if m["images_forwarded"] == 0:
        console.print("[green]all outputs from the cache: no forward pass was run")
    else:
        console.print(f"the model processed {m['images_forwarded']} images:")
        for line in grouped_log(m["forward_log"]):
            console.print(f"  {line}")
    t = Table(title=f"{run_dir}: AUROC / FPR@95%TPR (%)")
    t.add_column("detector", overflow="fold")
    for o in m["ood_sets"]:
        t.add_column(o, justify="right", overflow="fold")
    t.add_column("cost", justify="right")
    for d in m["scored"]:
        r = m["detectors"][d]
        if r.get("applicable") is False:  # its reason is printed once, under the table
            t.add_row(d, *["n/a"] * len(m["ood_sets"]), "")
            continue
        t.add_row(d, *[f"{r['ood'][o]['auroc']:.1%} / {r['ood'][o]['fpr_at_tpr95']:.1%}"
                       if o in r["ood"] else "n/a" for o in m["ood_sets"]],
                  f"{r.get('cost', float('nan')):.2f}×")
    out.print(t)
    for d in m["scored"]:
        r = m["detectors"][d]
        if r.get("applicable") is False:
            console.print(f"{d}: n/a, {escape(r['reason'])}")
        for s, n in r.get("nonfinite", {}).items():
            console.print(f"[bold red]{d}: {n} NaN/infinite score(s) on {s}; no metric computed")
        sel = r.get("selection", {})
        if sel.get("mode", "none") != "none":
            against = (f" vs {sel['negatives']}" if sel.get("negatives")
                       else f" (no negatives; criterion: {sel.get('criterion', 'in-dist only')})")
            console.print(f"{d}: selection {sel['mode']} on {sel.get('validation')} "
                          f"(validation split){against}: "
                          f"{sel.get('chosen', sel.get('weights'))}")
    out.print(f"test accuracy {m['classification']['uncalibrated']['accuracy']:.2%}; "
              f"metrics in {run_dir / 'metrics.json'}")


@command()
def report(
    paths: Annotated[list[Path] | None, typer.Argument(metavar="PATH",
        help="Run folders or folders of runs (default: runs/).")] = None,
    metric: Annotated[list[str] | None, typer.Option(metavar="METRIC",
        help="Metric(s) to show (repeatable): auroc, fpr_at_tpr95, tnr_at_tpr95, dtacc, "
             "aupr_in, aupr_out, and the selective-classification ones "
             "misclassification_auroc, aurc, e_aurc, augrc, risk_at_80, risk_at_95. Tables "
             "default to auroc, fpr_at_tpr95 and the selective ones, data to all.")
    ] = None,
    ood: Annotated[list[str] | None, typer.Option(metavar="NAME",
        help="Only these OOD sets (repeatable).")
                   ] = None,
    detector: Annotated[list[str] | None, typer.Option(
        "--detector", "-d", metavar="NAME", help="Only these detectors (repeatable).")] = None,
    loss: Annotated[list[str] | None, typer.Option(metavar="NAME",
        help="Only these losses (repeatable).")
                    ] = None,
    fmt: Annotated[str, typer.Option(
        "--format", "-f",
        metavar="FORMAT", help="What to print: rich, markdown, csv or json.")] = "rich",
    style: Annotated[str, typer.Option(metavar="STYLE",
        help="table (rows = loss + detector) or paper (SoftMax+MSP, SoftMax+entropy and "
             "DisMax+MMLES side by side, as the IsoMax / DisMax tables).")] = "table",
    pair: Annotated[list[str] | None, typer.Option(metavar="LOSS:DETECTOR",
        help="LOSS:DETECTOR pairs for --style paper (repeatable).")] = None,
    compare: Annotated[tuple[Path, Path] | None, typer.Option(metavar="A B",
        help="RUN_A RUN_B: show B − A for every shared cell (each a run or folder of runs).")
    ] = None,
    plots: Annotated[Path | None, typer.Option(metavar="DIR",
        help="Write PNG histograms, ROC curves and reliability diagrams into this folder.")
    ] = None,
    bootstrap: Annotated[int, typer.Option(metavar="N",
        help="Bootstrap replicates for a 95 % AUROC interval (0 = off; e.g. 1000).")] = 0,
    fail_under: FailUnder = None,
    fail_over: FailOver = None,
    output: Annotated[Path | None, typer.Option(
        "--output", metavar="DIR",
        help="Folder for report.json/.md/.csv (default: the first path). No short form: `-o` "
             "is --loss-option in `train`.")
    ] = None,
    write: Annotated[bool, typer.Option(metavar="", help="Write the report files.")] = True,
    significance: Significance = 0,
    group_by: GroupBy = "benchmark",
) -> None:
    """Compare runs (mean ± std over seeds), write it as JSON, Markdown and CSV, and gate CI.

    Exit code 0: all gates pass; 1: a gate failed (the failed cells are printed); 2: bad input.

    Examples: `oodbench report runs/digits --metric auroc -d msp -d mmles` ·
    `oodbench report runs/digits --fail-under auroc=0.90 --fail-over fpr_at_tpr95=0.30` ·
    `oodbench report --compare runs/old runs/new` · `oodbench report runs/digits --plots figs`
    """
    from oodbench.report_command import ReportOptions, run_report

    opts = ReportOptions(metric, ood, detector, loss, fmt, style, pair, compare, plots,
                         bootstrap, fail_under or [], fail_over or [], output, write,
                         significance=significance, group_by=group_by)
    code = run_report(paths or [Path("runs")], opts)
    if code:
        raise typer.Exit(code)

@command()
def run(
    benchmark: Annotated[str, typer.Argument(metavar="BENCHMARK",
        help="Benchmark name or YAML file (default: the embedded `digits`).")] = "digits",
    loss: Annotated[list[str] | None, typer.Option(metavar="NAME",
        help="Only these losses (repeatable; default: the benchmark's).")] = None,
    seeds: Annotated[int | None, typer.Option(metavar="N",
        help="Use the first N of the benchmark's seeds.")
                     ] = None,
    epochs: Annotated[int | None, typer.Option(metavar="N",
        help="Override the number of epochs.")] = None,
    jobs: Annotated[int, typer.Option(
        metavar="N", min=1,
        help="Run the (loss × seed) runs as N parallel processes (each a train, calibrate, "
             "score of its run folder; log in RUN/job.log). Complete runs are skipped.")] = 1,
    rescore: Annotated[bool, typer.Option(
        "--rescore", help="Calibrate and score finished runs again even when their results are "
        "up to date (e.g. after changing a detector's code). Training is never redone.")
                       ] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show where each run stands and which steps `run` would take; "
        "write nothing.")] = False,
    runs_root: RunsRoot = Path("runs"),
    data_root: DataRoot = None,
    device: Device = "auto",
    compile_model: CompileModel = False,
) -> None:
    """Train, calibrate, score and report a whole benchmark (every loss × seed).

    Finished steps are skipped, so an interrupted `run` continues where it stopped: an
    unfinished run resumes from its checkpoint, a calibration fitted on the current weights is
    kept, and results that cover every detector and OOD set on those weights are not scored
    again (--rescore does).

    Example: `oodbench run` (embedded digits, no download) ·
    `oodbench run mnist --data-root ../shared/data` · `oodbench run --epochs 2`
    """
    from oodbench.console import RichTrainReporter, console, make_progress, progress_factory
    from oodbench.data import DataContext
    from oodbench.experiment import pick_device
    from oodbench.report_command import ReportOptions, run_report
    from oodbench.workflow import BenchmarkRequest, run_benchmark

    req = BenchmarkRequest(benchmark, loss, seeds, epochs, runs_root, compile_model, rescore)
    if dry_run:
        _print_plan(req, DataContext.resolve(data_root))
        return
    if jobs > 1:
        folder = _sweep(req, DataContext.resolve(data_root), str(pick_device(device)), jobs)
    else:
        with make_progress() as p, progress_factory(p) as pf:
            folder = run_benchmark(req, DataContext.resolve(data_root), pick_device(device),
                                   lambda label: RichTrainReporter(p, label), pf, console.print)
    run_report([folder], ReportOptions(table_metrics=("auroc", "fpr_at_tpr95")))


def _print_plan(req: Any, ctx: Any) -> None:
    from oodbench.console import out
    from oodbench.workflow import plan_benchmark

    plans = plan_benchmark(req, ctx)
    t = Table(title=f"oodbench run {req.benchmark} --dry-run (nothing was written)",
              caption=f"run folders under {plans[0].path.parent}" if plans else None)
    for c in ("run", "stands", "run would"):
        t.add_column(c)
    for p in plans:
        todo = " → ".join(p.todo) or "[green]nothing (up to date)[/]"
        if p.holder:
            todo = f"[yellow]skip it: in use by {p.holder}[/]"
        t.add_row(p.label, p.stands, todo)
    out.print(t)
    left = [p for p in plans if p.todo]
    held = sum(1 for p in left if p.holder)
    out.print(f"{len(left)} of {len(plans)} run(s) have work left"
              + (f", {held} of them in use by other processes (run would skip those)"
                 if held else ""))


def _sweep(req: Any, ctx: Any, device: str, jobs: int) -> Path:
    """The runs as parallel processes, one progress line per run showing its current step."""
    from oodbench.console import console, make_progress
    from oodbench.sweep import run_sweep

    with make_progress() as p:
        tasks: dict[str, Any] = {}

        def status(label: str, step: str) -> None:
            if label not in tasks:
                tasks[label] = p.add_task(label, total=None, info="")
            done = step == "done" or "skipped" in step
            p.update(tasks[label], info=step, total=1 if done else None,
                     completed=1 if done else 0)
            if not console.is_terminal:  # a log draws no bars: each step as a line
                console.print(f"{label}: {step}", soft_wrap=True)

        folder, ran = run_sweep(req, ctx, device, jobs, status)
    failed = [j for j in ran if j.returncode]
    for j in ran:
        if j.held_by:
            console.print(f"[yellow]skipped {j.label}: in use by {j.held_by}; run this "
                          "command again once it finishes for the complete report")
    for j in failed:
        console.print(f"[bold red]{j.label} failed while {j.failed_step}[/]: see {j.log}")
    if failed:
        raise typer.Exit(max(j.returncode or 1 for j in failed))
    return folder


@command()
def publish(
    source: Annotated[Path, typer.Argument(metavar="RUNS",
        help="Folder of run folders (or one run) whose results to copy.")],
    dest: Annotated[Path, typer.Argument(metavar="DEST",
        help="Folder to copy them into, same layout (e.g. benchmarks/results).")],
) -> None:
    """Copy scored runs' results (config, manifest, calibration, metrics; no weights, caches or
    per-sample scores) into DEST, small enough to commit; `oodbench report DEST` reads them.

    Example: `oodbench publish runs/mnist benchmarks/results/mnist`
    """
    from oodbench.console import out
    from oodbench.runs import publish_runs

    made = publish_runs(source, dest)
    out.print(f"copied the results of {len(made)} run(s) to {dest}; "
              f"regenerate the tables with `oodbench report {dest}`")


@command()
def data(
    download: Annotated[list[str] | None, typer.Option(
        "--download",
        metavar="NAME", help="Download this dataset into the data root first (repeatable; "
        "torchvision, needs internet; only mnist, fashionmnist, kmnist, cifar10, cifar100, "
        "svhn).")] = None,
    data_root: DataRoot = None,
) -> None:
    """List every dataset: its status here, size on disk and how to get it.

    Status: present, missing or checksum mismatch; built in for the embedded digits and the
    generated noise sets. Nothing is downloaded unless `--download` names it.

    Example: `oodbench data --data-root ../shared/data` · `oodbench data --download cifar10`
    """
    from oodbench.console import out
    from oodbench.data import DataContext
    from oodbench.data.status import dataset_statuses, human_size
    from oodbench.data.status import download as fetch

    ctx = DataContext.resolve(data_root, download=bool(download))
    fetch(download or [], ctx)
    colour = {"present": "green", "built in": "green", "missing": "yellow",
              "checksum mismatch": "bold red"}
    t = Table(title=f"datasets under {ctx.root.resolve()} (cache: {ctx.cache_root})")
    for c in ("dataset", "status", "size", "how to get it"):
        t.add_column(c, justify="right" if c == "size" else "left")
    for r in dataset_statuses(ctx):
        t.add_row(r.name, f"[{colour.get(r.status, 'white')}]{r.status}[/]",
                  human_size(r.size_bytes) if r.size_bytes else "",
                  "" if r.status in ("present", "built in") else r.how_to_get)
    out.print(t)


@command("list")
def list_(
    what: Annotated[str, typer.Argument(
        metavar="WHAT", help="losses, detectors, models, datasets or benchmarks.")] = "all",
    markdown: Annotated[bool, typer.Option(
        metavar="", help="Print the detector table as Markdown (the README's table).")] = False,
) -> None:
    """List what the registries hold (each is the one place to add a member); detectors with
    their paper, needs, fit, defaults, selection grid and the loss × detector applicability.

    Example: `oodbench list detectors` · `oodbench list detectors --markdown`
    """
    from oodbench.catalog import detector_markdown
    from oodbench.console import out

    tables = {"losses": _simple_rows, "detectors": _detector_table, "models": _simple_rows,
              "datasets": _simple_rows, "benchmarks": _simple_rows}
    if what != "all" and what not in tables:
        raise OodbenchError(f"cannot list {what!r}", f"use one of: all, {', '.join(tables)}")
    if markdown:
        if what != "detectors":
            raise OodbenchError("--markdown prints the detector table",
                                "run `oodbench list detectors --markdown`")
        out.file.write(detector_markdown())
        return
    for name, build in tables.items():
        if what in ("all", name):
            out.print(build(name))


def _simple_rows(what: str) -> Table:
    from oodbench.config import available_benchmarks
    from oodbench.data import DATASETS
    from oodbench.losses import LOSSES
    from oodbench.models import MODELS

    rows = {"losses": lambda: [(n, s.summary) for n, s in LOSSES.items()],
            "models": lambda: [(n, s.summary) for n, s in MODELS.items()],
            "datasets": lambda: [(n, s.summary) for n, s in DATASETS.items()],
            "benchmarks": lambda: [(n, _benchmark_summary(p))
                                   for n, p in available_benchmarks().items()]}
    t = Table(title=what)
    t.add_column("name")
    t.add_column("description")
    for r in rows[what]():
        t.add_row(*r)
    return t


def _benchmark_summary(path: Path) -> str:
    from oodbench.config import load_benchmark

    try:
        b = load_benchmark(str(path))
    except OodbenchError as e:
        return f"[red]invalid[/]: {e.message} ({path})"
    return (f"{b.dataset} · {b.model} · {', '.join(b.losses)} × {len(b.seeds)} seed"
            f"{'s' * (len(b.seeds) != 1)} · {b.train.epochs} epochs · {len(b.ood)} OOD sets\n"
            f"[dim]{path}[/]")


def _detector_table(what: str) -> Any:
    """A table where the terminal is wide enough; below 140 columns (CI logs, pipes: 80) one
    block per detector, since seven columns would cut every cell to a few letters."""
    from rich.console import Group
    from rich.padding import Padding
    from rich.text import Text

    from oodbench.catalog import applies_summary, detector_rows
    from oodbench.console import out

    rows = detector_rows()
    title = "n/a: refuses a prototype head; per loss: list detectors --markdown"
    if out.width < 140:
        blocks: list[Any] = [Text(f"{what} ({title})", style="bold")]
        for r in rows:
            lines = [f"needs {r.needs} · fitted on {r.fit} · defaults {r.defaults}",
                     *([f"grid {r.grid}"] if r.grid != "—" else []),
                     f"losses: {applies_summary(r.applies)}"]
            blocks += [Text.assemble((r.name, "bold"), "  ", r.paper),
                       *(Padding(Text(line), (0, 0, 0, 4)) for line in lines)]
        return Group(*blocks)
    t = Table(title=f"{what} ({title})")
    for c in ("name", "paper", "needs", "fitted on", "defaults", "grid", "losses"):
        t.add_column(c, no_wrap=c == "name", overflow="fold")  # never cut a name to "…"
    for r in rows:
        t.add_row(r.name, r.paper, r.needs, r.fit, r.defaults, r.grid, applies_summary(r.applies))
    return t


def main() -> None:  # pragma: no cover
    app(prog_name="oodbench")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
