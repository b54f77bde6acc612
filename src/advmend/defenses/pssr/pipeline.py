"""The PSSR pipeline as one classifier: x -> PS -> G -> f -> logits.

Fu, Zhou, Ma, Zhang, "Invariance-powered Trustworthy Defense via Remove Then Restore", arXiv
2402.00304 (2024); docs/pssr.md. `PSSRModel(x)` returns the protected classifier's logits on
the regenerated image, so every attack, `evaluate` and `advmend eval` use it like any classifier; the
intermediates (score map, mask, surgical and regenerated images) come from the explicit
`forward_with_intermediates(x)`.

Modes. In eval mode the pipeline is deterministic (the scorer and f in eval mode, G's dropout off).
`train()` only reaches G: the classifier (and the scorer) stay in eval mode with frozen parameters
unless `finetune_classifier`, so training G never moves f's BatchNorm statistics.

Gradients. The mask is computed from a detached input gradient and thresholded, so plain autograd
through this module treats M_s as a constant and differentiates through (1 - M_s) * x, G and f: that
IS the spec's white-box "mask constant" BPDA attack. The identity approximation of the whole
pre-processor is `advmend.attacks.BPDA(PSSRPreprocess(model), model.classifier)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from advmend.config import PSSR_MODES, PSSRConfig, RunConfig, from_dict
from advmend.defenses.classifier import build_classifier
from advmend.defenses.pssr.regenerator import Regenerator
from advmend.defenses.pssr.surgery import MASKS, apply_surgery, salient_mask, score_map
from advmend.defenses.registry import DEFENSES
from advmend.errors import ConfigError
from advmend.validate import check_images

MODES = PSSR_MODES  # the config's choices, one definition


@dataclass
class PSSROutput:
    """What one pass computed: score (N,1,H,W), mask (N,1,H,W) in {0,1}, surgical and regenerated
    images (N,C,H,W), and the classifier's logits (N,K) on the regenerated image."""

    score: torch.Tensor
    mask: torch.Tensor
    surgical: torch.Tensor
    regenerated: torch.Tensor
    logits: torch.Tensor


