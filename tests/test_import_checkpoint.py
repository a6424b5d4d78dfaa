"""`oodbench import-checkpoint` on a synthetic checkpoint in the akamaster format (keys
`module.*`, head `linear`), with a tiny `folder:` dataset: import, calibrate, score; and the
clear errors for a checkpoint that does not match the model."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from oodbench.cli import app
from oodbench.data import DATASETS
from oodbench.models import build_classifier

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def fake_akamaster(path: Path) -> None:
    torch.manual_seed(0)
    model = build_classifier("resnet20", torch.nn.Linear, 10, 3, 32)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue  # the original files predate this buffer
        k = k.replace("backbone.", "").replace("head.", "linear.")
        sd[f"module.{k}"] = v
    torch.save({"state_dict": sd, "best_prec1": 91.25}, path)


def image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for c in range(10):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    d / f"{i}.png")
    return root


def setup(tmp_path: Path) -> tuple[Path, Path]:
    """A fake ResNet-20 checkpoint and a benchmark over a tiny labelled `folder:` dataset."""
    ckpt = tmp_path / "resnet20-fake.th"
    fake_akamaster(ckpt)
    folder = image_folder(tmp_path / "imgs")
    bench = tmp_path / "tiny.yaml"
    bench.write_text(yaml.safe_dump({
        "name": "tiny", "in_distribution": f"folder:{folder}", "model": "resnet20",
        "losses": ["softmax"], "detectors": ["msp", "energy"], "ood": {"far": ["gaussian"]},
        "train": {"epochs": 1, "val_fraction": 0.2}}))
    return ckpt, bench


def test_import_calibrate_and_score(tmp_path: Path):
    ckpt, bench = setup(tmp_path)

    r = invoke("import-checkpoint", ckpt, "--model", "resnet20", "--benchmark", bench,
               "--run-dir", tmp_path / "run")
    assert r.exit_code == 0, r.output
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["finished"] and saved["imported"]["format"] == "akamaster"

    r = invoke("calibrate", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "imported" in r.output and "seen data" in r.output  # honest about its val split

    r = invoke("score", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "metrics.json").exists()

    # a published record names the file its weights came from, by content
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["imported"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert manifest["imported"]["format"] == "akamaster"
    assert manifest["imported"]["best_prec1"] == 91.25
    r = invoke("report", tmp_path / "run", "--output", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    runs = json.loads((tmp_path / "rep" / "report.json").read_text())["manifest"]["runs"]
    assert runs[0]["training"]["imported"]["sha256"] == manifest["imported"]["sha256"]


def test_a_checkpoint_for_another_model_is_a_clear_error(tmp_path: Path):
    ckpt, bench = setup(tmp_path)
    r = invoke("import-checkpoint", ckpt, "--model", "resnet32", "--benchmark", bench,
               "--run-dir", tmp_path / "run")
    assert r.exit_code == 2
    assert "does not match" in r.output and "fix:" in r.output


AKAMASTER = Path(os.environ.get("OODBENCH_DATA", Path(__file__).resolve().parents[2] / "shared"
                                / "data")) / "models" / "akamaster-resnet-cifar10"


def test_the_real_resnet56_as_resnet20_names_the_likely_cause(tmp_path: Path):
    """The published file, a real process: exit 2, a short message (torch's own lists ~150
    lines of keys) naming the model the file holds, and no run folder left behind."""
    files = sorted(AKAMASTER.glob("resnet56-*.th"))
    if not files:
        pytest.skip(f"the akamaster checkpoints are not in {AKAMASTER}")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
           "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "oodbench", "import-checkpoint", files[0],
                        "--model", "resnet20", "--benchmark", "cifar10-jpeg", "--run-dir",
                        tmp_path / "run"], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    text = r.stdout + r.stderr
    assert "Traceback" not in text and len(text.strip().splitlines()) <= 10, text
    assert "0 missing, 216 unexpected, 0 shape-mismatched keys" in text
    assert "the checkpoint looks like resnet56 but --model resnet20 was given" in text
    assert "27 blocks (9+9+9)" in text and "fix: pass --model resnet56" in text
    assert not (tmp_path / "run").exists()


def test_a_head_for_another_number_of_classes_is_named(tmp_path: Path):
    ckpt, bench = setup(tmp_path)
    raw = torch.load(ckpt, weights_only=True)
    raw["state_dict"]["module.linear.weight"] = torch.zeros(100, 64)
    raw["state_dict"]["module.linear.bias"] = torch.zeros(100)
    torch.save(raw, ckpt)
    r = invoke("import-checkpoint", ckpt, "--model", "resnet20", "--benchmark", bench,
               "--run-dir", tmp_path / "run")
    assert r.exit_code == 2
    assert "another number of classes: the checkpoint's head has 100 outputs, the model's 10" \
        in " ".join(r.output.split())
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------- a registered model's state_dict
def smallcnn8_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_classifier("smallcnn8", torch.nn.Linear, 10, 1, 8).state_dict()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module"])
def test_a_plain_state_dict_imports_and_scores(tmp_path: Path, wrap: str):
    state = smallcnn8_state()
    saved = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3},
             "module": {f"module.{k}": v for k, v in state.items()}}[wrap]
    torch.save(saved, tmp_path / "weights.pt")
    r = invoke("import-checkpoint", tmp_path / "weights.pt", "--model", "smallcnn8",
               "--benchmark", "digits", "--run-dir", tmp_path / "run")
    assert r.exit_code == 0, r.output
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["imported"]["format"] == "state-dict"
    assert all(torch.equal(ckpt["model"][k], v) for k, v in state.items())
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    info = DATASETS.get("digits").info  # the dataset's own normalisation, as oodbench trains
    assert cfg["benchmark"]["normalization"] == {"mean": list(info.mean), "std": list(info.std)}

    r = invoke("score", tmp_path / "run", "--detector", "msp", "--detector", "energy")
    assert r.exit_code == 0, r.output
    metrics = yaml.safe_load((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["detectors"]) == {"msp", "energy"}
    assert 0.0 <= metrics["detectors"]["msp"]["ood"]["patches"]["auroc"] <= 1.0


def test_a_state_dict_of_another_model_is_a_clear_error(tmp_path: Path):
    state = smallcnn8_state()
    state["head.weight"], state["head.bias"] = torch.zeros(100, 128), torch.zeros(100)
    torch.save(state, tmp_path / "weights.pt")
    r = invoke("import-checkpoint", tmp_path / "weights.pt", "--model", "smallcnn8",
               "--benchmark", "digits", "--run-dir", tmp_path / "run")
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "does not match the model" in text and "fix:" in text
    assert "the checkpoint's head has 100 outputs, the model's 10" in text
    assert not (tmp_path / "run").exists()

    torch.save(smallcnn8_state(), tmp_path / "weights.pt")
    r = invoke("import-checkpoint", tmp_path / "weights.pt", "--model", "resnet18",
               "--benchmark", "digits", "--run-dir", tmp_path / "run")
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "the checkpoint looks like smallcnn8 but --model resnet18 was given" in text
    assert "fix: pass --model smallcnn8" in text and not (tmp_path / "run").exists()


def test_a_file_of_no_known_format_names_the_formats(tmp_path: Path):
    torch.save({"weights": [1, 2, 3]}, tmp_path / "weights.pt")
    r = invoke("import-checkpoint", tmp_path / "weights.pt", "--model", "smallcnn8",
               "--benchmark", "digits", "--run-dir", tmp_path / "run")
    assert r.exit_code == 2
    assert "akamaster" in r.output and "state-dict" in r.output


def test_a_non_torch_file_is_named_as_such(tmp_path: Path):
    (tmp_path / "bad.th").write_text("hello world\n")
    r = invoke("import-checkpoint", tmp_path / "bad.th", "--model", "smallcnn8", "--benchmark",
               "digits", "--run-dir", tmp_path / "run")
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "is not a PyTorch checkpoint" in text and "written by torch.save" in text
    assert "akamaster" in text and "state-dict" in text and not (tmp_path / "run").exists()


def test_reimporting_other_weights_into_a_run_folder_is_refused(tmp_path: Path):
    """The default folder of a model and benchmark holds one import: other weights there
    would sit beside the old ones' calibration and scores, so report would show stale numbers.
    The same file again is a no-op."""
    torch.save(smallcnn8_state(0), tmp_path / "a.pt")
    torch.save(smallcnn8_state(1), tmp_path / "b.pt")
    args = ("--model", "smallcnn8", "--benchmark", "digits")
    assert invoke("import-checkpoint", tmp_path / "a.pt", *args).exit_code == 0
    run = tmp_path / "runs" / "digits" / "smallcnn8-state-dict"
    r = invoke("score", run, "--detector", "msp")
    assert r.exit_code == 0, r.output
    held = torch.load(run / "checkpoint.pt", weights_only=True)["model"]

    r = invoke("import-checkpoint", tmp_path / "b.pt", *args)
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "already holds other weights" in text and "a.pt" in text
    assert "fix: delete" in text and "--run-dir" in text
    now = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(now[k], v) for k, v in held.items())

    assert invoke("import-checkpoint", tmp_path / "a.pt", *args).exit_code == 0  # idempotent
    from oodbench.checkpoint_import import imported_from
    from oodbench.runs import Run
    assert imported_from(Run.open(run)) == str((tmp_path / "a.pt").resolve())

    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    del ckpt["imported"]  # as a run trained here
    torch.save(ckpt, run / "checkpoint.pt")
    r = invoke("import-checkpoint", tmp_path / "a.pt", *args)
    assert r.exit_code == 2 and "already holds a run trained here" in " ".join(r.output.split())


def test_a_dismax_run_checkpoint_names_the_head_not_the_model(tmp_path: Path):
    """An oodbench run trained with DisMax: the backbone fits, the head has prototypes. The fix
    is not --model (it is right) nor a loss option (import has none)."""
    from oodbench.config import RunConfig, load_benchmark
    from oodbench.experiment import build_model
    from oodbench.runs import Run

    cfg = RunConfig(load_benchmark("digits"), "dismax", 0, {})
    run = Run.create(tmp_path / "dismax-run", cfg)
    torch.save({"model": build_model(cfg).state_dict(), "optimizer": {}, "epoch": 1, "step": 0,
                "history": [], "finished": True}, run.checkpoint_path)
    r = invoke("import-checkpoint", run.checkpoint_path, "--model", "smallcnn8", "--benchmark",
               "digits", "--run-dir", tmp_path / "run")
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "head is not a linear classifier" in text and "head.prototypes" in text
    assert "only checkpoints with a linear head (trained with the SoftMax loss)" in text
    assert "needs no import" in text and "oodbench score" in text
    assert str(run.path).replace("/", "") in text.replace("/", "").replace(" ", "")
    assert "pass --model" not in text and "another model or loss" not in text
    assert not (tmp_path / "run").exists()
