"""Scoped model modes for attack generation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (BatchNorm running stats, deterministic FSR masks, no dropout) and frozen parameters.

    Freezing parameters means `torch.autograd.grad` computes only the input gradient, which is all an
    attack needs: weight gradients are neither computed nor accumulated into `.grad`. Every module's
    own `training` flag and every parameter's `requires_grad` are restored on exit, even after an error.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)
