"""One training loop for both stages: the classifier (`train`) and PSSR's regenerator
(`train_pssr`) are `Stage` descriptions run by `loop.run_stage`, which owns the run folder, resume,
metrics.jsonl and the checkpoint records. Tiny synthetic runs, a few seconds each."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import advmend.training.loop as loop_mod
import advmend.training.run_folder as run_folder
from advmend.checkpoint import load_checkpoint
from advmend.config import RunConfig, TrainConfig, from_dict
from advmend.errors import ConfigError
from advmend.training.loop import train
from advmend.training.pssr_loop import train_pssr
from advmend.training.schedule import Schedule, learning_rate
from advmend.training.stage import Phase, Stage

CFG = {
    "name": "one-loop",
    "data": {"name": "synthetic", "val_size": 16, "options": {"n_train": 64, "n_test": 16, "image_size": 8}},
    "model": {"name": "small_cnn", "options": {"width": 4}},
    "train": {"method": "standard", "epochs": 1, "batch_size": 32, "val_attack": {"steps": 1},
              "progress": False, "device": "cpu"},
    "pssr": {"enabled": False, "width": 4, "epochs": 1, "pretrain_epochs": 1, "batch_size": 32,
             "attack": {"steps": 1, "step_size": 0.02}},
}  # fmt: skip
# What the loop writes into every record, whichever stage it trains (besides the checkpoint format's own
# keys: format, versions, tensors_sha256, and the optimizer's layout).
LOOP_RECORD_KEYS = {"config", "epoch", "metrics", "best", "scaler", "optimizer_state"}
FORMAT_KEYS = {"format", "versions", "tensors_sha256", "optimizer", "extra_tensors"}
# What the loop writes into every metrics.jsonl line (train_epoch, and validation when there is a split).
LOOP_METRIC_KEYS = {"epoch", "lr", "loss", "train_acc", "seconds", "images_per_s", "val_clean_acc", "val_robust_acc",
                    "val_seconds"}  # fmt: skip


def _cfg(**pssr) -> RunConfig:
    d = json.loads(json.dumps(CFG))
    d["pssr"].update(pssr)
    return from_dict(RunConfig, d)


def _lines(run: Path) -> list[dict]:
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_both_stages_are_trained_by_the_one_loop_and_write_its_records(tmp_path, monkeypatch):
    stages: list[str] = []
    one_epoch = loop_mod.train_epoch

    def spy(stage, epoch):  # the loop's train_epoch: a copy of the loop elsewhere would not call it
        stages.append(stage.name)
        return one_epoch(stage, epoch)

    monkeypatch.setattr(loop_mod, "train_epoch", spy)
    clf = train(_cfg(), tmp_path / "clf", log=lambda _m: None)
    pssr = train_pssr(_cfg(enabled=True, classifier=str(clf.best)), tmp_path / "pssr", log=lambda _m: None)
    assert stages == ["epoch", "pssr epoch", "pssr epoch"]

    _, c = load_checkpoint(clf.last)
    _, p = load_checkpoint(pssr.last)
    assert LOOP_RECORD_KEYS <= set(c) and LOOP_RECORD_KEYS <= set(p)
    # Each stage adds only its own fields; the PSSR records keep their format (no ema / early_stopping).
    assert set(c) - LOOP_RECORD_KEYS - FORMAT_KEYS == {"num_classes", "image_shape", "norm", "eps", "world_size",
                                                       "ema", "early_stopping", "normalization"}  # fmt: skip
    assert set(p) - LOOP_RECORD_KEYS - FORMAT_KEYS == {"num_classes", "image_shape", "norm", "eps", "classifier"}
    assert set(c["extra_tensors"]) == {"rng.rank0.cpu"} and set(p["extra_tensors"]) == {"rng.cpu"}
    # PSSR's train.select=robust selects on gray-box accuracy (white box is 0 behind a plain classifier).
    for res, rec, metric in ((clf, c, "val_robust_acc"), (pssr, p, "val_graybox_acc")):
        assert _lines(res.out_dir) == res.history and rec["metrics"] == res.history[-1]
        assert rec["best"]["metric"] == metric and rec["epoch"] == len(res.history)
        assert res.selection.startswith(metric)
        assert all(LOOP_METRIC_KEYS <= set(h) for h in res.history)
    assert [h["stage"] for h in pssr.history] == ["pretrain", "adversarial"]
    assert all("stage" not in h for h in clf.history)


@pytest.mark.slow
def test_pssr_resume_goes_through_the_shared_resume_path(tmp_path, monkeypatch):
    clf = train(_cfg(), tmp_path / "clf", log=lambda _m: None)
    cfg = _cfg(enabled=True, classifier=str(clf.best))
    run = tmp_path / "pssr"
    train_pssr(cfg, run, log=lambda _m: None)
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "last.json", "config.yaml")}
    calls: list[int] = []
    real = run_folder.read_history
    monkeypatch.setattr(run_folder, "read_history", lambda path, upto=None: calls.append(upto) or real(path, upto))
    wider = replace(cfg, pssr=replace(cfg.pssr, width=8, epochs=2))
    with pytest.raises(ConfigError) as e:
        train_pssr(wider, run, resume=True, log=lambda _m: None)
    assert str(e.value).startswith(
        f"--resume: the config differs from the run in {run} at pssr.width (4 in the run, 8 now)"
    )
    assert {name: (run / name).read_bytes() for name in before} == before  # refused before writing anything
    logs: list[str] = []
    res = train_pssr(replace(cfg, pssr=replace(cfg.pssr, epochs=2)), run, resume=True, log=logs.append)
    assert calls == [2] and f"resuming {run} after epoch 2" in logs  # the loop's resume read the history
    assert [h["epoch"] for h in res.history] == [1, 2, 3] and _lines(run) == res.history


def test_a_stage_runs_its_phases_in_one_epoch_counter():
    stage = Stage.__new__(Stage)
    stage.phases = (Phase("pre", 2, "pretrain"), Phase("adv", 3, "adversarial"))
    assert stage.epochs == 5
    assert [stage.phase(e).objective for e in range(5)] == ["pre", "pre", "adv", "adv", "adv"]
    stage.phases = (Phase("pre", 0, "pretrain"), Phase("adv", 2, "adversarial"))  # no pre-training
    assert [stage.phase(e).label for e in range(2)] == ["adversarial", "adversarial"]


def test_an_explicit_schedule_needs_no_train_config():
    """PSSR's schedule (pssr.lr, cosine over all its epochs) is given as a Schedule, not a faked train
    section; the classifier's is `Schedule.of(train)`, the same numbers as the train section itself."""
    cosine = Schedule(lr=1e-3, epochs=3, kind="cosine")
    assert learning_rate(cosine, 0, 0, 2) == 1e-3
    assert learning_rate(cosine, 1, 0, 2) == pytest.approx(0.75e-3)  # a third of the way: (1 + cos(pi/3)) / 2
    assert learning_rate(cosine, 1, 1, 2) == pytest.approx(0.5e-3)
    t = TrainConfig(epochs=10, lr=0.2)  # piecewise: x0.1 at epochs round(7.5) = 8 and 9
    assert [learning_rate(Schedule.of(t), e, 0, 4) for e in range(10)] == pytest.approx([0.2] * 8 + [0.02, 0.002])


