"""The training loop: model selection on the validation split, schedules."""

import json

import pytest

from advmend.config import RunConfig, TrainConfig, from_dict
from advmend.errors import ConfigError
from advmend.training.loop import train
from advmend.training.schedule import learning_rate


def _cfg(select: str) -> RunConfig:
    return from_dict(RunConfig, {
        "data": {"name": "synthetic", "val_size": 64, "options": {"n_train": 192, "n_test": 32}},
        "model": {"name": "small_cnn", "options": {"width": 8}},
        "train": {"method": "standard", "epochs": 3, "batch_size": 64, "lr": 0.05, "progress": False,
                  "select": select, "val_attack": {"steps": 1}},
    })  # fmt: skip


@pytest.mark.parametrize("select, key", [("clean", "val_clean_acc"), ("robust", "val_robust_acc"), ("last", "epoch")])
def test_best_checkpoint_follows_selection(tmp_path, select, key):
    result = train(_cfg(select), tmp_path / select, log=lambda s: None)
    best = json.loads((tmp_path / select / "best.json").read_text())["best"]
    values = [h[key] for h in result.history]
    expected_epoch = result.history[values.index(max(values))]["epoch"]  # first epoch reaching the max
    assert best == {"epoch": expected_epoch, "metric": key, "value": max(values)}
    assert json.loads((tmp_path / select / "best.json").read_text())["epoch"] == expected_epoch


def test_unknown_selection_rejected(tmp_path):
    with pytest.raises(ConfigError, match="train.select"):
        train(_cfg("best"), tmp_path / "x", log=lambda s: None)
    assert not (tmp_path / "x").exists()


def test_piecewise_schedule_matches_reference_recipe():
    cfg = TrainConfig()  # lr 0.1, x0.1 at 75 % and 90 % of 100 epochs
    lrs = [learning_rate(cfg, e, 0, 10) for e in (0, 74, 75, 89, 90, 99)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
