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
# MNIST) and shares CIFAR-10's L2 and L1 radii; its L-inf radius is its own (data.DATASET_INFO). A data set
# without radii of its own (an image folder, an .npz file) uses one row, chosen by `data.radii` or its
# image size (`data.dataset_radii`).
STANDARD_RADII: dict[str, dict[str, float]] = {
    "cifar10": {"linf": 8 / 255, "l2": 0.5, "l1": 12.0},
    "imagenet": {"linf": 4 / 255, "l2": 3.0},
}
L2_EPS = STANDARD_RADII["cifar10"]["l2"]
L1_EPS = STANDARD_RADII["cifar10"]["l1"]


@dataclass(frozen=True)
class Radii:
    """A data set's standard radius for each norm it has one for (`eps`: norm -> radius), with the data set's
    name and the `STANDARD_RADII` row they come from, so a missing radius is reported where it matters."""

    dataset: str
    row: str
    eps: dict[str, float]

    def of(self, norm: str) -> float:
        if norm not in self.eps:
            raise ConfigError(
                f"data set {self.dataset!r} (standard radii of {self.row}) has no standard {norm} radius: "
                f"give the attack's eps (e.g. --set train.attack.eps=... or advmend eval --eps ...)"
            )
        return self.eps[norm]


@dataclass(frozen=True)
class ThreatModel:
    """The ball an attack may move an image in: its norm ("linf", "l2" or "l1") and radius eps."""

    norm: str
    eps: float

    @classmethod
    def resolve(cls, norm: str, eps: float | None, radii: Radii) -> ThreatModel:
        """The one place where "eps None" is decided: the data set's standard radius for `norm` (`radii`,
        e.g. 8/255 L-inf and 0.5 L2 for CIFAR-10, 4/255 and 3.0 for an ImageNet-sized folder). A given eps
        must be finite and >= 0."""
        if eps is None:
            eps = radii.of(norm)
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ConfigError(f"the {norm} radius eps must be a finite number >= 0, got {eps!r}")
        return cls(norm, float(eps))
