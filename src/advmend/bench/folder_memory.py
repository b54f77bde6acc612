"""Peak memory of a PGD evaluation streamed from an image folder: 200 images against 2,000.

    python -m advmend.bench.folder_memory --work DIR [--small 200 --large 2000 --size 224]

Writes a folder of `large` generated JPEG images (a little larger than `size`, so the evaluation
resizes and crops them) and a second folder of its first `small` ones, then evaluates a small CNN (stride-4 stem)
with PGD-2 on each in a fresh process (peak RSS is a high-water mark: one process per measurement),
decoding with 2 worker processes. Each image is filed under the class the model predicts for it, so
every example is attacked. The target: the peak RSS of the large run within 10 % of the small one's.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

CLASSES = 10
WORKERS = 2
BATCH = 50


def _model() -> torch.nn.Module:
    """A small CNN with a stride-4 stem: cheap at 224 pixels, so the run measures the data path."""
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 4, stride=4),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, CLASSES),
    ).eval()


def make_folder(base: Path, n: int, size: int, seed: int = 0) -> None:
    """`n` smooth random JPEG images in base/test/<class>/, each under the class the model predicts."""
    from PIL import Image

    from advmend.data.folder import eval_transform

    model = _model()
    rng = np.random.default_rng(seed)
    side = round(size / 0.875) + 16  # larger than the resize target: every image is resized and cropped
    for k in range(CLASSES):
        (base / "test" / f"c{k:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((side, side + 8 * (i % 5)), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        with Image.open(io.BytesIO(buf.getvalue())) as decoded:
            x = np.asarray(eval_transform(decoded.convert("RGB"), size), dtype=np.float32) / 255
        with torch.no_grad():
            label = int(model(torch.from_numpy(x).permute(2, 0, 1)[None]).argmax(1))
        (base / "test" / f"c{label:02d}" / f"{i:05d}.jpg").write_bytes(buf.getvalue())


def measure(base: Path, size: int) -> dict:
    """Evaluate PGD-2 on the folder in this process; peak RSS of this process and of its workers."""
    from advmend.attacks.pgd import PGD
    from advmend.data import load_dataset
    from advmend.evaluation.evaluate import evaluate

    ds = load_dataset("folder", "test", path=str(base), image_size=size, workers=WORKERS)
    t0 = time.perf_counter()
    res = evaluate(_model(), ds, [PGD(eps=8 / 255, steps=2, name="PGD-2")], batch_size=BATCH)
    return {
        "n": len(ds),
        "clean_accuracy": 100 * res.clean_accuracy,
        "attacked": res.attacks[0].attacked,
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "worker_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def _copy_first(src: Path, dst: Path, n: int) -> None:
    for k in range(CLASSES):  # every class folder, so that both folders share the labels
        (dst / "test" / f"c{k:02d}").mkdir(parents=True, exist_ok=True)
    files = sorted((src / "test").glob("*/*.jpg"), key=lambda p: p.name)[:n]
    for f in files:
        (dst / "test" / f.parent.name).mkdir(parents=True, exist_ok=True)
        (dst / "test" / f.parent.name / f.name).write_bytes(f.read_bytes())


def run(work: Path, small: int = 200, large: int = 2000, size: int = 224) -> dict:
    """Make both folders under `work` (kept for a rerun), measure each in a fresh process."""
    big, little = work / f"folder-{large}-{size}", work / f"folder-{small}-{size}"
    if not (big / "test").is_dir():
        make_folder(big, large, size)
    if not (little / "test").is_dir():
        _copy_first(big, little, small)
    out: dict[Any, Any] = {}
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for n, folder in ((small, little), (large, big)):
        cmd = [sys.executable, "-m", "advmend.bench.folder_memory", "--measure", str(folder), "--size", str(size)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"measuring {folder} failed: {done.stderr.strip().splitlines()[-1:]}")
        out[n] = json.loads(done.stdout.strip().splitlines()[-1])
    out["ratio"] = round(out[large]["peak_rss_mib"] / out[small]["peak_rss_mib"], 3)
    return out


def format_result(res: dict, small: int, large: int) -> str:
    lines = [f"{'images':>7} {'peak RSS MiB':>13} {'workers MiB':>12} {'attacked':>9} {'seconds':>8}"]
    for n in (small, large):
        r = res[n]
        lines.append(f"{r['n']:>7} {r['peak_rss_mib']:>13.1f} {r['worker_peak_rss_mib']:>12.1f} "
                     f"{r['attacked']:>9} {r['seconds']:>8.1f}")  # fmt: skip
    verdict = "within" if res["ratio"] <= 1.10 else "NOT within"
    lines.append(f"peak RSS {large} / {small} images: {res['ratio']:.3f} ({verdict} the 10 % target)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, help="folder for the generated images")
    p.add_argument("--small", type=int, default=200)
    p.add_argument("--large", type=int, default=2000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # one measurement, in a fresh process
    args = p.parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.size)))
        return 0
    if args.work is None:
        p.error("--work DIR is required")
    res = run(args.work, args.small, args.large, args.size)
    print(format_result(res, args.small, args.large))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
