"""What one training stage is: the description `advmend.training.loop.run_stage` trains.

Why a description rather than a second loop: the classifier (`loop.train`) and PSSR's regenerator
(`pssr_loop.train_pssr`) differ in what they train and how they judge it (model, objective, optimizer,
schedule, validation, record fields, resume rules), never in how a run folder is kept. Describing
those differences as data lets one loop own the folder: out-dir checks, resume, config.yaml,
metrics.jsonl, model selection, atomic checkpoints, and exact resume for both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from advmend.config import RunConfig
from advmend.data import BatchLoader
from advmend.training.distributed import DistContext
from advmend.training.ema import ModelEMA
from advmend.training.precision import Precision
from advmend.training.schedule import Schedule


@dataclass(frozen=True)
class Phase:
    """`epochs` consecutive epochs trained with one objective; a `label` is recorded as the epochs' "stage"
    in metrics.jsonl (PSSR: "pretrain", then "adversarial"; the classifier's one phase has none)."""

    objective: Callable
    epochs: int
    label: str | None = None


@dataclass(frozen=True)
class Selection:
    """How a stage's best checkpoint is chosen.

    Attributes:
        key: the metric the best checkpoint maximises (a key of the epoch record); "epoch" when there
            is nothing to validate on (the best is then the latest epoch).
        description: the choice in words, for the log and the command's output.
        goal: a rule on the epoch record; epochs that meet it rank above those that do not
            (`loop.select_best`), or None. PSSR's: its clean accuracy within a few points of the
            classifier's alone.
    """

    key: str
    description: str
    goal: Callable[[dict], bool] | None = None


@dataclass
class ClassifierOptions:
    """What only the classifier's stage has: training at scale and a folder of its own.

    Attributes:
        ctx: the distributed context: its checkpoints hold every rank's RNG states (rng.rank<r>.<generator>;
            a stage without these options runs on one process and keeps rng.<generator>).
        ema: the weight average, validated and kept as `best` (None: off).
        patience: early stopping after this many validations without a new best (None: off). Its
            checkpoint records carry "ema" and "early_stopping" (None when off); PSSR's have neither.
        channels_last, tensorboard: the memory layout of its batches and its TensorBoard events.
        out_dir_config: a new run may start over in a folder that holds only what a run of this config
            writes before its first checkpoint (`run_folder.prepare_out_dir`); PSSR's folder also holds
            its classifier's run, so it has no such rule.
    """

    out_dir_config: RunConfig
    ctx: DistContext = field(default_factory=DistContext)
    ema: ModelEMA | None = None
    patience: int | None = None
    channels_last: bool = False
    tensorboard: bool = False


@dataclass
class Stage:
    """One stage of training, as `run_stage` trains it (see the module docstring for why). Its fields are
    what both stages have; what only the classifier's has is grouped in `classifier`.

    Attributes:
        name: names the epochs in the progress bar ("epoch", "pssr epoch").
        config: the run's config: config.yaml and every checkpoint record's "config".
        model: the unwrapped module: checkpointed, averaged (EMA), validated.
        view: what the objective trains: `model`, or its DDP / torch.compile wrapper.
        phases: the objectives, in epoch order; the stage trains sum(phase.epochs) epochs in one counter.
        optimizer, schedule: the optimizer and its learning rate, a pure function of (epoch, step).
        loader: the training batches (re-seeded per epoch, so resume needs no loader state).
        device, precision: where and in which precision (train.amp) the steps run.
        validate: the val_* metrics of a module (the EMA copy when there is one), or None: nothing to
            validate on (then `selection` is the latest epoch).
        val_every: validate every this many epochs, and after the last.
        selection: how the best checkpoint is chosen (`Selection`).
        record: the stage's own checkpoint record fields (num_classes, image_shape, threat model, ...).
        check_resume: called with the record of the `last` checkpoint being resumed; raises when the
            run cannot continue with this stage, else returns the config the continued run records when
            it differs from the run's (then config.yaml is rewritten), or None.
        checkpoint_bytes: the size of one `last` checkpoint, for the disk-space check.
        progress: whether a progress bar is shown.
        lr_key: the setting a non-finite loss error tells the user to lower.
        log_line: an epoch's log line from its record and the stage's epoch count.
        classifier: what only the classifier's stage has (`ClassifierOptions`), None for PSSR's.
    """

    name: str
    config: RunConfig
    model: nn.Module
    view: nn.Module
    phases: tuple[Phase, ...]
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    loader: BatchLoader
    device: torch.device
    precision: Precision
    validate: Callable[[nn.Module], dict] | None
    val_every: int
    selection: Selection
    record: dict
    check_resume: Callable[[dict], dict | None]
    checkpoint_bytes: int
    progress: bool
    lr_key: str
    log_line: Callable[[dict, int], str]
    classifier: ClassifierOptions | None = None

    @property
    def ctx(self) -> DistContext:
        """The distributed context: the classifier's, else one process."""
        return self.classifier.ctx if self.classifier is not None else DistContext()

    @property
    def ema(self) -> ModelEMA | None:
        return self.classifier.ema if self.classifier is not None else None

    @property
    def epochs(self) -> int:
        return sum(p.epochs for p in self.phases)

    def phase(self, epoch: int) -> Phase:
        """The phase that trains `epoch` (0-based)."""
        for p in self.phases:
            if epoch < p.epochs:
                return p
            epoch -= p.epochs
        return self.phases[-1]
