"""The training loop: the one place that owns `zero_grad`, `backward` and `step`.

`run_stage` trains a `training.stage.Stage` (what to train and how to judge it) into a folder; the
classifier (`train`, its stage built by `classifier_stage`) and PSSR's regenerator
(`training.pssr_loop.train_pssr`) are two stages of this one loop: the run folder, resume, records and
checkpoints (`training.run_folder`) are the same code for both; DDP, EMA, early stopping and TensorBoard apply to the
stages that have them (the classifier's).

Per epoch: a progress bar (train.progress), one log line, one JSONL record (losses, clean and PGD
accuracy on the held-out validation split, lr, seconds, images/s) and, with train.tensorboard, the
same scalars as TensorBoard events; checkpoints `last` and `best` (by `train.select`: robust or clean
validation accuracy, or the latest epoch; never the test set), written atomically.

At scale: mixed precision, channels_last and torch.compile (training/precision.py,
training/distributed.py), DistributedDataParallel under torchrun (rank 0 logs and writes), an EMA of
the weights used for validation and the best checkpoint (training/ema.py), early stopping after
`train.patience` validations without a new best, and exact resume: `last` holds the model,
optimizer, GradScaler, EMA, early-stopping counters and every rank's RNG states, and the schedule is
a pure function of (epoch, step), so `resume=True` after a kill continues as if never stopped
(bit-identical weights with train.deterministic).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from advmend.config import RunConfig, check_config, to_dict
from advmend.data import BatchLoader
from advmend.defenses.build import build_model
from advmend.errors import ConfigError
from advmend.evaluation.evaluate import evaluate
from advmend.models import describe_normalization
from advmend.training.build import (
    attack_threat,
    build_attack,
    build_data,
    build_objective,
    check_objective,
    resolve_device,
)
from advmend.training.distributed import (
    DistContext,
    env_context,
    init_distributed,
    shutdown_distributed,
    training_view,
)  # fmt: skip
from advmend.training.ema import ModelEMA
from advmend.training.precision import Precision, check_amp, to_channels_last
from advmend.training.run_folder import (  # noqa: F401  (LAST, BEST, prepare_out_dir, ...: where callers found them)
    BEST,
    LAST,
    RESUME_FREE_KEYS,
    append_metrics,
    check_resume_config,
    checkpoint_bytes,
    config_changes,
    open_run,
    prepare_out_dir,
    rng_tensors,
    save_or_explain,
    unchanged_except,
)
from advmend.training.schedule import Schedule, learning_rate
from advmend.training.stage import ClassifierOptions, Phase, Selection, Stage
from advmend.training.trainers import TRAINERS

# Model selection on the held-out validation split (never the test set): the metric of each choice.
SELECT = {"robust": "val_robust_acc", "clean": "val_clean_acc", "last": "epoch"}  # keys: config.SELECTS
TIE_KEY = "val_clean_acc"  # breaks a tie of the selection metric (select_best)
LATEST = Selection("epoch", "the latest epoch (no validation split)")  # with nothing to validate on


@dataclass
class TrainResult:
    out_dir: Path
    last: Path
    best: Path
    history: list[dict]
    stopped: dict | None = field(default=None)  # {"epoch", "reason"} when early stopping ended the run
    selection: str = ""  # how the best checkpoint was chosen, in words (Stage.selection.description)


def check_train_config(cfg: RunConfig, device: torch.device | None = None) -> None:
    """The config's value rules, by the step that loading runs (`config.check_config`: a RunConfig built
    in Python skips loading), then what depends on this machine: the device, amp on it, sync_bn,
    tensorboard."""
    check_config(cfg)
    t = cfg.train
    device = device if device is not None else resolve_device(t.device)
    check_amp(t.amp, device)
    if t.sync_bn and device.type != "cuda":
        raise ConfigError(
            "train.sync_bn=true needs CUDA devices (torch's SyncBatchNorm runs only on GPUs); set it false"
        )
    if t.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None


@contextlib.contextmanager
def _determinism(enabled: bool):
    """torch.use_deterministic_algorithms + cuDNN determinism for the run; restored afterwards."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)  # fmt: skip
    # cuBLAS is only deterministic with a fixed workspace (must be set before its first use).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]


