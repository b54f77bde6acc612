"""Paths the file system refuses, through every command that takes one: a name too long, a parent that
is a file, a read-only file system, a folder without write permission. Each is one `advmend: error:`
line on stderr with exit code 2, naming the path, and nothing is left at the refused path."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import error_line
from test_folder import user_model  # noqa: F401 (a fixture: a user's model module on sys.path)

from advmend.cli import main

LONG = "x" * 300  # longer than any file system allows a name to be (255 bytes on Linux)
CONFIG = (
    "name: paths\n"
    "data: {name: synthetic, val_size: 16, options: {n_train: 48, n_test: 16}}\n"
    "model: {name: small_cnn, options: {width: 2}}\n"
    "train: {epochs: 1, batch_size: 16, attack: {steps: 1}, val_attack: {steps: 1}, progress: false}\n"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A config and the run folder `advmend train` made from it."""
    folder = tmp_path_factory.mktemp("trained")
    (folder / "c.yaml").write_text(CONFIG)
    assert main(["train", str(folder / "c.yaml"), "--out", str(folder / "run")]) == 0
    (folder / "records").mkdir()
    return folder


@pytest.fixture
def read_only(tmp_path):
    """A folder on a read-only file system (a tmpfs mounted ro); skipped where mounting is not allowed."""
    where = tmp_path / "ro"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("mounting a read-only tmpfs needs root with CAP_SYS_ADMIN")
    yield where
    subprocess.run(["umount", str(where)], check=True)


def _bad(kind: str, tmp_path: Path, name: str, read_only: Path | None = None) -> Path:
    if kind == "name too long":
        return tmp_path / (LONG + Path(name).suffix)
    if kind == "parent is a file":
        (tmp_path / "afile").write_text("not a folder")
        return tmp_path / "afile" / name
    if kind == "read-only":
        assert read_only is not None
        return read_only / name
    if os.geteuid() == 0:
        pytest.skip("root writes into every folder whatever its permission bits")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked / name


# (command, the output's name, argv with OUT where the refused path goes)
OUTPUTS = {
    "train --out": ("run", ["train", "{cfg}", "--out", "OUT"]),
    "eval --out": ("report", ["eval", "{ckpt}", "--protocol", "quick", "--n-examples", "4", "--no-plot", "--quiet",
                              "--out", "OUT"]),
    "eval --save-adv": ("adv.pt", ["eval", "{ckpt}", "--protocol", "quick", "--n-examples", "4", "--no-plot",
                                   "--quiet", "--out", "{tmp}/ev", "--save-adv", "OUT"]),
    "pssr-analysis --out": ("finding", ["pssr-analysis", "{ckpt}", "--n-examples", "4", "--steps", "1", "--grid", "0",
                                        "--out", "OUT"]),
    "bench --json": ("bench.json", ["bench", "--models", "small_cnn", "--iters", "1", "--warmup", "0",
                                    "--batch-size", "2", "--json", "OUT"]),
    "plot --out": ("curves.png", ["plot", "{run}", "--out", "OUT"]),
    "results --out": ("results.md", ["results", "{records}", "--out", "OUT"]),
}  # fmt: skip
INPUTS = {
    "train config": ("c.yaml", ["train", "IN", "--out", "{tmp}/o"]),
    "eval checkpoint": ("last.safetensors", ["eval", "IN", "--out", "{tmp}/o"]),
    "eval data.root": ("data", ["eval", "--model", "{model}", "--dataset", "cifar10", "--set", "data.root=IN",
                                "--out", "{tmp}/o"]),
    "pssr-analysis checkpoint": ("last.safetensors", ["pssr-analysis", "IN", "--out", "{tmp}/o"]),
    "plot run folder": ("run", ["plot", "IN"]),
    "results records": ("records", ["results", "IN", "--out", "{tmp}/o.md"]),
    "study file": ("study.yaml", ["study", "IN"]),
}  # fmt: skip


def _argv(template: list[str], trained: Path, tmp_path: Path, slot: str, path: Path) -> list[str]:
    fill = {"cfg": trained / "c.yaml", "ckpt": trained / "run" / "last.safetensors", "run": trained / "run",
            "records": trained / "records", "tmp": tmp_path, "model": "folder_channel_net:channel_net"}  # fmt: skip
    return [a.replace(slot, "{bad}").format(**fill, bad=path) for a in template]


def _run(argv: list[str], capsys) -> str:
    assert main(argv) == 2, argv
    return error_line(capsys)  # one line, no traceback


@pytest.mark.parametrize("kind", ["name too long", "parent is a file", "read-only", "no permission"])
@pytest.mark.parametrize("command", sorted(OUTPUTS))
def test_an_output_the_file_system_refuses_is_one_line_and_nothing_is_written(trained, tmp_path, capsys, request,
                                                                               command, kind):  # fmt: skip
    ro = request.getfixturevalue("read_only") if kind == "read-only" else None
    name, template = OUTPUTS[command]
    bad = _bad(kind, tmp_path, name, ro)
    before = sorted(p.name for p in tmp_path.iterdir())
    line = _run(_argv(template, trained, tmp_path, "OUT", bad), capsys)
    flag = command.split()[1]
    assert flag in line and (LONG[:24] in line or str(bad.parent) in line), line
    assert {"name too long": "longer than the file system allows", "parent is a file": "is a file, not a folder",
            "read-only": "read-only file system", "no permission": "no permission"}[kind] in line  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing new beside it (no report folder "ev")
    assert not os.path.lexists(bad) if kind != "name too long" else True
    if ro is not None:
        assert list(ro.iterdir()) == []


@pytest.mark.parametrize("kind", ["name too long", "parent is a file"])
@pytest.mark.parametrize("command", sorted(INPUTS))
def test_an_input_the_file_system_refuses_is_one_line(trained, tmp_path, capsys, user_model, command, kind):  # noqa: F811
    name, template = INPUTS[command]
    bad = _bad(kind, tmp_path, name)
    line = _run(_argv(template, trained, tmp_path, "IN", bad), capsys)
    assert LONG[:24] in line or "afile" in line, line
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.md").exists()
