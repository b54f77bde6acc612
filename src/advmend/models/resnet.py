"""ResNet-18 for CIFAR-sized inputs (He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016), with the usual 3x3 stride-1 stem and no max-pool."""

from __future__ import annotations

import torch
from torch import nn

from advmend.models.registry import MODELS, init_weights, resnet_stages, stage_widths


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: conv1-bn1-relu stem, ``layer1``..``layer4`` (64/128/256/512 channels,
    strides 1/2/2/2), global average pooling and ``fc``.

    Args:
        num_blocks: Blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        num_classes: Number of logits.
        in_channels: Input channels.
        normalize: Input normalisation module, or ``None`` for identity.
        width: Channels of the first stage; the stages have width, 2, 4 and 8 x width channels
            (64 is the published model; a smaller width makes a CPU-sized ResNet).
    """

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int],
        *,
        num_classes: int,
        in_channels: int = 3,
        normalize: nn.Module | None = None,
        width: int = 64,
    ) -> None:
        super().__init__()
        widths = stage_widths(width)
        self.normalize = normalize if normalize is not None else nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet_stages(
            BasicBlock, num_blocks, in_planes=width, widths=widths
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the pooled penultimate features, shape (N, 8 * width)."""
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@MODELS.register("resnet18", fsr_layers=["layer4"])
def resnet18(*, num_classes: int, in_channels: int = 3, normalize: nn.Module | None = None, width: int = 64) -> ResNet:
    """ResNet-18 for 32x32 inputs (layer4 output is (8 * width)x4x4; width 64 is the paper's)."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, normalize=normalize, width=width)
