"""Bad input: each case ends in exit code 2, one `advmend: error:` line naming what was wrong,
no traceback, and nothing written (the --out folder never appears).

One tiny run (synthetic 3x8x8 images, 4 classes, small_cnn width 4, one epoch) is shared by the module.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import struct
import subprocess
import sys
import typing
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import error_line as _error_line

import advmend
from advmend.cli import main
from advmend.config import RunConfig, TrainConfig, check_config
from advmend.data import DATASETS, load_dataset
from advmend.defenses.build import build_model
from advmend.errors import ConfigError, DataError
from advmend.models import MODELS
from advmend.models.registry import model_options
from advmend.training.build import build_data

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = {
    "name": "promises",
    "data": {"name": "synthetic", "val_size": 16,
             "options": {"n_train": 64, "n_test": 32, "image_size": 8, "num_classes": 4}},
    "model": {"name": "small_cnn", "options": {"width": 4}},
    "train": {"epochs": 1, "batch_size": 16, "attack": {"steps": 1}, "val_attack": {"steps": 1}, "progress": False},
    "eval": {"protocol": "quick", "n_examples": 8, "plot": False},
}  # fmt: skip


def _config(folder: Path, cfg: dict = CONFIG) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _npz(path: Path, x_train, y_train, x_test, y_test) -> Path:
    np.savez(path, x_train=np.asarray(x_train), y_train=np.asarray(y_train),
             x_test=np.asarray(x_test), y_test=np.asarray(y_test))  # fmt: skip
    return path


def _images(n: int, h: int = 8, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, h, c), dtype=np.uint8)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("promises") / "run"
    assert main(["train", str(_config(out.parent)), "--out", str(out)]) == 0
    return out


def _train_fails(tmp_path, capsys, overrides, cfg: dict = CONFIG) -> str:
    out = tmp_path / "out"
    args = ["train", str(_config(tmp_path, cfg)), "--out", str(out)]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    msg = _error_line(capsys)
    assert not out.exists()
    return msg


def _eval_fails(run, tmp_path, capsys, overrides) -> str:
    report = tmp_path / "report"
    args = ["eval", str(run / "last.safetensors"), "--out", str(report), "--quiet"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    msg = _error_line(capsys)
    assert not report.exists()
    return msg


# --------------------------------------------------------------------------- 1. model.options


@pytest.mark.parametrize(
    "override,needles",
    [
        ("model.options.nope=1", ["model.options.nope", "its options: width"]),
        ("model.options.width=abc", ["model.options.width", "integer", "'abc'"]),
        ("model.options.width=1.5", ["model.options.width", "integer"]),
        ("model.options.num_classes=3", ["model.options.num_classes", "from the data"]),
    ],
)
def test_train_bad_model_option(tmp_path, capsys, override, needles):
    msg = _train_fails(tmp_path, capsys, [override])
    for needle in needles:
        assert needle in msg


def test_model_options_fail_at_config_load_before_any_data(tmp_path):
    # A missing data file would be the error if options were checked only when the model is built.
    cfg = dict(CONFIG, data={"name": "npz", "options": {"path": str(tmp_path / "missing.npz")}})
    with pytest.raises(ConfigError, match=r"model\.options\.nope"):
        from advmend.config import load_run_config

        load_run_config(str(_config(tmp_path, cfg)), ["model.options.nope=1"])


# --------------------------------------------------------------------------- 2. empty splits


def test_eval_on_npz_with_empty_test_split(run, tmp_path, capsys):
    npz = _npz(tmp_path / "empty_test.npz", _images(8), np.arange(8) % 4, _images(0), np.zeros(0, np.int64))
    msg = _eval_fails(run, tmp_path, capsys, ["data.name=npz", f"data.options={{path: {npz}}}"])
    assert "test split is empty" in msg and str(npz) in msg


def test_train_on_npz_with_empty_train_split(tmp_path, capsys):
    npz = _npz(tmp_path / "empty_train.npz", _images(0), np.zeros(0, np.int64), _images(8), np.arange(8) % 4)
    cfg = dict(CONFIG, data={"name": "npz", "val_size": 0, "options": {"path": str(npz)}})
    msg = _train_fails(tmp_path, capsys, [], cfg)
    assert "train split is empty" in msg and str(npz) in msg


# --------------------------------------------------------------------------- 3. data the model cannot take


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["data.options.channels=1"], "1x8x8 images"),  # 1-channel data on a 3-channel model
        (["data.options.image_size=16"], "3x16x16 images"),  # another image size
        (["data.options.num_classes=6"], "6 classes"),  # labels the model cannot predict
    ],
)
def test_eval_data_the_model_cannot_take(run, tmp_path, capsys, overrides, needle):
    msg = _eval_fails(run, tmp_path, capsys, overrides)
    assert needle in msg and "last.safetensors" in msg


def test_eval_labels_beyond_the_models_classes(run, tmp_path, capsys):
    # The images fit (3x8x8) and the npz names no classes: only the labels 4..5 give it away. This one
    # used to evaluate silently (a label the model can never predict counts as a miss).
    y = np.arange(16) % 6
    npz = _npz(tmp_path / "six.npz", _images(16), y, _images(16, seed=1), y)
    msg = _eval_fails(run, tmp_path, capsys, ["data.name=npz", f"data.options={{path: {npz}}}"])
    assert "labels in [0, 5]" in msg and "predicts 4" in msg


def test_train_and_test_splits_must_agree(tmp_path):
    npz = _npz(tmp_path / "mixed.npz", _images(16), np.arange(16) % 4, _images(8, c=1), np.arange(8) % 4)
    cfg = RunConfig(data=dataclasses.replace(RunConfig().data, name="npz", val_size=0, options={"path": str(npz)}))
    with pytest.raises(DataError, match=r"1x8x8 images .* takes 3x8x8"):
        build_data(cfg.data)


# --------------------------------------------------------------------------- 4, 5. unreadable data files


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels: enough for PIL's decompression-bomb check."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_png_in_image_folder(tmp_path, capsys):
    from PIL import Image

    base = tmp_path / "images"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (base / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(_images(1)[0]).save(base / split / cls / f"{i}.png")
    bomb = base / "train" / "b" / "bomb.png"
    _png_header_only(bomb, 40_000, 40_000)  # 1.6 G pixels: PIL refuses it as a decompression bomb
    with pytest.raises(DataError, match="bomb.png.*too large"):
        load_dataset("folder", "train", path=str(base))
    cfg = dict(CONFIG, data={"name": "folder", "val_size": 2, "options": {"path": str(base)}})
    msg = _train_fails(tmp_path, capsys, [], cfg)
    assert str(bomb) in msg


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > PWNED",))


def test_pickle_in_torchvision_mnist_cache(tmp_path, capsys, monkeypatch):
    import pickle

    monkeypatch.chdir(tmp_path)
    processed = tmp_path / "root" / "MNIST" / "processed"
    processed.mkdir(parents=True)
    for name in ("training.pt", "test.pt"):
        (processed / name).write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(DataError, match=r"test\.pt .*not a plain tensor file"):
        load_dataset("mnist", "test", root=str(tmp_path / "root"))
    cfg = dict(CONFIG, data={"name": "mnist", "root": str(tmp_path / "root"), "val_size": 2})
    msg = _train_fails(tmp_path, capsys, [], cfg)
    assert str(processed / "training.pt") in msg
    assert not (tmp_path / "PWNED").exists()  # refused unread, nothing ran


# --------------------------------------------------------------------------- 6. broken pipe


def test_list_into_a_closed_pipe_exits_quietly(capsys, monkeypatch):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader went away, as `advmend list | head -1` after its line
    stdout = open(write_end, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["list"]) == 141  # 128 + SIGPIPE, as a process killed by the signal
    monkeypatch.undo()
    assert capsys.readouterr().err == ""
    stdout.close()  # its pending output now goes to devnull: no second BrokenPipeError


def test_list_into_a_closed_pipe_subprocess():
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = dict(os.environ, PYTHONPATH=str(Path(advmend.__file__).parents[1]))
    proc = subprocess.run([sys.executable, "-m", "advmend", "list"], stdout=write_end, stderr=subprocess.PIPE,
                          env=env, timeout=120)  # fmt: skip
    os.close(write_end)
    assert proc.stderr.decode() == ""
    assert proc.returncode == 141


# --------------------------------------------------------------------------- 7. non-finite numbers


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.lr=inf", "train.lr"),
        ("train.lr=.inf", "train.lr"),
        ("train.lr=nan", "train.lr"),
        ("train.lr=1e400", "train.lr"),
        ("train.attack.eps=-inf", "train.attack.eps"),
        ("train.attack.step_size=1e308/1e-308", "train.attack.step_size"),
        ("fsr.tau=.nan", "fsr.tau"),
    ],
)
def test_train_non_finite_number(tmp_path, capsys, override, key):
    msg = _train_fails(tmp_path, capsys, [override])
    assert key in msg and "finite" in msg


def test_train_huge_integer(tmp_path, capsys):
    msg = _train_fails(tmp_path, capsys, [f"train.seed={2**70}"])
    assert "train.seed" in msg and "out of range" in msg


def test_python_api_config_is_checked_too():
    cfg = RunConfig(train=TrainConfig(lr=float("inf")))
    with pytest.raises(ConfigError, match=r"train\.lr: expected a finite number"):
        check_config(cfg)
    with pytest.raises(ConfigError, match=r"train\.lr: expected a finite number"):
        build_model(cfg, 10, (3, 32, 32))


# --------------------------------------------------------------------------- 8. failed download


@pytest.fixture
def no_network(monkeypatch):
    """Every download fails at once and for real: urllib goes through a proxy that refuses connections."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_failed_download_leaves_nothing_behind(tmp_path, no_network, name):
    root = tmp_path / "data"
    root.mkdir()
    (root / "keep.txt").write_text("mine")
    (root / "MNIST").mkdir()  # a folder torchvision writes into, there before: it stays, empty
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(DataError, match="downloading it failed"):
        load_dataset(name, "test", root=str(root), download=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    deep = tmp_path / "new" / "deeper"
    with pytest.raises(DataError, match="downloading it failed"):
        load_dataset(name, "test", root=str(deep), download=True)
    assert not (tmp_path / "new").exists()  # the folders the attempt created are gone too


def test_failed_download_error_is_one_line(tmp_path, capsys, no_network):
    cfg = dict(CONFIG, data={"name": "mnist", "root": str(tmp_path / "d"), "download": True, "val_size": 2})
    msg = _train_fails(tmp_path, capsys, [], cfg)
    assert "downloading it failed" in msg
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- 9. suggested keys are real keys


def _schema_keys(cls=RunConfig, prefix: str = "") -> set[str]:
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.add(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= _schema_keys(hints[f.name], key + ".")
    for name in DATASETS.names():  # data.options.<loader option>
        keys |= {f"data.options.{p}" for p in inspect.signature(DATASETS.get(name)).parameters}
    for name in MODELS.names():
        keys |= {f"model.options.{p}" for p in model_options(name)}
    return keys


_SECTIONS = ("data", "model", "fsr", "train", "eval", "pssr")


def _message_keys(path: Path) -> list[tuple[int, str]]:
    """Dotted config keys (data.x, model.options.y, ...) named in the messages of raised errors."""
    pattern = re.compile(r"(?<![\w.])((?:{})\.[a-z_][a-z_0-9]*(?:\.[a-z_][a-z_0-9]*)*)".format("|".join(_SECTIONS)))
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            for sub in ast.walk(node.exc):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    found += [(node.lineno, m) for m in pattern.findall(sub.value)]
    return found


PACKAGE = Path(advmend.__file__).parent


@pytest.mark.parametrize("rel", sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")))
def test_error_messages_suggest_only_real_keys(rel):
    keys = _schema_keys()
    bad = [(line, key) for line, key in _message_keys(PACKAGE / rel) if key not in keys]
    assert not bad, f"{rel}: messages name keys that do not exist: {bad}"


def test_message_scan_finds_a_wrong_key(tmp_path):
    # The scanner itself: the old suggestion `data.path` is caught, `data.options.path` is not.
    src = tmp_path / "m.py"
    src.write_text('raise ValueError(f"set --set data.path=FILE or --set data.options.path=FILE")\n')
    keys = _schema_keys()
    assert [k for _, k in _message_keys(src) if k not in keys] == ["data.path"]


def test_listing_names_real_keys(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    keys = _schema_keys()
    # Every dotted name but a Python path (advmend.attacks.BPDA) must be a whole key (not `attack.loss`).
    named = [k for k in re.findall(r"(?<![\w./])([a-z_]+(?:\.[a-z_0-9]+)+)", out) if not k.startswith("advmend.")]
    assert "train.method" in named and "model.options" in named
    assert all(k in keys for k in named), [k for k in named if k not in keys]
    assert "model.options: width" in out


def test_eval_device_message_names_both_ways_to_set_it(run, tmp_path, capsys):
    report = tmp_path / "report"
    assert main(["eval", str(run / "last.safetensors"), "--device", "nope", "--out", str(report)]) == 2
    msg = _error_line(capsys)
    assert "--device" in msg and not report.exists()


@pytest.mark.parametrize("argv", [["eval", "x.safetensors", "--n-examples", "q"], [], ["nope"], ["train"]])
def test_bad_command_line_is_one_line(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "--help" in _error_line(capsys)


def test_binary_config_file(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_bytes(b"\x00\x01\xff\xfe")
    out = tmp_path / "out"
    assert main(["train", str(config), "--out", str(out)]) == 2
    assert "not a YAML text file" in _error_line(capsys) and not out.exists()


@pytest.mark.parametrize("override", ["eval.n_examples=0", "eval.norm=l0"])
def test_bad_after_train_eval_setting_fails_before_training(tmp_path, capsys, override):
    msg = _train_fails(tmp_path, capsys, ["eval.after_train=true", override])
    assert override.split("=")[0] in msg
