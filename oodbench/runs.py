"""A run folder: everything about one trained model, so each step can run separately, later.

    runs/<benchmark>/<loss>-seed<seed>/
        config.yaml        resolved run config (benchmark + loss + seed)
        checkpoint.pt      weights + optimizer + progress (resume point; weights_only-loadable)
        manifest.json      versions, device, timings, data fingerprints
        calibration.json   fitted temperature and before/after calibration metrics
        cache/<key>/       cached forward outputs, keyed by weights + data + transform
        scores/<detector>/<ood set>.npy
        metrics.json       everything `report` reads
        metrics.json.lock  lock of concurrent `score`s merging into metrics.json
        run.lock           held while a process trains the run (`Run.hold`): holder's PID, host

Temporaries of a process killed while writing are removed when the folder is next opened.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oodbench.config import RunConfig, load_yaml
from oodbench.errors import OodbenchError
from oodbench.io import (
    Busy,
    atomic_write,
    held_now,
    holder_of,
    read_json,
    remove_stale_temps,
    write_yaml,
)


def default_run_dir(cfg: RunConfig, root: Path = Path("runs")) -> Path:
    return root / cfg.benchmark.name / f"{cfg.loss}-seed{cfg.seed}"


@dataclass
class Run:
    path: Path

    config_path = property(lambda self: self.path / "config.yaml")
    checkpoint_path = property(lambda self: self.path / "checkpoint.pt")
    manifest_path = property(lambda self: self.path / "manifest.json")
    calibration_path = property(lambda self: self.path / "calibration.json")
    metrics_path = property(lambda self: self.path / "metrics.json")
    cache_dir = property(lambda self: self.path / "cache")
    scores_dir = property(lambda self: self.path / "scores")

    @classmethod
    def create(cls, path: Path, cfg: RunConfig) -> Run:
        """New run folder, or the existing one if its config is the same (so training resumes).
        A different config in the same folder is refused rather than mixed."""
        run = cls(Path(path))
        if run.config_path.exists():
            old = run.config()
            if old.to_dict() != cfg.to_dict():
                raise OodbenchError(
                    f"{path} already holds a run with another configuration",
                    "delete that folder to start over, or put this run elsewhere (`train "
                    "--run-dir DIR`, `run --runs-root DIR`)",
                )
            run.remove_stale_temps()
            return run
        _check_new_run_folder(run.path)
        write_yaml(run.config_path, cfg.to_dict())
        return run

    @classmethod
    def open(cls, path: Path) -> Run:
        run = cls(Path(path))
        if not run.config_path.exists():
            raise OodbenchError(f"no run at {path}",
                                "create it with `oodbench train --benchmark NAME --loss LOSS`")
        run.remove_stale_temps()
        return run

    def remove_stale_temps(self) -> None:
        """Delete the temporaries a killed process left in the folder (a checkpoint or
        metrics.json being written, score files); the cache cleans its own (`OutputCache`)."""
        remove_stale_temps(self.path)
        if self.scores_dir.is_dir():
            for d in self.scores_dir.iterdir():
                if d.is_dir():
                    remove_stale_temps(d)

    @contextlib.contextmanager
    def hold(self) -> Iterator[int | None]:
        """Hold this run folder for the block, so no other process trains it meanwhile: two
        trainings of one run would write one checkpoint in turns. A second process gets an
        error naming the holder (exit 2) instead. Re-entrant within one process, and a no-op in
        a child the holder started for this run (`HELD_BY_PARENT`). Yields the lock's file
        descriptor when this call took the lock (else None), for children to inherit."""
        key = self.path.resolve()
        if _held_here(key):
            yield None
            return
        stack = contextlib.ExitStack()
        try:
            fd = stack.enter_context(held_now(self.path / "run.lock"))
        except Busy as busy:
            raise RunInUse(self.path, busy.holder) from None
        with stack:
            _HELD.add(key)
            try:
                yield fd
            finally:
                _HELD.discard(key)

    def in_use(self) -> str | None:
        """Who holds this run folder ("pid N on HOST", or "another process"), else None."""
        if _held_here(self.path.resolve()):
            return None
        holder = holder_of(self.path / "run.lock")  # a probe: writes nothing
        return None if holder is None else holder or "another process"

    def config(self) -> RunConfig:
        return RunConfig.from_dict(load_yaml(self.config_path), str(self.config_path))

    def require_checkpoint(self) -> dict[str, Any]:
        if not self.checkpoint_path.exists():
            raise OodbenchError(f"{self.path} has no checkpoint yet",
                                f"train it first: `oodbench train --run-dir {self.path}`")
        return load_checkpoint(self.checkpoint_path)

    def is_trained(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        ckpt = load_checkpoint(self.checkpoint_path)
        return bool(ckpt.get("finished", False))

    def calibration(self) -> dict[str, Any] | None:
        return read_json(self.calibration_path) if self.calibration_path.exists() else None


_HELD: set[Path] = set()  # run folders this process holds (`Run.hold`)
# Run folders a parent process holds for this one (`oodbench run --jobs` holds each run for its
# train → calibrate → score children): os.pathsep-separated resolved paths.
HELD_BY_PARENT = "OODBENCH_HELD_BY_PARENT"


def _check_new_run_folder(path: Path) -> None:
    """A new run goes into a missing or empty-of-runs folder: not onto a file, and not into a
    folder of run folders (`runs/digits`), whose runs `score` and `report` would then mix."""
    if path.exists() and not path.is_dir():
        raise OodbenchError(f"{path} is a file, not a run folder",
                            "pass a folder path (missing or empty) as the run folder")
    if path.is_dir() and any(p.parent != path for p in _runs_below(path)):
        raise OodbenchError(f"{path} holds run folders already, so it cannot be a run folder "
                            "itself", f"pass a new folder, e.g. {path / 'NAME'}")


def _runs_below(path: Path) -> list[Path]:
    """Run configs one or two levels down (`runs/`, `runs/BENCHMARK/`); no deeper walk, so a
    large folder is not crawled."""
    found = [*path.glob("*/config.yaml"), *path.glob("*/*/config.yaml")]
    return [p for p in found if (p.parent / "checkpoint.pt").exists()
            or (p.parent / "metrics.json").exists()]


def _held_here(key: Path) -> bool:
    """This process holds `key`, or its parent does on its behalf."""
    return key in _HELD or str(key) in os.environ.get(HELD_BY_PARENT, "").split(os.pathsep)


class RunInUse(OodbenchError):
    """Another process holds the run folder (a `train` of it, or `run` working on it)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is in use by {holder or 'another process'} (a `train` of this "
                         "folder, or a `run` working on it)",
                         "wait for that process to finish (or stop it), or train another "
                         "--run-dir")
        self.path, self.holder = path, holder


