"""VGG-16 with batch normalisation for CIFAR-sized inputs (Simonyan & Zisserman, "Very Deep
Convolutional Networks for Large-Scale Image Recognition", ICLR 2015)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from advmend.models.registry import MODELS, init_weights

# Channels of each conv in each stage; every stage is followed by a 2x2 max-pool.
VGG16_STAGES: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)


class VGG(nn.Module):
    """VGG with BN: ``stage1``..``stage5`` (conv3x3-BN-ReLU stacks), each followed by its own
    ``pool1``..``pool5`` max-pool, then global average pooling and ``fc``.

    Inputs must be at least 32x32 (five 2x2 pools). At 32x32 ``stage4`` outputs 512x4x4, the
    "conv4_3 + BN + ReLU, before the 4th max-pool" placement used by FSR.

    Args:
        stages: Conv channels per stage (five stages).
        num_classes: Number of logits.
        in_channels: Input channels.
        normalize: Input normalisation module, or ``None`` for identity.
    """

    def __init__(
        self,
        stages: Sequence[Sequence[int]] = VGG16_STAGES,
        *,
        num_classes: int,
        in_channels: int = 3,
        normalize: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.normalize = normalize if normalize is not None else nn.Identity()
        cin = in_channels
        for i, widths in enumerate(stages, start=1):
            layers: list[nn.Module] = []
            for cout in widths:
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=False)]
                cin = cout
            self.add_module(f"stage{i}", nn.Sequential(*layers))
            self.add_module(f"pool{i}", nn.MaxPool2d(2))
        self.num_stages = len(stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the pooled penultimate features, shape (N, 512)."""
        x = self.normalize(x)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"pool{i}")(getattr(self, f"stage{i}")(x))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@MODELS.register("vgg16_bn", fsr_layers=["stage4"])
def vgg16_bn(*, num_classes: int, in_channels: int = 3, normalize: nn.Module | None = None) -> VGG:
    """VGG-16-BN for 32x32 inputs (``stage4`` output is 512x4x4)."""
    return VGG(VGG16_STAGES, num_classes=num_classes, in_channels=in_channels, normalize=normalize)
