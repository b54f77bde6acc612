"""Plain results shared across layers, so no layer reaches up to another's module for a dataclass.

`LossOutput` is what every training objective returns (classifier objectives in training/, the PSSR
regenerator's in defenses/pssr/); `AttackRun` is what an external attack (AutoAttack, transfer) returns to
the evaluation that runs it; `ThreatModel` is the ball an attack is bounded by, from config to checkpoint
to report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from advmend.errors import ConfigError


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


# The standard radius of each threat model, as RobustBench and the AutoAttack papers use them (Croce &
# Hein 2020 for L-inf and L2; Croce & Hein 2021, "Mind the box", for L1 on CIFAR-10). ImageNet's models are
# evaluated at 224 x 224; it has no standard L1 radius. Every built-in data set is 32 x 32 (28 x 28 for
# MNIST) and shares CIFAR-10's L2 and L1 radii; its L-inf radius is its own (data.DATASET_INFO).
STANDARD_RADII: dict[str, dict[str, float]] = {
    "cifar10": {"linf": 8 / 255, "l2": 0.5, "l1": 12.0},
    "imagenet": {"linf": 4 / 255, "l2": 3.0},
}
L2_EPS = STANDARD_RADII["cifar10"]["l2"]
L1_EPS = STANDARD_RADII["cifar10"]["l1"]


@dataclass(frozen=True)
class ThreatModel:
    """The ball an attack may move an image in: its norm ("linf", "l2" or "l1") and radius eps."""

    norm: str
    eps: float

    @classmethod
    def resolve(cls, norm: str, eps: float | None, dataset_eps: float, dataset: str | None = None) -> ThreatModel:
        """The one place where "eps None" is decided: the data set's standard L-inf radius (`dataset_eps`,
        e.g. 8/255 for CIFAR-10) for norm linf; for l2 and l1 the `STANDARD_RADII` row of `dataset`, CIFAR-10's
        (`L2_EPS`, `L1_EPS`) for a data set without a row of its own. A given eps must be finite and >= 0."""
        if eps is None:
            if norm == "linf":
                eps = dataset_eps
            else:
                row = STANDARD_RADII.get(dataset or "cifar10", STANDARD_RADII["cifar10"])
                if norm not in row:
                    raise ConfigError(f"{dataset} has no standard {norm} radius: give the attack's eps")
                eps = row[norm]
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ConfigError(f"the {norm} radius eps must be a finite number >= 0, got {eps!r}")
        return cls(norm, float(eps))