# The files that record a finished run's results and how they were made: what `publish_runs`
# copies (no checkpoint, cache or per-sample scores), and all that `oodbench report` reads.
RECORD_FILES = ("config.yaml", "manifest.json", "calibration.json", "metrics.json")


def publish_runs(source: Path, dest: Path) -> list[Path]:
    """Copy the record files of every scored run under `source` to the same relative folder
    under `dest`, so the results can be committed and reported on without the weights and
    caches (megabytes instead of gigabytes). Each copy is atomic; returns the run folders made."""
    source, dest = Path(source), Path(dest)
    runs = sorted(m.parent for m in source.rglob("metrics.json")
                  if (m.parent / "config.yaml").exists())
    if not runs:
        raise OodbenchError(f"no scored runs under {source}",
                            "point at a folder of run folders that `oodbench score` has written")
    made = []
    for run in runs:
        target = dest / run.relative_to(source)
        target.mkdir(parents=True, exist_ok=True)
        for name in RECORD_FILES:
            if (run / name).exists():
                atomic_write(target / name, lambda tmp, src=run / name: shutil.copyfile(src, tmp))
        made.append(target)
    return made


CHECKPOINT_HINT = ("delete it and train again (the run folder's config is kept), or import a "
                   "foreign checkpoint with `oodbench import-checkpoint`")
# Keys an unfinished checkpoint must hold for training to resume from it, with their types.
RESUME_KEYS: dict[str, type | tuple[type, ...]] = {"optimizer": dict, "epoch": int, "step": int,
                                                   "history": list}


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at `path`, checked to be one oodbench wrote, so every caller can index
    it: anything else (a bare tensor, a foreign dict) is an OodbenchError, not a KeyError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / corrupt / foreign file
        raise OodbenchError(f"cannot read checkpoint {path}: {e}", CHECKPOINT_HINT) from None
    problem = checkpoint_problem(state)
    if problem:
        raise OodbenchError(f"{path} is not an oodbench checkpoint: {problem}", CHECKPOINT_HINT)
    state.setdefault("history", [])
    return state


