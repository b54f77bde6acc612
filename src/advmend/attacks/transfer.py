"""Transfer attack: adversarial examples crafted on a surrogate model, scored on the target model.

Papernot, McDaniel, Goodfellow, "Transferability in Machine Learning", 2016; listed by Carlini et al.
2019 ("On Evaluating Adversarial Robustness", section 4) as a check that a defense's robustness does not
come from a broken gradient: a transfer attack ignores the target's gradients entirely, so robust
accuracy under transfer far *below* white-box robust accuracy means the white-box attacks were masked.
The examples come from the one PGD core run on the surrogate (in the surrogate's eval mode).

The rule (one for every transfer path in advmend: `advmend eval --transfer-from` and PSSR's
"transfer" and "graybox" threat models): the transferred example is the attack's LAST iterate on the
surrogate, whatever `PGD.keep_best` says. Fooling the surrogate is not the goal, fooling the target
is: the first iterate that fools the surrogate (`keep_best`, right for white-box scoring) sits just
across the surrogate's own decision boundary, while the last iterate has climbed the surrogate's loss
for the whole budget, and high-loss, high-confidence examples are the ones that transfer (Carlini &
Wagner, "Towards Evaluating the Robustness of Neural Networks", S&P 2017). It is also what transfer
evaluations usually do: run the full attack on the surrogate and hand over its output.
With restarts, an example keeps the first run whose last iterate fools the surrogate, else its
highest-loss run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from advmend.attacks.modes import attack_mode
from advmend.attacks.pgd import PGD, pgd
from advmend.types import AttackRun


def crafting_attacks(attacks: Sequence[Any]) -> list[PGD]:
    """The attacks of `attacks` that can craft on a source model (a transfer or gray-box threat model):
    the presets of the PGD core. External attacks (AutoAttack) only attack the model they are given, so
    a list without a PGD one crafts with PGD-20 (step 2.5 eps / 20) at its first attack's radius and
    norm, and the transfer threat models still run; an empty list crafts nothing."""
    crafters = [a for a in attacks if isinstance(a, PGD)]
    if crafters or not attacks:
        return crafters
    ref = attacks[0]  # every attack has a radius and a norm
    return [PGD(eps=ref.eps, steps=20, step_size=2.5 * ref.eps / 20, norm=ref.norm, name="PGD-20")]


@dataclass(frozen=True, eq=False)
class Transfer:
    """Craft with `attack` on `surrogate`, score on the model under evaluation.

    Args:
        surrogate: an independently trained model with the same input and label spaces.
        attack: the white-box attack run on the surrogate.
        source: where the surrogate came from (a checkpoint path), for the report.
    """

    surrogate: nn.Module
    attack: PGD
    source: str = ""

    def __post_init__(self) -> None:
        # The module's rule: craft with the last iterate (see the module docstring).
        object.__setattr__(self, "attack", replace(self.attack, keep_best=False))

    @property
    def eps(self) -> float:
        return self.attack.eps

    @property
    def norm(self) -> str:
        return self.attack.norm

    def describe(self) -> dict:
        inner = self.attack.describe()
        return dict(inner, name=f"transfer {inner['name']}", surrogate=self.source, final_iterate=True)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: torch.device,
            batch_size: int = 256, generator: torch.Generator | None = None, progress: bool = False) -> AttackRun:  # fmt: skip
        self.surrogate.to(device)
        chunks, fooled = [], []
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            x_adv = pgd(self.surrogate, xb, yb, self.attack, generator=generator, validate=False)
            with attack_mode(model), torch.no_grad():
                fooled.append(model(x_adv).argmax(1) != yb)
            chunks.append(x_adv)
        return AttackRun(torch.cat(chunks), torch.cat(fooled))
