"""Adaptive-attack tools for defenses whose gradients are missing, wrong or random.

BPDA (Backward Pass Differentiable Approximation; Athalye, Carlini, Wagner, "Obfuscated Gradients Give a
False Sense of Security", ICML 2018): run the real pre-processor forward, but differentiate a stand-in
backward. EOT (Expectation over Transformation) is the `eot` setting of the attack core (`PGD.eot`),
which averages the input gradient over several draws of a randomised model.

Both compose with every gradient attack because a `BPDA` module is just a model: `model(x)` returns the
classifier's logits on the pre-processed input, exactly as the defense computes them. That includes
AutoAttack: pass the `BPDA` module as the model to `AutoAttackSpec.run`/`evaluate`, and set
`AutoAttackSpec(eot=n)` (or version "rand") for randomised pre-processors.

Masks. "Straight-through for masks" (the spec's BPDA row) needs no separate backward here: for a
defense x -> x * m(x) whose binary mask m comes from comparisons, the straight-through estimator
treats m as a constant in the backward pass, which is exactly `stand_in=lambda x: x * m(x)` (the
comparison has no gradient, so autograd differentiates only the product). For a mask that *selects
which pixels are replaced* (x -> m * x + (1 - m) * g(x)), pass the same expression with the
differentiable part you trust as `stand_in`; the identity default is the other common choice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Preprocess = Callable[[torch.Tensor], torch.Tensor]


def bpda(x: torch.Tensor, preprocess: Preprocess, stand_in: Preprocess | None = None) -> torch.Tensor:
    """`preprocess(x)` in the forward pass, with the gradient of `stand_in` (identity when None).

    The value is exactly `preprocess(x)`; only the backward pass is approximated. The pre-processor
    runs without building a graph, so nothing is spent differentiating it.
    """
    with torch.no_grad():
        value = preprocess(x)
    surrogate = x if stand_in is None else stand_in(x)
    return surrogate + (value - surrogate).detach()


class BPDA(nn.Module):
    """A classifier behind a pre-processor, attacked with an approximate backward pass.

    Args:
        preprocess: the defense's input transformation, [0,1] images to [0,1] images (may be
            non-differentiable or random).
        classifier: the protected model, images to logits; gradients flow through it exactly.
        stand_in: differentiable approximation of `preprocess` used only for gradients; None is the
            identity (the usual choice when preprocess(x) is close to x).

    Example:
        >>> attacked = BPDA(jpeg_compress, classifier)
        >>> x_adv = pgd(attacked, x, y, PGD(eps=8/255, steps=100, eot=1))
    """

    def __init__(self, preprocess: Preprocess, classifier: nn.Module, stand_in: Preprocess | None = None):
        super().__init__()
        self.preprocess = preprocess
        self.classifier = classifier
        self.stand_in = stand_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(bpda(x, self.preprocess, self.stand_in))
