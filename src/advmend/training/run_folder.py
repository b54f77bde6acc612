"""The run folder of a training stage: its checks, resume, config.yaml, metrics.jsonl and checkpoints.

`training.loop.run_stage` trains the epochs; everything it keeps on disk goes through here: the
disk-space and out-dir checks before anything is written (`prepare_out_dir`), the state of a resumed
run (`open_run`: weights, optimizer, GradScaler, EMA, RNG states, early-stopping counters, history),
the resume rules (`unchanged_except`, `check_resume_config`), the per-epoch metrics line
(`append_metrics`) and the atomic `best` / `last` checkpoints (`save_or_explain`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from torch import nn

from advmend.checkpoint import load_checkpoint, save_checkpoint
from advmend.config import RunConfig, from_dict, parse_yaml, to_dict
from advmend.errors import CheckpointError, ConfigError
from advmend.io import atomic_write_text, existing_ancestor, stale_temp_files
from advmend.training.curves import read_history
from advmend.training.distributed import DistContext
from advmend.training.ema import ModelEMA
from advmend.training.rng import restore_rng_state, rng_state_tensors
from advmend.training.stage import Stage

LAST, BEST = "last.safetensors", "best.safetensors"
# Free space wanted before training: best + last + the temporary copy during an atomic rewrite.
DISK_FACTOR = 3
# Settings that may differ when a run is resumed, because they do not change what it computes: where it
# is written, where and how visibly it runs, and whether the test-set evaluation follows training.
# Every other key must equal the run's (its last checkpoint's record), or --resume is an error.
RESUME_FREE_KEYS = ("out_dir", "train.device", "train.progress", "train.tensorboard", "eval.after_train")
# What a run folder holds before its first checkpoint: a run killed then may be started over.
STARTED_RUN_FILES = ("config.yaml", "metrics.jsonl", "tensorboard")


@dataclass
class RunState:
    """Where a stage's epochs start: after `start_epoch`, with the history, best value and
    early-stopping counters of the run so far (all empty for a new run)."""

    start_epoch: int = 0
    best_value: float | None = None
    history: list[dict] = field(default_factory=list)
    since_best: int = 0
    stopped: dict | None = None


def open_run(stage: Stage, out_dir: Path, *, resume: bool, log: Callable[[str], None]) -> RunState:
    """Check and create the run folder, restore a resumed run's state into `stage`, write config.yaml and
    metrics.jsonl (rank 0); returns where the epochs start."""
    model, optimizer, precision, ctx, device = stage.model, stage.optimizer, stage.precision, stage.ctx, stage.device
    check_disk_space(out_dir, stage.checkpoint_bytes)
    options = stage.classifier
    prepare_out_dir(out_dir, resume, ctx.rank, cfg=options.out_dir_config if options is not None else None)
    if ctx.is_main:
        remove_stale_temp_files(out_dir, log)
    ctx.barrier()

    start_epoch, best_value, history, since_best, stopped = 0, None, [], 0, None
    # config.yaml describes the run's checkpoints: written when a run starts, and on resume only when
    # missing or when the stage's resume check returns a changed config (e.g. train.epochs changed to
    # continue the run: the new checkpoints record it too).
    run_config: dict[str, Any] | None = to_dict(stage.config)
    if resume:
        state, record = load_checkpoint(out_dir / LAST)
        changed = stage.check_resume(record)
        if changed is not None:
            run_config = changed
        elif (out_dir / "config.yaml").is_file():
            run_config = None  # never rewritten: it already describes the checkpoints
        else:
            run_config = record["config"]
        model.load_state_dict(state)
        optimizer.load_state_dict(record["optimizer_state"])
        extra = record.get("extra_tensors", {})
        precision.load_state(record.get("scaler"))
        if options is not None and options.ema is not None:
            if any(k.startswith("ema.") for k in extra):
                options.ema.load_state_tensors(extra, (record.get("ema") or {}).get("updates", 0))
            else:
                options.ema = ModelEMA(model, options.ema.decay)
                log("--resume: the checkpoint has no EMA; the average restarts from the current weights")
        prefix = f"rng.rank{ctx.rank}." if options is not None else "rng."
        rng = {k[len(prefix) :]: v for k, v in extra.items() if k.startswith(prefix)}
        if rng:
            restore_rng_state(rng, device)
        else:
            log("--resume: no RNG state for this rank in the checkpoint; the run continues, but not bit-exactly")
        start_epoch, best_value = record["epoch"], record["best"]["value"]
        early = record.get("early_stopping") or {}
        since_best, stopped = early.get("validations_since_best", 0), early.get("stopped")
        history = read_history(out_dir / "metrics.jsonl", start_epoch)
        log(f"resuming {out_dir} after epoch {start_epoch}")
    if ctx.is_main:
        if run_config is not None:
            atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(run_config, sort_keys=False))
        atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    return RunState(start_epoch, best_value, history, since_best, stopped)


def append_metrics(out_dir: Path, rec: dict) -> None:
    """One epoch's record as a line of metrics.jsonl."""
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def rng_tensors(stage: Stage) -> dict[str, torch.Tensor]:
    """The RNG states a `last` checkpoint holds: every rank's for the classifier's stage (it may run on
    several), else this process's (`ClassifierOptions.ctx`)."""
    return _gather_rng(stage.ctx, stage.device) if stage.classifier is not None else _rng(stage.device)


