"""Exact resume after SIGKILL, atomic checkpoints under kills, and disk checks before training."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError

import advmend.checkpoint as ckpt_mod
import advmend.training.loop as loop_mod
import advmend.training.run_folder as run_folder
from advmend.checkpoint import load_checkpoint
from advmend.config import RunConfig, from_dict
from advmend.errors import CheckpointError, ConfigError
from advmend.training.loop import LAST, train

# PGD-AT with random starts and FSR (Gumbel noise), dropout-free small_cnn, EMA and early-stopping
# counters: every piece of state a resume must restore is exercised.
CFG = {
    "name": "resume",
    "data": {"name": "synthetic", "val_size": 32, "options": {"n_train": 128, "n_test": 16, "image_size": 16}},
    "model": {"name": "small_cnn", "options": {"width": 4}},
    "fsr": {"enabled": True, "hidden": 8},
    "train": {"method": "pgd_at", "epochs": 6, "batch_size": 32, "lr": 0.05, "schedule": "cosine",
              "attack": {"steps": 2, "step_size": 0.01}, "val_attack": {"steps": 1}, "ema": 0.9,
              "patience": 50, "deterministic": True, "progress": False, "device": "cpu"},
}  # fmt: skip


def _write_cfg(tmp_path: Path, **train) -> Path:
    cfg = json.loads(json.dumps(CFG))
    cfg["train"].update(train)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cmd(cfg: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "advmend", "train", str(cfg), "--out", str(out), *extra]


def _env() -> dict:
    # Same thread count in every process, so CPU kernels reduce in the same order.
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _sidecar_epoch(out: Path) -> int:
    try:
        return json.loads((out / "last.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def _wait_for_epoch(proc: subprocess.Popen, out: Path, epoch: int, deadline: float) -> float:
    """Block until `out` holds the checkpoint of `epoch`; returns when it was seen."""
    while _sidecar_epoch(out) < epoch:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, f"no checkpoint of epoch {epoch} within 120 s"
        time.sleep(0.005)
    return time.monotonic()


def _run_and_kill(cmd: list[str], out: Path, fraction: float | None) -> int:
    """Start training and SIGKILL it: right after its first checkpoint (`fraction` None), or at
    `fraction` (in [0, 1)) of the third epoch, measured by the length of the second one, so that the
    kill lands mid-run whatever the machine's speed. Returns the last complete epoch."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        first = _wait_for_epoch(proc, out, 1, deadline)
        if fraction is not None:
            epoch_seconds = _wait_for_epoch(proc, out, 2, deadline) - first
            time.sleep(fraction * epoch_seconds)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return load_checkpoint(out / LAST)[1]["epoch"]


