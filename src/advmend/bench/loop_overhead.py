"""What the training loop costs over a minimal PGD-AT loop doing the same work.

`advmend bench --loop` trains the same model on the same images twice, alternating: once through
`advmend train` (the product: run folder, records, metrics, checkpoints, progress, resume state) and
once through `minimal_pgd_at`, a plain PyTorch loop of about 40 lines that does only the work PGD-AT
needs (per-example pad-crop-flip, PGD in eval mode with frozen weights, the last iterate, one SGD step
with a cosine learning rate per step). Both report images/s of their training epochs alone (no start-up,
no validation, no evaluation); the ratio product / minimal is the loop's efficiency (1.0 = no overhead).
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from advmend.config import RunConfig, load_run_config


@dataclass
class LoopRow:
    loop: str
    epochs_ips: list[float]  # images/s of every timed epoch, in order

    @property
    def ips(self) -> float:
        return statistics.median(self.epochs_ips)


def _pad_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Zero-pad, crop back at a random offset per example, mirror half of them: one gather each."""
    n, c, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * pad)
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :].expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def minimal_pgd_at(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int,
                   batch_size: int, lr: float, eps: float, steps: int, channels_last: bool,
                   seed: int = 0) -> list[float]:  # fmt: skip
    """Madry et al.'s PGD-AT in plain PyTorch; returns images/s per epoch (training alone)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    n = images.shape[0]
    n_batches = math.ceil(n / batch_size)
    alpha = 2.5 * eps / steps
    memory = torch.channels_last if channels_last else torch.contiguous_format
    ips = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        t0 = time.perf_counter()
        for b in range(n_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            x = _pad_crop_flip(images[idx].float().div_(255), gen).contiguous(memory_format=memory)
            y = labels[idx]
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            delta = (torch.rand(x.shape, generator=gen) * 2 - 1).mul_(eps)
            delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
            for _ in range(steps):
                (g,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y, reduction="sum"), delta)
                delta = ((x + (delta.detach() + alpha * g.sign()).clamp(-eps, eps)).clamp(0, 1) - x).requires_grad_(
                    True
                )
            for p in model.parameters():
                p.requires_grad_(True)
            model.train()
            t = (epoch * n_batches + b) / (epochs * n_batches)
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * t))
            loss = F.cross_entropy(model(x + delta.detach()), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        ips.append(n / (time.perf_counter() - t0))
    return ips


def loop_config(base: str, n_images: int, epochs: int) -> RunConfig:
    """`base` trained on `n_images` for `epochs` with nothing around the epochs: no validation,
    no evaluation, no progress bar, fp32 + channels_last (the minimal loop's setting)."""
    return load_run_config(base, [
        f"data.train_subset={n_images}", "data.val_size=0", f"train.epochs={epochs}", "train.amp='off'",
        "train.channels_last=true", "train.progress=false", "eval.after_train=false", "fsr.enabled=false",
    ])  # fmt: skip


def bench_loop(base: str = "cifar10/pgdat_small_cnn_cpu", *, n_images: int = 5000, epochs: int = 3,
               rounds: int = 2) -> list[LoopRow]:  # fmt: skip
    """images/s of the product's loop and of the minimal loop on the same images, alternating `rounds`
    times (so that a busy machine slows both alike); the first epoch of each run is warm-up."""
    from advmend.defenses.build import build_model
    from advmend.training.build import attack_threat, build_data
    from advmend.training.loop import train

    cfg = loop_config(base, n_images, epochs)
    data = build_data(cfg.data, need_test=False)
    train_set = data.train  # the images `advmend train` trains on
    assert train_set is not None  # need_train
    product, minimal = LoopRow("advmend train", []), LoopRow("minimal PGD-AT loop", [])
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            train(cfg, Path(tmp) / "run", log=lambda s: None)
            lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
            product.epochs_ips += [json.loads(line)["images_per_s"] for line in lines][1:]
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, train_set.num_classes, train_set.image_shape)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        attack = cfg.train.attack
        eps = attack_threat(attack, data.info["radii"]).eps  # eps None: the data set's radius, as training
        minimal.epochs_ips += minimal_pgd_at(
            model,
            train_set.images,
            train_set.labels,
            epochs=epochs,
            batch_size=cfg.train.batch_size,
            lr=cfg.train.lr,
            eps=eps,
            steps=attack.steps,
            channels_last=cfg.train.channels_last,
        )[1:]
    return [product, minimal]


def format_loop_rows(rows: list[LoopRow]) -> str:
    base = rows[-1].ips
    lines = ["| loop | images/s (median of epochs) | epochs timed | vs minimal |", "|---|---:|---:|---:|"]
    lines += [f"| {r.loop} | {r.ips:.1f} | {len(r.epochs_ips)} | {r.ips / base:.3f}x |" for r in rows]
    return "\n".join(lines)
