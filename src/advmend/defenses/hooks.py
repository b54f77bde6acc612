"""What a defense's model may supply to training, so that training never asks which defense it is.

Training, its objectives and its DDP / torch.compile view are written once, for any model; a defense
whose training adds loss terms of its own (FSR: L_sep and L_rec) gives its model one method,
`forward_with_loss`, and every objective (PGD-AT, TRADES, MART, fast AT, standard) calls it for its
loss pass. A model without it is trained on its logits alone. The method, not a test of the model's
class, is what training looks for: a new defense needs no line in training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class AuxiliaryLoss(Protocol):
    """A model whose loss pass adds its own weighted loss terms to the training objective.

    `forward_with_loss(x, y, weights)` returns (logits, the weighted terms or None, metrics): the logits
    of `x` from the same forward pass that computed the terms (so they cost no second pass), the sum of
    the model's terms weighted by `weights` (the objective's loss weights by name, e.g. "lambda_sep";
    None when they add nothing, then the pass must be exactly the plain `model(x)`), and detached
    per-term values for the epoch record.
    """

    def forward_with_loss(
        self, x: torch.Tensor, y: torch.Tensor, weights: Mapping[str, float]
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]: ...
