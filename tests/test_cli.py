"""End-to-end tests of the `advmend` command (train, eval, list) on the synthetic data set.

One tiny training run (2 epochs, small_cnn width 8 with FSR) is shared by the module; tests that
change a run work on a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import error_line as _error_line

from advmend.checkpoint import FORMAT as CHECKPOINT_FORMAT
from advmend.cli import main
from advmend.models import MODELS

CONFIG = {
    "name": "cli-test",
    "data": {"name": "synthetic", "val_size": 64, "options": {"n_train": 256, "n_test": 64}},
    "model": {"name": "small_cnn", "options": {"width": 8}},
    "fsr": {"enabled": True, "hidden": 8},
    "train": {
        "epochs": 2,
        "batch_size": 64,
        "attack": {"steps": 2},
        "val_attack": {"steps": 2},
        "progress": False,
    },
    "eval": {"protocol": "quick", "after_train": True, "n_examples": 32},
}

METRIC_KEYS = {"loss", "train_acc", "val_clean_acc", "val_robust_acc", "lr", "seconds", "images_per_s"}


def _write_config(folder: Path, cfg: dict = CONFIG) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    return _write_config(tmp_path_factory.mktemp("cfg"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, config_path) -> tuple[Path, int]:
    """One 2-epoch run with evaluation after training; returns (out dir, exit code)."""
    out = tmp_path_factory.mktemp("train") / "run"
    code = main(["train", str(config_path), "--out", str(out)])
    return out, code


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    out, code = trained
    assert code == 0
    dst = tmp_path / "run"
    shutil.copytree(out, dst)
    return dst


# --------------------------------------------------------------------------- train


def test_train_writes_checkpoints_config_and_metrics(trained, config_path):
    out, code = trained
    assert code == 0
    for name in ("last", "best"):
        assert (out / f"{name}.safetensors").is_file()
        side = json.loads((out / f"{name}.json").read_text())
        assert side["format"] == CHECKPOINT_FORMAT
        assert side["config"]["model"]["name"] == "small_cnn"
    assert json.loads((out / "last.json").read_text())["epoch"] == 2
    assert 1 <= json.loads((out / "best.json").read_text())["epoch"] <= 2

    saved_cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert saved_cfg["train"]["epochs"] == 2
    assert saved_cfg["fsr"]["enabled"] is True and saved_cfg["fsr"]["hidden"] == 8
    assert saved_cfg["data"]["options"] == {"n_train": 256, "n_test": 64}

    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert METRIC_KEYS <= set(r), set(r)
        assert 0 <= r["train_acc"] <= 100
        assert 0 <= r["val_robust_acc"] <= r["val_clean_acc"] <= 100
        assert r["lr"] > 0 and r["seconds"] >= 0 and r["images_per_s"] > 0


def test_train_leaves_no_temp_files(trained):
    out, _ = trained
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_train_evaluates_after_training(trained):
    out, code = trained
    assert code == 0
    ev = out / "eval-quick"
    assert (ev / "report.md").is_file()
    assert "clean" in (ev / "report.md").read_text()
    report = json.loads((ev / "report.json").read_text())
    assert report["n_examples"] == 32
    assert 0 <= report["clean_accuracy"] <= 100
    attacks = report["attacks"]
    assert [a["settings"]["name"] for a in attacks] == ["FGSM", "PGD-20"]
    for a in attacks:
        s = a["settings"]
        assert s["norm"] == "linf" and s["eps"] == pytest.approx(8 / 255)
        assert {"steps", "step_size", "random_start", "restarts", "loss"} <= set(s)
        assert 0 <= a["robust_accuracy"] <= report["clean_accuracy"]
    worst = report["worst_case"]["robust_accuracy"]
    assert worst <= min(a["robust_accuracy"] for a in attacks)
    per = report["per_example"]
    assert len(per["clean"]) == 32 and len(per["worst_case"]) == 32
    assert 100 * sum(per["clean"]) / 32 == pytest.approx(report["clean_accuracy"])
    assert report["meta"]["checkpoint"].endswith("best.safetensors")
    assert report["meta"]["protocol"] == "quick"


def test_train_again_without_resume_refuses(run_copy, config_path, capsys):
    before = {p.name: _sha(p) for p in run_copy.iterdir() if p.is_file()}
    code = main(["train", str(config_path), "--out", str(run_copy)])
    assert code == 2
    msg = _error_line(capsys)
    assert "--resume" in msg
    after = {p.name: _sha(p) for p in run_copy.iterdir() if p.is_file()}
    assert after == before  # nothing was overwritten


def test_resume_continues_to_more_epochs(run_copy, config_path):
    first_two = _metrics(run_copy)
    code = main(["train", str(config_path), "--out", str(run_copy), "--resume",
                 "--set", "train.epochs=3", "--set", "eval.after_train=false"])  # fmt: skip
    assert code == 0
    records = _metrics(run_copy)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[:2] == first_two  # the earlier epochs' records are kept, not retrained
    assert json.loads((run_copy / "last.json").read_text())["epoch"] == 3
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["train"]["epochs"] == 3


def test_resume_without_a_run_fails(tmp_path, config_path, capsys):
    out = tmp_path / "fresh"
    code = main(["train", str(config_path), "--out", str(out), "--resume"])
    assert code == 2
    assert "last.safetensors" in _error_line(capsys)


# --------------------------------------------------------------------------- eval


def test_eval_checkpoint(trained, tmp_path, capsys):
    out, _ = trained
    report_dir = tmp_path / "report"
    ckpt = out / "last.safetensors"
    code = main(["eval", str(ckpt), "--protocol", "quick", "--n-examples", "16", "--out", str(report_dir),
                 "--quiet"])  # fmt: skip
    assert code == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["n_examples"] == 16
    assert len(report["per_example"]["clean"]) == 16
    assert [a["settings"]["name"] for a in report["attacks"]] == ["FGSM", "PGD-20"]
    assert report["meta"]["checkpoint"] == str(ckpt)
    assert report["meta"]["checkpoint_sha256"] == _sha(ckpt)
    assert report["meta"]["epoch"] == 2
    assert (report_dir / "report.md").is_file()
    assert "report.json" in capsys.readouterr().out


# --------------------------------------------------------------------------- errors: exit 2, one line, no output


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.epoch=3", "train.epoch"),
        ("model.name=nope", "nope"),
        ("fsr.layers=[nope]", "nope"),
    ],
)
def test_train_config_errors(config_path, tmp_path, capsys, override, needle):
    out = tmp_path / "out"
    code = main(["train", str(config_path), "--out", str(out), "--set", override])
    assert code == 2
    assert needle in _error_line(capsys)
    assert not out.exists()


def test_train_missing_dataset(tmp_path, capsys):
    empty = tmp_path / "empty_data"
    empty.mkdir()
    cfg = dict(CONFIG, data={"name": "cifar10", "root": str(empty), "download": False, "val_size": 64})
    config = _write_config(tmp_path, cfg)
    out = tmp_path / "out"
    code = main(["train", str(config), "--out", str(out)])
    assert code == 2
    msg = _error_line(capsys)
    assert str(empty.resolve()) in msg or str(empty) in msg
    assert not out.exists()
    assert list(empty.iterdir()) == []  # nothing was downloaded or written into the data root


def test_train_missing_config_file(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["train", str(tmp_path / "missing.yaml"), "--out", str(out)])
    assert code == 2
    assert "missing.yaml" in _error_line(capsys)
    assert not out.exists()


def test_eval_tampered_checkpoint(trained, tmp_path, capsys):
    out, _ = trained
    ckpt = tmp_path / "last.safetensors"
    shutil.copy(out / "last.safetensors", ckpt)
    data = bytearray(ckpt.read_bytes())
    data[-9] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    report_dir = tmp_path / "report"
    code = main(["eval", str(ckpt), "--protocol", "quick", "--n-examples", "16", "--out", str(report_dir)])
    assert code == 2
    msg = _error_line(capsys)
    assert "modified" in msg or "corrupt" in msg
    assert not report_dir.exists()


def test_eval_missing_checkpoint(tmp_path, capsys):
    report_dir = tmp_path / "report"
    missing = tmp_path / "nope.safetensors"
    code = main(["eval", str(missing), "--out", str(report_dir)])
    assert code == 2
    assert "nope.safetensors" in _error_line(capsys)
    assert not report_dir.exists()


def test_eval_rejects_non_data_override(trained, tmp_path, capsys):
    out, _ = trained
    report_dir = tmp_path / "report"
    code = main(["eval", str(out / "last.safetensors"), "--set", "train.epochs=3", "--out", str(report_dir)])
    assert code == 2
    assert "train.epochs" in _error_line(capsys)
    assert not report_dir.exists()


def test_eval_unknown_protocol(trained, tmp_path, capsys):
    out, _ = trained
    report_dir = tmp_path / "report"
    code = main(["eval", str(out / "last.safetensors"), "--protocol", "nope", "--out", str(report_dir)])
    assert code == 2
    assert "nope" in _error_line(capsys)
    assert not report_dir.exists()


# --------------------------------------------------------------------------- list


def test_list(capsys):
    assert main(["list"]) == 0
    stdout = capsys.readouterr().out
    for name in MODELS.names():
        assert name in stdout
    assert "small_cnn" in stdout and "resnet18" in stdout
    assert "quickstart" in stdout
    assert "quick" in stdout and "paper" in stdout  # protocols
    assert "synthetic" in stdout  # datasets
