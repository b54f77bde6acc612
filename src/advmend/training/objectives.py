"""Training objectives: `(model, x, y) -> LossOutput`. They never own the optimizer.

PGD-AT (Madry et al. 2018): minimise CE on adversarial examples made by the shared PGD core with the
model in eval mode; the loss pass then runs in the model's current (train) mode. With an `FSRModel`,
the FSR terms of shared/specs/fsr.md are added: L = CE + lambda_sep * L_sep + lambda_rec * L_rec, in
the same single forward pass. "standard" training is the same objective with no attack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from advmend.attacks.pgd import PGD, pgd
from advmend.defenses.insert import FSRModel, fsr_losses


@dataclass
class LossOutput:
    """The scalar to minimise, the logits it was computed on, and detached scalar metrics."""

    loss: torch.Tensor
    logits: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class AdversarialCE:
    """Cross-entropy on examples from `attack` (None: clean examples), plus FSR terms if present.

    Args:
        attack: the inner maximisation; None or 0 steps trains on clean inputs.
        lambda_sep: weight of L_sep for FSR models.
        lambda_rec: weight of L_rec for FSR models.
    """

    attack: PGD | None = None
    lambda_sep: float = 1.0
    lambda_rec: float = 1.0

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LossOutput:
        x_in = x if self.attack is None else pgd(model, x, y, self.attack, validate=False)
        use_fsr = isinstance(model, FSRModel) and (self.lambda_sep != 0 or self.lambda_rec != 0)
        if not use_fsr:
            logits = model(x_in)
            loss = F.cross_entropy(logits, y)
            return LossOutput(loss, logits, {"ce": loss.detach()})
        out = model.forward_with_aux(x_in)
        ce = F.cross_entropy(out.logits, y)
        sep, rec = fsr_losses(out, y)
        loss = ce + self.lambda_sep * sep + self.lambda_rec * rec
        return LossOutput(
            loss, out.logits, {"ce": ce.detach(), "fsr_sep": sep.detach(), "fsr_rec": rec.detach()}
        )
