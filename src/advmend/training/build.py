"""From a RunConfig to the objects a run needs: device, data splits, attacks, objective.

With `advmend.defenses.build.build_model` (the model), this is the only place that reads config sections
and turns them into library objects, so the training loop, the evaluation command and the benchmarks all
build things the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import overload

import torch

from advmend.attacks.pgd import PGD
from advmend.config import AttackConfig, DataConfig, RunConfig, check_config
from advmend.data import (
    dataset_info,
    dataset_radii,
    load_dataset,
    split_train_val,
    subset,
)
from advmend.data.arrays import ImageDataset
from advmend.errors import ConfigError
from advmend.evaluation.load import test_split
from advmend.registry import Registry
from advmend.training.mart import MART, MART_BETA
from advmend.training.objectives import AdversarialCE, fast_at_attack
from advmend.training.trades import TRADES, TRADES_BETA, trades_attack
from advmend.types import Radii, ThreatModel
from advmend.validate import check_data_fits_model

OBJECTIVES: Registry = Registry("training method")


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """'auto' picks CUDA when available, else CPU; anything else must be a valid torch device. `key`
    names the setting in messages (a command's --device flag, or the config key)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{key}: invalid device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} is {name!r} but CUDA is not available; use auto or cpu")
    return device


@dataclass
class DataSplits:
    """Train, held-out validation (from the training split) and test sets, plus dataset facts."""

    train: ImageDataset | None  # None when built with need_train=False
    val: ImageDataset | None
    test: ImageDataset | None
    info: dict


def build_data(cfg: DataConfig, *, need_train: bool = True, need_test: bool = True) -> DataSplits:
    """Load the splits a run needs; the validation split is seeded and disjoint from training."""
    check_config(cfg)  # data.val_size, data.train_subset: the rules of loading, for a section built in Python
    opts = dict(cfg.options)
    info = dataset_info(cfg.name)
    train: ImageDataset | None = None
    val: ImageDataset | None = None
    test: ImageDataset | None = None
    if need_train:
        full = load_dataset(cfg.name, "train", root=cfg.root, download=cfg.download, **opts)
        if cfg.val_size >= len(full):
            raise ConfigError(f"data.val_size={cfg.val_size} leaves no training data ({len(full)} examples)")
        train, val = split_train_val(full, cfg.val_size, cfg.seed) if cfg.val_size else (full, None)
        if cfg.train_subset is not None:
            train = subset(train, cfg.train_subset, cfg.seed)
    if need_test:
        test = test_split(cfg)
        if train is not None:  # a model trained on the train split must take the test split
            check_data_fits_model(test, image_shape=train.image_shape, num_classes=train.num_classes,
                                  source=f"a model trained on the training split of {cfg.name!r}",
                                  hint="the train and test splits need the same image shape and classes")  # fmt: skip
    ref = train if train is not None else test
    assert ref is not None, "build_data needs need_train or need_test"
    info["num_classes"] = ref.num_classes
    info["image_shape"] = ref.image_shape
    if ref.image_shape[0] != len(info["mean"]):
        info.update(
            dataset_info(cfg.name, channels=ref.image_shape[0])
            | {"num_classes": ref.num_classes, "image_shape": ref.image_shape}
        )
    info["augment"] = info["augment"] if cfg.augment is None else cfg.augment
    info["radii"] = data_radii(cfg, ref.image_shape)
    info["eps"] = info["radii"].eps["linf"]
    return DataSplits(train, val, test, info)


def data_radii(cfg: DataConfig, image_shape: tuple[int, ...] | None = None) -> Radii:
    """The standard radii of a run's data (`data.radii`, else by data set and image size). Before the data
    is loaded, `image_shape` is unknown: a folder's `image_size` option stands in for it."""
    side = cfg.options.get("image_size")
    if image_shape is None and isinstance(side, int) and not isinstance(side, bool):  # a bad one: the loader's error
        image_shape = (3, side, side)
    return dataset_radii(cfg.name, image_shape, cfg.radii)


def attack_threat(cfg: AttackConfig, radii: Radii) -> ThreatModel:
    """The threat model of an attack section (eps None: the data set's radius for its norm)."""
    return ThreatModel.resolve(cfg.norm, cfg.eps, radii)


def build_attack(cfg: AttackConfig, radii: Radii, *, keep_best: bool, name: str = "") -> PGD:
    """A PGD configuration from its config section: every field of the section is a PGD field of the same
    name and meaning, taken as it is, with eps resolved by `attack_threat`."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    fields["eps"] = attack_threat(cfg, radii).eps
    return PGD(**fields, keep_best=keep_best, name=name or f"PGD-{cfg.steps}")


@overload
def _beta(cfg: RunConfig, default: float) -> float: ...
@overload
def _beta(cfg: RunConfig, default: None) -> None: ...
def _beta(cfg: RunConfig, default: float | None) -> float | None:
    """`train.beta` for a method that uses it (null: the method's `default`); an error for the others,
    so a beta meant for another method never trains silently."""
    beta = cfg.train.beta
    if default is None:
        if beta is not None:
            raise ConfigError(
                f"train.beta is used only by methods trades and mart, not {cfg.train.method!r}; remove train.beta"
            )
        return None
    return default if beta is None else beta


def _label_attack(cfg: RunConfig, radii: Radii) -> PGD:
    """`train.attack` as a PGD on the labels; training uses the last iterate, as Madry et al. (keep_best=False)."""
    if cfg.train.attack.loss == "kl":
        raise ConfigError(
            f"train.attack.loss 'kl' is TRADES' inner loss; method {cfg.train.method!r} needs ce or margin"
        )
    return build_attack(cfg.train.attack, radii, keep_best=False)


@OBJECTIVES.register("pgd_at")
def _pgd_at(cfg: RunConfig, radii: Radii) -> AdversarialCE:
    _beta(cfg, None)
    return AdversarialCE(_label_attack(cfg, radii), cfg.fsr.lambda_sep, cfg.fsr.lambda_rec)


@OBJECTIVES.register("standard")
def _standard(cfg: RunConfig, radii: Radii) -> AdversarialCE:
    _beta(cfg, None)
    return AdversarialCE(None, cfg.fsr.lambda_sep, cfg.fsr.lambda_rec)


@OBJECTIVES.register("trades")
def _trades(cfg: RunConfig, radii: Radii) -> TRADES:
    a = cfg.train.attack
    if a.loss not in ("ce", "kl"):  # "ce" is the section's default; TRADES always maximises the KL
        raise ConfigError(f"train.attack.loss must be kl for method trades, got {a.loss!r}")
    if not a.random_start:
        raise ConfigError(
            "train.attack.random_start must be true for method trades: at x' = x the KL gradient is zero, "
            "so the attack needs its 0.001 * N(0, I) start"
        )
    if a.restarts != 1:
        raise ConfigError(f"train.attack.restarts must be 1 for method trades, got {a.restarts}")
    attack = trades_attack(attack_threat(a, radii).eps, a.steps, a.step_size, norm=a.norm)
    return TRADES(attack, _beta(cfg, TRADES_BETA), cfg.fsr.lambda_sep, cfg.fsr.lambda_rec)


@OBJECTIVES.register("mart")
def _mart(cfg: RunConfig, radii: Radii) -> MART:
    return MART(_label_attack(cfg, radii), _beta(cfg, MART_BETA), cfg.fsr.lambda_sep, cfg.fsr.lambda_rec)


@OBJECTIVES.register("fast_at")
def _fast_at(cfg: RunConfig, radii: Radii) -> AdversarialCE:
    _beta(cfg, None)
    a = cfg.train.attack
    if a.steps != 1:
        raise ConfigError(f"train.attack.steps must be 1 for method fast_at (one FGSM step), got {a.steps}")
    if not a.random_start:
        raise ConfigError(
            "train.attack.random_start must be true for method fast_at (FGSM without it overfits "
            "catastrophically, Wong et al. 2020); for plain FGSM training use method pgd_at with steps 1"
        )
    if a.loss != "ce" or a.restarts != 1:
        raise ConfigError(f"method fast_at needs train.attack.loss ce and restarts 1, got {a.loss!r} and {a.restarts}")
    attack = fast_at_attack(attack_threat(a, radii).eps, norm=a.norm, step_size=a.step_size)
    return AdversarialCE(attack, cfg.fsr.lambda_sep, cfg.fsr.lambda_rec)


def build_objective(cfg: RunConfig, radii: Radii):
    """The training objective named by `train.method`, with its settings checked; an attack with eps null
    takes the data set's radius for its norm from `radii`."""
    return OBJECTIVES.get(cfg.train.method)(cfg, radii)


def check_objective(cfg: RunConfig) -> None:
    """Build the training objective and the validation attack once at the data set's standard radius, so
    that what depends on `train.method` (TRADES' attack, train.beta, fast AT's one step) and the attack
    sections fail before any data is loaded; nothing is drawn at random. The loop builds them again."""
    radii = data_radii(cfg.data)
    build_objective(cfg, radii)
    build_attack(cfg.train.val_attack, radii, keep_best=True)
