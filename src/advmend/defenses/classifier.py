"""The classifier a run config describes: a registered backbone, with FSR blocks when `fsr.enabled`.

The PSSR pipeline wraps this classifier (`defenses.pssr.pipeline`), and `defenses.build.build_model`
picks between the two; keeping the classifier here lets the pipeline build it without a cycle.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from advmend.config import NormalizeStats, RunConfig, check_config
from advmend.data import dataset_info
from advmend.defenses.insert import FSRModel
from advmend.defenses.registry import DEFENSES, PLAIN
from advmend.errors import ConfigError
from advmend.models import create_model, fsr_preset
from advmend.models.external import is_external


@DEFENSES.register(PLAIN, label="", eval_prefix="", transfer_key=None, test_with_train_split=True)
@DEFENSES.register("fsr", enabled=lambda cfg: cfg.fsr.enabled, order=1, label="", eval_prefix="", transfer_key=None,
                   test_with_train_split=True)  # fmt: skip
def build_classifier(cfg: RunConfig, num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    """The classifier of `cfg.model`, with FSR blocks when `cfg.fsr.enabled` (`cfg.pssr` is not read)."""
    check_config(cfg)  # a RunConfig built in Python skips from_dict's checks (finite numbers, options)
    m = cfg.model
    norm: dict[str, Any]
    if isinstance(m.normalize, NormalizeStats):
        norm = {"mean": m.normalize.mean, "std": m.normalize.std, "normalize_source": "model.normalize"}
    elif m.normalize:
        info = dataset_info(cfg.data.name, channels=image_shape[0])
        norm = {"mean": info["mean"], "std": info["std"], "normalize_source": f"data set {cfg.data.name}"}
    else:
        norm = {}
    model = create_model(m.name, num_classes=num_classes, in_channels=image_shape[0], weights=m.weights,
                         pretrained=m.pretrained, **norm, **m.options)  # fmt: skip
    _probe_input(model, m.name, image_shape, num_classes)
    if not cfg.fsr.enabled:
        return model
    if not cfg.fsr.layers and is_external(m.name):
        raise ConfigError(f"fsr.layers: {m.name!r} has no reference FSR placement; name its layers "
                          f"(`advmend layers {m.name}` lists them)")  # fmt: skip
    layers = list(cfg.fsr.layers) if cfg.fsr.layers else fsr_preset(m.name)
    return FSRModel(
        model, at=layers, num_classes=num_classes, input_shape=image_shape, tau=cfg.fsr.tau, hidden=cfg.fsr.hidden
    )


def _probe_input(model: nn.Module, name: str, image_shape: tuple[int, int, int], num_classes: int) -> None:
    """Forward passes on zeros, in eval and in training mode, so that images the architecture cannot take
    (too small for its pooling, say) or an output that is not one logit vector per image (a list of
    feature maps, torchvision's GoogLeNet with auxiliary heads in training) are a ConfigError now rather
    than an error in the first training step. Modes, buffers (BatchNorm statistics) and the RNG are left
    as they were."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for training in (False, True):
                model.train(training)
                # Two images in training: BatchNorm needs more than one value per channel.
                n = 2 if training else 1
                out = model(torch.zeros(n, *image_shape))
                if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n, num_classes):
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ConfigError(f"model {name!r} must return one vector of {num_classes} logits per image, got "
                                      f"{got} for {n} image(s) in {'training' if training else 'eval'} mode")  # fmt: skip
    except (RuntimeError, AssertionError) as e:  # timm checks image sizes with assert
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"model {name!r} cannot take {image_shape[0]}x{image_shape[1]}x{image_shape[2]} images ({first}); "
            "use larger images (e.g. data.options.image_size), another model.name, or a timm model's img_size "
            "option (model.options)"
        ) from None
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(buffers[k])
