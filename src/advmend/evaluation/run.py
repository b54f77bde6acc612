"""Evaluate a trained model under a named protocol and write its report (shared by `train` and `eval`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from advmend.attacks.presets import protocol_attacks
from advmend.config import RunConfig, from_dict
from advmend.data import ArrayDataset, subset
from advmend.errors import CheckpointError, ConfigError
from advmend.evaluation.evaluate import EvalResult, evaluate
from advmend.evaluation.report import write_report
from advmend.training.build import build_model
from advmend.training.checkpoint import file_sha256, load_checkpoint


def load_trained_model(path: str | Path, device: torch.device) -> tuple[nn.Module, RunConfig, dict]:
    """Rebuild the model a checkpoint was trained as, load its verified weights, move it to `device`."""
    state, record = load_checkpoint(path)
    try:
        cfg = from_dict(RunConfig, record["config"])
        model = build_model(cfg, record["num_classes"], tuple(record["image_shape"]))
        float(record["eps"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its recorded config cannot rebuild the model ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match the recorded model ({first})") from None
    return model.to(device).eval(), cfg, record


def run_protocol(
    model: nn.Module,
    test: ArrayDataset,
    cfg: RunConfig,
    eps: float,
    device: torch.device,
    out_dir: Path,
    meta: dict,
    progress: bool = True,
) -> EvalResult:
    """Evaluate on the test set (or its seeded `eval.n_examples` subset) and write report.json/.md."""
    n = cfg.eval.n_examples
    if n is not None and n < 1:
        raise ConfigError(f"eval.n_examples must be >= 1, got {n}")
    ds = subset(test, n, cfg.eval.seed) if n is not None and n < len(test) else test
    attacks = protocol_attacks(cfg.eval.protocol, eps)
    result = evaluate(model, ds, attacks, batch_size=cfg.eval.batch_size, device=device,
                      seed=cfg.eval.seed, progress=progress)  # fmt: skip
    meta = dict(meta, protocol=cfg.eval.protocol, eps=eps, device=str(device), split="test",
                subset_seed=cfg.eval.seed if ds is not test else None)  # fmt: skip
    if meta.get("checkpoint"):
        meta["checkpoint_sha256"] = file_sha256(meta["checkpoint"])
    write_report(out_dir, result, meta)
    return result
