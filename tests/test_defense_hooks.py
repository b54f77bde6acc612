"""A new defense is one definition and its registrations: training and evaluation need no line for it.

The toy defense here is a classifier whose training adds a penalty on the size of its logits, its own
loss term. It registers how it is built (`DEFENSES`, with the config rule that selects it) and trained
(`TRAINERS`: the classifier's loop), and gives its model `forward_with_loss`; `advmend train`'s path
then trains it with every objective's loss pass adding its term and evaluates its checkpoint.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from advmend.attacks.pgd import PGD
from advmend.config import RunConfig, from_dict
from advmend.defenses.classifier import build_classifier
from advmend.defenses.hooks import AuxiliaryLoss
from advmend.defenses.registry import DEFENSES, defense_of
from advmend.models import create_model
from advmend.training.distributed import _AuxiliaryLossView, _Dispatch
from advmend.training.loop import train
from advmend.training.objectives import AdversarialCE
from advmend.training.run import train_and_evaluate
from advmend.training.trainers import TRAINERS

PENALTY_WEIGHT = 0.5


class PenalisedLogits(nn.Module):
    """A classifier trained with PENALTY_WEIGHT * mean(logits^2) added to its objective's loss."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def forward_with_loss(self, x, y, weights):
        logits = self(x)
        penalty = logits.pow(2).mean()
        return logits, PENALTY_WEIGHT * penalty, {"toy_penalty": penalty.detach()}


def build_toy(cfg: RunConfig, num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    return PenalisedLogits(build_classifier(cfg, num_classes, image_shape))


@pytest.fixture
def toy_defense(monkeypatch):
    """The toy's registrations, in copies of the registries that the test leaves as it found them."""
    for registry in (DEFENSES, TRAINERS):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
        monkeypatch.setattr(registry, "_meta", {k: dict(v) for k, v in registry._meta.items()})
    DEFENSES.register("toy", enabled=lambda cfg: cfg.name.startswith("toy"), order=2, label="Toy",
                      eval_prefix="toy-", transfer_key=None, test_with_train_split=True)(build_toy)  # fmt: skip
    TRAINERS.register("toy")(train)


def _cfg(name: str) -> RunConfig:
    return from_dict(RunConfig, {
        "name": name,
        "data": {"name": "synthetic", "val_size": 32, "augment": False,
                 "options": {"n_train": 96, "n_test": 16, "image_size": 16}},
        "model": {"name": "small_cnn", "options": {"width": 4}},
        "train": {"method": "pgd_at", "epochs": 1, "batch_size": 32, "lr": 0.05, "progress": False,
                  "attack": {"steps": 1}, "val_attack": {"steps": 1}},
        "eval": {"protocol": "quick", "n_examples": 16, "plot": False, "after_train": True},
    })  # fmt: skip


def test_a_new_defense_trains_and_evaluates_through_its_registrations(tmp_path, toy_defense):
    cfg = _cfg("toy-run")
    assert defense_of(cfg) == "toy" and defense_of(_cfg("plain")) == "none"
    logs: list[str] = []
    result = train_and_evaluate(cfg, tmp_path / "run", log=logs.append)
    (epoch,) = result.history
    # Every objective's loss pass added the toy's own term: the epoch loss is CE plus the weighted penalty.
    assert epoch["toy_penalty"] > 0
    assert epoch["loss"] == pytest.approx(epoch["ce"] + PENALTY_WEIGHT * epoch["toy_penalty"], rel=1e-5)
    assert logs[0].startswith("advmend train (Toy): toy-run")
    # Its checkpoint is rebuilt by its own builder and evaluated in the folder its registration names.
    report = json.loads((tmp_path / "run" / "eval-toy-quick" / "report.json").read_text())
    assert report["meta"]["checkpoint"] == str(result.best)
    # A plain classifier of the same recipe has no such term.
    plain = train(_cfg("plain"), tmp_path / "plain", log=lambda s: None).history[0]
    assert "toy_penalty" not in plain and plain["loss"] == pytest.approx(plain["ce"])


def test_the_wrapped_view_keeps_a_new_defense_loss_term():
    """Under DDP / torch.compile objectives train a wrapper: it keeps the toy's loss pass, as it keeps FSR's."""
    torch.manual_seed(0)
    model = PenalisedLogits(create_model("small_cnn", num_classes=10, width=4))
    view = _AuxiliaryLossView(_Dispatch(copy.deepcopy(model)))  # a twin: each pass moves BatchNorm statistics
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    objective = AdversarialCE(PGD(eps=8 / 255, steps=1, random_start=False))
    got, ref = objective(view, x, y), objective(model, x, y)
    assert isinstance(view, AuxiliaryLoss) and "toy_penalty" in got.metrics
    torch.testing.assert_close(got.loss, ref.loss)
    assert not isinstance(_Dispatch(model), AuxiliaryLoss)  # the wrapper alone would hide the term
