"""DistributedDataParallel: 2 gloo processes on CPU train to the same weights as 1 process."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import advmend.training.loop as loop_mod
from advmend.checkpoint import load_checkpoint
from advmend.config import RunConfig, from_dict
from advmend.training.loop import train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _cfg(**train_opts) -> RunConfig:
    # Why the runs can be equal: the attack has no random start and there is no FSR (no per-rank random
    # draws), no augmentation (its RNG is seeded per rank), 128 examples split into full global batches
    # of 32, and no BatchNorm (per-rank batch statistics would differ from whole-batch ones; torch's
    # SyncBatchNorm, the cure, runs on GPUs only), so each rank computes its half of exactly the
    # single-process batch and DDP averages the two halves' gradients.
    return from_dict(RunConfig, {
        "data": {"name": "synthetic", "val_size": 32, "augment": False,
                 "options": {"n_train": 128, "n_test": 16, "image_size": 16}},
        "model": {"name": "small_cnn", "options": {"width": 4}},
        "train": {"method": "pgd_at", "epochs": 2, "batch_size": 32, "lr": 0.05, "progress": False,
                  "device": "cpu", "attack": {"steps": 2, "step_size": 0.01, "random_start": False},
                  "val_attack": {"steps": 1}, **train_opts},
    })  # fmt: skip


def _build_without_batchnorm(cfg, num_classes, image_shape):
    model = _real_build_model(cfg, num_classes, image_shape)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.BatchNorm2d):
            model.set_submodule(name, torch.nn.Identity())
    return model


_real_build_model = loop_mod.build_model


@pytest.fixture
def no_batchnorm(monkeypatch):
    monkeypatch.setattr(loop_mod, "build_model", _build_without_batchnorm)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # what torchrun sets  # fmt: skip
    torch.set_num_threads(1)
    loop_mod.build_model = _build_without_batchnorm  # this spawned process's own copy of the module
    result = train(_cfg(), out, log=lambda s: None)
    assert not dist.is_initialized()  # train() leaves the process group it joined
    assert len(result.history) == 2


@pytest.mark.slow
def assert_matches_one_process(single: Path, ddp: Path, h_single: list[dict]) -> tuple[dict, list[dict]]:
    """A 2-process run in `ddp` ended with the weights and epoch losses of the 1-process run in `single`;
    returns the 2-process run's checkpoint record and its metrics.jsonl history."""
    ref, _ = load_checkpoint(single / "last.safetensors")
    got, record = load_checkpoint(ddp / "last.safetensors")
    assert record["world_size"] == 2 and record["epoch"] == 2
    assert set(got) == set(ref)
    for k in ref:
        assert torch.allclose(got[k].double(), ref[k].double(), rtol=1e-4, atol=1e-5), k
    h_ddp = [json.loads(s) for s in (ddp / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(h_ddp, h_single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    return record, h_ddp


def test_two_gloo_processes_match_one_process(tmp_path, no_batchnorm):
    single = tmp_path / "single"
    h_single = train(_cfg(), single, log=lambda s: None).history
    ddp = tmp_path / "ddp"
    mp.spawn(_worker, args=(2, _free_port(), str(ddp)), nprocs=2, join=True)

    record, h_ddp = assert_matches_one_process(single, ddp, h_single)
    # Epoch metrics are all-reduced: the loss and accuracy are those of the whole global batch.
    for a, b in zip(h_ddp, h_single):
        assert a["train_acc"] == pytest.approx(b["train_acc"])
        assert a["val_robust_acc"] == pytest.approx(b["val_robust_acc"])
    # Rank 0 alone writes: one set of files, every rank's RNG state in `last`.
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
    assert {k for k in record["extra_tensors"] if k.startswith("rng.")} == {"rng.rank0.cpu", "rng.rank1.cpu"}


def _fsr_cfg() -> RunConfig:
    cfg = _cfg(epochs=1)
    return dataclasses.replace(cfg, fsr=dataclasses.replace(cfg.fsr, enabled=True))


def _fsr_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # what torchrun sets  # fmt: skip
    torch.set_num_threads(1)
    train(_fsr_cfg(), out, log=lambda s: None)


def test_ddp_keeps_an_fsr_model_own_loss_terms(tmp_path):
    """Under DDP the objective trains a wrapper of the model: FSR's L_sep and L_rec must still reach the
    loss (`training_view` hands objectives the model's `forward_with_loss` through the wrapper)."""
    ddp = tmp_path / "ddp"
    mp.spawn(_fsr_worker, args=(2, _free_port(), str(ddp)), nprocs=2, join=True)
    (rec,) = [json.loads(s) for s in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert rec["fsr_sep"] > 0 and rec["fsr_rec"] > 0  # fsr.lambda_sep = fsr.lambda_rec = 1
    assert rec["loss"] == pytest.approx(rec["ce"] + rec["fsr_sep"] + rec["fsr_rec"], rel=1e-5)


def test_global_batch_must_split_evenly(tmp_path, monkeypatch):
    from advmend.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="divisible"):
        train(_cfg(), tmp_path / "x", log=lambda s: None)
    assert not (tmp_path / "x").exists()


def test_sync_bn_on_cpu_is_a_config_error(tmp_path):
    from advmend.errors import ConfigError

    with pytest.raises(ConfigError, match="train.sync_bn"):
        train(_cfg(sync_bn=True), tmp_path / "x", log=lambda s: None)
