"""Run configuration: frozen dataclasses mapped 1:1 to YAML, strict keys, dotted ``--set`` overrides.

Library code receives these dataclasses, never CLI arguments. Unknown keys and wrong types are
``ConfigError``s naming the dotted path (``train.attack.eps``), so a typo never trains silently with a
default. Float fields also accept a fraction written as a string, e.g. ``eps: 8/255``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from advmend.data.corruptions import check_corruptions
from advmend.errors import ConfigError
from advmend.io import check_input_path
from advmend.models.external import is_external
from advmend.models.registry import check_model_options
from advmend.types import STANDARD_RADII
from advmend.values import from_dict

# The choices of string settings whose meaning lives above this module: the layers that act on them
# import these (training/schedule.py, training/loop.py, training/precision.py, attacks/pgd.py).
SCHEDULES = ("piecewise", "cosine", "constant")
SELECTS = ("robust", "clean", "last")  # model selection on the held-out validation split
AMP_CHOICES = ("off", "bf16", "fp16")
NORMS = ("linf", "l2", "l1")
STARTS = ("uniform", "normal")
PSSR_MASKS = ("alpha", "ratio")
PSSR_MODES = ("full", "hole")
PSSR_RDROP = ("cross", "literal")
PSSR_THREATS = ("graybox", "adaptive")


def _check_values(section: str, rows: tuple[tuple[str, Any, bool], ...]) -> None:
    """ConfigError "section.key: invalid value V" for the first row whose check fails."""
    for key, value, ok in rows:
        if not ok:
            raise ConfigError(f"{section}.{key}: invalid value {value!r}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {choices}, got {value!r}")


def _check_weight(value: float, key: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{key} must be a finite number >= 0, got {value}")


# A field with this metadata is left out of the resolved config (`to_dict`) while it holds its default: a
# setting added after configs were written leaves their resolved dicts, and the study records' config
# hashes (`advmend.study.spec.config_digest`), as they were.
RECORDED_WHEN_SET = {"recorded_when_set": True}


@dataclass(frozen=True)
class DataConfig:
    """Which data, where it lives, and how it is split and augmented."""

    name: str = "cifar10"
    root: str | None = None  # None: $ADVMEND_DATA, else ./data
    download: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # loader options: path, image_size, n_train...
    train_subset: int | None = None  # seeded subset of the training split
    val_size: int = 1000  # seeded held-out validation split taken from the training split
    augment: bool | None = None  # None: the dataset's standard (pad-4 crop + flip on CIFAR)
    seed: int = 0
    # The STANDARD_RADII row an attack with eps null uses ("cifar10", "imagenet"); None: the data set's own,
    # or for a folder/npz by its image size (data.dataset_radii).
    radii: str | None = field(default=None, metadata=RECORDED_WHEN_SET)

    def checked(self, path: str = "") -> DataConfig:
        p = path or "data"
        if self.radii is not None and self.radii not in STANDARD_RADII:
            raise ConfigError(f"{p}.radii must be one of {sorted(STANDARD_RADII)}, got {self.radii!r}")
        if self.val_size < 0:
            raise ConfigError(f"{p}.val_size must be >= 0, got {self.val_size}")
        if self.train_subset is not None and self.train_subset < 1:
            raise ConfigError(f"{p}.train_subset must be >= 1, got {self.train_subset}")
        return self


@dataclass(frozen=True)
class NormalizeStats:
    """Per-channel input statistics given in the config: ``model.normalize: {mean: [...], std: [...]}``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def checked(self, path: str = "") -> NormalizeStats:
        p = path or "model.normalize"
        if not self.mean or len(self.mean) != len(self.std):
            raise ConfigError(f"{p}: mean and std must be non-empty lists of equal length, "
                              f"got {len(self.mean)} and {len(self.std)} values")  # fmt: skip
        if any(not s > 0 for s in self.std):
            raise ConfigError(f"{p}.std: every value must be > 0, got {list(self.std)}")
        return self


