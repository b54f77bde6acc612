"""advmend: adversarial robustness by repair (FSR, PSSR), adversarial training and honest evaluation.

The public API is the five functions below; `import advmend` stays light (torch is imported by the
first call, not here). Each docstring holds a short example that runs as written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from advmend._version import __version__

if TYPE_CHECKING:  # annotations only: `import advmend` does not import torch
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from torch import nn

    from advmend.config import RunConfig
    from advmend.defenses.insert import FSRModel
    from advmend.defenses.pssr.pipeline import PSSRModel
    from advmend.evaluation.evaluate import EvalResult
    from advmend.training.loop import TrainResult

__all__ = ["__version__", "add_pssr", "evaluate", "insert_fsr", "load", "train"]


def insert_fsr(backbone: nn.Module, at: str | Sequence[str], num_classes: int, **options: Any) -> FSRModel:
    """Insert FSR blocks (feature separation and recalibration) after the named layers of a classifier.

    Args:
        backbone: a classifier (an `nn.Module`, [0, 1] images in, logits out).
        at: the module path (or a list of them) whose output features are separated and recalibrated,
            e.g. "layer4" for a ResNet.
        num_classes: the number of classes of the blocks' auxiliary heads.
        **options: `input_shape` (C, H, W; default (3, 32, 32)), `tau` (Gumbel-sigmoid temperature,
            default 0.1), `hidden` (width of the separation / recalibration nets, default 64).

    Returns:
        The `advmend.defenses.FSRModel`: called on images it returns the logits; trained with
            `advmend.train` (config `fsr.enabled: true`) its FSR losses are added to the objective.

    Example:
        >>> import torch, advmend
        >>> from advmend.models import create_model
        >>> model = advmend.insert_fsr(create_model("small_cnn", num_classes=10, width=8), at="stage3",
        ...                            num_classes=10)
        >>> model(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    from advmend.defenses.insert import insert_fsr as insert

    return insert(backbone, at, num_classes, **options)


def add_pssr(classifier: nn.Module, image_shape: Sequence[int], **options: Any) -> PSSRModel:
    """Put PSSR (pixel surgery, then semantic regeneration) in front of a classifier: PSSR's entry point.

    The returned pipeline removes an input's salient pixels (scored by the classifier's input
    gradient), restores the image with a fresh regenerator G, and classifies the restored image. G is
    trained by `advmend.train` on a config with `pssr.enabled: true` (`pssr.classifier`: the
    classifier's checkpoint; configs/pssr/ holds recipes).

    Args:
        classifier: the protected classifier ([0, 1] images in, logits out).
        image_shape: (C, H, W) of the images.
        **options: `pssr.*` settings of the surgery and of G: mask ("alpha" or "ratio"), alpha, rho,
            fill, surgery, mode ("full" or "hole"), width, depth, dropout, residual, finetune_classifier.

    Returns:
        The `advmend.defenses.PSSRModel` (logits on the regenerated image).

    Example:
        >>> import torch, advmend
        >>> from advmend.models import create_model
        >>> f = create_model("small_cnn", num_classes=10, width=8)
        >>> pipeline = advmend.add_pssr(f, (3, 32, 32), width=8).eval()
        >>> pipeline(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    from advmend.defenses.pssr.pipeline import pssr_pipeline
    from advmend.errors import ConfigError

    if len(image_shape) != 3:
        raise ConfigError(f"image_shape {tuple(image_shape)}: give (C, H, W), e.g. (3, 32, 32)")
    c, h, w = (int(v) for v in image_shape)
    return pssr_pipeline(classifier, (c, h, w), **options)


def train(config: str | Path | RunConfig, out_dir: str | Path | None = None, *, overrides: Sequence[str] = (),
          resume: bool = False, log: Callable[[str], None] = print) -> TrainResult:  # fmt: skip
    """Train the run a config describes (a classifier, FSR or PSSR) into a run folder.

    Args:
        config: a YAML file, a bundled config name (see `advmend list`), or a `RunConfig`.
        out_dir: the run folder (default: the config's out_dir, else runs/<name>).
        overrides: "key=value" settings applied to a YAML config, as `--set` does
            (e.g. ["train.epochs=1"]).
        resume: continue the run in `out_dir` from its last.safetensors.
        log: called with each log line (`print` by default).

    Returns:
        The `TrainResult`: `best` and `last` checkpoints, the per-epoch `history`, and `selection`
            (how the best checkpoint was chosen). The test set is not touched: evaluate `best` with
            `advmend.evaluate`.

    Example:
        >>> import tempfile, advmend
        >>> folder = tempfile.mkdtemp()
        >>> run = advmend.train("quickstart", folder, log=lambda line: None,
        ...                     overrides=["data.train_subset=256", "data.val_size=64", "train.epochs=1",
        ...                                "train.progress=false"])
        >>> run.best.name
        'best.safetensors'
    """
    from pathlib import Path

    from advmend.config import RunConfig, load_run_config
    from advmend.training.run import train_run

    cfg = config if isinstance(config, RunConfig) else load_run_config(str(config), list(overrides))
    out = Path(out_dir or cfg.out_dir or Path("runs") / cfg.name)
    return train_run(cfg, out, resume=resume, log=log)


def evaluate(checkpoint: str | Path, *, protocol: str | None = None, n_examples: int | None = None,
             out: str | Path | None = None, device: str = "auto", overrides: Sequence[str] = (),
             progress: bool = False) -> EvalResult:  # fmt: skip
    """Evaluate a checkpoint under an attack protocol and write its report card, as `advmend eval` does.

    Attacks, the sanity suite (gradient-masking checks) and the report (report.json, report.md,
    accuracy_vs_eps.png) are the command's; a PSSR checkpoint is evaluated under its threat models.

    Args:
        checkpoint: a .safetensors checkpoint written by `advmend.train` / `advmend train`.
        protocol: the attack protocol (see `advmend list`); default: the run's eval.protocol.
        n_examples: evaluate a seeded subset of this many test examples.
        out: the report folder (default: next to the checkpoint, eval-<protocol>).
        device: "auto", "cpu", "cuda", "cuda:N".
        overrides: "key=value" settings of the eval and data sections (e.g. ["eval.batch_size=64"]).
        progress: show progress bars.

    Returns:
        The `EvalResult`: `clean_accuracy`, `worst_accuracy`, and per attack in `attacks`.

    Example:
        >>> import tempfile, advmend
        >>> folder = tempfile.mkdtemp()
        >>> run = advmend.train("quickstart", folder, log=lambda line: None,
        ...                     overrides=["data.train_subset=256", "data.val_size=64", "train.epochs=1",
        ...                                "train.progress=false"])
        >>> result = advmend.evaluate(run.best, protocol="quick", n_examples=16, out=folder + "/card")
        ... # doctest: +ELLIPSIS
        quickstart: ...
        >>> 0 <= result.worst_accuracy <= result.clean_accuracy <= 1
        True
    """
    from advmend.config import parse_overrides
    from advmend.evaluation.checkpoint_eval import evaluate_source
    from advmend.training.build import resolve_device
    from advmend.training.run import prepare_evaluation

    pairs = parse_overrides(list(overrides), sections=("data", "eval"))
    pairs += [(f"eval.{k}", v) for k, v in (("protocol", protocol), ("n_examples", n_examples)) if v is not None]
    return evaluate_source(checkpoint=str(checkpoint), overrides=pairs, device=resolve_device(device, "device"),
                           out=out, prepare=prepare_evaluation, progress=progress,
                           log=print if progress else (lambda _m: None))  # fmt: skip


def load(checkpoint: str | Path, device: str = "cpu") -> nn.Module:
    """The model a checkpoint was trained as (classifier, FSR model or PSSR pipeline), weights verified.

    Args:
        checkpoint: a .safetensors checkpoint written by `advmend.train` / `advmend train`.
        device: where to put the model ("cpu", "cuda", ...).

    Returns:
        The `nn.Module` in eval mode ([0, 1] images in, logits out). Its run config and checkpoint
            record: `advmend.evaluation.load.load_trained_model`.

    Example:
        >>> import tempfile, torch, advmend
        >>> folder = tempfile.mkdtemp()
        >>> run = advmend.train("quickstart", folder, log=lambda line: None,
        ...                     overrides=["data.train_subset=256", "data.val_size=64", "train.epochs=1",
        ...                                "train.progress=false"])
        >>> model = advmend.load(run.best)
        >>> model(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    import torch

    from advmend.evaluation.load import load_trained_model

    return load_trained_model(checkpoint, torch.device(device))[0]
