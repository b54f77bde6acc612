"""Plain results shared across layers, so no layer reaches up to another's module for a dataclass.

`LossOutput` is what every training objective returns (classifier objectives in training/, the PSSR
regenerator's in defenses/pssr/); `AttackRun` is what an external attack (AutoAttack, transfer) returns to
the evaluation that runs it; `ThreatModel` is the ball an attack is bounded by, from config to checkpoint
to report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossOutput:
    """The scalar to minimise, the logits it was computed on, and detached scalar metrics.

    `x_adv` is the (detached) batch the attack produced, or None for clean training; it is kept for
    tests and inspection and costs no memory beyond what the step already holds.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    x_adv: torch.Tensor | None = None


@dataclass
class AttackRun:
    """What an external attack returns for the examples it was given.

    Attributes:
        x_adv: adversarial examples, same shape and device as the input.
        fooled: (n,) bool, misclassified w.r.t. the true label.
        stages: for attacks made of a cascade of sub-attacks (AutoAttack): per stage, a dict with
            "name", "fooled" ((n,) bool, fooled by this stage or an earlier one), "seconds", "attacked".
        notes: warnings the attack's own checks raised (e.g. AutoAttack's flags).
    """

    x_adv: torch.Tensor
    fooled: torch.Tensor
    stages: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


L2_EPS = 0.5  # the standard L2 radius for 32x32 images (RobustBench; ../shared/specs/evaluation.md)


@dataclass(frozen=True)
class ThreatModel:
    """The ball an attack may move an image in: its norm ("linf" or "l2") and radius eps."""

    norm: str
    eps: float

    @classmethod
    def resolve(cls, norm: str, eps: float | None, dataset_eps: float) -> ThreatModel:
        """The one place where "eps None" is decided: the data set's standard L-inf radius (`dataset_eps`,
        e.g. 8/255 for CIFAR-10) for norm linf, `L2_EPS` for norm l2."""
        if eps is None:
            eps = dataset_eps if norm == "linf" else L2_EPS
        return cls(norm, float(eps))