@dataclass(frozen=True)
class ModelConfig:
    """The classifier: a registered model, or ``timm/<arch>`` / ``torchvision/<arch>`` by name.

    `normalize` puts input statistics inside the model ([0,1] in): false keeps the model's own (none for
    the registered models, the pretrained metadata for timm/torchvision ones), true the data set's, and
    ``{mean, std}`` those. `weights` (a state dict file) or `pretrained` (the library's download) give a
    timm/torchvision model its initial weights."""

    name: str = "resnet18"
    normalize: bool | NormalizeStats = False
    options: dict[str, Any] = field(default_factory=dict)  # model-specific keyword arguments
    weights: str | None = field(default=None, metadata=RECORDED_WHEN_SET)
    pretrained: bool = field(default=False, metadata=RECORDED_WHEN_SET)

    def checked(self, path: str = "") -> ModelConfig:
        """model.options are the model factory's keyword arguments: check their names and types now, so
        `--set model.options.nope=1` fails before data is loaded, not as a TypeError in the factory."""
        p = path or "model"
        if self.weights is not None and self.pretrained:
            raise ConfigError(f"{p}.weights and {p}.pretrained both give initial weights: keep one")
        if self.weights is not None and not self.weights.strip():
            raise ConfigError(f"{p}.weights must be a file path, got {self.weights!r}")
        if (self.weights is not None or self.pretrained) and not is_external(self.name):
            raise ConfigError(f"{p}.weights and {p}.pretrained are for timm/ and torchvision/ models; "
                              f"{self.name!r} is built in")  # fmt: skip
        if not self.options and not is_external(self.name):
            return self
        options = check_model_options(self.name, self.options, f"{p}.options")
        return dataclasses.replace(self, options=options)

    def architecture(self) -> ModelConfig:
        """This model without its initial weights (file or download): what rebuilding a checkpoint needs."""
        return dataclasses.replace(self, weights=None, pretrained=False)


@dataclass(frozen=True)
class FSRConfig:
    """Feature Separation and Recalibration blocks (docs/fsr.md)."""

    enabled: bool = False
    layers: tuple[str, ...] | None = None  # None: the model's reference placement
    tau: float = 0.1
    hidden: int = 64
    lambda_sep: float = 1.0
    lambda_rec: float = 1.0

    def checked(self, path: str = "") -> FSRConfig:
        p = path or "fsr"
        if self.layers is not None and not self.layers:
            raise ConfigError(f"{p}.layers must name at least one layer")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"{p}.layers names a layer twice: {list(self.layers)}")
        if not self.tau > 0:
            raise ConfigError(f"{p}.tau must be > 0, got {self.tau}")
        _check_values(p, (("hidden", self.hidden, self.hidden >= 1),))
        _check_weight(self.lambda_sep, f"{p}.lambda_sep")
        _check_weight(self.lambda_rec, f"{p}.lambda_rec")
        return self


