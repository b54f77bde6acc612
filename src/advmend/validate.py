"""Checks at the public boundary: images in [0,1], integer labels, logits from a model.

Each check raises an ``InputError`` / ``ModelContractError`` quoting what was found and what was
expected, so a user sees one line that says how to fix the call."""

from __future__ import annotations

import torch

from advmend.errors import InputError, ModelContractError


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
    lo, hi = torch.aminmax(x.detach())
    lo, hi = float(lo), float(hi)
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
