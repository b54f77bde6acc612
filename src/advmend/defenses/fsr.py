"""The FSR block: Feature Separation and Recalibration.

Kim, Cho, Jung, Yoon, "Feature Separation and Recalibration for Adversarial Robustness", CVPR 2023,
https://arxiv.org/abs/2303.13846. Specification: docs/fsr.md.

A feature map f is split by a Gumbel-sigmoid mask m into a robust part m*f and a non-robust part
(1-m)*f; a recalibration net R adds back (1-m)*R((1-m)*f). On the main path the block is therefore a
masked residual correction, f_out = f + (1-m)*R((1-m)*f); the separation itself is enforced only by the
auxiliary head and its losses (see `advmend.defenses.insert.fsr_losses`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from advmend.errors import ConfigError, InputError


def gumbel_sigmoid_mask(
    z: torch.Tensor, tau: float, *, stochastic: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Relaxed Bernoulli mask.

    Training: sigmoid((z + L) / tau) with L ~ Logistic(0, 1) per element. Deterministic (evaluation
    and every attack): sigmoid(z / tau). The direct form is used instead of the reference code's
    log-sigmoid-plus-1e-8 form, which saturates in float32 for |z| > ~17.
    """
    if stochastic:
        u = torch.rand(z.shape, device=z.device, dtype=z.dtype, generator=generator)
        tiny = torch.finfo(z.dtype).tiny
        u = u.clamp(tiny, 1.0 - torch.finfo(z.dtype).eps)
        z = z + (torch.log(u) - torch.log1p(-u))
    return torch.sigmoid(z / tau)


class _SigmoidSoftBackward(torch.autograd.Function):
    """sigmoid(z / tau) forward, the gradient of sigmoid(z / backward_tau) backward (BPDA through the mask)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, tau: float, backward_tau: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        ctx.backward_tau = backward_tau
        return torch.sigmoid(z / tau)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        soft = torch.sigmoid(z / ctx.backward_tau)
        return grad * soft * (1 - soft) / ctx.backward_tau, None, None


def _three_conv_net(channels: int, hidden: int) -> nn.Sequential:
    """conv3x3(C->h) BN ReLU conv3x3(h->h) BN ReLU conv3x3(h->C), no conv biases (the reference's S and R)."""
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(),
        nn.Conv2d(hidden, channels, 3, padding=1, bias=False),
    )


@dataclass
class FSRBlockOutput:
    """What one FSR block computed on a batch: the new features and the auxiliary logits.

    Attributes:
        features: f_out, same shape as the input feature map.
        mask: m in (0, 1), same shape as the features.
        logits_robust: A(f+), the head on the robust part, (N, K).
        logits_nonrobust: A(f-), the head on the non-robust part, (N, K).
        logits_recalibrated: A(f~-), the head on the recalibrated non-robust part, (N, K).
    """

    features: torch.Tensor
    mask: torch.Tensor
    logits_robust: torch.Tensor
    logits_nonrobust: torch.Tensor
    logits_recalibrated: torch.Tensor


