"""Training curves from a run folder's metrics.jsonl: loss and clean / robust validation accuracy per epoch."""

from __future__ import annotations

import json
from pathlib import Path

from advmend.errors import InputError
from advmend.plotting import pyplot, save_png


def read_history(path: Path, upto_epoch: int | None = None) -> list[dict]:
    """The epoch records of a metrics.jsonl (up to `upto_epoch`); a line cut short by a kill is skipped."""
    history = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "epoch" in rec and (upto_epoch is None or rec["epoch"] <= upto_epoch):
            history.append(rec)
    return history


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-epoch records of `run_dir/metrics.jsonl`, for plotting."""
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise InputError(f"run folder {run_dir} not found")
    if not path.is_file():
        raise InputError(f"{run_dir} has no metrics.jsonl: is it an `advmend train` output folder?")
    records = read_history(path)
    if not records:
        raise InputError(f"{path} holds no epoch records yet: train at least one epoch first")
    return records


def plot_curves(records: list[dict], out: str | Path, title: str = "") -> Path:
    """Two panels, written to the PNG `out`: training losses, and train / clean / robust accuracy."""
    plt = pyplot("advmend plot")
    out = Path(out)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [r["epoch"] for r in records]
    for key, label in (
        ("loss", "training loss"),
        ("ce", "cross-entropy"),
        ("fsr_sep", "FSR L_sep"),
        ("fsr_rec", "FSR L_rec"),
    ):
        if any(key in r for r in records) and not (key == "ce" and all(r.get("ce") == r.get("loss") for r in records)):
            pts = [(r["epoch"], r[key]) for r in records if key in r]
            ax_loss.plot(*zip(*pts), marker="o", ms=3, label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    for key, label in (("train_acc", "train (adversarial batches)"), ("val_clean_acc", "validation clean"),
                       ("val_robust_acc", "validation PGD")):  # fmt: skip
        pts = [(r["epoch"], r[key]) for r in records if key in r]
        if pts:
            ax_acc.plot(*zip(*pts), marker="o", ms=3, label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, out)
