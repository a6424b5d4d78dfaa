"""Provenance: enough facts about how a number was made to trace and reproduce it.

`run_provenance` is stored by `score` in each run's metrics.json (it needs the live datasets to
fingerprint them); `report_manifest` gathers those per-run records into every report, with the
facts about the report itself. Everything here is cheap: no forward pass, no file re-hashing
beyond the metrics files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PACKAGES = ("oodbench", "torch", "torchvision", "numpy", "scikit-learn", "scipy", "typer",
            "rich", "pyyaml", "matplotlib")
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def package_versions() -> dict[str, str | None]:
    """Installed versions (None when a package is absent), plus the Python version."""
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    if out.get("oodbench") is None:  # running from a source tree that is not installed
        from oodbench import __version__

        out["oodbench"] = __version__
    return out


def git_commit(root: Path = SOURCE_ROOT) -> dict[str, Any] | None:
    """The commit of the oodbench source in use and whether the tree has local changes; None
    when `root` is not the top of a git checkout (an installed package, even one in a venv
    inside the user's own repository, whose commit is not oodbench's) or without git."""
    try:
        top, head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
            text=True, timeout=10, check=True).stdout.splitlines()
        if Path(top).resolve() != Path(root).resolve():
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return {"commit": head, "dirty": bool(dirty)} if head else None


def device_info(device: Any) -> dict[str, Any]:
    """The torch device, with the accelerator's name when there is one."""
    import torch

    dev = torch.device(device)
    info: dict[str, Any] = {"device": str(dev), "platform": platform.platform(),
                            "processor": platform.processor() or platform.machine(),
                            "torch_threads": torch.get_num_threads()}
    if dev.type == "cuda" and torch.cuda.is_available():
        info["name"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    return info


def digest(obj: Any) -> str:
    """sha256 of a JSON-serialisable object in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def run_provenance(config: dict[str, Any], datasets: dict[str, str], device: Any,
                   weights: str) -> dict[str, Any]:
    """The per-run record stored in metrics.json. `datasets` maps each scored set's name to its
    content fingerprint (sha256 of pixels + labels, `ImageSet.fingerprint`)."""
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "packages": package_versions(),
        "device": device_info(device),
        "git": git_commit(),
        "seed": config.get("seed"),
        "config": config,
        "config_sha256": digest(config),
        "datasets": datasets,
        "weights_sha256": weights,
        "command": sys.argv[:],
    }


def _training_manifest(path: Path) -> dict[str, Any] | None:
    """The run's manifest.json written by `train` (training data fingerprints, environment) or
    `import-checkpoint` (the source file), without per-epoch numbers; None when absent or
    unreadable."""
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = ("environment", "data", "epochs", "imported")
    return {k: m[k] for k in keys if k in m} if isinstance(m, dict) else None


def report_manifest(metrics: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    """The manifest every report carries: who made the report, and for each run where its
    numbers come from. Older metrics.json files without `provenance` keep what they have."""
    runs = []
    for path, m in metrics:
        prov = m.get("provenance") or {}
        env = m.get("environment") or {}
        runs.append({
            "metrics_file": str(path),
            "metrics_sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
            "benchmark": m.get("benchmark"), "loss": m.get("loss"), "seed": m.get("seed"),
            "weights_sha256": m.get("weights"),
            "packages": prov.get("packages") or {k: v for k, v in env.items()
                                                 if k not in ("platform", "device")},
            "device": prov.get("device") or {"device": env.get("device"),
                                             "platform": env.get("platform")},
            "git": prov.get("git"),
            "datasets": prov.get("datasets"),
            "config_sha256": prov.get("config_sha256"),
            "config": prov.get("config"),
            "scored": prov.get("created"),
            "training": _training_manifest(Path(path).parent / "manifest.json"),
        })
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "report_packages": package_versions(),
            "report_git": git_commit(), "command": sys.argv[:], "runs": runs}
