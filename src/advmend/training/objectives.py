"""Training objectives: `(model, x, y) -> LossOutput`. They never own the optimizer.

PGD-AT (Madry et al. 2018): minimise CE on adversarial examples made by the shared PGD core with the
model in eval mode; the loss pass then runs in the model's current (train) mode. A model with its own
loss terms adds them in the same single forward pass (`adversarial_forward`); for an `FSRModel` those
are the FSR terms of docs/fsr.md: L = CE + lambda_sep * L_sep + lambda_rec * L_rec. "standard"
training is the same objective with no attack, and fast AT (Wong et al. 2020) is the same objective
with a one-step attack (`fast_at_attack`).

TRADES and MART live in `trades.py` and `mart.py`; all of them add a model's own terms through
`adversarial_forward`, so every method composes with FSR (and any such defense) the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from advmend.attacks.pgd import PGD, pgd
from advmend.defenses.hooks import AuxiliaryLoss
from advmend.errors import ConfigError
from advmend.types import LossOutput


def check_weight(value: float, name: str) -> None:
    """ConfigError naming the config key unless `value` is a finite number >= 0."""
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value}")


def check_fsr_weights(lambda_sep: float, lambda_rec: float) -> None:
    """The FSR weights every objective takes (fsr.lambda_sep, fsr.lambda_rec)."""
    check_weight(lambda_sep, "fsr.lambda_sep")
    check_weight(lambda_rec, "fsr.lambda_rec")


@dataclass(frozen=True)
class RegularisedObjective:
    """The fields TRADES and MART share, and their checks: the inner attack, the weight `beta` of the
    KL regulariser (>= 0) and the FSR weights. Each method adds its own check of the attack."""

    attack: PGD
    beta: float
    lambda_sep: float = 1.0
    lambda_rec: float = 1.0

    def __post_init__(self) -> None:
        check_weight(self.beta, "train.beta")
        check_fsr_weights(self.lambda_sep, self.lambda_rec)


def adversarial_forward(
    model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, lambda_sep: float, lambda_rec: float
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """The loss pass on the adversarial batch: (final logits, the model's weighted auxiliary terms or
    None, metrics).

    A model with its own loss terms (`defenses.hooks.AuxiliaryLoss`: an `FSRModel`'s L_sep and L_rec)
    computes them in its one loss pass, weighted by the objective's weights; any other model gives its
    logits alone. Asking for the method rather than a class keeps every defense out of the objectives.
    """
    if not isinstance(model, AuxiliaryLoss):
        return model(x_adv), None, {}
    return model.forward_with_loss(x_adv, y, {"lambda_sep": lambda_sep, "lambda_rec": lambda_rec})


def fast_at_attack(eps: float, *, norm: str = "linf", step_size: float | None = None) -> PGD:
    """FGSM with a uniform random start, step alpha = 1.25 * eps ("fast AT").

    Wong, Rice, Kolter, "Fast is better than free: Revisiting adversarial training", ICLR 2020
    (arXiv 2001.03994): delta ~ U(-eps, eps), one signed step of alpha, projection onto the ball and
    [0, 1]. The random start is what prevents catastrophic overfitting of plain FGSM training; alpha
    = 1.25 eps is their recommended step. Wong et al. craft delta in train mode; like every advmend
    training attack it runs here in eval mode (`attack_mode`). `step_size` overrides alpha.
    """
    alpha = 1.25 * eps if step_size is None else step_size
    return PGD(
        eps=eps, steps=1, step_size=alpha if alpha > 0 else None, norm=norm, random_start=True,
        start="uniform", keep_best=False, name="FGSM-RS",
    )  # fmt: skip


@dataclass(frozen=True)
class AdversarialCE:
    """Cross-entropy on examples from `attack` (None: clean examples), plus FSR terms if present.

    Args:
        attack: the inner maximisation; None or 0 steps trains on clean inputs. Its last iterate is
            trained on, whatever its `keep_best` (see `PGD.for_training`).
        lambda_sep: weight of L_sep for FSR models.
        lambda_rec: weight of L_rec for FSR models.
    """

    attack: PGD | None = None
    lambda_sep: float = 1.0
    lambda_rec: float = 1.0

    def __post_init__(self) -> None:
        check_fsr_weights(self.lambda_sep, self.lambda_rec)
        if self.attack is not None:
            object.__setattr__(self, "attack", self.attack.for_training())

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LossOutput:
        x_adv = None if self.attack is None else pgd(model, x, y, self.attack, validate=False).detach()
        logits, fsr, metrics = adversarial_forward(
            model, x if x_adv is None else x_adv, y, self.lambda_sep, self.lambda_rec
        )
        ce = F.cross_entropy(logits, y)
        loss = ce if fsr is None else ce + fsr
        return LossOutput(loss, logits, {"ce": ce.detach(), **metrics}, x_adv)