@TRAINERS.register("none")
@TRAINERS.register("fsr")
def train(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train `cfg` into `out_dir`. Everything is built and checked before anything is written.

    Under torchrun (RANK / WORLD_SIZE set) this joins the process group, trains with DDP on the same
    global batch, and leaves it at the end; only rank 0 logs and writes files.
    """
    out_dir = Path(out_dir)
    ctx = env_context()
    device = resolve_device(cfg.train.device)
    check_train_config(cfg, device)
    check_objective(cfg)
    if cfg.train.batch_size % ctx.world_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} (the global batch) must be divisible by the "
            f"{ctx.world_size} processes"
        )
    owns_group = not torch.distributed.is_available() or not torch.distributed.is_initialized()
    device = init_distributed(ctx, device)
    try:
        with _determinism(cfg.train.deterministic):
            stage = classifier_stage(cfg, out_dir, ctx, device)
            return run_stage(stage, out_dir, resume=resume, log=log if ctx.is_main else (lambda s: None))
    finally:
        if owns_group:
            shutdown_distributed(ctx)


def classifier_stage(cfg: RunConfig, out_dir: Path, ctx: DistContext, device: torch.device) -> Stage:
    """The classifier's stage of `cfg`: its model (SyncBatchNorm, channels_last, the DDP / compile view),
    the objective of `train.method`, SGD on `train.*`'s schedule, EMA, and validation accuracy."""
    t = cfg.train
    torch.manual_seed(t.seed)
    data = build_data(cfg.data, need_test=False)
    info = data.info
    model = build_model(cfg, info["num_classes"], info["image_shape"]).to(device)
    if t.sync_bn and ctx.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    objective = build_objective(cfg, info["radii"])
    val_attack = build_attack(t.val_attack, info["radii"], keep_best=True, name=f"PGD-{t.val_attack.steps}")
    optimizer = torch.optim.SGD(
        model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.nesterov
    )
    # Each rank takes every world_size-th example of the shuffled order, batch_size / world_size at a
    # time: the union of the ranks' step-s batches is exactly the single-process step-s batch.
    assert data.train is not None  # built with need_train
    loader = BatchLoader(
        data.train, t.batch_size // ctx.world_size, shuffle=True, device=device, augment=info["augment"],
        drop_last=len(data.train) >= 2 * t.batch_size, seed=t.seed, rank=ctx.rank, world_size=ctx.world_size,
    )  # fmt: skip
    precision = Precision(t.amp, device)
    ema = ModelEMA(model, t.ema) if t.ema is not None else None
    view = training_view(model, ctx, device, compile=t.compile)
    validate, selection = None, LATEST  # without a validation split there is nothing to select on
    if data.val is not None:
        validate = lambda m: _validate(m, data.val, val_attack, cfg, device, ctx)  # noqa: E731
        selection = Selection(SELECT[t.select], f"{SELECT[t.select]} (train.select={t.select})")
    return Stage(
        name="epoch", config=cfg, model=model, view=view, phases=(Phase(objective, t.epochs),),
        optimizer=optimizer, schedule=Schedule.of(t), loader=loader, device=device, precision=precision,
        validate=validate, val_every=t.val_every, selection=selection,
        record={
            "num_classes": info["num_classes"],
            "image_shape": list(info["image_shape"]),
            # What the training attack really used (train.attack.eps, or the data set's radius when null):
            # evaluation reads it back as the checkpoint's threat model.
            **asdict(attack_threat(t.attack, info["radii"])),
            "world_size": ctx.world_size,
            "normalization": describe_normalization(model),  # its source; the values are sealed buffers too
        },
        check_resume=lambda record: check_resume_config(out_dir, record, cfg),
        checkpoint_bytes=checkpoint_bytes(model, optimizer, ema is not None), progress=t.progress,
        lr_key="train.lr", log_line=log_line,
        classifier=ClassifierOptions(out_dir_config=cfg, ctx=ctx, ema=ema, patience=t.patience,
                                     channels_last=t.channels_last, tensorboard=t.tensorboard),
    )  # fmt: skip


def run_stage(stage: Stage, out_dir: Path, *, resume: bool, log: Callable[[str], None]) -> TrainResult:
    """Train `stage` into `out_dir`: the one loop of both stages (see `training.stage` for why).

    The epochs: train, validate, log line and TensorBoard scalars, model selection, early stopping and
    the checkpoint record; what is kept on disk (the folder's checks, --resume, config.yaml,
    metrics.jsonl, the atomic `best` / `last` checkpoints) goes through `training.run_folder`. `log`
    is called on every rank (pass a silent one on ranks other than 0).
    """
    model, optimizer, precision, ctx = stage.model, stage.optimizer, stage.precision, stage.ctx
    state = open_run(stage, out_dir, resume=resume, log=log)
    start_epoch, best_value, history = state.start_epoch, state.best_value, state.history
    since_best, stopped, select_key = state.since_best, state.stopped, stage.selection.key
    options = stage.classifier  # early stopping, EMA and TensorBoard: the classifier's stage alone
    patience = options.patience if options is not None else None
    writer = None
    if options is not None and options.tensorboard and ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_epoch + 1)

    record_base = {"config": to_dict(stage.config), **stage.record}
    epochs = stage.epochs
    try:
        for epoch in range(start_epoch, epochs):
            if stopped:
                break
            rec = train_epoch(stage, epoch)
            ema = stage.ema
            if stage.validate is not None and ((epoch + 1) % stage.val_every == 0 or epoch + 1 == epochs):
                rec.update(stage.validate(ema.module if ema else model))
            label = stage.phase(epoch).label
            if label is not None:
                rec["stage"] = label
            history.append(rec)
            if ctx.is_main:
                append_metrics(out_dir, rec)
                if writer is not None:
                    for k, v in rec.items():
                        if k != "epoch" and isinstance(v, (int, float)):
                            writer.add_scalar(k, v, rec["epoch"])
                    writer.flush()
            log(stage.log_line(rec, epochs))
            is_best, best_value, best_epoch = select_best(history, select_key, best_value, stage.selection.goal)
            if patience is not None and rec.get(select_key) is not None:  # a validated epoch
                since_best = 0 if is_best else since_best + 1
                if since_best >= patience:
                    stopped = {"epoch": epoch + 1, "reason": f"early stopping: no new best {select_key} in "
                               f"{since_best} validations (train.patience={patience})"}  # fmt: skip
            record = dict(
                record_base, epoch=epoch + 1, metrics=rec,
                best={"epoch": best_epoch, "metric": select_key, "value": best_value},
                scaler=precision.state(),
            )  # fmt: skip
            if options is not None:  # PSSR's records have neither key
                record.update(
                    ema=None if ema is None else {"decay": ema.decay, "updates": ema.updates, "used_for_selection": True},
                    early_stopping={"patience": patience, "metric": select_key,
                                    "validations_since_best": since_best, "stopped": stopped},
                )  # fmt: skip
            extra = rng_tensors(stage)
            if ema is not None:
                extra.update(ema.state_tensors())
            if ctx.is_main:
                if is_best:  # with EMA, the averaged weights are what was validated and selected
                    save_or_explain(out_dir / BEST, ema.module if ema else model, record)
                save_or_explain(out_dir / LAST, model, record, optimizer, extra)
            ctx.barrier()  # nobody reads or moves on before rank 0 has written
            if stopped:
                log(f"stopped after epoch {stopped['epoch']}: {stopped['reason']}")
    finally:
        if writer is not None:
            writer.close()
    return TrainResult(out_dir, out_dir / LAST, out_dir / BEST, history, stopped, stage.selection.description)


