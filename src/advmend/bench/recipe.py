"""The training step of one run config (its model, FSR blocks, objective and attack) under speed switches.

`advmend bench --config CONFIG --switches off,channels_last,bf16` times exactly the step the config trains
with (e.g. the CPU study's small CNN with FSR and PGD-3), on random data of the data set's image shape,
and reports images/s and the ratio to fp32 without switches. Whether a switch keeps robust accuracy is a
separate, trained comparison (the CPU tuning study repeats its recipe in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from advmend.bench.throughput import _images_per_s, switched_step
from advmend.config import RunConfig
from advmend.data.sources import dataset_info
from advmend.defenses.build import build_model
from advmend.errors import ConfigError
from advmend.training.build import build_objective, data_radii


@dataclass
class RecipeRow:
    config: str
    switch: str
    batch_size: int
    images_per_s: float
    ratio: float  # over the fp32, no-switch row


def recipe_step(cfg: RunConfig, switch: str, batch_size: int, device: torch.device):
    """One optimisation step of `cfg`'s objective (attack + loss + backward + SGD step), set up as the
    training loop does for `switch` (off | channels_last | bf16 | fp16)."""
    info = dataset_info(cfg.data.name)
    if info["image_shape"] is None or info["num_classes"] is None:
        raise ConfigError(f"advmend bench --config needs a data set of known image shape, got {cfg.data.name!r}")
    torch.manual_seed(0)
    model = build_model(cfg, info["num_classes"], tuple(info["image_shape"]))
    radii = data_radii(cfg.data, tuple(info["image_shape"]))
    return switched_step(model, build_objective(cfg, radii), switch, image_shape=tuple(info["image_shape"]),
                         num_classes=info["num_classes"], batch_size=batch_size, device=device, lr=cfg.train.lr,
                         momentum=cfg.train.momentum)  # fmt: skip


def bench_recipe(name: str, cfg: RunConfig, switches: list[str], *, batch_size: int | None, iters: int,
                 warmup: int, device: torch.device) -> list[RecipeRow]:  # fmt: skip
    """images/s of `cfg`'s training step under each switch (fp32 'off' first, the reference)."""
    bs = batch_size or cfg.train.batch_size
    rows, base = [], None
    for switch in ("off", *[s for s in switches if s != "off"]):
        run_cfg = replace(cfg, train=replace(cfg.train, amp="off", channels_last=False))
        ips = _images_per_s(recipe_step(run_cfg, switch, bs, device), bs, iters, warmup, device)
        base = ips if switch == "off" else base
        assert base is not None  # "off" comes first
        rows.append(RecipeRow(name, switch, bs, ips, ips / base))
    return rows


def format_recipe_rows(rows: list[RecipeRow], device: str) -> str:
    lines = [f"device: {device}", "", "| config | switch | batch | train step img/s | vs fp32 off |",
             "|---|---|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r.config} | {r.switch} | {r.batch_size} | {r.images_per_s:.1f} | {r.ratio:.2f}x |" for r in rows]
    return "\n".join(lines)
