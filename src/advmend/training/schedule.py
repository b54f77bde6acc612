"""Learning-rate schedules as pure functions of training progress (resuming needs no scheduler state)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from advmend.config import TrainConfig  # train.schedule and train.milestones are checked by TrainConfig


@dataclass(frozen=True)
class Schedule:
    """A training stage's learning rate, given explicitly: the classifier's comes from `train.*`
    (`Schedule.of`), PSSR's regenerator's from `pssr.lr` with a cosine decay over all its epochs.

    kind: piecewise | cosine | constant; `milestones` (fractions of `epochs`) and `gamma` are piecewise's.
    """

    lr: float
    epochs: int
    kind: str = "piecewise"
    milestones: tuple[float, ...] = (0.75, 0.9)
    gamma: float = 0.1

    @classmethod
    def of(cls, t: TrainConfig) -> Schedule:
        return cls(lr=t.lr, epochs=t.epochs, kind=t.schedule, milestones=tuple(t.milestones), gamma=t.gamma)


def learning_rate(schedule: Schedule | TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The learning rate at `step` of `epoch` (both 0-based).

    piecewise: lr * gamma^(number of milestones passed), changing at epoch boundaries as in the
    reference recipe (milestones 0.75 and 0.9 of 100 epochs = epochs 75 and 90);
    cosine: per-step cosine decay to 0; constant: lr.
    """
    s = schedule if isinstance(schedule, Schedule) else Schedule.of(schedule)
    if s.kind == "constant":
        return s.lr
    if s.kind == "piecewise":
        passed = sum(epoch >= round(m * s.epochs) for m in s.milestones)
        return s.lr * s.gamma**passed
    progress = (epoch * steps_per_epoch + step) / max(1, s.epochs * steps_per_epoch)
    return 0.5 * s.lr * (1 + math.cos(math.pi * progress))
