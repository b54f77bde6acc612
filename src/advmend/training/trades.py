"""TRADES: clean cross-entropy plus beta * KL(p(x) || p(x')) on a KL-maximising x'.

Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan, "Theoretically Principled Trade-off between Robustness and
Accuracy", ICML 2019 (arXiv 1901.08573), and its reference code:

- inner maximisation, model in eval mode: x' maximises KL(p(x) || p(x')) within the eps-ball,
  starting from x + 0.001 * N(0, I) (at x' = x the KL and its gradient are exactly zero, so a start
  at x would never move). p(x) is the clean prediction in eval mode, held fixed (detached).
- outer minimisation, model in train mode: CE(f(x), y) + beta * KL(p(x) || p(x')), the KL summed over
  classes and averaged over the batch ("batchmean"); gradients flow through both p(x) and p(x').
  beta = 1/lambda of the paper, 6 in its CIFAR-10 recipe.

With an FSR model, lambda_sep * L_sep + lambda_rec * L_rec are added on the adversarial batch
(docs/fsr.md); the clean pass is an ordinary train-mode pass (stochastic masks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from advmend.attacks.losses import kl_loss
from advmend.attacks.modes import attack_mode
from advmend.attacks.pgd import PGD, pgd
from advmend.errors import ConfigError
from advmend.training.objectives import RegularisedObjective, adversarial_forward
from advmend.types import LossOutput

TRADES_BETA = 6.0  # Zhang et al. 2019, CIFAR-10 (1/lambda = 6)


@dataclass(frozen=True)
class TRADES(RegularisedObjective):
    """The TRADES objective.

    Args:
        attack: the inner maximisation; must use loss "kl" (target: clean probabilities), one run
            (restarts 1) and the last iterate (keep_best False). `trades_attack` builds the
            reference one.
        beta: weight of the KL term (>= 0).
        lambda_sep, lambda_rec: weights of the FSR terms for FSR models.
    """

    beta: float = TRADES_BETA

    def __post_init__(self) -> None:
        super().__post_init__()
        a = self.attack
        if a.loss != "kl" or a.targeted or a.keep_best or a.restarts != 1:
            raise ConfigError(
                "trades needs an untargeted attack with loss 'kl', restarts 1 and keep_best false "
                f"(got loss {a.loss!r}, restarts {a.restarts}); see advmend.training.trades.trades_attack"
            )

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LossOutput:
        # The attack's target: the clean prediction of the function the attack sees (eval mode).
        with attack_mode(model), torch.no_grad():
            p_clean = F.softmax(model(x).float(), dim=1)
        x_adv = pgd(model, x, p_clean, self.attack, validate=False).detach()
        logits_clean = model(x)  # train mode, as the reference: BatchNorm batch statistics
        logits_adv, fsr, metrics = adversarial_forward(model, x_adv, y, self.lambda_sep, self.lambda_rec)
        ce = F.cross_entropy(logits_clean, y)
        kl = kl_loss(logits_adv, F.softmax(logits_clean.float(), dim=1)).mean()  # "batchmean"
        loss = ce + self.beta * kl
        if fsr is not None:
            loss = loss + fsr
        # Train accuracy is reported on the adversarial batch, as for PGD-AT.
        return LossOutput(loss, logits_adv, {"ce": ce.detach(), "kl": kl.detach(), **metrics}, x_adv)


def trades_attack(
    eps: float, steps: int = 10, step_size: float | None = None, *, norm: str = "linf", name: str = ""
) -> PGD:
    """TRADES' inner maximisation: KL loss from x + 0.001 * N(0, I), last iterate (the reference code)."""
    return PGD(
        eps=eps, steps=steps, step_size=step_size, norm=norm, random_start=True, start="normal", loss="kl",
        keep_best=False, name=name or f"TRADES-KL-{steps}",
    )  # fmt: skip
