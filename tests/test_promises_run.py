"""Promises about run folders, resume and evaluation output, driven through `advmend.cli.main`:
a checkpoint's record is sealed and validated, `--resume` never trains under a silently changed config
nor rewrites config.yaml, a folder that is not a resumable run is never overwritten, and `advmend eval`
checks its output before working and leaves nothing behind when it fails.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import error_line as _error_line
from safetensors import safe_open
from safetensors.torch import save_file

import advmend.checkpoint as ckpt_mod
import advmend.evaluation.report as report_mod
import advmend.training.build as build_mod
from advmend.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = {
    "name": "promises",
    "data": {"name": "synthetic", "val_size": 32, "options": {"n_train": 96, "n_test": 32, "image_size": 16}},
    "model": {"name": "small_cnn", "options": {"width": 4}},
    "train": {"method": "standard", "epochs": 1, "batch_size": 32, "val_attack": {"steps": 1},
              "progress": False, "device": "cpu"},
    "eval": {"protocol": "quick", "n_examples": 16, "batch_size": 16},
}  # fmt: skip


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under `folder`: (sha256, inode), so a rewrite with equal bytes is seen too."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_ino)
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, config_path) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", str(config_path), "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


def _reseal(src: Path, dst: Path, **changes) -> Path:
    """Copy a checkpoint with record fields changed, sealed again as save_checkpoint would seal it
    (what a buggy writer produces): the seal holds, so the record's own checks must refuse it."""
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    record = dict(json.loads(meta["advmend"]), **changes)
    text = json.dumps(record, indent=2, sort_keys=True)
    seal = ckpt_mod._seal(record["tensors_sha256"], text)
    save_file(tensors, str(dst), metadata={"advmend": text, "advmend_sha256": seal})
    return dst


# --------------------------------------------------------------------------- sealed, validated records


def test_eval_refuses_a_checkpoint_whose_eps_was_edited(finished, tmp_path, capsys):
    """The issue's case: eps changed to 0.5/255 in the embedded record, tensors untouched."""
    src = finished / "best.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    record = json.loads(meta["advmend"])
    meta["advmend"] = json.dumps(dict(record, eps=0.5 / 255), indent=2, sort_keys=True)
    forged = tmp_path / "forged.safetensors"
    save_file(tensors, str(forged), metadata=meta)
    report = tmp_path / "report"
    assert main(["eval", str(forged), "--out", str(report), "--quiet"]) == 2
    assert "record" in _error_line(capsys) and not report.exists()


@pytest.mark.parametrize("shape", [[3, -1, 32], [3, 16], [3, 16.0, 16], "3x16x16", [3, 0, 16]])
def test_eval_refuses_an_invalid_recorded_image_shape(finished, tmp_path, capsys, shape):
    bad = _reseal(finished / "best.safetensors", tmp_path / "bad.safetensors", image_shape=shape)
    report = tmp_path / "report"
    assert main(["eval", str(bad), "--out", str(report), "--quiet"]) == 2
    assert "image_shape" in _error_line(capsys) and not report.exists()


# --------------------------------------------------------------------------- resume


def test_resume_with_a_changed_config_is_an_error_naming_the_keys(run_copy, config_path, capsys):
    before = _snapshot(run_copy)
    code = main(["train", str(config_path), "--out", str(run_copy), "--resume",
                 "--set", "train.lr=0.05", "--set", "model.options.width=8"])  # fmt: skip
    assert code == 2
    msg = _error_line(capsys)
    assert "train.lr" in msg and "model.options.width" in msg
    assert _snapshot(run_copy) == before  # config.yaml and the checkpoints untouched


