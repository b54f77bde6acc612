"""Classifiers from timm and torchvision by name: ``timm/<arch>`` and ``torchvision/<arch>``.

The library's model sits behind advmend's `Normalize` (`ExternalModel`: submodules ``normalize`` and
``net``), so it takes [0, 1] images like every registered model and attacks work in pixel space. Its
normalisation comes from the model's own metadata (timm's pretrained config, torchvision's weights
transforms) unless the caller gives mean and std. Initial weights come from a file (`load_weights`:
safetensors, or a state dict read with ``weights_only=True``) or the library's own download.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advmend.errors import ConfigError
from advmend.models.normalize import Normalize

LIBRARIES = ("timm", "torchvision")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def is_external(name: str) -> bool:
    """Whether `name` names a timm or torchvision model (``timm/<arch>``, ``torchvision/<arch>``)."""
    return isinstance(name, str) and name.partition("/")[0] in LIBRARIES and "/" in name


def _library(lib: str) -> Any:
    """The imported library; a one-line error with the install command when it is missing."""
    try:
        return importlib.import_module(lib)
    except ImportError:
        raise ConfigError(f'model.name {lib}/...: {lib} is not installed; pip install "advmend[{lib}]"') from None


def architectures(lib: str) -> list[str]:
    """Every classifier architecture the installed `lib` lists (what `lib/<arch>` may name)."""
    module = _library(lib)
    if lib == "timm":
        return list(module.list_models())
    models = importlib.import_module("torchvision.models")
    return list(models.list_models(module=models))  # classification models only


def check_name(name: str) -> tuple[str, str]:
    """(library, architecture) of an external model name; a ConfigError naming close names otherwise."""
    lib, _, arch = name.partition("/")
    known = architectures(lib)
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ConfigError(f"model.name {name!r}: {lib} has no architecture {arch!r}{hint} "
                          f"(`advmend list --models {lib}` lists them)")  # fmt: skip
    return lib, arch


class ExternalModel(nn.Module):
    """A timm/torchvision classifier that takes [0, 1] images: ``net(normalize(x))``.

    Module paths inside the library's model are ``net.<path>`` (e.g. ``net.layer4``), the names
    `advmend layers` lists and `fsr.layers` takes.
    """

    def __init__(self, net: nn.Module, normalize: Normalize | None) -> None:
        super().__init__()
        self.normalize = normalize if normalize is not None else nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def metadata_stats(lib: str, arch: str, net: nn.Module) -> tuple[list[float], list[float], str] | None:
    """(mean, std, source) the model's own metadata prescribes, or None when it has none."""
    if lib == "timm":
        cfg = getattr(net, "pretrained_cfg", None) or {}
        if cfg.get("mean") is None or cfg.get("std") is None:
            return None
        return list(cfg["mean"]), list(cfg["std"]), f"timm pretrained config of {arch}"
    models = importlib.import_module("torchvision.models")
    try:
        weights = models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):  # an architecture without published weights
        return None
    transform = weights.transforms()
    return list(transform.mean), list(transform.std), f"torchvision {weights} transforms"


