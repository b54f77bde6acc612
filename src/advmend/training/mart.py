"""MART: boosted cross-entropy on x' plus a misclassification-weighted KL(p(x) || p(x')).

Wang, Zou, Yi, Bailey, Ma, Gu, "Improving Adversarial Robustness Requires Revisiting Misclassified
Examples", ICLR 2020, and its reference code:

- inner maximisation: standard PGD on CE (the shared core, eval mode) from `train.attack`; the
  bundled MART configs use the reference code's start x + 0.001 * N(0, I) (`start: normal`).
- outer minimisation, model in train mode, with p = softmax:
      BCE(p(x'), y) = CE(f(x'), y) - log(1 - max_{k != y} p_k(x'))
      L = BCE + beta * mean_i [ KL(p(x_i) || p(x'_i)) * (1 - p_{y_i}(x_i)) ]
  The KL term is weighted by how badly the clean example is classified, so misclassified examples
  are regularised most. beta = 6 (the reference code's default). Gradients flow through p(x),
  p(x') and the weight, as in the reference.

With an FSR model, lambda_sep * L_sep + lambda_rec * L_rec are added on the adversarial batch
(docs/fsr.md); the clean pass is an ordinary train-mode pass (stochastic masks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from advmend.attacks.losses import kl_loss
from advmend.attacks.pgd import pgd
from advmend.errors import ConfigError
from advmend.training.objectives import RegularisedObjective, adversarial_forward
from advmend.types import LossOutput

MART_BETA = 6.0  # Wang et al. 2020, the reference code's default
# -log(1 - p) is infinite at p = 1 (a confidently wrong x'), and its gradient 1/(1 - p) explodes near it.
# The reference code evaluates log(1.0001 - p): the term is at most -log(1e-4) ~ 9.2 and its gradient
# at most 1e4, while it is unchanged to within 1e-4 wherever p is not close to 1.
BCE_CLAMP = 1.0001


def boosted_ce(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MART's BCE: CE(f(x'), y) - log(1.0001 - max_{k != y} p_k(x')), averaged over the batch."""
    probs = F.softmax(logits_adv.float(), dim=1)
    top_wrong = probs.scatter(1, y[:, None], 0.0).amax(dim=1)  # probabilities are >= 0
    return F.cross_entropy(logits_adv.float(), y) - torch.log(BCE_CLAMP - top_wrong).mean()


def weighted_kl(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_i KL(p(x_i) || p(x'_i)) * (1 - p_{y_i}(x_i))."""
    p_clean = F.softmax(logits_clean.float(), dim=1)
    kl = kl_loss(logits_adv, p_clean)
    return (kl * (1 - p_clean.gather(1, y[:, None]).squeeze(1))).mean()


@dataclass(frozen=True)
class MART(RegularisedObjective):
    """The MART objective.

    Args:
        attack: the inner maximisation (PGD on a label loss; the last iterate is trained on, whatever
            its `keep_best`).
        beta: weight of the weighted KL term (>= 0).
        lambda_sep, lambda_rec: weights of the FSR terms for FSR models.
    """

    beta: float = MART_BETA

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attack.loss == "kl" or self.attack.targeted:
            raise ConfigError(
                f"mart needs an untargeted attack on the labels (loss ce or margin), got {self.attack.loss!r}"
            )
        object.__setattr__(self, "attack", self.attack.for_training())  # the last iterate, always

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LossOutput:
        x_adv = pgd(model, x, y, self.attack, validate=False).detach()
        logits_clean = model(x)  # train mode, before the adversarial pass as in the reference
        logits_adv, fsr, metrics = adversarial_forward(model, x_adv, y, self.lambda_sep, self.lambda_rec)
        bce = boosted_ce(logits_adv, y)
        kl = weighted_kl(logits_clean, logits_adv, y)
        loss = bce + self.beta * kl
        if fsr is not None:
            loss = loss + fsr
        return LossOutput(loss, logits_adv, {"bce": bce.detach(), "kl": kl.detach(), **metrics}, x_adv)
