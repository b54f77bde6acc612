"""The training loop: the one place that owns `train()`, `zero_grad`, `backward` and `step`.

Per epoch: a progress bar, one log line and one JSONL record (losses, clean and PGD accuracy on the
held-out validation split, lr, seconds, images/s); checkpoints `last` and `best` (by `train.select`:
robust or clean validation accuracy, or the latest epoch; never the test set), written atomically;
`resume=True` continues from `last`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from tqdm.auto import tqdm

from advmend.config import RunConfig, to_dict
from advmend.data import BatchLoader
from advmend.errors import CheckpointError, ConfigError
from advmend.evaluation.evaluate import evaluate
from advmend.training.build import build_attack, build_data, build_model, build_objective, resolve_device
from advmend.training.checkpoint import load_checkpoint, save_checkpoint
from advmend.training.schedule import check_schedule, learning_rate

LAST, BEST = "last.safetensors", "best.safetensors"
# Model selection on the held-out validation split (never the test set): the metric of each choice.
SELECT = {"robust": "val_robust_acc", "clean": "val_clean_acc", "last": "epoch"}


@dataclass
class TrainResult:
    out_dir: Path
    last: Path
    best: Path
    history: list[dict]


def check_train_config(cfg: RunConfig) -> None:
    """Value checks that types alone cannot express, each naming its dotted key."""
    t = cfg.train
    for key, value, ok in (
        ("train.epochs", t.epochs, t.epochs >= 1),
        ("train.batch_size", t.batch_size, t.batch_size >= 1),
        ("train.lr", t.lr, t.lr > 0),
        ("train.momentum", t.momentum, 0 <= t.momentum < 1),
        ("train.weight_decay", t.weight_decay, t.weight_decay >= 0),
        ("train.val_every", t.val_every, t.val_every >= 1),
        ("eval.batch_size", cfg.eval.batch_size, cfg.eval.batch_size >= 1),
    ):
        if not ok:
            raise ConfigError(f"{key}: invalid value {value!r}")
    check_schedule(t)
    if t.select not in SELECT:
        raise ConfigError(f"train.select must be one of {tuple(SELECT)}, got {t.select!r}")


def _prepare_out_dir(out_dir: Path, resume: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output path {out_dir} exists and is not a folder")
    if not resume and (out_dir / LAST).exists():
        raise ConfigError(f"{out_dir} already holds a run: pass --resume to continue it, or choose another --out")
    if resume and not (out_dir / LAST).exists():
        raise CheckpointError(f"--resume: no {LAST} in {out_dir} to resume from")
    out_dir.mkdir(parents=True, exist_ok=True)
    probe = out_dir / ".advmend-write-test"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output folder {out_dir} is not writable ({e.strerror}); choose another --out") from None


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train `cfg` into `out_dir`. Everything is built and checked before anything is written."""
    out_dir = Path(out_dir)
    check_train_config(cfg)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg.data, need_test=False)
    info = data.info
    model = build_model(cfg, info["num_classes"], info["image_shape"]).to(device)
    objective = build_objective(cfg, info["eps"])
    val_attack = build_attack(cfg.train.val_attack, info["eps"], keep_best=True, name=f"PGD-{cfg.train.val_attack.steps}")
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=cfg.train.lr,
        momentum=cfg.train.momentum,
        weight_decay=cfg.train.weight_decay,
        nesterov=cfg.train.nesterov,
    )
    loader = BatchLoader(
        data.train, cfg.train.batch_size, shuffle=True, device=device, augment=info["augment"],
        drop_last=len(data.train) >= 2 * cfg.train.batch_size, seed=cfg.train.seed,
    )  # fmt: skip
    _prepare_out_dir(out_dir, resume)

    start_epoch, best_value, history = 0, None, []
    # Without a validation split there is nothing to select on: best is the latest epoch.
    select_key = SELECT[cfg.train.select] if data.val is not None else "epoch"
    if resume:
        state, record = load_checkpoint(out_dir / LAST)
        if record["config"]["model"] != to_dict(cfg)["model"] or record["config"]["fsr"] != to_dict(cfg)["fsr"]:
            raise ConfigError(f"--resume: the model or fsr section differs from the run in {out_dir}")
        model.load_state_dict(state)
        optimizer.load_state_dict(record["optimizer_state"])
        start_epoch, best_value = record["epoch"], record["best"]["value"]
        metrics = out_dir / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        history = [h for h in (json.loads(line) for line in lines if line.strip()) if h["epoch"] <= start_epoch]
        log(f"resuming {out_dir} after epoch {start_epoch}")
    (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))

    record_base = {
        "config": to_dict(cfg),
        "num_classes": info["num_classes"],
        "image_shape": list(info["image_shape"]),
        "eps": info["eps"],
    }
    for epoch in range(start_epoch, cfg.train.epochs):
        rec = _train_epoch(model, objective, optimizer, loader, cfg, epoch, device)
        if data.val is not None and ((epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs):
            val = evaluate(model, data.val, [val_attack], batch_size=cfg.eval.batch_size, device=device)
            rec["val_clean_acc"] = 100 * val.clean_accuracy
            rec["val_robust_acc"] = 100 * val.worst_accuracy
            rec["val_seconds"] = round(val.seconds, 2)
        history.append(rec)
        with open(out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        log(_log_line(rec, cfg.train.epochs))
        value = rec.get(select_key)  # None on epochs without validation: not a candidate
        is_best = value is not None and (best_value is None or value > best_value)
        if is_best:
            best_value = value
        best_epoch = next((h["epoch"] for h in history if h.get(select_key) == best_value), None)
        record = dict(record_base, epoch=epoch + 1, metrics=rec,
                      best={"epoch": best_epoch, "metric": select_key, "value": best_value})  # fmt: skip
        if is_best:
            save_checkpoint(out_dir / BEST, model, record)
        save_checkpoint(out_dir / LAST, model, record, optimizer)
    return TrainResult(out_dir, out_dir / LAST, out_dir / BEST, history)


def _train_epoch(model, objective, optimizer, loader, cfg: RunConfig, epoch: int, device) -> dict:
    """One epoch. Sums stay on the device; the host syncs only for the progress bar every 20 steps."""
    model.train()
    loader.set_epoch(epoch)
    sums: dict[str, torch.Tensor] = {}
    correct = torch.zeros((), device=device)
    seen = 0
    t0 = time.perf_counter()
    n_steps = len(loader)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not cfg.train.progress, leave=False)
    for step, (x, y) in enumerate(bar):
        lr = learning_rate(cfg.train, epoch, step, n_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        out = objective(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        n = x.shape[0]
        seen += n
        for k, v in {"loss": out.loss.detach(), **out.metrics}.items():
            sums[k] = sums.get(k, 0) + v * n
        correct += (out.logits.detach().argmax(1) == y).sum()
        if step % 20 == 0 or step == n_steps - 1:
            loss_now = float(sums["loss"]) / seen
            if loss_now != loss_now or loss_now in (float("inf"), float("-inf")):
                raise FloatingPointError(
                    f"training loss became {loss_now} in epoch {epoch + 1}: lower train.lr or check the data"
                )
            bar.set_postfix(loss=f"{loss_now:.3f}", lr=f"{lr:.3g}")
    seconds = time.perf_counter() - t0
    rec = {"epoch": epoch + 1, "lr": lr}
    rec.update({k: float(v) / seen for k, v in sums.items()})
    rec["train_acc"] = 100 * float(correct) / seen
    rec["seconds"] = round(seconds, 2)
    rec["images_per_s"] = round(seen / seconds, 1)
    return rec


def _log_line(rec: dict, epochs: int) -> str:
    parts = [f"epoch {rec['epoch']}/{epochs}", f"loss {rec['loss']:.4f}", f"train acc {rec['train_acc']:.2f}%"]
    if "fsr_sep" in rec:
        parts.append(f"sep {rec['fsr_sep']:.3f} rec {rec['fsr_rec']:.3f}")
    if "val_clean_acc" in rec:
        parts.append(f"val clean {rec['val_clean_acc']:.2f}% val pgd {rec['val_robust_acc']:.2f}%")
    parts.append(f"lr {rec['lr']:.4g}  {rec['seconds']:.1f}s  {rec['images_per_s']:.0f} img/s")
    return " | ".join(parts)
