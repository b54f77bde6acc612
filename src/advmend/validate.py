"""Checks at the public boundary: images in [0,1], integer labels, logits from a model.

Each check raises an ``InputError`` / ``ModelContractError`` quoting what was found and what was
expected, so a user sees one line that says how to fix the call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from advmend.errors import AdvmendError, DataError, InputError, ModelContractError


class ImageData(Protocol):
    """What `check_data_fits_model` reads of a data set (advmend.data.arrays.ImageDataset, a layer above)."""

    @property
    def images(self) -> Any: ...

    @property
    def labels(self) -> torch.Tensor: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    def __len__(self) -> int: ...


def check_images(x: object, name: str = "x") -> torch.Tensor:
    """Require a float (N, C, H, W) tensor with finite values in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise InputError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(
            f"{name} must be a floating-point tensor in [0, 1], got dtype {x.dtype} "
            "(convert uint8 images with x.float() / 255)"
        )
    if x.numel() == 0:
        raise InputError(f"{name} is empty: shape {tuple(x.shape)}")
    # One reduction and one host sync for all three conditions.
    lo_t, hi_t = torch.aminmax(x.detach())
    lo, hi = float(lo_t), float(hi_t)
    if lo != lo or hi != hi or abs(lo) == float("inf") or abs(hi) == float("inf"):
        raise InputError(f"{name} contains NaN or infinite values")
    if lo < 0.0 or hi > 1.0:
        raise InputError(
            f"{name} must lie in [0, 1], found values in [{lo:.4g}, {hi:.4g}] "
            "(models take unnormalised images; normalisation lives inside the model)"
        )
    return x


def check_labels(y: object, n: int, num_classes: int | None = None, name: str = "y") -> torch.Tensor:
    """Require an integer (N,) label tensor with values in [0, num_classes)."""
    if not isinstance(y, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != n:
        raise InputError(f"{name} must have shape ({n},) to match the images, got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise InputError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else "[0, K)"
        raise InputError(f"{name} must hold class indices in {bound}, found values in [{lo}, {hi}]")
    return y


def check_logits(out: object, n: int) -> torch.Tensor:
    """Require the model output to be one (N, K) floating tensor of logits."""
    if isinstance(out, (tuple, list, dict)):
        raise ModelContractError(
            f"the model returned a {type(out).__name__}; attacks need model(x) to return one (N, K) "
            "logits tensor (expose auxiliary outputs through a separate method)"
        )
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelContractError(f"the model must return logits of shape ({n}, K), got {shape}")
    if not out.is_floating_point():
        raise ModelContractError(f"the model must return floating-point logits, got {out.dtype}")
    return out


def check_data_fits_model(
    ds: ImageData,
    *,
    image_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    model: torch.nn.Module | None = None,
    device: torch.device | str | None = None,
    source: object = "the model",
    hint: str = "evaluate on the data set the model was trained on (data.name, data.options)",
) -> None:
    """Require a data set (an ArrayDataset) whose images and labels a model can take, before any work.

    With the model's recorded ``image_shape`` (C, H, W) and ``num_classes`` (a checkpoint's record) the
    data must have that image shape and no class the model cannot predict. Without a recorded shape,
    ``model`` is run once on two of the images, and its logit count bounds the labels: a user's model
    whose shape is unknown fails here with one line, not in the middle of an attack.

    Raises:
        DataError: Images of another shape, or labels >= the model's number of classes; the message
            names both sides and ``source`` (the checkpoint or the model).
    """
    c, h, w = ds.image_shape
    lo, hi = (int(ds.labels.min()), int(ds.labels.max())) if len(ds) else (0, -1)
    if image_shape is not None:
        want = tuple(int(v) for v in image_shape)
        if want != (c, h, w):
            raise DataError(
                f"the data has {c}x{h}x{w} images (CxHxW) but {source} takes {'x'.join(map(str, want))}: {hint}"
            )
    elif model is not None and len(ds):
        x = ds.images[:2].to(device or "cpu").float().div_(255.0)
        try:
            with torch.no_grad():
                out = model(x)
        except AdvmendError:
            raise
        except Exception as e:  # a user's model tells a wrong input shape in its own words
            first = str(e).splitlines()[0] if str(e) else ""
            raise DataError(
                f"{source} cannot take the data's {c}x{h}x{w} images (CxHxW): {type(e).__name__}: {first}"
            ) from None
        if isinstance(out, torch.Tensor) and out.dim() == 2:
            num_classes = int(out.shape[1]) if num_classes is None else num_classes
    if num_classes is not None and (ds.num_classes > num_classes or hi >= num_classes):
        raise DataError(
            f"the data has {ds.num_classes} classes (labels in [{lo}, {hi}]) but {source} predicts "
            f"{num_classes}: {hint}"
        )
