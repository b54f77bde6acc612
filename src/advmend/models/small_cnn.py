"""A small, fast CNN for CPU runs on 32x32 RGB or 28x28 grey images."""

from __future__ import annotations

import torch
from torch import nn

from advmend.errors import ConfigError
from advmend.models.registry import MODELS, init_weights


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=False)]


class SmallCNN(nn.Module):
    """Three stages of two conv3x3-BN-ReLU layers (widths w, 2w, 4w), max-pools after the
    first two, then global average pooling and a linear classifier.

    Submodules: ``normalize``, ``stage1``, ``pool1``, ``stage2``, ``pool2``, ``stage3``, ``fc``.
    ``stage3`` outputs the (4w)-channel map at 1/4 of the input resolution.

    Args:
        num_classes: Number of logits.
        in_channels: Input channels.
        normalize: Input normalisation module, or ``None`` for identity.
        width: Base channel width ``w``.
    """

    def __init__(
        self, *, num_classes: int, in_channels: int = 3, normalize: nn.Module | None = None, width: int = 32
    ) -> None:
        super().__init__()
        w = int(width)
        self.normalize = normalize if normalize is not None else nn.Identity()
        self.stage1 = nn.Sequential(*_conv_bn_relu(in_channels, w), *_conv_bn_relu(w, w))
        self.pool1 = nn.MaxPool2d(2)
        self.stage2 = nn.Sequential(*_conv_bn_relu(w, 2 * w), *_conv_bn_relu(2 * w, 2 * w))
        self.pool2 = nn.MaxPool2d(2)
        self.stage3 = nn.Sequential(*_conv_bn_relu(2 * w, 4 * w), *_conv_bn_relu(4 * w, 4 * w))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)
        init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the pooled penultimate features, shape (N, 4 * width)."""
        x = self.normalize(x)
        x = self.pool1(self.stage1(x))
        x = self.pool2(self.stage2(x))
        x = self.stage3(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@MODELS.register("small_cnn", fsr_layers=["stage3"])
def small_cnn(
    *, num_classes: int, in_channels: int = 3, normalize: nn.Module | None = None, width: int = 32
) -> SmallCNN:
    """Small CNN for quick CPU experiments."""
    if width < 1:
        raise ConfigError(f"model.options.width must be >= 1, got {width!r}")
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, normalize=normalize, width=width)
