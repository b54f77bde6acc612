"""The model registry, the ``create_model`` factory, the FSR layer presets and shared init."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

from torch import nn

from advmend.errors import ConfigError
from advmend.models.external import create_external, is_external
from advmend.models.normalize import Normalize
from advmend.registry import Registry
from advmend.values import coerce_value

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

#: Model name -> dotted submodule path(s) whose output the FSR block repairs (the reference placements
#: of Kim et al., "Feature Separation and Recalibration", CVPR 2023): each model's `fsr_layers`,
#: given where it is registered (`@MODELS.register(name, fsr_layers=[...])`).
FSR_PRESETS: Mapping[str, list[str]] = MODELS.meta_view("fsr_layers")


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


# Arguments create_model fills itself (from the data and model.normalize): never model options.
_BUILT_IN_ARGS = ("num_classes", "in_channels", "normalize")
_CHECKABLE = (bool, int, float, str)


def _checkable(tp: Any) -> bool:
    """Whether the config value rules (advmend.values.coerce_value) can check annotation `tp`."""
    if tp in _CHECKABLE:
        return True
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        return all(a is type(None) or _checkable(a) for a in args)
    if typing.get_origin(tp) is tuple:
        return len(args) == 2 and args[1] is Ellipsis and _checkable(args[0])
    return False


def model_options(name: str) -> dict[str, inspect.Parameter]:
    """The options (keyword arguments beyond num_classes/in_channels/normalize) of registered model `name`."""
    params = inspect.signature(MODELS.get(name)).parameters
    return {k: p for k, p in params.items() if k not in _BUILT_IN_ARGS and p.kind is not p.VAR_KEYWORD}


def check_model_options(name: str, options: dict[str, Any], key: str = "model.options") -> dict[str, Any]:
    """Checks model options against the factory's signature: known names, and values of the annotated type.

    Returns the options with values converted as config values are (an int for a float option becomes a
    float, "8/255" a number). ``None`` values pass (create_model drops them: the factory's default).

    Raises:
        ConfigError: Unknown model, an option the factory does not take, or a value of the wrong type;
            the message names ``<key>.<option>`` and lists the valid options.

    A ``timm/<arch>`` or ``torchvision/<arch>`` name is checked against the installed library's list; its
    options are checked by the library's factory when the model is built (their signatures are **kwargs).
    """
    if is_external(name):
        from advmend.models.external import check_name

        check_name(name)
        for opt in options:
            if opt in _BUILT_IN_ARGS + ("in_chans", "pretrained", "weights"):
                raise ConfigError(f"{key}.{opt}: advmend sets it for {name!r} (from the data, model.normalize, "
                                  f"model.pretrained or model.weights); remove {key}.{opt}")  # fmt: skip
        return dict(options)
    factory = MODELS.get(name)
    valid = model_options(name)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())
    listing = ", ".join(sorted(valid)) or "none"
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # unresolvable annotations (a user's model): check the names only
        hints = {}
    out = {}
    for opt, value in options.items():
        if opt in _BUILT_IN_ARGS:
            source = "model.normalize" if opt == "normalize" else "the data"
            raise ConfigError(f"{key}.{opt}: model {name!r} takes {opt} from {source}; remove {key}.{opt}")
        if opt not in valid and not takes_any:
            raise ConfigError(f"{key}.{opt}: model {name!r} has no option {opt!r}; its options: {listing}")
        tp = hints.get(opt)
        if value is not None and tp is not None and _checkable(tp):
            value = coerce_value(value, tp, f"{key}.{opt}")
        out[opt] = value
    return out


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    normalize_source: str = "given",
    weights: str | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Builds a registered model that takes [0, 1] images.

    Args:
        name: Registered model name (see ``MODELS.names()``).
        num_classes: Number of output logits, >= 2.
        in_channels: Input image channels, >= 1.
        mean: Per-channel normalisation mean; used together with ``std``.
        std: Per-channel normalisation std; used together with ``mean``.
        normalize_source: Where ``mean``/``std`` come from, for the report card.
        weights: A ``timm/`` or ``torchvision/`` model's initial weights: a state dict file.
        pretrained: A ``timm/`` or ``torchvision/`` model's initial weights from the library's download.
        **kwargs: Model-specific options; ``None`` values are dropped (timm style).

    Raises:
        ConfigError: Unknown name, bad sizes, or mismatched normalisation statistics.
    """
    factory = None if is_external(name) else MODELS.get(name)
    # num_classes, in_channels, mean and std come from the data set, not from config keys: the messages
    # name the create_model arguments.
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"create_model: num_classes (from the data) must be an int >= 2, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"create_model: in_channels (from the data) must be an int >= 1, got {in_channels!r}")
    if (mean is None) != (std is None):
        raise ConfigError("create_model: mean and std must be given together")
    normalize = None
    if mean is not None and std is not None:
        normalize = Normalize(mean, std, source=normalize_source)
        if normalize.mean.numel() != in_channels:
            raise ConfigError(
                f"create_model: mean/std have {normalize.mean.numel()} values but in_channels={in_channels}"
            )
    kwargs = check_model_options(name, kwargs)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if factory is None:
        return create_external(
            name,
            num_classes=num_classes,
            in_channels=in_channels,
            mean=mean,
            std=std,
            source=normalize_source,
            weights=weights,
            pretrained=pretrained,
            options=kwargs,
        )
    if weights is not None or pretrained:
        raise ConfigError(
            f"model.weights and model.pretrained are for timm/ and torchvision/ models; {name!r} is "
            "built in (continue from its checkpoint instead)"
        )
    try:
        return factory(num_classes=num_classes, in_channels=in_channels, normalize=normalize, **kwargs)
    except (RuntimeError, MemoryError) as e:  # e.g. width=10**6: weights beyond memory (or int64 sizes)
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        shown = ", ".join(f"model.options.{k}={v!r}" for k, v in kwargs.items()) or "no model.options"
        raise ConfigError(f"model {name!r} cannot be built with {shown} ({first})") from None


def stage_widths(width: int) -> tuple[int, int, int, int]:
    """The four stage widths of a CIFAR ResNet whose first stage has `width` channels (64: 64..512)."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"model.options.width must be a positive integer (64 is the published ResNet), got {width!r}")
    return (width, 2 * width, 4 * width, 8 * width)


def resnet_stages(
    block: Callable[[int, int, int], nn.Module],
    num_blocks: Sequence[int],
    in_planes: int = 64,
    widths: Sequence[int] = (64, 128, 256, 512),
    strides: Sequence[int] = (1, 2, 2, 2),
) -> list[nn.Sequential]:
    """The stages of a CIFAR ResNet (layer1..layer4): stage i has num_blocks[i] blocks
    `block(in_planes, planes, stride)` of widths[i] channels, the first with strides[i], the others 1.
    Built in order, block by block (the parameters' creation order, so the same random draws)."""
    stages = []
    for planes, blocks, stride in zip(widths, num_blocks, strides):
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(block(in_planes, planes, s))
            in_planes = planes
        stages.append(nn.Sequential(*layers))
    return stages


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