@dataclass(frozen=True)
class AttackConfig:
    """An L-inf, L2 or L1 PGD-family attack. `eps: null` takes the dataset's standard radius."""

    norm: str = "linf"
    eps: float | None = None
    step_size: float | None = None  # None: min(eps, 2.5 * eps / steps) (Madry et al.)
    steps: int = 10
    random_start: bool = True
    restarts: int = 1
    loss: str = "ce"
    kappa: float = 0.0
    start: str = "uniform"  # random start law: uniform in the ball | normal (0.001 * N(0, I), TRADES / MART code)
    eot: int = 1  # gradient draws averaged per step, for models with random parts

    def checked(self, path: str = "") -> AttackConfig:
        """The values PGD checks too (attacks.pgd.PGD), named by their dotted key; the loss names a
        registered loss, which the PGD built from this section checks."""
        p = path or "attack"
        _check_choice(f"{p}.norm", self.norm, NORMS)
        _check_choice(f"{p}.start", self.start, STARTS)
        _check_values(p, (
            ("eps", self.eps, self.eps is None or self.eps >= 0),
            ("step_size", self.step_size, self.step_size is None or self.step_size > 0),
            ("steps", self.steps, self.steps >= 0),
            ("restarts", self.restarts, self.restarts >= 1),
            ("eot", self.eot, self.eot >= 1),
        ))  # fmt: skip
        return self


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the training objective. `milestones` are fractions of `epochs`."""

    method: str = "pgd_at"  # pgd_at | trades | mart | fast_at | standard
    beta: float | None = None  # TRADES / MART regulariser weight; None: the method's published default
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "piecewise"  # piecewise | cosine | constant
    milestones: tuple[float, ...] = (0.75, 0.9)
    gamma: float = 0.1
    attack: AttackConfig = field(default_factory=AttackConfig)
    val_attack: AttackConfig = field(default_factory=AttackConfig)
    val_every: int = 1
    select: str = "robust"  # best checkpoint by validation accuracy: robust | clean | last (latest epoch)
    patience: int | None = None  # early stopping: stop after this many validations without a new best
    ema: float | None = None  # decay of an exponential moving average of the weights (e.g. 0.999); None: off
    amp: str = "off"  # mixed precision: off | bf16 | fp16 (fp16 uses loss scaling)
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    sync_bn: bool = False  # SyncBatchNorm under DistributedDataParallel
    deterministic: bool = False  # torch.use_deterministic_algorithms + cuDNN determinism
    tensorboard: bool = False  # also write TensorBoard event files (needs the tensorboard package)
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def checked(self, path: str = "") -> TrainConfig:
        """Value checks that types alone cannot express; what depends on the machine (the device, amp on
        it, sync_bn, tensorboard) is checked when training starts (training.loop.check_train_config)."""
        p = path or "train"
        _check_values(p, (
            ("epochs", self.epochs, self.epochs >= 1),
            ("batch_size", self.batch_size, self.batch_size >= 1),
            ("lr", self.lr, self.lr > 0),
            ("momentum", self.momentum, 0 <= self.momentum < 1),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0),
            ("val_every", self.val_every, self.val_every >= 1),
            ("patience", self.patience, self.patience is None or self.patience >= 1),
            ("ema", self.ema, self.ema is None or 0 < self.ema < 1),
        ))  # fmt: skip
        if self.beta is not None:
            _check_weight(self.beta, f"{p}.beta")
        _check_choice(f"{p}.schedule", self.schedule, SCHEDULES)
        if any(not 0 < m <= 1 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ConfigError(
                f"{p}.milestones must be increasing fractions of the epochs in (0, 1], got {list(self.milestones)}"
            )
        _check_choice(f"{p}.select", self.select, SELECTS)
        _check_choice(f"{p}.amp", self.amp, AMP_CHOICES)
        return self


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation protocol on the test split; `after_train` runs it when training ends."""

    protocol: str = "paper"
    n_examples: int | None = None  # seeded subset of the test set; None: all of it
    batch_size: int = 256
    seed: int = 0
    after_train: bool = False
    norm: str = "linf"  # threat model of the evaluation: linf, l2 or l1
    cascade: bool | None = None  # attacks only on still-robust examples; None: the protocol's choice
    sanity_full: bool | None = None  # also the costly sanity checks (S01-S04); None: the protocol's choice
    plot: bool = True  # write accuracy_vs_eps.png next to the report
    corruptions: tuple[str, ...] | None = None  # protocol corruptions: which ones; None: all 15
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)  # protocol corruptions: which severities

    def checked(self, path: str = "") -> EvalConfig:
        """Checked with the rest of the config, so that a bad value never costs a training run
        (eval.after_train); the protocol's name is checked by the command that runs it."""
        p = path or "eval"
        _check_values(p, (
            ("batch_size", self.batch_size, self.batch_size >= 1),
            ("n_examples", self.n_examples, self.n_examples is None or self.n_examples >= 1),
            ("norm", self.norm, self.norm in NORMS),
        ))  # fmt: skip
        check_corruptions(self.corruptions, self.severities, p)
        return self


