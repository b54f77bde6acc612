"""The training loop: model selection on the validation split, schedules."""

import dataclasses
import json

import pytest
import torch

from advmend.checkpoint import load_checkpoint
from advmend.config import RunConfig, TrainConfig, from_dict, to_dict
from advmend.errors import ConfigError
from advmend.training.ema import ModelEMA
from advmend.training.loop import select_best, train
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


# --------------------------------------------------------------------------- config checks of the scale features


@pytest.mark.parametrize("key, value", [("patience", 0), ("ema", 1.0), ("ema", 0.0), ("amp", "fp8")])
def test_bad_scale_settings_name_their_key(tmp_path, key, value):
    cfg = _cfg("robust")
    with pytest.raises(ConfigError, match=f"train.{key}"):  # checked when the config is built
        cfg = from_dict(RunConfig, {**to_dict(cfg), "train": {**to_dict(cfg)["train"], key: value}})
    with pytest.raises(ConfigError, match=f"train.{key}"):  # and by train(), for a config changed in Python
        train(
            dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **{key: value})),
            tmp_path / "x",
            log=lambda s: None,
        )
    assert not (tmp_path / "x").exists()


def test_patience_needs_a_validation_metric(tmp_path):
    with pytest.raises(ConfigError, match="train.patience"):  # checked when the config is built
        from_dict(RunConfig, {**to_dict(_cfg("last")), "train": {**to_dict(_cfg("last"))["train"], "patience": 2}})
    cfg = _cfg("last")
    with pytest.raises(ConfigError, match="train.patience"):  # and by train(), for a config changed in Python
        train(
            dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, patience=2)),
            tmp_path / "x",
            log=lambda s: None,
        )


def test_tensorboard_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    cfg = from_dict(
        RunConfig, {**to_dict(_cfg("robust")), "train": {**to_dict(_cfg("robust"))["train"], "tensorboard": True}}
    )
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        train(cfg, tmp_path / "x", log=lambda s: None)
    assert not (tmp_path / "x").exists()