def _build_net(lib: str, arch: str, num_classes: int, in_channels: int, pretrained: bool,
               options: dict[str, Any]) -> nn.Module:  # fmt: skip
    """The library's model; its own errors become one line naming the option or the download."""
    name = f"{lib}/{arch}"
    module = _library(lib)
    if lib == "timm":

        def build() -> nn.Module:
            return module.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels,
                                       **options)  # fmt: skip
    else:
        if in_channels != 3:
            raise ConfigError(f"model {name!r} takes 3-channel images, the data have {in_channels}; "
                              "use a timm model (in_chans follows the data)")  # fmt: skip
        models = importlib.import_module("torchvision.models")

        def build() -> nn.Module:
            if not pretrained:
                return models.get_model(arch, weights=None, num_classes=num_classes, **options)
            weights = models.get_model_weights(arch).DEFAULT
            if len(weights.meta["categories"]) != num_classes:
                raise ConfigError(
                    f"model.pretrained: {name}'s weights have {len(weights.meta['categories'])} classes, the data "
                    f"{num_classes}; use timm/{arch} if timm has it (its head is re-initialised) or model.weights"
                )
            return models.get_model(arch, weights=weights, **options)

    # huggingface_hub logs each failed request as a warning before raising: the raised error, made one
    # line below, is the message.
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        return build()
    except ConfigError:
        raise
    except TypeError as e:  # an option the architecture does not take, or a value of the wrong kind
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if bad:
            raise ConfigError(f"model.options.{bad.group(1)}: {lib} model {arch!r} has no option "
                              f"{bad.group(1)!r}") from None  # fmt: skip
        raise ConfigError(f"model.options: {lib} model {arch!r} refuses them ({_first_line(e)})") from None
    except Exception as e:
        if pretrained:  # the download failed: no network, a proxy, no weights for this architecture
            raise ConfigError(
                f"model.pretrained: cannot fetch {name}'s weights ({_first_line(e)}); without a network, download "
                "them elsewhere and give the file as model.weights"
            ) from None
        shown = ", ".join(f"model.options.{k}={v!r}" for k, v in options.items()) or "no model.options"
        raise ConfigError(f"model {name!r} cannot be built with {shown} ({_first_line(e)})") from None
    finally:
        hub_log.setLevel(level)


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:200]


def create_external(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    source: str,
    weights: str | None = None,
    pretrained: bool = False,
    options: dict[str, Any],
) -> ExternalModel:
    """`ExternalModel` for ``timm/<arch>`` or ``torchvision/<arch>`` (see `advmend.models.create_model`).

    Normalisation: `mean`/`std` when given (described by `source`), else the model's metadata, else none.
    """
    lib, arch = check_name(name)
    net = _build_net(lib, arch, num_classes, in_channels, pretrained, dict(options))
    if weights is not None:
        load_weights(net, weights, name)
    if mean is None or std is None:
        found = metadata_stats(lib, arch, net)
        if found is not None and len(found[0]) != in_channels:
            raise ConfigError(f"model {name!r}: its normalisation metadata has {len(found[0])} channels, the data "
                              f"{in_channels}; set model.normalize: {{mean: [...], std: [...]}}")  # fmt: skip
        mean, std, source = found if found is not None else (None, None, source)
    normalize = Normalize(mean, std, source=source) if mean is not None and std is not None else None
    return ExternalModel(net, normalize)


def read_state_dict(path: str | Path, what: str = "model.weights") -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file, or a .pt/.pth/.bin file read with ``weights_only=True`` (no
    pickled code runs); ``{"state_dict": ...}`` and ``{"model": ...}`` wrappers are opened."""
    p = Path(path)
    if p.suffix not in WEIGHT_SUFFIXES:
        raise ConfigError(f"{what}: {str(p)!r} must end in one of {', '.join(WEIGHT_SUFFIXES)}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except OSError as e:  # missing, a folder, no permission, a name too long
        raise ConfigError(f"{what}: cannot read {str(p)!r}: {e.strerror or _first_line(e)}") from None
    except Exception as e:  # not a weights file: safetensors' and pickle's own errors vary by version
        raise ConfigError(f"{what}: {str(p)!r} is not a weights file ({_first_line(e)})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{what}: {str(p)!r} holds no state dict of tensors")
    return state


def _listed(keys: Sequence[str], limit: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_weights(net: nn.Module, path: str | Path, name: str) -> None:
    """Load a state dict file into `net` exactly: missing, unexpected and mis-shaped keys are one error."""
    state = read_state_dict(path)
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or shapes:
        parts = [f"missing {_listed(missing)}" if missing else "", f"unexpected {_listed(unexpected)}" if unexpected
                 else "", f"shapes differ at {_listed(shapes, 2)}" if shapes else ""]  # fmt: skip
        raise ConfigError(f"model.weights: {str(path)!r} does not fit {name} ({'; '.join(p for p in parts if p)})")
    net.load_state_dict(state, strict=True)
