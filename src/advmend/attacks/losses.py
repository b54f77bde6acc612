"""Per-example attack losses (reduction='none'): the attack maximises them.

Per-example values keep results independent of the batch size; attacks sum them only to get
the input gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from advmend.registry import Registry

AttackLoss = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
LOSSES: Registry[AttackLoss] = Registry("attack loss")


@LOSSES.register("ce")
def ce_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the true class."""
    return F.cross_entropy(logits, y, reduction="none")


@LOSSES.register("margin")
def margin_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """Carlini-Wagner margin: -max(z_y - max_{j != y} z_j, -kappa).

    Increasing it pushes the best wrong logit above the true one; past a margin of `kappa` the loss is
    flat (kappa = 50 in the FSR paper's "C&W" protocol, which in practice never saturates).
    """
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return -torch.clamp(true - other, min=-kappa)


@LOSSES.register("kl")
def kl_loss(logits: torch.Tensor, target: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """KL(p || softmax(logits)) per example, where `target` is p, an (N, K) probability tensor.

    TRADES' inner maximisation (Zhang et al. 2019): the attack moves the prediction away from the
    clean prediction p rather than from a label, so it needs no label at all.
    """
    log_q = F.log_softmax(logits.float(), dim=1)
    return F.kl_div(log_q, target.float(), reduction="none").sum(1)


# Targeted losses: the attack maximises them, so each one grows as the prediction moves towards the
# target class `t` (the `y` argument of a targeted attack holds the target, not the true label).


@LOSSES.register("ce_targeted")
def ce_targeted_loss(logits: torch.Tensor, target: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """Minus the cross-entropy of the target class: ascending it descends CE towards the target."""
    return -F.cross_entropy(logits, target, reduction="none")


@LOSSES.register("margin_targeted")
def margin_targeted_loss(logits: torch.Tensor, target: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """Targeted Carlini-Wagner margin: -max(max_{j != t} z_j - z_t, -kappa).

    It grows until the target logit leads every other logit by `kappa` (Carlini & Wagner 2017, f_6).
    """
    aimed = logits.gather(1, target[:, None]).squeeze(1)
    other = logits.scatter(1, target[:, None], float("-inf")).amax(dim=1)
    return -torch.clamp(other - aimed, min=-kappa)