def test_tensorboard_writes_the_jsonl_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = from_dict(
        RunConfig, {**to_dict(_cfg("robust")), "train": {**to_dict(_cfg("robust"))["train"], "tensorboard": True}}
    )
    train(cfg, tmp_path / "tb", log=lambda s: None)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    jsonl = [json.loads(s) for s in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([h["loss"] for h in jsonl])
    assert "val_robust_acc" in acc.Tags()["scalars"]


# --------------------------------------------------------------------------- EMA


def test_ema_closed_form_and_limit():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.5)
    w0 = model[0].weight.detach().clone()
    expected = w0.clone()
    for t in range(1, 6):
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].running_mean.add_(2.0)
        before = model[0].weight.detach().clone()
        ema.update(model)
        d = min(0.5, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * model[0].weight.detach()
        assert torch.equal(model[0].weight, before)  # the model is never modified
        assert torch.allclose(ema.module[0].weight, expected, atol=1e-6)
        assert torch.equal(ema.module[1].running_mean, model[1].running_mean)  # buffers are copied
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    assert model.training  # the trained model's mode is untouched
    # Limit: a decay near 0 tracks the latest weights exactly.
    fast = ModelEMA(model, decay=1e-12)
    with torch.no_grad():
        model[0].weight.mul_(3)
    fast.update(model)
    assert torch.allclose(fast.module[0].weight, model[0].weight, atol=1e-9)


def test_ema_of_an_fsr_model_runs_its_own_blocks():
    from advmend.defenses.insert import FSRModel
    from advmend.models import create_model

    torch.manual_seed(0)
    model = FSRModel(create_model("small_cnn", num_classes=10, width=4), at=["stage3"], num_classes=10,
                     input_shape=(3, 16, 16))  # fmt: skip
    ema = ModelEMA(model, decay=0.9)
    x = torch.rand(2, 3, 16, 16)
    model.eval()
    assert torch.equal(ema.module(x), model(x))
    with torch.no_grad():
        next(iter(model.fsr.parameters())).add_(1.0)  # a change in the original's FSR block only
    assert not torch.equal(ema.module(x), model(x))
    assert len(ema.module.forward_with_aux(x).blocks) == 1  # the copy records its own block's outputs


def test_ema_is_validated_selected_and_recorded(tmp_path):
    base = to_dict(_cfg("last"))
    cfg = from_dict(RunConfig, {**base, "train": {**base["train"], "ema": 0.8}})
    result = train(cfg, tmp_path / "ema", log=lambda s: None)
    _, last = load_checkpoint(tmp_path / "ema" / "last.safetensors")
    best_state, best = load_checkpoint(tmp_path / "ema" / "best.safetensors")
    side = json.loads((tmp_path / "ema" / "best.json").read_text())
    steps = 3 * (128 // 64)  # epochs x steps per epoch (192 - 64 validation examples, batch 64)
    assert side["ema"] == best["ema"] == {"decay": 0.8, "updates": steps, "used_for_selection": True}
    # select=last: best is the final epoch, holding the averaged weights (not the raw ones).
    ema_state = {k[len("ema.") :]: v for k, v in last["extra_tensors"].items() if k.startswith("ema.")}
    assert set(ema_state) == set(best_state)
    assert all(torch.equal(best_state[k], ema_state[k]) for k in ema_state)
    raw, _ = load_checkpoint(tmp_path / "ema" / "last.safetensors")
    assert any(not torch.equal(raw[k], ema_state[k]) for k in raw if raw[k].is_floating_point())
    assert len(result.history) == 3


# --------------------------------------------------------------------------- early stopping


def test_early_stopping_stops_and_records_why(tmp_path):
    base = to_dict(_cfg("robust"))
    # A learning rate this small leaves validation accuracy unchanged: no epoch after the first is a new best.
    cfg = from_dict(RunConfig, {**base, "train": {**base["train"], "epochs": 6, "lr": 1e-12, "patience": 2}})
    logs: list[str] = []
    result = train(cfg, tmp_path / "es", log=logs.append)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.stopped["epoch"] == 3 and "train.patience=2" in result.stopped["reason"]
    side = json.loads((tmp_path / "es" / "last.json").read_text())
    assert side["early_stopping"]["stopped"] == result.stopped
    assert side["early_stopping"]["validations_since_best"] == 2
    assert side["best"]["epoch"] == 1
    assert any(s.startswith("stopped after epoch 3") for s in logs)
    # Resuming a run that stopped early trains nothing more.
    again = train(cfg, tmp_path / "es", resume=True, log=lambda s: None)
    assert [h["epoch"] for h in again.history] == [1, 2, 3] and again.stopped == result.stopped


def _select(history, key="val_robust_acc"):
    best = None
    out = []
    for i in range(len(history)):
        is_best, best, epoch = select_best(history[: i + 1], key, best)
        out.append((is_best, best, epoch))
    return out


def test_a_tie_of_the_selection_metric_goes_to_the_higher_clean_accuracy_then_the_earlier_epoch():
    # PSSR in front of a plain classifier: white box (hence robust) is 0 at every validation
    h = [{"epoch": 1}, {"epoch": 2, "val_robust_acc": 0.0, "val_clean_acc": 74.5},
         {"epoch": 3}, {"epoch": 4, "val_robust_acc": 0.0, "val_clean_acc": 74.6}]  # fmt: skip
    assert _select(h) == [(False, None, None), (True, 0.0, 2), (False, 0.0, 2), (True, 0.0, 4)]
    h[3]["val_clean_acc"] = 74.4  # lower clean accuracy: the earlier epoch stays
    assert _select(h)[-1] == (False, 0.0, 2)
    h[3]["val_clean_acc"] = 74.5  # a full tie: the earlier epoch stays
    assert _select(h)[-1] == (False, 0.0, 2)
    h[3]["val_robust_acc"] = 0.1  # the selection metric itself still comes first
    h[3]["val_clean_acc"] = 10.0
    assert _select(h)[-1] == (True, 0.1, 4)
    h.append({"epoch": 5, "val_robust_acc": 0.05, "val_clean_acc": 99.0})
    assert _select(h)[-1] == (False, 0.1, 4)


class _Constant(torch.nn.Module):
    """Logits that always say class 0: clean accuracy is the share of label 0."""

    def forward(self, x):
        return 5 * torch.nn.functional.one_hot(torch.zeros(x.shape[0], dtype=torch.long), 10).float() - 2


def test_pssr_selects_on_graybox_accuracy_among_epochs_meeting_the_clean_goal():
    from advmend.data import ArrayDataset
    from advmend.training.pssr_loop import CLEAN_GOAL_POINTS, pssr_selection

    labels = torch.tensor([0] * 60 + [1] * 40)  # the classifier alone: 60 % clean
    val = ArrayDataset(torch.zeros(100, 1, 8, 8, dtype=torch.uint8), labels, tuple(str(k) for k in range(10)))
    chosen = pssr_selection("robust", _Constant(), val, _cfg("robust"), torch.device("cpu"))
    key, goal, words = chosen.key, chosen.goal, chosen.description
    assert key == "val_graybox_acc" and "val_graybox_acc" in words and "57.00" in words
    assert goal({"val_clean_acc": 60.1 - CLEAN_GOAL_POINTS}) and not goal({"val_clean_acc": 59.9 - CLEAN_GOAL_POINTS})
    # White box is 0 at every epoch behind a plain classifier: the gray-box accuracy decides, and an
    # epoch whose clean accuracy misses the goal loses to every epoch that meets it.
    h = [{"epoch": 1, "val_graybox_acc": 41.0, "val_robust_acc": 0.0, "val_clean_acc": 58.0},
         {"epoch": 2, "val_graybox_acc": 52.0, "val_robust_acc": 0.0, "val_clean_acc": 50.0},
         {"epoch": 3, "val_graybox_acc": 48.5, "val_robust_acc": 0.0, "val_clean_acc": 57.5}]  # fmt: skip
    assert [select_best(h[: i + 1], key, None, goal)[1:] for i in range(3)] == [(41.0, 1), (41.0, 1), (48.5, 3)]
    assert select_best(h, key, None, None)[1:] == (52.0, 2)  # without the goal, the best gray-box epoch
    # "clean" and "last" select as for a classifier, without a goal.
    clean = pssr_selection("clean", _Constant(), val, _cfg("clean"), torch.device("cpu"))
    assert (clean.key, clean.goal) == ("val_clean_acc", None)
