"""Wide residual networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016), in
the CIFAR form used by TRADES (Zhang et al., ICML 2019) without its redundant ``sub_block1``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advmend.errors import ConfigError
from advmend.models.registry import MODELS, init_weights


class WideBasicBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3x3 (-dropout) BN-ReLU-conv3x3; a 1x1 conv shortcut
    from the activated input when the shape changes. Parameter names follow TRADES."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = float(dropout)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return out + shortcut


class NetworkBlock(nn.Module):
    """A stage of ``n`` wide blocks kept under ``.layer`` (TRADES naming)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        blocks = [WideBasicBlock(in_planes, out_planes, stride, dropout)]
        blocks += [WideBasicBlock(out_planes, out_planes, 1, dropout) for _ in range(n - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: ``conv1`` (16 ch), ``block1``..``block3`` (16k/32k/64k channels, strides
    1/2/2), ``final`` (BN + ReLU), global average pooling and ``fc``.

    Args:
        depth: Total depth, ``6n + 4`` (e.g. 28 or 34).
        widen_factor: Width multiplier ``k``.
        dropout: Dropout probability between the two convs of each block.
        num_classes: Number of logits.
        in_channels: Input channels.
        normalize: Input normalisation module, or ``None`` for identity.

    Raises:
        ConfigError: If ``depth`` is not ``6n + 4`` with n >= 1, or widen_factor < 1.
    """

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        dropout: float = 0.0,
        *,
        num_classes: int,
        in_channels: int = 3,
        normalize: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigError(f"WideResNet depth must be 6n+4 with n >= 1 (e.g. 28, 34), got {depth!r}")
        if widen_factor < 1:
            raise ConfigError(f"WideResNet widen_factor must be >= 1, got {widen_factor!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.options.dropout must be in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = normalize if normalize is not None else nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, dropout)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, dropout)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, dropout)
        self.final = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=False))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the pooled penultimate features, shape (N, 64 * widen_factor)."""
        x = self.conv1(self.normalize(x))
        x = self.final(self.block3(self.block2(self.block1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@MODELS.register("wrn34_10", fsr_layers=["final"])
def wrn34_10(
    *, num_classes: int, in_channels: int = 3, normalize: nn.Module | None = None, dropout: float = 0.0
) -> WideResNet:
    """WRN-34-10 (``final`` output is 640x8x8 at 32x32)."""
    return WideResNet(34, 10, dropout, num_classes=num_classes, in_channels=in_channels, normalize=normalize)


@MODELS.register("wrn28_10", fsr_layers=["final"])
def wrn28_10(
    *, num_classes: int, in_channels: int = 3, normalize: nn.Module | None = None, dropout: float = 0.0
) -> WideResNet:
    """WRN-28-10 (``final`` output is 640x8x8 at 32x32)."""
    return WideResNet(28, 10, dropout, num_classes=num_classes, in_channels=in_channels, normalize=normalize)