class PSSRModel(nn.Module):
    """Pixel Surgery and Semantic Regeneration in front of a classifier.

    Args:
        classifier: f, [0,1] images -> (N, K) logits (plain, adversarially trained or FSR).
        regenerator: G, (x_s, M_s) -> image in [0, 1].
        mask: "alpha" (M_s = 1[S >= alpha * mean S], the default) or "ratio" (top-rho pixels).
        alpha, rho: the thresholds of the two mask rules.
        fill: value written into the removed pixels.
        surgery: False skips PS (M_s = 0, x_s = x): the "SR without PS" ablation.
        mode: "full" (x_hat = G(.), default) or "hole" (x_hat = (1-M) x + M G(.): only removed pixels
            are regenerated).
        finetune_classifier: train f jointly with G (default False: f frozen, always in eval mode).
        scorer: the network whose input gradient scores pixels; None (default) uses f itself.
    """

    def __init__(
        self,
        classifier: nn.Module,
        regenerator: Regenerator,
        *,
        mask: str = "alpha",
        alpha: float = 1.0,
        rho: float = 0.2,
        fill: float = 0.0,
        surgery: bool = True,
        mode: str = "full",
        finetune_classifier: bool = False,
        scorer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        _check_choice("pssr.mask", mask, MASKS)
        _check_choice("pssr.mode", mode, MODES)
        self.classifier = classifier
        self.regenerator = regenerator
        # Stored only when distinct, so f's weights are not saved twice under two names.
        self.scorer = scorer
        self.mask_rule, self.alpha, self.rho, self.fill = mask, float(alpha), float(rho), float(fill)
        self.use_surgery, self.mode = bool(surgery), mode
        self.finetune_classifier = bool(finetune_classifier)
        frozen = [self.scorer] if self.scorer is not None else []
        if not self.finetune_classifier:
            frozen.append(self.classifier)
        for module in frozen:
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> PSSRModel:
        """Sets G's mode; f (unless fine-tuned) and the scorer stay in eval mode."""
        super().train(mode)
        if not self.finetune_classifier:
            self.classifier.eval()
        if self.scorer is not None:
            self.scorer.eval()
        return self

    # --- the three stages, usable separately (the training objective batches them its own way)
    def surgery(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(score, mask, surgical image); score and mask are detached. Without surgery: zeros, zeros, x."""
        if not self.use_surgery:
            zeros = x.new_zeros(x.shape[0], 1, *x.shape[2:])
            return zeros, zeros, x
        score = score_map(self.scorer if self.scorer is not None else self.classifier, x)
        m = salient_mask(score, mask=self.mask_rule, alpha=self.alpha, rho=self.rho)
        return score, m, apply_surgery(x, m, self.fill)

    def regenerate(self, surgical: torch.Tensor, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """G's image; in hole mode the pixels outside the mask are x's, exactly."""
        g = self.regenerator(surgical, mask)
        if self.mode == "hole":
            return x * (1 - mask) + mask * g
        return g

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """x_hat = SR(PS(x)), the whole pre-processor."""
        _, m, xs = self.surgery(x)
        return self.regenerate(xs, m, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) of f on the regenerated image: what every attack and metric sees."""
        return self.classifier(self.preprocess(x))

    def forward_with_intermediates(self, x: torch.Tensor) -> PSSROutput:
        """Every intermediate of one pass (input checked: float (N,C,H,W) in [0,1])."""
        check_images(x)
        score, m, xs = self.surgery(x)
        xr = self.regenerate(xs, m, x)
        return PSSROutput(score, m, xs, xr, self.classifier(xr))


class PSSRPreprocess(nn.Module):
    """The whole pre-processor G(PS(.)) as a module, for `BPDA(PSSRPreprocess(m), m.classifier)`.

    A module (not a lambda) so that `attack_mode` on the BPDA wrapper also puts G in eval mode.
    """

    def __init__(self, pipeline: PSSRModel) -> None:
        super().__init__()
        self.pipeline = pipeline

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pipeline.preprocess(x)


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {choices}, got {value!r}")


def check_pssr_config(p: PSSRConfig) -> None:
    """Value checks of the pssr section, each naming its dotted key (the config's own rule, also run when
    a config is loaded; here for pipelines built from a config made in Python)."""
    p.checked()


def check_pssr_run(cfg: RunConfig) -> None:
    """What PSSR's trainer needs of a run config: the pssr section enabled and its values checked."""
    if not cfg.pssr.enabled:
        raise ConfigError("train_pssr needs pssr.enabled: true")
    check_pssr_config(cfg.pssr)


def check_classifier_record(record: dict, source: str) -> None:
    """ConfigError when checkpoint `source` (its `record`) holds a PSSR pipeline: PSSR protects a
    classifier (plain or FSR), and its transfer surrogate is one too, never another pipeline."""
    if ((record.get("config") or {}).get("pssr") or {}).get("enabled"):
        raise ConfigError(f"{source} is a PSSR checkpoint; give a classifier's checkpoint")


def pipeline_of(model: nn.Module) -> PSSRModel | None:
    """The PSSR pipeline `model` is, or None when it is a classifier (plain or FSR) without PS + G."""
    return model if isinstance(model, PSSRModel) else None


# PSSR is asked first: it wraps a classifier that may carry FSR blocks. Its transfer source is a config key
# (a surrogate classifier, `evaluation.pssr`), and its training loads its own classifier's split.
@DEFENSES.register("pssr", enabled=lambda cfg: cfg.pssr.enabled, order=0, label="PSSR", eval_prefix="pssr-",
                   transfer_key="pssr.surrogate", test_with_train_split=False)  # fmt: skip
def build_pssr_model(cfg: RunConfig, num_classes: int, image_shape: tuple[int, int, int]) -> PSSRModel:
    """The PSSR pipeline of `cfg`: f from cfg.model/cfg.fsr (built by `build_classifier`), G from cfg.pssr.

    Weights are not loaded here: a PSSR checkpoint holds f's and G's together.
    """
    check_pssr_config(cfg.pssr)
    return _assemble(build_classifier(cfg, num_classes, image_shape), image_shape, cfg.pssr)


def pipeline_for_training(cfg: RunConfig, classifier: nn.Module, num_classes: int,
                          image_shape: tuple[int, int, int]) -> PSSRModel:  # fmt: skip
    """The pipeline of `cfg` that PSSR's trainer trains: the trained `classifier`'s weights as f (frozen
    unless pssr.finetune_classifier), a fresh G."""
    model = build_pssr_model(cfg, num_classes, image_shape)
    model.classifier.load_state_dict(classifier.state_dict())
    return model


def _assemble(classifier: nn.Module, image_shape: tuple[int, int, int], p: PSSRConfig) -> PSSRModel:
    """PS + a fresh G of section `p` in front of `classifier`."""
    regenerator = Regenerator(image_shape[0], image_shape[1:], width=p.width, dropout=p.dropout, depth=p.depth,
                              residual=p.residual)  # fmt: skip
    return PSSRModel(
        classifier, regenerator, mask=p.mask, alpha=p.alpha, rho=p.rho, fill=p.fill, surgery=p.surgery,
        mode=p.mode, finetune_classifier=p.finetune_classifier,
    )  # fmt: skip


def pssr_pipeline(classifier: nn.Module, image_shape: tuple[int, int, int], **options) -> PSSRModel:
    """PS + G in front of `classifier` for images of `image_shape` (C, H, W), with a fresh regenerator.

    `options` are `pssr.*` settings of the surgery and the regenerator (mask, alpha, rho, fill, surgery,
    mode, width, depth, dropout, residual, finetune_classifier), checked as the config checks them.
    """
    p = from_dict(PSSRConfig, dict(options, enabled=True))  # unknown keys and bad values: one ConfigError line
    check_pssr_config(p)
    return _assemble(classifier, image_shape, p)