def test_a_stage_holds_what_both_stages_give():
    """No Stage field has a default one stage leaves untouched: what only the classifier's stage has
    (DDP context, EMA, early stopping, channels_last, TensorBoard, its folder's start-over rule) is its
    `ClassifierOptions`, the one optional field."""
    import dataclasses

    from advmend.training.stage import ClassifierOptions

    optional = [f.name for f in dataclasses.fields(Stage)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]  # fmt: skip
    assert optional == ["classifier"]
    assert {f.name for f in dataclasses.fields(ClassifierOptions)} == {
        "ctx", "ema", "patience", "channels_last", "tensorboard", "out_dir_config"}  # fmt: skip


def test_pssr_clean_accuracy_goal_ranks_the_best_checkpoint_in_the_loop(tmp_path, monkeypatch):
    """The loop selects with the stage's whole `Selection`: an epoch missing PSSR's clean-accuracy goal
    loses to one meeting it, whatever its gray-box accuracy. The validation numbers are scripted (the
    stage's validate is its input here) so that the goal, not chance, decides."""
    import advmend.training.pssr_loop as pssr_loop

    clf = train(_cfg(), tmp_path / "clf", log=lambda _m: None)
    scripted = iter([{"val_clean_acc": 100.0, "val_graybox_acc": 10.0, "val_robust_acc": 0.0},  # meets the goal
                     {"val_clean_acc": -50.0, "val_graybox_acc": 90.0, "val_robust_acc": 0.0}])  # fmt: skip
    monkeypatch.setattr(pssr_loop, "_validate", lambda *args: dict(next(scripted)))
    res = train_pssr(_cfg(enabled=True, classifier=str(clf.best)), tmp_path / "pssr", log=lambda _m: None)
    assert len(res.history) == 2
    _, best = load_checkpoint(res.best)
    assert best["best"] == {"epoch": 1, "metric": "val_graybox_acc", "value": 10.0} and best["epoch"] == 1
