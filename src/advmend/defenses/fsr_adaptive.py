"""The adaptive attack on FSR, as an attack any evaluation can run: `advmend eval CKPT --protocol fsr-adaptive`.

At evaluation FSR's mask is sigmoid(z / 0.1), nearly a step function. If its vanishing gradient is what
keeps PGD from a model's weak points, the same attack differentiated through a softer mask (`MaskBPDA`:
the exact forward pass, the backward of sigmoid(z / backward_tau)) finds them. The protocol puts the plain
attacks and their BPDA versions side by side, each number on its own (no cascade), so the difference is
the masking's share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from advmend.attacks.pgd import PGD
from advmend.attacks.presets import PROTOCOLS, cw_margin, paper_protocol
from advmend.defenses.fsr import MaskBPDA
from advmend.types import AttackRun

BACKWARD_TAU = 1.0  # ten times the model's tau: the mask's gradient reaches the typical range of z


@dataclass(frozen=True)
class ThroughSoftMask:
    """`attack` run on `MaskBPDA(model, backward_tau)`: the model's exact logits, FSR's mask differentiated
    at a softer temperature. Its examples are scored on the model itself (the forward pass is exact)."""

    attack: PGD
    backward_tau: float = BACKWARD_TAU

    @property
    def eps(self) -> float:
        return self.attack.eps

    @property
    def norm(self) -> str:
        return self.attack.norm

    def describe(self) -> dict:
        inner = self.attack.describe()
        return dict(inner, name=f"{inner['name']} BPDA-mask", bpda_backward_tau=self.backward_tau)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: torch.device,
            batch_size: int = 256, generator: torch.Generator | None = None, progress: bool = False) -> AttackRun:  # fmt: skip
        return self.attack.run(MaskBPDA(model, self.backward_tau), x, y, device=device, batch_size=batch_size,
                               generator=generator, progress=progress)  # fmt: skip


def _plain_attacks(eps: float, norm: str) -> tuple[PGD, PGD]:
    """PGD-20 and CW-30 with the FSR paper's settings (step eps/10, no random start, CW kappa 50)."""
    cw30 = cw_margin(eps, norm, steps=30, step_size=eps / 10, kappa=50.0, name="CW-30")
    return paper_protocol(eps, norm)[1], cw30


def adaptive_attacks(eps: float, norm: str = "linf") -> list[ThroughSoftMask]:
    """PGD-20 and CW-30 through FSR's softened mask: what the study adds to an FSR row's evaluation."""
    return [ThroughSoftMask(a) for a in _plain_attacks(eps, norm)]


@PROTOCOLS.register("fsr-adaptive", cascade=False, sanity_full=False)
def fsr_adaptive_protocol(eps: float, norm: str = "linf") -> list:
    """PGD-20 and CW-30 (the FSR paper's settings), and both again through FSR's softened mask (BPDA)."""
    pgd20, cw30 = _plain_attacks(eps, norm)
    return [pgd20, ThroughSoftMask(pgd20), cw30, ThroughSoftMask(cw30)]
