"""Semantic Regeneration: the conditional alignment extrapolator G of PSSR.

Fu, Zhou, Ma, Zhang, "Invariance-powered Trustworthy Defense via Remove Then Restore", arXiv
2402.00304 (2024): SR "is built on a conditional alignment extrapolator" that restores the
discriminative content removed by Pixel Surgery. The paper gives no architecture; ours
(docs/pssr.md) is a small U-Net (Ronneberger et al. 2015) conditioned on the surgery: its
input is concat(x_s, M_s) (C + 1 channels) so it knows which pixels are missing, its output a full
image in [0, 1] (sigmoid), with dropout in the decoder because the adversarial R-drop regulariser
compares two dropout draws.

Choices, and why:
- GroupNorm rather than BatchNorm: the output for one image must not depend on the other images in
  the batch (clean and adversarial images share a batch in training; attacks see one function).
- Max-pool down, bilinear up + conv: no checkerboard artefacts from transposed convolutions.
- Depth from the image size: 3 down/up stages when H and W are divisible by 8 (32x32 -> 4x4), 2 when
  divisible by 4 (28x28 MNIST -> 7x7), and a 4th for larger images whose sides are divisible by 16 with
  a bottleneck of at least 4 pixels a side (64x64 -> 4x4, 224x224 -> 14x14): three stages would leave a
  224-px image's deepest stage at 28x28, a small view of its context. Other sides are a clear error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from advmend.errors import ConfigError, InputError

_EPS = 1e-3  # clamp before logit: black or white pixels keep finite logits and gradients


MAX_DEPTH = 4
MIN_BOTTLENECK = 4  # pixels a side at the deepest stage that earns a stage beyond the third


def auto_depth(height: int, width: int) -> int:
    """The number of U-Net stages for (H, W) images: 3 if H, W are divisible by 8, 2 if by 4, and one more
    (up to `MAX_DEPTH`) each time the sides stay divisible and the bottleneck keeps `MIN_BOTTLENECK`
    pixels a side; ConfigError when the sides are not divisible by 4."""
    if height % 4 or width % 4 or min(height, width) < 4:
        raise ConfigError(
            f"the PSSR regenerator needs image sides divisible by 4 (2 U-Net stages), 8 (3 stages) or 16 "
            f"(4 stages, images of 64 px and more), got {height}x{width}; resize the images "
            f"(data.options.image_size) or set pssr.depth"
        )
    depth = 3 if height % 8 == 0 and width % 8 == 0 else 2
    while depth < MAX_DEPTH:
        scale = 2 ** (depth + 1)
        if height % scale or width % scale or min(height, width) // scale < MIN_BOTTLENECK:
            break
        depth += 1
    return depth


def fill_holes(surgical: torch.Tensor, mask: torch.Tensor, windows: Sequence[int] = (3, 5, 9)) -> torch.Tensor:
    """The surgical image with each removed pixel (mask 1) replaced by the mean of the kept pixels in the
    smallest window (3x3, then 5x5, then 9x9) that holds any; pixels with none get the image's mean
    kept colour (0.5 when nothing is kept). Kept pixels are returned unchanged.

    Normalised convolution (Knutsson and Westin, CVPR 1993) with box windows: batched, no loop over
    examples, differentiable in the kept pixels (the mask is a constant).
    """
    keep = 1 - mask.to(surgical.dtype)
    kept = surgical * keep
    n_kept = keep.sum(dim=(2, 3), keepdim=True)
    fill = torch.where(
        n_kept > 0, kept.sum(dim=(2, 3), keepdim=True) / n_kept.clamp_min(1), torch.full_like(n_kept, 0.5)
    )
    fill = fill.expand_as(surgical)
    for k in reversed(windows):  # the smallest window that sees a kept pixel wins: it is applied last
        den = F.avg_pool2d(keep, k, stride=1, padding=k // 2, count_include_pad=True)
        num = F.avg_pool2d(kept, k, stride=1, padding=k // 2, count_include_pad=True)
        fill = torch.where(den > 0, num / den.clamp_min(1e-12), fill)
    return kept + (1 - keep) * fill


def _block(cin: int, cout: int) -> nn.Sequential:
    groups = math.gcd(8, cout)
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.ReLU(),
    )  # fmt: skip


class Regenerator(nn.Module):
    """U-Net G: (x_s, M_s) -> regenerated image in [0, 1] with the shape of x_s.

    Args:
        channels: image channels C (the input has C + 1: the image and the mask).
        image_size: (H, W) it will see (the data's, `pssr_pipeline`); fixes the depth when `depth` is None.
        width: channels of the first stage; stage i has width * 2^i.
        dropout: dropout probability after every decoder stage (0 disables it).
        depth: number of down/up stages; None picks it from `image_size` (see `auto_depth`).
        residual: predict a correction, in logit space, of the surgical image with its holes filled
            by `fill_holes` (each removed pixel gets the mean of its nearest kept neighbours):
            sigmoid(logit(fill_holes(x_s, M_s)) + U-Net(.)), the head initialised to zero. G then starts
            as the identity on kept pixels and as a local interpolation on removed ones, and only learns
            the correction. Without it the U-Net must rebuild each image's level through the GroupNorm
            after its first convolution, which normalises it away (it learns the identity only to about
            0.03 mean L1 on small images: tests/test_pssr_resume.py); and a correction of the raw
            surgical image (holes at 0, logit -6.9) did not learn to fill the holes in 78 steps on
            CIFAR-10 (PSNR 10.8 dB, docs/pssr.md).
    """

    def __init__(
        self,
        channels: int,
        image_size: Sequence[int],
        *,
        width: int = 32,
        dropout: float = 0.1,
        depth: int | None = None,
        residual: bool = False,
    ) -> None:
        super().__init__()
        h, w = int(image_size[0]), int(image_size[1])
        if width < 1:
            raise ConfigError(f"pssr.width must be >= 1, got {width}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"pssr.dropout must be in [0, 1), got {dropout}")
        self.depth = auto_depth(h, w) if depth is None else int(depth)
        if self.depth < 1 or h % 2**self.depth or w % 2**self.depth:
            raise ConfigError(f"pssr.depth={depth} does not divide the {h}x{w} images into 2^depth")
        self.channels, self.image_size = channels, (h, w)
        widths = [width * 2**i for i in range(self.depth + 1)]
        self.stem = _block(channels + 1, widths[0])
        self.down = nn.ModuleList(_block(widths[i], widths[i + 1]) for i in range(self.depth))
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in range(self.depth))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Conv2d(widths[0], channels, 1)
        self.residual = bool(residual)
        if self.residual:  # identity at initialisation: the correction starts at zero
            nn.init.zeros_(self.head.weight)
            assert self.head.bias is not None  # Conv2d's default bias=True
            nn.init.zeros_(self.head.bias)

    def forward(self, surgical: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if surgical.dim() != 4 or surgical.shape[1] != self.channels or mask.shape[1:2] != (1,):
            raise InputError(
                f"the regenerator takes (N, {self.channels}, H, W) images and (N, 1, H, W) masks, got "
                f"{tuple(surgical.shape)} and {tuple(mask.shape)}"
            )
        h, w = surgical.shape[-2:]
        if h % 2**self.depth or w % 2**self.depth:
            raise InputError(
                f"the regenerator ({self.depth} stages) needs sides divisible by {2**self.depth}, got {h}x{w}"
            )
        skips = [self.stem(torch.cat([surgical, mask.to(surgical.dtype)], dim=1))]
        for block in self.down:
            skips.append(block(self.pool(skips[-1])))
        h = skips.pop()
        for i in reversed(range(self.depth)):  # deepest decoder stage first
            h = self.dropout(self.up[i](torch.cat([self.upsample(h), skips.pop()], dim=1)))
        out = self.head(h)
        if self.residual:
            out = out + torch.logit(fill_holes(surgical, mask).clamp(_EPS, 1 - _EPS))
        return torch.sigmoid(out)
