"""Loading a trained checkpoint as the model it was trained as (every evaluation starts here)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from advmend.checkpoint import load_checkpoint
from advmend.config import DataConfig, RunConfig, check_config, from_dict
from advmend.data import load_dataset
from advmend.data.arrays import ImageDataset
from advmend.defenses.build import build_model
from advmend.errors import CheckpointError


def load_trained_model(path: str | Path, device: torch.device) -> tuple[nn.Module, RunConfig, dict]:
    """Rebuild the model a checkpoint was trained as, load its verified weights, move it to `device`."""
    state, record = load_checkpoint(path)
    try:
        cfg = from_dict(RunConfig, record["config"])
        # The trained weights replace the initial ones: no model.weights file or download is needed again.
        model = build_model(replace(cfg, model=cfg.model.architecture()), record["num_classes"],
                            tuple(record["image_shape"]))  # fmt: skip
        float(record["eps"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its recorded config cannot rebuild the model ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match the recorded model ({first})") from None
    return model.to(device).eval(), cfg, record


def test_split(cfg: DataConfig) -> ImageDataset:
    """The test split of data section `cfg` (what every evaluation runs on; training's `build_data` too)."""
    check_config(cfg)  # the rules of loading, for a section built in Python
    return load_dataset(cfg.name, "test", root=cfg.root, download=cfg.download, **dict(cfg.options))