class FSRBlock(nn.Module):
    """Feature Separation and Recalibration for one (N, C, H, W) feature map.

    Args:
        channels: C of the feature map.
        num_classes: K of the auxiliary head.
        tau: Gumbel-sigmoid temperature (reference 0.1); part of the model, saved with it.
        hidden: width of the separation and recalibration nets (reference 64).
        stochastic: force the mask mode; None (default) follows `self.training`, so an evaluated
            model is deterministic and attacks see exactly the function that is scored.

    Example:
        >>> block = FSRBlock(512, 10)
        >>> f_out = block(torch.rand(2, 512, 4, 4))
    """

    tau: torch.Tensor  # a buffer (register_buffer in __init__)

    def __init__(
        self,
        channels: int,
        num_classes: int,
        *,
        tau: float = 0.1,
        hidden: int = 64,
        stochastic: bool | None = None,
    ) -> None:
        super().__init__()
        if channels < 1 or num_classes < 2 or hidden < 1:
            raise ConfigError(
                f"FSRBlock needs channels >= 1, num_classes >= 2, hidden >= 1; got {channels}, {num_classes}, {hidden}"
            )
        if not tau > 0:
            raise ConfigError(f"fsr.tau must be > 0, got {tau}")
        self.channels = channels
        self.stochastic = stochastic
        # Not saved: an attack-time setting (`mask_bpda`). None = the exact mask's gradient.
        self.backward_tau: float | None = None
        self.register_buffer("tau", torch.tensor(float(tau)))
        self.separation = _three_conv_net(channels, hidden)
        self.recalibration = _three_conv_net(channels, hidden)
        self.head = nn.Linear(channels, num_classes)

    def _mask(self, f: torch.Tensor) -> torch.Tensor:
        if f.dim() != 4 or f.shape[1] != self.channels:
            raise InputError(f"FSRBlock expects features of shape (N, {self.channels}, H, W), got {tuple(f.shape)}")
        stochastic = self.training if self.stochastic is None else self.stochastic
        z = self.separation(f)
        if self.backward_tau is not None and not stochastic:
            return _SigmoidSoftBackward.apply(z, float(self.tau), self.backward_tau)
        return gumbel_sigmoid_mask(z, float(self.tau), stochastic=stochastic)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """f_out = f + (1 - m) * R((1 - m) * f); the auxiliary head is not evaluated."""
        inv = 1.0 - self._mask(f)
        return f + inv * self.recalibration(inv * f)

    def forward_with_aux(self, f: torch.Tensor) -> FSRBlockOutput:
        """f_out plus the mask and the head's logits on the three branches (training losses)."""
        m = self._mask(f)
        inv = 1.0 - m
        robust = m * f
        nonrobust = inv * f
        recalibrated = nonrobust + inv * self.recalibration(nonrobust)
        # One head call for the three branches: global average pool, stack, Linear.
        pooled = torch.cat([t.mean(dim=(2, 3)) for t in (robust, nonrobust, recalibrated)])
        lr, ln, lc = self.head(pooled).chunk(3)
        return FSRBlockOutput(robust + recalibrated, m, lr, ln, lc)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, tau={float(self.tau):g}, stochastic={self.stochastic}"


class MaskBPDA(nn.Module):
    """An FSR model attacked through a softened mask: BPDA (Athalye et al., ICML 2018) for FSR.

    At evaluation FSR's mask is sigmoid(z / tau) with tau = 0.1: nearly a step function, whose gradient
    vanishes wherever |z| is not small. If that is what keeps a gradient attack from finding a model's weak
    points (gradient masking), differentiating a softer mask removes the cause: this wrapper computes
    exactly the model's forward pass (the same logits, bit for bit) while every FSR block's mask
    backpropagates as sigmoid(z / backward_tau). Any gradient attack (PGD, CW, AutoAttack's APGD) run on
    the wrapper is then an adaptive attack on the model; its adversarial examples are scored on the
    model itself.

    Args:
        model: a model holding FSR blocks (e.g. `insert_fsr`'s result); shared, not copied.
        backward_tau: temperature of the mask's backward pass (> tau; 1.0 by default: a mask whose
            gradient reaches every logit of z in the typical range).

    Example:
        >>> x_adv = pgd(MaskBPDA(fsr_model), x, y, PGD(eps=8/255, steps=20))
    """

    def __init__(self, model: nn.Module, backward_tau: float = 1.0) -> None:
        super().__init__()
        if not backward_tau > 0 or backward_tau != backward_tau or backward_tau == float("inf"):
            raise ConfigError(f"the mask's backward temperature must be a finite number > 0, got {backward_tau}")
        self.blocks = [m for m in model.modules() if isinstance(m, FSRBlock)]
        if not self.blocks:
            raise ConfigError("MaskBPDA needs a model with FSR blocks; this model has none")
        self.model = model
        self.backward_tau = float(backward_tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The blocks read backward_tau during this forward only (the autograd function keeps it for
        # the backward pass), so the model is left exactly as it was, even if the forward raises.
        for b in self.blocks:
            b.backward_tau = self.backward_tau
        try:
            return self.model(x)
        finally:
            for b in self.blocks:
                b.backward_tau = None


def fsr_terms(block_outputs: list[FSRBlockOutput], logits: torch.Tensor, y: torch.Tensor):
    """(L_sep, L_rec) averaged over blocks; y_adv = the highest-scoring wrong class of `logits`."""
    with torch.no_grad():
        wrong = logits.detach().clone()
        wrong.scatter_(1, y[:, None], float("-inf"))
        y_adv = wrong.argmax(dim=1)
    sep = sum(F.cross_entropy(b.logits_robust, y) + F.cross_entropy(b.logits_nonrobust, y_adv) for b in block_outputs)
    rec = sum(F.cross_entropy(b.logits_recalibrated, y) for b in block_outputs)
    n = len(block_outputs)
    return sep / n, rec / n