def test_resume_of_a_finished_run_with_the_same_config_changes_nothing(run_copy, config_path, capsys):
    before = _snapshot(run_copy)
    # train.progress and train.device are settings that do not change the result: they may differ.
    code = main(["train", str(config_path), "--out", str(run_copy), "--resume",
                 "--set", "train.progress=true", "--set", "train.device=auto"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    after = _snapshot(run_copy)
    assert after["config.yaml"] == before["config.yaml"]  # same bytes and same inode: never rewritten
    assert after["last.safetensors"] == before["last.safetensors"]


# --------------------------------------------------------------------------- folders that are not runs


@pytest.mark.parametrize("resume", [False, True])
def test_a_folder_with_best_but_no_last_is_never_overwritten(run_copy, config_path, capsys, resume):
    (run_copy / "last.safetensors").unlink()
    (run_copy / "last.json").unlink()
    before = _snapshot(run_copy)
    code = main(["train", str(config_path), "--out", str(run_copy)] + (["--resume"] if resume else []))
    assert code == 2
    msg = _error_line(capsys)
    assert ("--out" in msg and "delete" in msg) if not resume else "last.safetensors" in msg
    assert _snapshot(run_copy) == before


def test_a_non_empty_folder_that_is_no_run_is_refused(tmp_path, config_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert main(["train", str(config_path), "--out", str(out)]) == 2
    msg = _error_line(capsys)
    assert "notes.txt" in msg and "--out" in msg
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


# --------------------------------------------------------------------------- eval output


@pytest.fixture
def no_work(monkeypatch):
    """Loading the test set is the first real work of `advmend eval`: it must not be reached."""

    def refuse(*args, **kwargs):
        raise AssertionError("advmend eval started working before checking its output")

    monkeypatch.setattr(build_mod, "build_data", refuse)


def test_eval_out_is_an_existing_file(finished, tmp_path, capsys, no_work):
    target = tmp_path / "report.txt"
    target.write_text("keep me")
    assert main(["eval", str(finished / "best.safetensors"), "--out", str(target), "--quiet"]) == 2
    assert "--out" in _error_line(capsys)
    assert target.read_text() == "keep me"


def test_eval_out_below_a_file(finished, tmp_path, capsys, no_work):
    (tmp_path / "afile").write_text("x")
    assert main(["eval", str(finished / "best.safetensors"), "--out", str(tmp_path / "afile" / "r"), "--quiet"]) == 2
    assert "--out" in _error_line(capsys)


def test_eval_save_adv_is_a_folder(finished, tmp_path, capsys, no_work):
    (tmp_path / "adv.pt").mkdir()
    code = main(["eval", str(finished / "best.safetensors"), "--out", str(tmp_path / "r"), "--quiet",
                 "--save-adv", str(tmp_path / "adv.pt")])  # fmt: skip
    assert code == 2
    assert "--save-adv" in _error_line(capsys)
    assert not (tmp_path / "r").exists()


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_evaluation_leaves_no_output_folder(finished, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(report_mod, "atomic_write_text", _disk_full)  # report.json is the last write
    out = tmp_path / "new" / "report"
    adv = tmp_path / "adv.pt"
    code = main(["eval", str(finished / "best.safetensors"), "--out", str(out), "--quiet", "--save-adv", str(adv)])
    assert code == 2
    assert "No space left on device" in _error_line(capsys)
    assert not (tmp_path / "new").exists() and not adv.exists()


def test_disk_full_evaluation_keeps_an_existing_folder_as_it_was(finished, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(report_mod, "atomic_write_text", _disk_full)
    out = tmp_path / "report"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(["eval", str(finished / "best.safetensors"), "--out", str(out), "--quiet"]) == 2
    _error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]  # the plot written before the failure is gone


# --------------------------------------------------------------------------- messages name eval's own flags


@pytest.mark.parametrize("argv,needle", [(["--device", "nonsense"], "--device"), (["--n-examples", "0"], "--n-examples"),
                                         (["--batch-size", "0"], "--batch-size")])  # fmt: skip
def test_eval_errors_name_eval_flags(finished, tmp_path, capsys, argv, needle):
    out = tmp_path / "report"
    assert main(["eval", str(finished / "best.safetensors"), "--out", str(out), "--quiet", *argv]) == 2
    msg = _error_line(capsys)
    assert needle in msg and "train." not in msg and "eval." not in msg
    assert not out.exists()
