"""The model a run config describes: the builder its defense registered (`defenses.registry.DEFENSES`)."""

from __future__ import annotations

from torch import nn

import advmend.defenses.classifier  # noqa: F401  (registers the plain classifier and FSR)
import advmend.defenses.pssr.pipeline  # noqa: F401  (registers PSSR)
from advmend.config import RunConfig
from advmend.defenses.registry import DEFENSES, defense_of


def build_model(cfg: RunConfig, num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    """The model of the defense `cfg` describes: the classifier of `cfg.model` (with FSR blocks when
    `cfg.fsr.enabled`), behind PS + G when `cfg.pssr.enabled`. Weights are not loaded here."""
    return DEFENSES.get(defense_of(cfg))(cfg, num_classes, image_shape)
