"""Plain results shared across layers, so no layer reaches up to another's module for a dataclass.

`LossOutput` is what every training objective returns (classifier objectives in training/, the PSSR
regenerator's in defenses/pssr/); `AttackRun` is what an external attack (AutoAttack, transfer) returns to
the evaluation that runs it.
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
