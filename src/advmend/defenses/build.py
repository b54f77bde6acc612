"""The model a run config describes: the classifier, or the PSSR pipeline in front of it."""

from __future__ import annotations

from torch import nn

from advmend.config import RunConfig
from advmend.defenses.classifier import build_classifier
from advmend.defenses.pssr.pipeline import build_pssr_model


def build_model(cfg: RunConfig, num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    """The classifier of `cfg.model` (with FSR blocks when `cfg.fsr.enabled`), behind PS + G when
    `cfg.pssr.enabled`. Weights are not loaded here."""
    if cfg.pssr.enabled:
        return build_pssr_model(cfg, num_classes, image_shape)
    return build_classifier(cfg, num_classes, image_shape)