# --- PSSR (owned by the PSSR feature; see src/advmend/defenses/pssr/)
@dataclass(frozen=True)
class PSSRConfig:
    """Pixel Surgery and Semantic Regeneration (docs/pssr.md); values are checked with
    the rest of the config (`checked`). `train` trains the classifier (when `classifier`
    is null); `epochs`, `batch_size`, `lr` and `attack` here train the regenerator."""

    enabled: bool = False
    classifier: str | None = None  # checkpoint of the protected classifier; None: train it first
    mask: str = "alpha"  # alpha: S >= alpha * mean(S) | ratio: the top-rho pixels
    alpha: float = 1.0
    rho: float = 0.2
    fill: float = 0.0
    surgery: bool = True  # false: the "without surgery" ablation
    mode: str = "full"  # full regeneration | hole (regenerate only the removed pixels)
    width: int = 32
    depth: int | None = None  # U-Net stages; None: from the image size (regenerator.auto_depth)
    dropout: float = 0.1
    residual: bool = False  # G predicts a correction of the surgical image (identity at initialisation)
    lambda_pix: float = 1.0
    lambda_pix_clean: float | None = None  # weight of the clean path's L_pix; None: lambda_pix
    lambda_sem: float = 1.0
    lambda_ce: float = 1.0  # weight of f's cross-entropy inside L_sem; 0: feature-guided only (HGD)
    lambda_feat: float = 1.0
    lambda_feat_clean: float | None = None  # weight of the clean path's feature loss; None: lambda_feat
    lambda_rd: float = 1.0
    rdrop: str = "cross"  # cross: adversarial vs clean path | literal: two dropout draws of the adversarial path
    threat: str = "graybox"  # training examples crafted on f (graybox) or on the whole pipeline (adaptive)
    attack: AttackConfig = field(default_factory=AttackConfig)
    epochs: int = 10
    pretrain_epochs: int = 0  # reconstruction pre-training of G (clean images, L_pix only) before `epochs`
    batch_size: int = 128
    lr: float = 1e-3
    finetune_classifier: bool = False
    surrogate: str | None = None  # checkpoint of an independent classifier for the transfer threat model

    def checked(self, path: str = "") -> PSSRConfig:
        p = path or "pssr"
        _check_choice(f"{p}.mask", self.mask, PSSR_MASKS)
        _check_choice(f"{p}.mode", self.mode, PSSR_MODES)
        _check_choice(f"{p}.rdrop", self.rdrop, PSSR_RDROP)
        _check_choice(f"{p}.threat", self.threat, PSSR_THREATS)
        _check_values(p, (
            ("alpha", self.alpha, self.alpha > 0),
            ("rho", self.rho, 0 <= self.rho <= 1),
            ("fill", self.fill, 0 <= self.fill <= 1),
            ("width", self.width, self.width >= 1),
            ("depth", self.depth, self.depth is None or self.depth >= 1),
            ("dropout", self.dropout, 0 <= self.dropout < 1),
            ("lambda_pix", self.lambda_pix, self.lambda_pix >= 0),
            ("lambda_pix_clean", self.lambda_pix_clean, self.lambda_pix_clean is None or self.lambda_pix_clean >= 0),
            ("lambda_sem", self.lambda_sem, self.lambda_sem >= 0),
            ("lambda_ce", self.lambda_ce, self.lambda_ce >= 0),
            ("lambda_feat", self.lambda_feat, self.lambda_feat >= 0),
            ("lambda_feat_clean", self.lambda_feat_clean, self.lambda_feat_clean is None or self.lambda_feat_clean >= 0),
            ("lambda_rd", self.lambda_rd, self.lambda_rd >= 0),
            ("epochs", self.epochs, self.epochs >= 1),
            ("pretrain_epochs", self.pretrain_epochs, self.pretrain_epochs >= 0),
            ("batch_size", self.batch_size, self.batch_size >= 1),
            ("lr", self.lr, self.lr > 0),
        ))  # fmt: skip
        if self.lambda_rd > 0 and self.dropout == 0 and self.rdrop == "literal":
            raise ConfigError(f"{p}.rdrop=literal compares two dropout draws: set {p}.dropout > 0 or {p}.lambda_rd=0")
        return self


