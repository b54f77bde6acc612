"""Protocol `corruptions`: accuracy under the 15 common corruptions at 5 severities (Hendrycks &
Dietterich 2019), reported as RobustBench's corruptions track reports it: the mean corruption
accuracy over every (corruption, severity), a corruption x severity table and a picture of one
example per corruption.

The corrupted copies of the evaluation subset are seeded (`eval.seed`) and cached on disk (under
``$ADVMEND_CACHE``, default ``~/.cache/advmend``, keyed by the images' hash, corruption, severity,
seed and the implementation's version), so evaluating a second model reuses them. Each copy is
scored by `evaluate` with no attack: the clean-accuracy path of every other protocol.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from advmend.data import ArrayDataset, ImageFolder
from advmend.data.arrays import ImageDataset
from advmend.data.corruptions import SEVERITIES, corrupt, corruption_names, ndimage
from advmend.errors import ConfigError
from advmend.evaluation.evaluate import EvalResult, evaluate
from advmend.io import atomic_write_bytes
from advmend.plotting import pyplot, save_png

# Part of every cache key: bump it when a corruption's output changes, so no stale copy is reused.
IMPLEMENTATION = "advmend-cifar10c-1"
PARAMETERS = "CIFAR-10-C (github.com/hendrycks/robustness, ImageNet-C/create_c/make_cifar_c.py)"
PICTURE = "corruption_examples.png"


@dataclass
class CorruptionResult:
    """Accuracy (percent) per corruption and severity on the same examples as `clean`."""

    clean: EvalResult
    accuracy: dict[str, dict[int, float]] = field(default_factory=dict)
    seconds: float = 0.0
    cache: dict[str, int] = field(default_factory=lambda: {"hits": 0, "misses": 0})
    notes: list[str] = field(default_factory=list)

    @property
    def mean_accuracy(self) -> float:
        """Mean corruption accuracy: the mean over every evaluated (corruption, severity)."""
        values = [a for row in self.accuracy.values() for a in row.values()]
        return float(np.mean(values)) if values else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean_corruption_accuracy": self.mean_accuracy,
            "clean_accuracy": 100 * self.clean.clean_accuracy,
            "accuracy": {name: {str(s): a for s, a in row.items()} for name, row in self.accuracy.items()},
            "per_corruption_mean": {name: float(np.mean(list(row.values()))) for name, row in self.accuracy.items()},
            "parameters": PARAMETERS,
            "implementation": IMPLEMENTATION,
            "cache": dict(self.cache),
            "seconds": round(self.seconds, 3),
            **({"notes": list(self.notes)} if self.notes else {}),
        }

    def markdown(self) -> str:
        severities = sorted({s for row in self.accuracy.values() for s in row})
        lines = ["## Common corruptions", "",
                 f"Mean corruption accuracy: **{self.mean_accuracy:.2f} %** over {len(self.accuracy)} corruptions "
                 f"x {len(severities)} severities (clean: {100 * self.clean.clean_accuracy:.2f} %, "
                 f"{self.clean.n} examples).", "",
                 "| corruption | " + " | ".join(f"severity {s}" for s in severities) + " | mean |",
                 "|---|" + "---|" * (len(severities) + 1)]  # fmt: skip
        for name, row in self.accuracy.items():
            cells = " | ".join(f"{row[s]:.2f}" for s in severities)
            lines.append(f"| {name} | {cells} | {np.mean(list(row.values())):.2f} |")
        lines += ["", f"Parameters: {PARAMETERS}; frost uses a procedural texture, not the original's photographs "
                      "(docs/corruptions.md)."]  # fmt: skip
        return "\n".join(lines) + "\n"

    def console(self) -> str:
        severities = sorted({s for row in self.accuracy.values() for s in row})
        head = f"{'corruption':<18}" + "".join(f"{'s' + str(s):>8}" for s in severities) + f"{'mean':>8}"
        rows = [head, "-" * len(head)]
        for name, row in self.accuracy.items():
            rows.append(f"{name:<18}" + "".join(f"{row[s]:>8.2f}" for s in severities)
                        + f"{np.mean(list(row.values())):>8.2f}")  # fmt: skip
        clean = 100 * self.clean.clean_accuracy
        rows.append(f"mean corruption accuracy {self.mean_accuracy:.2f} % (clean {clean:.2f} %)")
        return "\n".join(rows)


def cache_root() -> Path:
    """Where corrupted copies are kept: $ADVMEND_CACHE/corruptions, default ~/.cache/advmend/corruptions."""
    base = os.environ.get("ADVMEND_CACHE") or Path.home() / ".cache" / "advmend"
    return Path(base).expanduser() / "corruptions"


def _digest(images: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _cached(images: torch.Tensor, digest: str, name: str, severity: int, seed: int, root: Path | None,
            result: CorruptionResult) -> torch.Tensor:  # fmt: skip
    """`corrupt(images, name, severity, seed)`, read from the cache when there, else computed and stored."""
    path = root / f"{IMPLEMENTATION}-{digest}-{name}-s{severity}-seed{seed}.npy" if root is not None else None
    if path is not None and path.is_file():
        try:
            with open(path, "rb") as fh:
                arr = np.load(fh, allow_pickle=False)
            if arr.dtype == np.uint8 and arr.shape == tuple(images.shape):
                result.cache["hits"] += 1
                return torch.from_numpy(arr)
        except (OSError, ValueError):  # a damaged cache file is recomputed and replaced
            pass
    out = corrupt(images, name, severity, seed)
    result.cache["misses"] += 1
    if path is not None:
        buf = io.BytesIO()
        np.save(buf, out.numpy(), allow_pickle=False)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))
        except OSError as e:  # a cache that cannot be written costs time, never the evaluation
            note = f"corruption cache {root} not writable ({e.strerror or e}): copies recomputed"
            if note not in result.notes:
                result.notes.append(note)
    return out


def evaluate_corruptions(
    model: nn.Module,
    ds: ImageDataset | ImageFolder,
    *,
    names: tuple[str, ...] | None = None,
    severities: tuple[int, ...] = SEVERITIES,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    cache: Path | None | bool = True,
    progress: bool = False,
) -> CorruptionResult:
    """Accuracy of `model` on `ds` and on each corrupted copy of it.

    Args:
        names: Corruptions (default: all 15, in the paper's order).
        severities: Severities 1..5 to evaluate.
        seed: Seeds the corruptions' random draws.
        cache: A folder for the corrupted copies, True for :func:`cache_root`, False/None for none.
    """
    start = time.perf_counter()
    ndimage()  # scipy missing: said before any work
    names = tuple(names) if names is not None else tuple(corruption_names())
    clean = evaluate(model, ds, [], batch_size=batch_size, device=device, seed=seed)
    result = CorruptionResult(clean)
    root = cache_root() if cache is True else (Path(cache) if cache else None)
    images = ds.images[:]  # the evaluation subset, uint8, decoded once (an image folder's too)
    digest = _digest(images) if root is not None else ""
    labels = ds.labels.clone()
    pairs = [(n, s) for n in names for s in severities]
    for name, severity in tqdm(pairs, desc="corruptions", disable=not progress, leave=False):
        corrupted = ArrayDataset(_cached(images, digest, name, severity, seed, root, result), labels, ds.classes)
        res = evaluate(model, corrupted, [], batch_size=batch_size, device=device, seed=seed)
        result.accuracy.setdefault(name, {})[severity] = 100 * res.clean_accuracy
    result.seconds = time.perf_counter() - start
    return result


def examples_png(path: Path, image: torch.Tensor, names: tuple[str, ...], severity: int, seed: int) -> str | None:
    """One example per corruption at `severity`, next to the clean image; None, or why no picture."""
    try:
        plt = pyplot("the corruption picture")
    except ConfigError as e:  # no matplotlib: the numbers stand without the picture
        return str(e)
    panels = [("clean", image)] + [(n, corrupt(image[None], n, severity, seed)[0]) for n in names]
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows))
    for ax in np.asarray(axes).reshape(-1):
        ax.axis("off")
    for ax, (title, img) in zip(np.asarray(axes).reshape(-1), panels):
        arr = img.permute(1, 2, 0).numpy()
        ax.imshow(arr[..., 0] if arr.shape[-1] == 1 else arr, cmap="gray" if arr.shape[-1] == 1 else None,
                  interpolation="nearest")  # fmt: skip
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"one example per corruption, severity {severity}", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
    return None


def run_corruptions(model: nn.Module, ds: ImageDataset | ImageFolder, cfg: Any, device: torch.device, out_dir: Path,
                    meta: dict, progress: bool = True, *, extra: tuple = ()) -> EvalResult:  # fmt: skip
    """Protocol `corruptions` end to end: the evaluation, then report.json / report.md (the card, with a
    `corruptions` section) and corruption_examples.png, written only once every number is known.
    Returns the clean `EvalResult` with `.corruptions` set. `extra` (transfer attacks, a --save-adv file)
    must be empty: this protocol runs no attack."""
    from advmend.evaluation.report import write_report

    if any(e is not None for e in extra):
        raise ConfigError("protocol corruptions runs no attack: drop --transfer-from and --save-adv, or choose "
                          "an attack protocol")  # fmt: skip
    ev = cfg.eval
    names = tuple(ev.corruptions) if ev.corruptions is not None else tuple(corruption_names())
    result = evaluate_corruptions(model, ds, names=names, severities=tuple(ev.severities), seed=ev.seed,
                                  batch_size=ev.batch_size, device=device, progress=progress)  # fmt: skip
    meta = dict(meta, protocol=ev.protocol, device=str(device), split="test", corruption_seed=ev.seed,
                timings={"evaluation_s": round(result.seconds, 3)})  # fmt: skip
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if ev.plot:
        note = examples_png(out_dir / PICTURE, ds.images[0], names, max(ev.severities), ev.seed)
        meta["plot" if note is None else "plot_note"] = PICTURE if note is None else note
    write_report(out_dir, result.clean, meta, None, section=({"corruptions": result.to_dict()}, result.markdown()))
    result.clean.corruptions = result
    return result.clean