def checkpoint_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, ema: bool) -> int:
    """Bytes of one `last` checkpoint: weights and buffers, one optimizer slot per parameter (SGD
    momentum) and the EMA copy; the JSON record is small next to them."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    slots = 1 if any(g.get("momentum", 0) for g in optimizer.param_groups) else 0
    return weights + slots * params + (weights if ema else 0)


def check_disk_space(out_dir: Path, need: int) -> None:
    """ConfigError, before training, when the output filesystem cannot hold the checkpoints."""
    free = shutil.disk_usage(existing_ancestor(out_dir)).free
    if free < DISK_FACTOR * need:
        raise ConfigError(
            f"not enough disk space for checkpoints in {out_dir}: {free / 2**20:.1f} MiB free, "
            f"need about {DISK_FACTOR * need / 2**20:.1f} MiB ({DISK_FACTOR} x {need / 2**20:.1f} MiB); "
            "free some space or choose another --out"
        )


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, cfg: RunConfig) -> dict[str, tuple[object, object]]:
    """{dotted key: (the run's value, `cfg`'s value)} for every key outside RESUME_FREE_KEYS that differs.

    `saved` (a checkpoint record's config, or a config.yaml) is resolved as a RunConfig first, so keys
    it lacks compare as their defaults.
    """
    plain = lambda c: json.loads(json.dumps(to_dict(c), default=str))  # noqa: E731  (tuples vs lists)
    old, new = _flat(plain(from_dict(RunConfig, saved))), _flat(plain(cfg))
    missing = "<absent>"
    return {
        k: (old.get(k, missing), new.get(k, missing))
        for k in sorted(old.keys() | new.keys())
        if k not in RESUME_FREE_KEYS and old.get(k, missing) != new.get(k, missing)
    }


def _describe_changes(changes: dict[str, tuple[object, object]]) -> str:
    return ", ".join(f"{k} ({a!r} in the run, {b!r} now)" for k, (a, b) in changes.items())


def _is_started_run_of(out_dir: Path, entries: list[Path], cfg: RunConfig) -> bool:
    """Whether `out_dir` holds only what a run of `cfg` writes before its first checkpoint."""
    if not all(p.name in STARTED_RUN_FILES for p in entries) or not (out_dir / "config.yaml").is_file():
        return False
    try:
        saved = parse_yaml((out_dir / "config.yaml").read_text())
        return isinstance(saved, dict) and not config_changes(saved, cfg)
    except (OSError, yaml.YAMLError, ValueError, TypeError):
        return False


def prepare_out_dir(out_dir: Path, resume: bool, rank: int = 0, *, cfg: RunConfig | None = None) -> None:
    """Check the run folder before anything is written, create it, and check it is writable.

    With `cfg` (a new run of that config, `resume` false) the folder must be absent, empty, or hold only
    what a run of the same config wrote before being killed ahead of its first checkpoint: any other
    content (e.g. a best.safetensors without last.safetensors) is never overwritten.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output path {out_dir} exists and is not a folder")
    if not resume and (out_dir / LAST).exists():
        raise ConfigError(f"{out_dir} already holds a run: pass --resume to continue it, or choose another --out")
    if resume and not (out_dir / LAST).exists():
        hint = ""
        if (out_dir / "config.yaml").is_file() and not (out_dir / BEST).exists():
            hint = " (the run there wrote no checkpoint yet: run again without --resume to start it over)"
        raise CheckpointError(f"--resume: no {LAST} in {out_dir} to resume from{hint}")
    if cfg is not None and not resume and out_dir.is_dir():
        # Leftovers of this or another rank's atomic writes and write probes are not run content.
        ignore = set(stale_temp_files(out_dir))
        entries = [p for p in out_dir.iterdir() if p not in ignore and not p.name.startswith(".advmend-write-test-")]
        if entries and not _is_started_run_of(out_dir, entries, cfg):
            names = ", ".join(sorted(p.name for p in entries)[:5]) + (", ..." if len(entries) > 5 else "")
            raise ConfigError(
                f"{out_dir} is not empty ({names}) and holds no run to resume (no {LAST}); refusing to "
                "overwrite it: use --resume only on a run folder, choose another --out, or delete the folder"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    probe = out_dir / f".advmend-write-test-{rank}-{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output folder {out_dir} is not writable ({e.strerror}); choose another --out") from None


def unchanged_except(out_dir: Path, record: dict, cfg: RunConfig, may_change: tuple[str, ...]) -> dict[str, tuple]:
    """The rule of every resumed stage: ConfigError naming each dotted key (other than `may_change` and
    RESUME_FREE_KEYS) where `cfg` differs from the run's recorded config; returns the changes among
    `may_change` as {key: (in the run, now)}, for the stage to judge."""
    try:
        changes = config_changes(record["config"], cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"--resume: {out_dir / LAST} records a config this advmend cannot read ({e})") from None
    allowed = {k: changes.pop(k) for k in may_change if k in changes}
    if changes:
        raise ConfigError(
            f"--resume: the config differs from the run in {out_dir} at {_describe_changes(changes)}; resume "
            "with the run's settings (its config.yaml), or start a new run with another --out"
        )
    return allowed


def check_resume_config(out_dir: Path, record: dict, cfg: RunConfig) -> dict | None:
    """ConfigError naming every dotted key where `cfg` differs from the run being resumed.

    `train.epochs` may change to continue a run further (or end it sooner), as long as epochs remain to
    be trained: otherwise nothing would be trained and the changed value would describe no checkpoint.
    Returns the run's config (as recorded) with the new train.epochs when it changed, else None.
    """
    epochs = unchanged_except(out_dir, record, cfg, ("train.epochs",)).get("train.epochs")
    if epochs is None:
        return None
    done, stopped = record["epoch"], (record.get("early_stopping") or {}).get("stopped")
    if stopped or cfg.train.epochs <= done:
        why = f"stopped early after epoch {stopped['epoch']}" if stopped else f"has already trained {done} epochs"
        raise ConfigError(
            f"--resume: train.epochs={cfg.train.epochs} ({epochs[0]} in the run), but the run in {out_dir} {why}: "
            "nothing would be trained; keep train.epochs as it was, or start a new run with another --out"
        )
    return dict(record["config"], train=dict(record["config"]["train"], epochs=cfg.train.epochs))


def remove_stale_temp_files(out_dir: Path, log: Callable[[str], None]) -> None:
    """Delete the temporary files a kill during an atomic write left in `out_dir` (never loaded)."""
    for tmp in stale_temp_files(out_dir):
        tmp.unlink(missing_ok=True)
        log(f"removed {tmp.name}, an incomplete write from an interrupted run")


def save_or_explain(path: Path, model: nn.Module, record: dict, optimizer=None, extra=None) -> None:
    """save_checkpoint, with a full disk or a permission problem turned into one CheckpointError line.

    safetensors reports its own write failures (a full disk among them) as SafetensorError, not OSError.
    Either way nothing was renamed: the previous checkpoint and its sidecar are intact, temp files gone.
    """
    try:
        save_checkpoint(path, model, record, optimizer, extra_tensors=extra)
    except (OSError, SafetensorError) as e:
        why = (e.strerror if isinstance(e, OSError) else None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"could not write {path} ({why[:200]}); the previous checkpoint is intact: "
            "free disk space or fix permissions, then rerun with --resume"
        ) from None


def _gather_rng(ctx: DistContext, device: torch.device) -> dict[str, torch.Tensor]:
    """Every rank's RNG states (all ranks must call this), named rng.rank<r>.<generator>."""
    out = {}
    for name, state in rng_state_tensors(device).items():
        comm_device = device if device.type == "cuda" else torch.device("cpu")  # nccl gathers on the GPU
        for r, s in enumerate(ctx.all_gather(state.to(comm_device))):
            out[f"rng.rank{r}.{name}"] = s.cpu()
    return out


def _rng(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states, named rng.<generator> (a single-process stage: PSSR's)."""
    return {f"rng.{k}": v for k, v in rng_state_tensors(device).items()}