@dataclass(frozen=True)
class RunConfig:
    """Everything one `advmend train` run needs; saved resolved with every checkpoint."""

    name: str = "run"
    out_dir: str | None = None  # None: runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    fsr: FSRConfig = field(default_factory=FSRConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pssr: PSSRConfig = field(default_factory=PSSRConfig)

    def checked(self, path: str = "") -> RunConfig:
        """What one section cannot check alone (each section checked itself as it was built)."""
        t = self.train
        if t.patience is not None and (t.select == "last" or self.data.val_size <= 0):
            raise ConfigError(
                "train.patience (early stopping) needs a validation split (data.val_size > 0) and "
                "train.select robust or clean"
            )
        return self


def check_config(cfg: Any) -> None:
    """Re-check a config dataclass built in Python (which skips from_dict) by the same rules as loading:
    types, finite numbers, int64 ranges, every section's values (`checked`), model options; a
    ConfigError naming the dotted key otherwise."""
    from_dict(type(cfg), to_dict(cfg))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-ready mapping of a config dataclass (tuples become lists); a field marked
    RECORDED_WHEN_SET is left out while it holds its default."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)
                    if not (f.metadata.get("recorded_when_set") and getattr(v, f.name) == f.default)}  # fmt: skip
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


Override = tuple[str, Any]  # a dotted key and its value, parsed


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true/false. YAML 1.1 also reads on/off/yes/no
    as booleans, so `train.amp: off` (a string setting) arrived as False and was refused."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str) -> Any:
    """Parse one YAML document (a config file, a saved config.yaml or a --set value) safely."""
    return yaml.load(text, Loader=_Yaml12Loader)


def parse_overrides(overrides: list[str], sections: tuple[str, ...] | None = None) -> list[Override]:
    """``key.sub=value`` strings as (key, value) pairs, values parsed as YAML scalars/lists. With
    `sections`, a key outside them (e.g. `train.lr` for `advmend eval`) is a ConfigError."""
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        if sections is not None and key.split(".")[0] not in sections:
            shown = " and ".join(f"{s}.*" for s in sections)
            raise ConfigError(f"override {item!r}: only {shown} settings can be changed here")
        try:
            value = parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        pairs.append((key, value))
    return pairs


def apply_overrides(data: dict[str, Any], overrides: Sequence[str | Override]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings, or (dotted key, value) pairs (a command's flags), in order to a
    raw mapping; the result is checked when it is built (`from_dict`)."""
    data = _deepcopy(data)
    for item in overrides:
        key, value = item if isinstance(item, tuple) else parse_overrides([item])[0]
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or bad YAML is a ConfigError naming the file."""
    p = check_input_path(path, "config file")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found (see `advmend list` for bundled configs)")
    try:
        data = parse_yaml(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:  # a binary file given as the config
        byte = f"byte {e.object[e.start]:#04x} at offset {e.start}"
        raise ConfigError(f"{p}: not a YAML text file (not UTF-8: {byte})") from None
    except OSError as e:  # a folder, no permission
        raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping, got {type(data).__name__}")
    return data


CONFIG_DIR = Path(__file__).parent / "configs"


# Bundled folders of specs for other commands (`advmend study`), not run configs.
_NOT_RUN_CONFIGS = ("study",)


def bundled_configs() -> list[str]:
    """Names of the run configs shipped with advmend (usable as `advmend train NAME`)."""
    names = (p.relative_to(CONFIG_DIR) for p in CONFIG_DIR.rglob("*.yaml"))
    return sorted(str(n.with_suffix("")) for n in names if n.parts[0] not in _NOT_RUN_CONFIGS)


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a bundled config such as `quickstart` or `cifar10/pgdat_resnet18`."""
    p = check_input_path(name_or_path, "config")
    if p.is_file():
        return p
    bundled = CONFIG_DIR / (name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if bundled.is_file():
        return bundled
    raise ConfigError(f"config {name_or_path!r} not found: give a YAML path or one of: {', '.join(bundled_configs())}")


def load_run_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from YAML (a path or bundled name), apply ``--set`` overrides, validate."""
    data = load_yaml(resolve_config_path(name_or_path))
    data = apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data)
