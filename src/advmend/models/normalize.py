"""Per-channel input normalisation that lives inside the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from advmend.errors import ConfigError


class Normalize(nn.Module):
    """Computes ``(x - mean) / std`` per channel.

    Models take [0, 1] images; this module is their first layer, so attacks and defences
    always work in pixel space. ``mean`` and ``std`` are persistent buffers of shape
    ``(1, C, 1, 1)`` and are saved with checkpoints.

    Args:
        mean: Per-channel means.
        std: Per-channel standard deviations, all > 0.
        source: Where the statistics come from (the data set, model.normalize, a model's metadata), for
            the report card; not saved with the weights.

    Raises:
        ConfigError: If the lengths differ, are zero, or a std is not positive.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, source: str = "given") -> None:
        super().__init__()
        self.source = source
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if len(mean) == 0 or len(mean) != len(std):
            raise ConfigError(
                f"normalize: mean and std must be non-empty and of equal length, got {len(mean)} and {len(std)}"
            )
        if any(not s > 0 for s in std):
            raise ConfigError(f"normalize: every std must be > 0, got {std}")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        fmt = lambda t: "(" + ", ".join(f"{v:.4g}" for v in t.flatten().tolist()) + ")"  # noqa: E731
        return f"mean={fmt(self.mean)}, std={fmt(self.std)}"


def describe_normalization(model: nn.Module) -> dict[str, Any]:
    """The input normalisation inside `model` (its first `Normalize`), as the report card states it:
    ``{"source", "mean", "std"}``, or ``{"source": "none"}`` when the model has none."""
    norm = next((m for m in model.modules() if isinstance(m, Normalize)), None)
    if norm is None:
        return {"source": "none"}
    return {"source": norm.source, "mean": norm.mean.flatten().tolist(), "std": norm.std.flatten().tolist()}
