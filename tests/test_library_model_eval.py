"""`advmend eval --model timm/ARCH`: a library model by name, with its weights from a local file, evaluated on
an image folder at 224 px (ImageNet's radius 4/255); without weights, or with `model.pretrained` offline,
a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from advmend.cli import main

timm = pytest.importorskip("timm")
CLASSES = ("apple", "mango", "pear", "zebra")  # four: AutoAttack's targeted DLR loss needs them


def _folder(base: Path) -> Path:
    """base/test/<class>/0.png: one 240 x 260 image per class (resized and centre-cropped to 224)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in CLASSES:
        (base / "test" / cls).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (240, 260, 3)).astype(np.uint8)).save(base / "test" / cls / "0.png")
    return base


def _weights(tmp_path: Path, arch: str) -> Path:
    """A state dict of a randomly initialised model, saved as a user's downloaded weights would be."""
    torch.manual_seed(0)
    path = tmp_path / f"{arch}.pt"
    torch.save(timm.create_model(arch, num_classes=len(CLASSES)).state_dict(), path)
    return path


def _eval(tmp_path: Path, arch: str, *extra: str) -> list[str]:
    return ["eval", "--model", f"timm/{arch}", "--dataset", "folder", "--set", f"data.options.path={_folder(tmp_path / 'f')}",
            "--set", "data.options.image_size=224", "--no-plot", "--quiet", "--out", str(tmp_path / "report"), *extra]  # fmt: skip


def test_a_library_model_with_local_weights_is_evaluated_on_a_224px_folder(tmp_path):
    weights = _weights(tmp_path, "resnet10t")
    assert main(_eval(tmp_path, "resnet10t", "--weights", str(weights), "--protocol", "quick")) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["n_examples"] == 4 and report["meta"]["model"] == "timm/resnet10t"
    assert report["meta"]["checkpoint"] == str(weights) and len(report["meta"]["checkpoint_sha256"]) == 64
    assert report["meta"]["eps"] == pytest.approx(4 / 255)  # a 224-px folder: ImageNet's L-inf radius
    assert report["meta"]["normalization"]["source"] == "timm pretrained config of resnet10t"


@pytest.mark.slow  # ResNet-50 at 224 px under AutoAttack on one CPU thread: about a minute
def test_resnet50_with_local_weights_runs_autoattack_on_a_224px_folder(tmp_path):
    weights = _weights(tmp_path, "resnet50")
    assert main(_eval(tmp_path, "resnet50", "--weights", str(weights), "--protocol", "autoattack")) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["n_examples"] == 4 and report["meta"]["eps"] == pytest.approx(4 / 255)
    (attack,) = report["attacks"]
    assert attack["settings"]["name"] == "AutoAttack" and attack["settings"]["eps"] == pytest.approx(4 / 255)
    assert [s["name"] for s in attack["stages"]] == ["APGD-CE", "APGD-T", "FAB-T", "Square"]


def test_a_library_model_without_weights_is_one_line(tmp_path, capsys):
    assert main(_eval(tmp_path, "resnet10t", "--protocol", "quick")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--weights FILE" in err and "model.pretrained" in err, err
    assert not (tmp_path / "report").exists()


def test_pretrained_resnet50_offline_is_one_line(tmp_path):
    """In a fresh process, so that the hub reads HF_HUB_OFFLINE (no network, whatever this machine has)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    done = subprocess.run([sys.executable, "-m", "advmend", *_eval(tmp_path, "resnet50", "--set", "model.pretrained=true",
                                                                   "--protocol", "autoattack")],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "model.pretrained: cannot fetch timm/resnet50's weights" in done.stderr and "model.weights" in done.stderr
    assert not (tmp_path / "report").exists()
