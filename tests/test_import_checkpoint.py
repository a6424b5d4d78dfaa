"""`oodbench import-checkpoint` on a synthetic checkpoint in the akamaster format (keys
`module.*`, head `linear`), with a tiny `folder:` dataset: import, calibrate, score; and the
clear errors for a checkpoint that does not match the model."""

from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from oodbench.cli import app
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


def test_a_checkpoint_for_another_model_is_a_clear_error(tmp_path: Path):
    ckpt, bench = setup(tmp_path)
    r = invoke("import-checkpoint", ckpt, "--model", "resnet32", "--benchmark", bench,
               "--run-dir", tmp_path / "run")
    assert r.exit_code == 2
    assert "does not match" in r.output and "fix:" in r.output