def select_best(history: list[dict], select_key: str, best_value: float | None,
                goal: Callable[[dict], bool] | None = None) -> tuple[bool, float | None, int | None]:  # fmt: skip
    """Model selection after the epoch `history[-1]`: (is it the new best, best value, best epoch).

    Epochs without the selection metric (no validation that epoch) are not candidates. With a `goal`
    (a rule on the epoch record, e.g. PSSR's clean-accuracy goal), epochs that meet it rank above
    every epoch that does not, whatever their metric. A tie on the metric goes to the epoch with the
    higher validation clean accuracy (`TIE_KEY`), then to the earlier one. `best_value` (the
    checkpoint's, on resume) wins only when the history that reached it is gone.
    """
    validated = [h for h in history if h.get(select_key) is not None]
    if not validated:
        return False, best_value, None
    met = goal if goal is not None else (lambda h: True)
    best = max(validated, key=lambda h: (met(h), h[select_key], h.get(TIE_KEY, float("-inf")), -h["epoch"]))
    if best_value is not None and best_value > best[select_key] and goal is None:
        return False, best_value, None
    return best is history[-1], best[select_key], best["epoch"]


def _validate(model, val_data, attack, cfg: RunConfig, device, ctx: DistContext) -> dict:
    """Clean and PGD accuracy on the validation split, computed by rank 0 and shared with all ranks
    (so every rank takes the same early-stopping decision)."""
    vals = torch.zeros(3, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    if ctx.is_main:
        res = evaluate(model, val_data, [attack], batch_size=cfg.eval.batch_size, device=device)
        vals = torch.tensor([100 * res.clean_accuracy, 100 * res.worst_accuracy, round(res.seconds, 2)],
                            dtype=torch.float64, device=vals.device)  # fmt: skip
    clean, robust, seconds = ctx.broadcast(vals).tolist()
    return {"val_clean_acc": clean, "val_robust_acc": robust, "val_seconds": seconds}


def train_epoch(stage: Stage, epoch: int) -> dict:
    """One epoch of `stage` (its objective for `epoch`, on its loader): the only place that runs
    zero_grad, backward and step.

    The objective trains `stage.view` (the model, or its DDP/compile wrapper); the EMA follows
    `stage.model`, the unwrapped module. Sums stay on the device; the host syncs only for the progress
    bar every 20 steps. `stage.name` and `stage.lr_key` name the stage in the progress bar and errors.
    """
    view, model, optimizer, loader = stage.view, stage.model, stage.optimizer, stage.loader
    device, precision, ema, ctx = stage.device, stage.precision, stage.ema, stage.ctx
    objective = stage.phase(epoch).objective
    channels_last = stage.classifier is not None and stage.classifier.channels_last
    view.train()
    loader.set_epoch(epoch)
    sums: dict[str, torch.Tensor] = {}
    correct = torch.zeros((), device=device)
    seen = 0
    t0 = time.perf_counter()
    n_steps = len(loader)
    show = stage.progress and ctx.is_main
    bar = tqdm(loader, desc=f"{stage.name} {epoch + 1}/{stage.epochs}", disable=not show, leave=False)
    lr = learning_rate(stage.schedule, epoch, 0, n_steps)
    for step, (x, y) in enumerate(bar):
        x = to_channels_last(x, channels_last)
        lr = learning_rate(stage.schedule, epoch, step, n_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with precision.autocast():  # the attack and the loss pass both run in it
            out = objective(view, x, y)
        optimizer.zero_grad(set_to_none=True)
        precision.backward_and_step(out.loss, optimizer)
        if ema is not None:
            ema.update(model)
        n = x.shape[0]
        seen += n
        for k, v in {"loss": out.loss.detach(), **out.metrics}.items():
            sums[k] = sums.get(k, 0) + v.float() * n
        correct += (out.logits.detach().argmax(1) == y).sum()
        if step % 20 == 0 or step == n_steps - 1:
            loss_now = float(sums["loss"]) / seen
            if loss_now != loss_now or loss_now in (float("inf"), float("-inf")):
                raise FloatingPointError(
                    f"training loss became {loss_now} in epoch {epoch + 1}: lower {stage.lr_key} or check the data"
                )
            if show:
                bar.set_postfix(loss=f"{loss_now:.3f}", lr=f"{lr:.3g}")
    seconds = time.perf_counter() - t0
    # One all-reduce of every sum: epoch metrics over the global batch, identical on all ranks.
    keys = sorted(sums)
    packed = torch.stack(
        [sums[k].to(torch.float64) for k in keys]
        + [correct.to(torch.float64), torch.tensor(float(seen), dtype=torch.float64, device=device)]
    )
    values: list[float] = ctx.all_reduce_sum(packed).tolist()
    total = values[-1]
    rec: dict[str, float | int] = {"epoch": epoch + 1, "lr": lr}
    rec.update({k: v / total for k, v in zip(keys, values)})
    rec["train_acc"] = 100 * values[-2] / total
    rec["seconds"] = round(seconds, 2)
    rec["images_per_s"] = round(total / seconds, 1)
    return rec


def log_line(rec: dict, epochs: int) -> str:
    parts = [f"epoch {rec['epoch']}/{epochs}", f"loss {rec['loss']:.4f}", f"train acc {rec['train_acc']:.2f}%"]
    if "fsr_sep" in rec:
        parts.append(f"sep {rec['fsr_sep']:.3f} rec {rec['fsr_rec']:.3f}")
    if "val_clean_acc" in rec:
        parts.append(f"val clean {rec['val_clean_acc']:.2f}% val pgd {rec['val_robust_acc']:.2f}%")
    parts.append(f"lr {rec['lr']:.4g}  {rec['seconds']:.1f}s  {rec['images_per_s']:.0f} img/s")
    return " | ".join(parts)
