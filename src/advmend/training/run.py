"""A run of any defense: train it with the trainer its defense registered, then evaluate its best checkpoint.

`train_run` is what `advmend train`, `advmend.train` and the study runner call; the trainer comes from
`training.trainers.TRAINERS` under the name of the config's defense (`defenses.registry.defense_of`),
so no caller branches on the defense. The evaluation after training is the one evaluation of a
checkpoint (`evaluation.checkpoint_eval.evaluate_checkpoint`), with `prepare_evaluation` adding what
only training can provide (PSSR: its transfer surrogate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import advmend.training.loop  # noqa: F401  (registers the classifier's trainer)
import advmend.training.pssr_loop  # noqa: F401  (registers PSSR's trainer)
from advmend.attacks.presets import PROTOCOLS
from advmend.config import RunConfig
from advmend.defenses.registry import defense_meta, defense_of
from advmend.evaluation.checkpoint_eval import eval_dir, evaluate_checkpoint
from advmend.evaluation.load import load_trained_model
from advmend.training.build import build_data, resolve_device
from advmend.training.loop import TrainResult
from advmend.training.trainers import TRAINERS


def train_run(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False,
              log: Callable[[str], None] = print) -> TrainResult:  # fmt: skip
    """Train `cfg` into `out_dir` with the trainer of its defense (a classifier, FSR or PSSR)."""
    return TRAINERS.get(defense_of(cfg))(cfg, Path(out_dir), resume=resume, log=log)


def prepare_evaluation(cfg: RunConfig, checkpoint: str | Path | None, meta: dict, log=print) -> tuple[RunConfig, dict]:
    """(cfg, meta) ready for the evaluation of `checkpoint`: the defense's own preparation (PSSR: the
    transfer surrogate, `pssr_loop.with_transfer_surrogate`), or both unchanged."""
    prepare = TRAINERS.meta(defense_of(cfg)).get("prepare_evaluation")
    return prepare(cfg, checkpoint, meta, log=log) if prepare is not None else (cfg, meta)


def check_before_training(cfg: RunConfig) -> None:
    """With eval.after_train, fail on a bad protocol or a missing test split now, not after hours of
    training (a classifier's test split must also match its training split)."""
    if cfg.eval.after_train:
        PROTOCOLS.get(cfg.eval.protocol)
        build_data(cfg.data, need_train=defense_meta(cfg)["test_with_train_split"])


def evaluate_after_training(cfg: RunConfig, best: Path, out_dir: Path):
    """`advmend train`'s evaluation of the best checkpoint with eval.after_train (every defense):
    `evaluate_checkpoint` with the run's eval and data sections, into <out>/eval-[<defense>-]<protocol>/."""
    device = resolve_device(cfg.train.device)
    model, run_cfg, record = load_trained_model(best, device)
    run_cfg = replace(run_cfg, name=cfg.name, eval=cfg.eval, data=cfg.data)
    epoch = record["best"]["epoch"]
    meta = {"checkpoint": str(best), "best_epoch": epoch}
    heading = f"\n{cfg.name}: best checkpoint (epoch {epoch}), {cfg.eval.protocol} protocol, test set"
    return evaluate_checkpoint(model, run_cfg, record, out_dir=eval_dir(out_dir, run_cfg), device=device, meta=meta,
                               heading=heading, checkpoint=best, prepare=prepare_evaluation,
                               progress=cfg.train.progress, console_sanity=False)  # fmt: skip


def train_and_evaluate(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, main_rank: bool = True,
                       log: Callable[[str], None] = print) -> TrainResult:  # fmt: skip
    """`advmend train`: check what the evaluation after training needs, train, then (on the main rank,
    with eval.after_train) evaluate the best checkpoint on the test set."""
    out_dir = Path(out_dir)
    check_before_training(cfg)  # with eval.after_train: a bad protocol or missing test split fails now
    label = defense_meta(cfg)["label"]
    if main_rank:
        log(f"advmend train{f' ({label})' if label else ''}: {cfg.name} -> {out_dir}")
    result = train_run(cfg, out_dir, resume=resume, log=log)
    if not main_rank:
        return result
    log(f"checkpoints: {result.last} (last), {result.best} (best by {result.selection})")
    if cfg.eval.after_train:
        evaluate_after_training(cfg, result.best, out_dir)
    return result
