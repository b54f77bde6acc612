"""Pixel Surgery (PS): remove the salient part of an input, keep the trivial part.

Fu, Zhou, Ma, Zhang, "Invariance-powered Trustworthy Defense via Remove Then Restore",
arXiv 2402.00304 (2024); design in docs/pssr.md. The paper calls PS "score-based": an
adversarial perturbation splits into a salient attack (the part that dominates the attack) and a
trivial attack (the rest). We score pixels by

    S = max_c | d p_yhat(x) / d x_c |,   yhat = argmax f(x)   (the true label is unknown at test time)

and remove the pixel locations with the largest scores, replacing them by a fill value. The trivial
perturbation is deliberately left in the image.

Everything here is batched (no loop over examples) and the mask carries no gradient: it is computed
with `torch.autograd.grad` (no `create_graph`) on a detached copy of x and thresholded. An attacker who
differentiates through `apply_surgery` therefore sees the mask as a constant: the straight-through BPDA
convention of the spec comes for free.
"""

from __future__ import annotations

import torch
from torch import nn

from advmend.attacks.modes import attack_mode
from advmend.config import PSSR_MASKS
from advmend.errors import ConfigError

MASKS = PSSR_MASKS  # the config's choices, one definition


def score_map(scorer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """|gradient of the scorer's top-1 probability w.r.t. x|, max over channels: (N, 1, H, W), detached.

    The scorer runs in eval mode with frozen parameters (`attack_mode`; modes and flags are restored),
    so BatchNorm uses its running statistics, dropout is off, no weight gradient is computed, and each
    example's score depends on that example only. Summing the per-example probabilities before
    differentiating gives every example its own gradient in one backward pass. Works under an outer
    `torch.no_grad()` (evaluation) and inside an attack's graph (the copy of x is detached).
    """
    x0 = x.detach().requires_grad_(True)
    with attack_mode(scorer), torch.enable_grad():
        probs = torch.softmax(scorer(x0).float(), dim=1)
        top = probs.max(dim=1).values  # p_yhat: the probability of the scorer's own prediction
        (grad,) = torch.autograd.grad(top.sum(), x0)
    return grad.abs().amax(dim=1, keepdim=True).to(x.dtype)


def salient_mask(score: torch.Tensor, *, mask: str = "alpha", alpha: float = 1.0, rho: float = 0.2) -> torch.Tensor:
    """The salient mask M_s in {0, 1}, shape (N, 1, H, W), one per pixel location (shared by channels).

    mask="alpha" (default): M_s = 1[S >= alpha * mean(S)] per image. An image whose score map is all
    zero (no gradient information, e.g. a saturated softmax) has nothing to single out, so nothing is
    removed rather than everything (S >= 0 would hold everywhere).
    mask="ratio": exactly round(rho * H * W) pixels with the largest scores per image (ties broken by
    `topk`), so the removal ratio is fixed.
    """
    n = score.shape[0]
    flat = score.detach().flatten(1)
    if mask == "alpha":
        mean = flat.mean(dim=1, keepdim=True)
        m = (flat >= alpha * mean) & (mean > 0)
        return m.to(score.dtype).view_as(score)
    if mask == "ratio":
        k = int(round(rho * flat.shape[1]))
        m = torch.zeros_like(flat)
        if k > 0:
            m.scatter_(1, flat.topk(k, dim=1).indices, 1.0)
        return m.view(n, *score.shape[1:])
    raise ConfigError(f"pssr.mask must be one of {MASKS}, got {mask!r}")


def apply_surgery(x: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """x_s = (1 - M) * x + M * fill; the mask (N, 1, H, W) broadcasts over channels.

    Differentiable in x (with M a constant), so attacks through the pipeline see the unmasked pixels.
    """
    mask = mask.detach()
    return x * (1 - mask) + mask * fill


def pixel_surgery(
    scorer: nn.Module,
    x: torch.Tensor,
    *,
    mask: str = "alpha",
    alpha: float = 1.0,
    rho: float = 0.2,
    fill: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(score map, salient mask, surgical image) for a batch; the first two detached."""
    score = score_map(scorer, x)
    m = salient_mask(score, mask=mask, alpha=alpha, rho=rho)
    return score, m, apply_surgery(x, m, fill)
