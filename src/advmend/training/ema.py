"""An exponential moving average (EMA) of the weights, for validation, selection and the best checkpoint.

Weight averaging improves adversarially trained models (Gowal et al., "Uncovering the Limits of
Adversarial Training against Norm-Bounded Adversarial Examples", 2020, sec. 4.3; Rebuffi et al.,
"Fixing Data Augmentation to Improve Adversarial Robustness", 2021). After optimizer step t (1-based),
    ema <- d_t * ema + (1 - d_t) * w,   d_t = min(decay, (1 + t) / (10 + t)),
the warm-up of TensorFlow's ExponentialMovingAverage(num_updates=t), so early averages are not
dominated by the random initialisation. Buffers (BatchNorm statistics) are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """An averaged copy of `model` (same structure, eval mode, no gradients).

    Args:
        model: the trained module (unwrapped: not DDP, not compiled).
        decay: the target decay in (0, 1), e.g. 0.999.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold in `model`'s current weights (call after each optimizer step)."""
        self.updates += 1
        d = self.current_decay()
        ema_p = [p for p in self.module.parameters()]
        new_p = [p.detach() for p in model.parameters()]
        floats = [(e, n) for e, n in zip(ema_p, new_p) if e.is_floating_point()]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [n for _, n in floats], 1.0 - d)
        for e, n in zip(self.module.buffers(), model.buffers()):
            e.copy_(n)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The averaged weights and buffers, named `ema.<state_dict key>`, for a checkpoint."""
        return {f"ema.{k}": v for k, v in self.module.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        state = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
        self.module.load_state_dict(state)
        self.updates = int(updates)
