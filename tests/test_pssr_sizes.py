"""PSSR at image sizes other than CIFAR's 32 px: the regenerator is sized from the data (its depth from
the image side), trains a step and is evaluated under the quick protocol at 64 and 224 px; a side the U-Net cannot
halve is a one-line error before any training. A few seconds each on a loaded 2-core CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import error_line

from advmend.cli import main
from advmend.defenses.pssr import PSSRModel, Regenerator, auto_depth
from advmend.errors import ConfigError
from advmend.evaluation.run import load_trained_model


def _config(size: int) -> dict:
    return {
        "name": f"pssr-{size}px",
        "data": {"name": "synthetic", "val_size": 8, "options": {"n_train": 40, "n_test": 8, "image_size": size}},
        "model": {"name": "small_cnn", "options": {"width": 4}},
        "train": {"method": "standard", "epochs": 1, "batch_size": 16, "val_attack": {"steps": 1}, "progress": False},
        "eval": {"protocol": "quick", "after_train": True, "n_examples": 8},
        "pssr": {"enabled": True, "width": 4, "epochs": 1, "batch_size": 16, "attack": {"steps": 1}},
    }


def _write(folder: Path, cfg: dict) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_the_depth_follows_the_image_side():
    assert [auto_depth(s, s) for s in (8, 16, 28, 32, 48, 64, 96, 224)] == [3, 3, 2, 3, 3, 4, 4, 4]
    assert auto_depth(64, 48) == 3  # 48 / 16 = 3 px: too small a bottleneck for a 4th stage
    for size, depth in ((64, 4), (224, 4)):
        g = Regenerator(3, (size, size), width=2, dropout=0.0)
        assert g.depth == depth and g.image_size == (size, size)
        out = g(torch.rand(1, 3, size, size), torch.zeros(1, 1, size, size))
        assert out.shape == (1, 3, size, size)
    with pytest.raises(ConfigError, match="divisible by 4"):
        auto_depth(226, 224)
    with pytest.raises(ConfigError, match="pssr.depth=5 does not divide"):
        Regenerator(3, (48, 48), depth=5)


@pytest.mark.parametrize("size", [64, pytest.param(224, marks=pytest.mark.slow)])  # 224 px: ~20 s
def test_pssr_trains_and_is_evaluated_at_other_sizes(tmp_path, size):
    out = tmp_path / "run"
    assert main(["train", str(_write(tmp_path, _config(size))), "--out", str(out)]) == 0
    model, cfg, record = load_trained_model(out / "best.safetensors", torch.device("cpu"))
    assert isinstance(model, PSSRModel) and record["image_shape"] == [3, size, size]
    assert model.regenerator.image_size == (size, size) and model.regenerator.depth == 4  # sized from the data
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [m["epoch"] for m in metrics] == [1] and metrics[0]["pix_adv"] > 0
    rep = json.loads((out / "eval-pssr-quick" / "report.json").read_text())
    assert rep["n_examples"] == 8 and all(t["status"] == "run" for t in rep["threat_models"].values())
    x = torch.rand(2, 3, size, size)
    assert model(x).shape == (2, 10)


@pytest.mark.parametrize("extra", [["--set", "data.options.image_size=66"], ["--set", "pssr.depth=7"]])
def test_a_size_the_regenerator_cannot_halve_is_one_line(tmp_path, capsys, extra):
    out = tmp_path / "run"
    assert main(["train", str(_write(tmp_path, _config(64))), "--out", str(out), *extra]) == 2
    line = error_line(capsys)
    assert "divisible" in line or "does not divide" in line, line
    assert not (out / "last.safetensors").exists()
