"""Pre-activation ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks",
ECCV 2016), in the CIFAR form used by Rice et al. 2020 and Wong et al. 2020."""

from __future__ import annotations

import torch
from torch import nn

from advmend.models.registry import MODELS, init_weights, resnet_stages, stage_widths


class PreActBlock(nn.Module):
    """BN-ReLU-conv x2; the shortcut branches off after the first BN-ReLU when projecting."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet: ``conv1``, ``layer1``..``layer4``, ``final`` (BN + ReLU),
    global average pooling and ``fc``.

    Args:
        num_blocks: Blocks per stage, e.g. ``(2, 2, 2, 2)`` for PreAct ResNet-18.
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
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet_stages(
            PreActBlock, num_blocks, in_planes=width, widths=widths
        )
        self.final = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=False))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the pooled penultimate features, shape (N, 8 * width)."""
        x = self.conv1(self.normalize(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.final(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@MODELS.register("preact_resnet18", fsr_layers=["final"])
def preact_resnet18(
    *, num_classes: int, in_channels: int = 3, normalize: nn.Module | None = None, width: int = 64
) -> PreActResNet:
    """PreAct ResNet-18 for 32x32 inputs (``final`` output is (8 * width)x4x4; width 64 is the paper's)."""
    return PreActResNet(
        (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, normalize=normalize, width=width
    )
