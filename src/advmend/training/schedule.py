"""Learning-rate schedules as pure functions of training progress (resuming needs no scheduler state)."""

from __future__ import annotations

import math

from advmend.config import TrainConfig  # train.schedule and train.milestones are checked by TrainConfig


def learning_rate(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The learning rate at `step` of `epoch` (both 0-based).

    piecewise: lr * gamma^(number of milestones passed), changing at epoch boundaries as in the
    reference recipe (milestones 0.75 and 0.9 of 100 epochs = epochs 75 and 90);
    cosine: per-step cosine decay to 0; constant: lr.
    """
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "piecewise":
        passed = sum(epoch >= round(m * cfg.epochs) for m in cfg.milestones)
        return cfg.lr * cfg.gamma**passed
    progress = (epoch * steps_per_epoch + step) / max(1, cfg.epochs * steps_per_epoch)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))
