"""The model registry, the ``create_model`` factory, the FSR layer presets and shared init."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

from advmend.errors import ConfigError
from advmend.models.normalize import Normalize
from advmend.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

#: Model name -> dotted submodule path(s) whose output the FSR block repairs
#: (the reference placements of Kim et al., "Feature Separation and Recalibration", CVPR 2023).
FSR_PRESETS: dict[str, list[str]] = {
    "small_cnn": ["stage3"],
    "resnet18": ["layer4"],
    "preact_resnet18": ["final"],
    "vgg16_bn": ["stage4"],
    "wrn34_10": ["final"],
    "wrn28_10": ["final"],
}


def fsr_preset(name: str) -> list[str]:
    """Returns the reference FSR layer path(s) for model ``name``.

    Raises:
        ConfigError: If no preset exists for ``name``.
    """
    try:
        return list(FSR_PRESETS[name])
    except KeyError:
        raise ConfigError(
            f"no FSR preset for model {name!r}; choose one of: {', '.join(sorted(FSR_PRESETS))}"
        ) from None


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Builds a registered model that takes [0, 1] images.

    Args:
        name: Registered model name (see ``MODELS.names()``).
        num_classes: Number of output logits, >= 2.
        in_channels: Input image channels, >= 1.
        mean: Per-channel normalisation mean; used together with ``std``.
        std: Per-channel normalisation std; used together with ``mean``.
        **kwargs: Model-specific options; ``None`` values are dropped (timm style).

    Raises:
        ConfigError: Unknown name, bad sizes, or mismatched normalisation statistics.
    """
    factory = MODELS.get(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"model.num_classes must be an int >= 2, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"model.in_channels must be an int >= 1, got {in_channels!r}")
    if (mean is None) != (std is None):
        raise ConfigError("model.mean and model.std must be given together")
    normalize = None
    if mean is not None and std is not None:
        normalize = Normalize(mean, std)
        if normalize.mean.numel() != in_channels:
            raise ConfigError(
                f"model.mean/std have {normalize.mean.numel()} values but in_channels={in_channels}"
            )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return factory(num_classes=num_classes, in_channels=in_channels, normalize=normalize, **kwargs)


def init_weights(model: nn.Module) -> None:
    """Standard init: Kaiming-normal convs (fan_out, relu), BN weight 1 / bias 0, zero linear bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
