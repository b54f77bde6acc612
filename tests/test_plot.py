"""`advmend plot RUN_DIR`: curves from metrics.jsonl to PNG, and clear errors."""

from __future__ import annotations

import json

import pytest

from advmend.cli import main


def _write_run(folder, n=3):
    folder.mkdir()
    lines = [
        {
            "epoch": e,
            "lr": 0.1,
            "loss": 2.0 - 0.3 * e,
            "ce": 1.9 - 0.3 * e,
            "fsr_sep": 0.5,
            "fsr_rec": 0.4,
            "train_acc": 10.0 * e,
            "val_clean_acc": 20.0 + e,
            "val_robust_acc": 10.0 + e,
        }
        for e in range(1, n + 1)
    ]
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"epoch": 4, "lo'  # a line cut by a kill
    (folder / "metrics.jsonl").write_text(text)


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _write_run(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run")]) == 0
    png = tmp_path / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "3 epochs" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").is_file()


def test_plot_of_a_real_run(tmp_path):
    pytest.importorskip("matplotlib")
    from advmend.config import RunConfig, from_dict
    from advmend.training.loop import train

    cfg = from_dict(RunConfig, {
        "data": {"name": "synthetic", "val_size": 32, "options": {"n_train": 64, "n_test": 16, "image_size": 16}},
        "model": {"name": "small_cnn", "options": {"width": 4}},
        "train": {"method": "standard", "epochs": 2, "batch_size": 32, "progress": False, "val_attack": {"steps": 1}},
    })  # fmt: skip
    train(cfg, tmp_path / "run", log=lambda s: None)
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "curves.png").is_file()


@pytest.mark.parametrize("case", ["missing folder", "no metrics", "empty metrics"])
def test_plot_errors_are_one_line(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case != "missing folder":
        run.mkdir()
    if case == "empty metrics":
        (run / "metrics.jsonl").write_text("")
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("advmend: error:") and err.count("\n") == 1
    assert not (run / "curves.png").exists()


def test_plot_without_matplotlib_says_how_to_install(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    _write_run(tmp_path / "run")
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["plot", str(tmp_path / "run")]) == 2
    assert "pip install" in capsys.readouterr().err