def checkpoint_problem(state: Any) -> str | None:
    """What makes `state` unusable as an oodbench checkpoint, or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    model = state.get("model")
    if not isinstance(model, dict) or not model:
        return "no `model` state dict"
    bad = [k for k, v in model.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        return f"`model` holds non-tensor entries ({', '.join(map(str, bad[:3]))})"
    if not isinstance(state.get("finished"), bool):
        return "no `finished` flag (true/false)"
    if not state["finished"]:
        for key, kind in RESUME_KEYS.items():
            if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
                return f"unfinished, and `{key}` is not a {getattr(kind, '__name__', kind)}"
    if not isinstance(state.get("history", []), list):
        return "`history` is not a list"
    return None


def load_weights(model: torch.nn.Module, state: dict[str, Any], source: str) -> None:
    """Strict load; a mismatch is an OodbenchError summarising it (counts, a few keys, the
    likely cause) instead of torch's one line per key."""
    mismatch = WeightsMismatch.between(model, state)
    if mismatch:
        raise mismatch.error(source)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[:2]
        raise OodbenchError(f"checkpoint {source} does not match the model ({' '.join(first)})",
                            "use the model/loss/number of classes it was trained with, or "
                            "retrain") from None


BLOCK = re.compile(r"^(.*?[A-Za-z_]\w*)\.(\d+)\.")  # "<stage>.<index>." : one block of a stage
SHOWN = 3  # keys listed per kind of mismatch


def _blocks(keys: list[str]) -> dict[str, int]:
    """Blocks per stage ("backbone.layer1" -> 9) from key names such as "backbone.layer1.8.x"."""
    seen: dict[str, set[int]] = {}
    for k in keys:
        m = BLOCK.match(k)
        if m:
            seen.setdefault(m.group(1), set()).add(int(m.group(2)))
    return {stage: len(idx) for stage, idx in seen.items()}


def _depth(blocks: dict[str, int]) -> str:
    parts = "+".join(str(n) for n in blocks.values())
    return f"{sum(blocks.values())} blocks" + (f" ({parts})" if len(blocks) > 1 else "")


@dataclass
class WeightsMismatch:
    """How a state dict differs from a model's: keys only in the model (missing), only in the
    state (unexpected), and in both with other shapes (key, checkpoint shape, model shape)."""

    missing: list[str]
    unexpected: list[str]
    shapes: list[tuple[str, tuple[int, ...] | None, tuple[int, ...]]]
    model_keys: list[str]
    state_keys: list[str]

    @classmethod
    def between(cls, model: torch.nn.Module, state: dict[str, Any]) -> WeightsMismatch:
        want = model.state_dict()
        shapes = [(k, tuple(v.shape) if torch.is_tensor(v) else None, tuple(want[k].shape))
                  for k, v in state.items() if k in want
                  and (not torch.is_tensor(v) or tuple(v.shape) != tuple(want[k].shape))]
        return cls([k for k in want if k not in state], [k for k in state if k not in want],
                   shapes, list(want), [str(k) for k in state])

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def likely_cause(self) -> str:
        """The most probable reason, derived from key names and shapes."""
        stripped = {k.removeprefix("module.") for k in self.state_keys}
        if self.unexpected and stripped == set(self.model_keys):
            return "the checkpoint's keys carry a `module.` prefix (saved from DataParallel)"
        ckpt, mine = _blocks(self.state_keys), _blocks(self.model_keys)
        if ckpt and mine and list(ckpt.values()) != list(mine.values()):
            return f"another depth: the checkpoint has {_depth(ckpt)}, the model {_depth(mine)}"
        if self.shapes and not (self.missing or self.unexpected):
            if all(k.startswith("head.") for k, _, _ in self.shapes):
                k, have, want = self.shapes[0]
                return (f"another number of classes: the checkpoint's head has "
                        f"{have[0] if have else '?'} outputs, the model's {want[0]}")
            if self.shapes[0][0] == self.model_keys[0]:
                return "another number of input channels (or first-layer width)"
            return "layers of other widths: another variant of the model"
        return "another model or loss (the modules differ)"

    def summary(self, limit: int = SHOWN) -> list[str]:
        def few(keys: list[str]) -> str:
            more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
            return ", ".join(keys[:limit]) + more

        lines = [f"  missing: {few(self.missing)}"] if self.missing else []
        if self.unexpected:
            lines.append(f"  unexpected: {few(self.unexpected)}")
        if self.shapes:
            lines.append("  other shape (checkpoint vs model): " + few(
                [f"{k} {list(h) if h else 'not a tensor'} vs {list(w)}"
                 for k, h, w in self.shapes]))
        return lines

    def error(self, source: str, cause: str | None = None,
              hint: str | None = None) -> OodbenchError:
        """One short message: counts, a few keys of each kind, the likely cause."""
        head = (f"checkpoint {source} does not match the model: {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.shapes)} shape-mismatched keys")
        lines = [head, *self.summary(), f"  likely cause: {cause or self.likely_cause()}"]
        return OodbenchError("\n".join(lines), hint or "use the model/loss/number of classes "
                             "it was trained with, or retrain")