def _final_tensors(out: Path) -> dict[str, torch.Tensor]:
    state, record = load_checkpoint(out / LAST)
    best, _ = load_checkpoint(out / "best.safetensors")
    tensors = {f"model.{k}": v for k, v in state.items()}
    tensors.update({f"extra.{k}": v for k, v in record["extra_tensors"].items()})
    tensors.update({f"best.{k}": v for k, v in best.items()})
    return tensors


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "run"
    subprocess.run(_cmd(_write_cfg(tmp), out), env=_env(), check=True, capture_output=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("when", ["right after the first checkpoint", "at a random moment"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, uninterrupted, when):
    cfg, out = _write_cfg(tmp_path), tmp_path / "run"
    fraction = None if when.startswith("right") else random.Random(os.getpid()).uniform(0.0, 1.0)
    done = _run_and_kill(_cmd(cfg, out), out, fraction)
    assert 1 <= done < CFG["train"]["epochs"], "the kill came after the run ended; nothing was tested"
    res = subprocess.run(_cmd(cfg, out, "--resume"), env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"resuming {out} after epoch {done}" in res.stdout

    ref, got = _final_tensors(uninterrupted), _final_tensors(out)
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    strip = lambda lines: [{k: v for k, v in json.loads(s).items() if k not in ("seconds", "images_per_s", "val_seconds")}
                           for s in lines]  # fmt: skip
    ref_log = strip((uninterrupted / "metrics.jsonl").read_text().splitlines())
    assert strip((out / "metrics.jsonl").read_text().splitlines()) == ref_log
    assert len(ref_log) == CFG["train"]["epochs"]


def _small_cfg(**train) -> RunConfig:
    cfg = json.loads(json.dumps(CFG))
    cfg["train"].update({"method": "standard", "epochs": 2, **train})
    cfg["fsr"]["enabled"] = False
    return from_dict(RunConfig, cfg)


def test_kill_during_write_leaves_loadable_previous_checkpoint(tmp_path):
    """A SIGKILL mid-write leaves only a temp file (the rename never happened): the final name still
    holds the previous complete checkpoint, and a resume removes the leftover."""
    out = tmp_path / "run"
    train(_small_cfg(epochs=1), out, log=lambda s: None)
    data = (out / LAST).read_bytes()
    state_before, rec_before = load_checkpoint(out / LAST)
    leftover = out / ".last.safetensors.k1ll3d.tmp"
    leftover.write_bytes(data[: len(data) // 2])  # what a kill during save_file leaves
    state, rec = load_checkpoint(out / LAST)
    assert rec["epoch"] == 1 and all(torch.equal(state[k], v) for k, v in state_before.items())
    logs = []
    train(_small_cfg(epochs=2), out, resume=True, log=logs.append)
    assert not leftover.exists() and any("incomplete write" in s for s in logs)
    assert load_checkpoint(out / LAST)[1]["epoch"] == 2


def test_truncated_checkpoint_is_refused_on_resume(tmp_path):
    out = tmp_path / "run"
    train(_small_cfg(epochs=1), out, log=lambda s: None)
    data = (out / LAST).read_bytes()
    (out / LAST).write_bytes(data[:-100])
    with pytest.raises(CheckpointError):
        train(_small_cfg(epochs=2), out, resume=True, log=lambda s: None)


def test_metrics_line_cut_by_a_kill_is_ignored_on_resume(tmp_path):
    out = tmp_path / "run"
    train(_small_cfg(epochs=1), out, log=lambda s: None)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "loss": 0.')  # the kill came mid-line, before epoch 2's checkpoint
    result = train(_small_cfg(epochs=2), out, resume=True, log=lambda s: None)
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in lines] == [1, 2] == [h["epoch"] for h in result.history]


def test_not_enough_disk_space_is_an_error_before_anything_is_written(tmp_path, monkeypatch):
    real = run_folder.shutil.disk_usage
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(ConfigError, match="disk space"):
        train(_small_cfg(), tmp_path / "run", log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_checkpoint_bytes_estimate_matches_the_file(tmp_path):
    out = tmp_path / "run"
    train(_small_cfg(epochs=1, ema=0.9), out, log=lambda s: None)
    from advmend.defenses.build import build_model

    cfg = _small_cfg()
    model = build_model(cfg, 10, (3, 16, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    estimate = run_folder.checkpoint_bytes(model, opt, ema=True)
    size = (out / LAST).stat().st_size
    assert estimate <= size < estimate + 64 * 1024  # the rest is the JSON record and RNG states


def _safetensors_full(tensors, filename, metadata=None):
    # What safetensors raises when the disk fills up while it writes.
    raise SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )


def _os_full(tensors, filename, metadata=None):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("full", [_os_full, _safetensors_full])
def test_disk_full_during_training_is_a_checkpoint_error(tmp_path, monkeypatch, full):
    monkeypatch.setattr(ckpt_mod, "save_file", full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact") as info:
        train(_small_cfg(epochs=1), tmp_path / "run", log=lambda s: None)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run" / LAST).exists()
    assert not list((tmp_path / "run").glob(".*.tmp"))


@pytest.mark.parametrize("full", [_os_full, _safetensors_full])
def test_disk_full_later_keeps_the_previous_checkpoint(tmp_path, monkeypatch, full):
    out = tmp_path / "run"
    train(_small_cfg(epochs=1), out, log=lambda s: None)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".safetensors", ".json")}
    monkeypatch.setattr(ckpt_mod, "save_file", full)
    with pytest.raises(CheckpointError, match="previous checkpoint is intact"):
        train(_small_cfg(epochs=2), out, resume=True, log=lambda s: None)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".safetensors", ".json")} == before
    assert not list(out.glob(".*.tmp"))
    assert load_checkpoint(out / LAST)[1]["epoch"] == 1


# --------------------------------------------------------------------------- resume under another config


def _files(out: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and inode of every file: an atomic rewrite with equal bytes still shows as a new inode."""
    return {p.name: (p.read_bytes(), p.stat().st_ino) for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture
def finished(tmp_path) -> Path:
    out = tmp_path / "run"
    train(_small_cfg(epochs=2), out, log=lambda s: None)
    return out


@pytest.mark.parametrize("change,keys", [
    ({"train": {"lr": 0.01}}, ["train.lr"]),
    ({"train": {"lr": 0.01, "attack": {"steps": 3}}}, ["train.attack.steps", "train.lr"]),
    ({"model": {"options": {"width": 8}}}, ["model.options.width"]),
    ({"data": {"seed": 1}}, ["data.seed"]),
    ({"eval": {"batch_size": 7}}, ["eval.batch_size"]),
])  # fmt: skip
def test_resume_with_changed_settings_names_them_and_changes_nothing(finished, change, keys):
    before = _files(finished)
    cfg = json.loads(json.dumps(loop_mod.to_dict(_small_cfg(epochs=2))))
    for section, values in change.items():
        for k, v in values.items():
            cfg[section][k] = dict(cfg[section][k], **v) if isinstance(v, dict) else v
    with pytest.raises(ConfigError, match="differs") as info:
        train(from_dict(RunConfig, cfg), finished, resume=True, log=lambda s: None)
    named = [k for k in ("train.lr", "train.attack.steps", "model.options.width", "data.seed", "eval.batch_size")
             if k in str(info.value)]  # fmt: skip
    assert sorted(named) == keys
    assert _files(finished) == before


def test_resume_with_the_same_config_never_rewrites_config_yaml(finished):
    before = _files(finished)
    # Settings that do not change what the run computes may differ (loop.RESUME_FREE_KEYS).
    cfg = _small_cfg(epochs=2, progress=True, device="auto")
    result = train(cfg, finished, resume=True, log=lambda s: None)
    assert [h["epoch"] for h in result.history] == [1, 2]
    after = _files(finished)
    assert after["config.yaml"] == before["config.yaml"]
    assert yaml.safe_load((finished / "config.yaml").read_text())["train"]["device"] == "cpu"  # the run's
    for name in ("last.safetensors", "best.safetensors", "last.json"):
        assert after[name] == before[name]


def test_resume_cannot_shorten_a_run_below_what_it_trained(finished):
    before = _files(finished)
    with pytest.raises(ConfigError, match="train.epochs=1.*already trained 2 epochs"):
        train(_small_cfg(epochs=1), finished, resume=True, log=lambda s: None)
    assert _files(finished) == before


def test_resume_to_more_epochs_continues_and_config_yaml_says_so(finished):
    train(_small_cfg(epochs=3), finished, resume=True, log=lambda s: None)
    assert load_checkpoint(finished / LAST)[1]["epoch"] == 3
    assert yaml.safe_load((finished / "config.yaml").read_text())["train"]["epochs"] == 3


def test_resume_restores_a_missing_config_yaml_from_the_checkpoint(finished):
    text = (finished / "config.yaml").read_text()
    (finished / "config.yaml").unlink()
    train(_small_cfg(epochs=2, progress=True), finished, resume=True, log=lambda s: None)
    assert yaml.safe_load((finished / "config.yaml").read_text()) == yaml.safe_load(text)


# --------------------------------------------------------------------------- run folders that are not runs


def test_run_killed_before_its_first_checkpoint_can_be_started_over(tmp_path):
    """What a kill during epoch 1 leaves (config.yaml, metrics.jsonl, a temp file) is no checkpoint: the
    same config may start over there, and --resume says so."""
    out = tmp_path / "run"
    train(_small_cfg(epochs=1), out, log=lambda s: None)
    for name in ("last.safetensors", "last.json", "best.safetensors", "best.json"):
        (out / name).unlink()
    (out / ".last.safetensors.abc.tmp").write_bytes(b"partial")
    with pytest.raises(CheckpointError, match="without --resume"):
        train(_small_cfg(epochs=1), out, resume=True, log=lambda s: None)
    with pytest.raises(ConfigError, match="not empty"):  # another config's leftovers are not its own
        train(_small_cfg(epochs=1, lr=0.01), out, log=lambda s: None)
    train(_small_cfg(epochs=1), out, log=lambda s: None)
    assert load_checkpoint(out / LAST)[1]["epoch"] == 1


@pytest.mark.parametrize("leftover", ["best.safetensors", "notes.txt", "eval-quick/report.json"])
def test_non_empty_folder_without_a_run_is_refused(tmp_path, leftover):
    out = tmp_path / "run"
    (out / leftover).parent.mkdir(parents=True)
    (out / leftover).write_text("precious")
    with pytest.raises(ConfigError, match="not empty.*another --out.*delete"):
        train(_small_cfg(epochs=1), out, log=lambda s: None)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [leftover]
    assert (out / leftover).read_text() == "precious"
