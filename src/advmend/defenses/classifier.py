"""The classifier a run config describes: a registered backbone, with FSR blocks when `fsr.enabled`.

The PSSR pipeline wraps this classifier (`defenses.pssr.pipeline`), and `defenses.build.build_model`
picks between the two; keeping the classifier here lets the pipeline build it without a cycle.
"""

from __future__ import annotations

import torch
from torch import nn

from advmend.config import RunConfig, check_config
from advmend.data import dataset_info
from advmend.defenses.insert import FSRModel
from advmend.defenses.registry import DEFENSES, PLAIN
from advmend.errors import ConfigError
from advmend.models import create_model, fsr_preset


@DEFENSES.register(PLAIN, label="", eval_prefix="", transfer_key=None, test_with_train_split=True)
@DEFENSES.register("fsr", enabled=lambda cfg: cfg.fsr.enabled, order=1, label="", eval_prefix="", transfer_key=None,
                   test_with_train_split=True)  # fmt: skip
def build_classifier(cfg: RunConfig, num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    """The classifier of `cfg.model`, with FSR blocks when `cfg.fsr.enabled` (`cfg.pssr` is not read)."""
    check_config(cfg)  # a RunConfig built in Python skips from_dict's checks (finite numbers, options)
    info = dataset_info(cfg.data.name, channels=image_shape[0])
    norm = {"mean": info["mean"], "std": info["std"]} if cfg.model.normalize else {}
    model = create_model(
        cfg.model.name, num_classes=num_classes, in_channels=image_shape[0], **norm, **cfg.model.options
    )
    _probe_input(model, cfg.model.name, image_shape)
    if not cfg.fsr.enabled:
        return model
    layers = list(cfg.fsr.layers) if cfg.fsr.layers else fsr_preset(cfg.model.name)
    return FSRModel(
        model, at=layers, num_classes=num_classes, input_shape=image_shape, tau=cfg.fsr.tau, hidden=cfg.fsr.hidden
    )


def _probe_input(model: nn.Module, name: str, image_shape: tuple[int, int, int]) -> None:
    """One eval-mode forward pass on zeros, so images the architecture cannot take (too small for its
    pooling, say) are a ConfigError now rather than a RuntimeError in the first training step."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # BatchNorm running statistics stay untouched; no random layer draws
        with torch.no_grad():
            model(torch.zeros(1, *image_shape))
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"model {name!r} cannot take {image_shape[0]}x{image_shape[1]}x{image_shape[2]} images ({first}); "
            "use larger images (e.g. data.options.image_size) or another model.name"
        ) from None
    finally:
        for m, mode in modes:
            m.training = mode
