"""Fuzzing the `advmend` command: whatever a user writes, the command ends with exit code 0 or
2, never a traceback, and an exit 2 is one `advmend: error:` line that leaves nothing behind (the --out
folder does not appear, or is unchanged for --resume; no stray folder in the working directory).

* `advmend train` with `--set` overrides drawn by hypothesis: real keys of the config schema (and of the
  synthetic data set's and small_cnn's options) plus junk keys; values of the right type, the wrong type,
  non-finite numbers, huge ints, fractions, empty strings, lists, mappings.
* `advmend eval` of a tiny checkpoint with drawn `--set data.* / eval.*` values and flags.
* A table of hand-made bad files: corrupt YAML, truncated or malformed npz, float / NaN images, a
  truncated or garbled checkpoint, an edited JSON sidecar.

Every run stays tiny (synthetic 3x8x8 data, small_cnn width 4, one epoch, one-step attacks). Values that
are valid but only slow (train.epochs=10**6, the paper protocol, torch.compile) are not drawn: they are
not bugs, and the file must run in seconds. ADVMEND_FUZZ_SCALE=10 draws ten times more examples (about 270
by default); ADVMEND_FUZZ_RANDOM=1 draws a new random sample instead of the fixed, reproducible one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import typing
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from advmend.cli import main  # noqa: E402
from advmend.config import RunConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SCALE = float(os.environ.get("ADVMEND_FUZZ_SCALE", "1"))


def fuzz_settings(examples: int) -> settings:
    return settings(FUZZ, max_examples=max(1, int(examples * SCALE)))


FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=os.environ.get("ADVMEND_FUZZ_RANDOM") != "1",
    database=None,  # write nothing into the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    print_blob=True,
)

BASE = {
    "name": "fuzz",
    "data": {"name": "synthetic", "val_size": 8,
             "options": {"n_train": 32, "n_test": 16, "image_size": 8, "num_classes": 4}},
    "model": {"name": "small_cnn", "options": {"width": 4}},
    "fsr": {"hidden": 4},
    "train": {"epochs": 1, "batch_size": 16, "attack": {"steps": 1}, "val_attack": {"steps": 1}, "progress": False},
    "eval": {"protocol": "quick", "n_examples": 8, "plot": False},
}  # fmt: skip

# Keys whose large (valid) values only make a run slow: drawn small, or out of range, or of a wrong type.
COST_KEYS = {
    "train.epochs", "train.attack.steps", "train.attack.restarts", "train.attack.eot", "train.val_attack.steps",
    "train.val_attack.restarts", "train.val_attack.eot", "fsr.hidden", "pssr.epochs", "pssr.width", "pssr.depth",
    "pssr.attack.steps", "pssr.attack.restarts", "pssr.attack.eot", "data.train_subset", "data.val_size",
    "eval.n_examples", "train.val_every", "train.patience",
}  # fmt: skip
# Valid values that are only slow, never drawn.
SLOW = {"train.compile": True, "eval.sanity_full": True, "pssr.enabled": True}
CHOICES = {  # a few real values for string keys, drawn besides junk strings
    "data.name": ["synthetic", "npz", "cifar10", "folder"],
    "model.name": ["small_cnn", "resnet18"],
    "train.method": ["pgd_at", "trades", "mart", "fast_at", "standard"],
    "train.schedule": ["piecewise", "cosine", "constant"],
    "train.select": ["robust", "clean", "last"],
    "train.amp": ["off", "bf16", "fp16"],
    "train.device": ["auto", "cpu", "cuda", "cuda:7", "tpu"],
    "eval.protocol": ["quick"],
    "eval.norm": ["linf", "l2"],
    "train.attack.norm": ["linf", "l2", "l1"],
    "train.attack.loss": ["ce", "kl", "margin", "ce_targeted"],
    "train.attack.start": ["uniform", "normal"],
}
OPTION_KEYS = {  # open mappings: the synthetic loader's and small_cnn's keyword arguments
    "data.options.n_train": int, "data.options.n_test": int, "data.options.image_size": int,
    "data.options.num_classes": int, "data.options.channels": int, "data.options.seed": int,
    "data.options.noise": float, "model.options.width": int,
}  # fmt: skip


def _schema(cls=RunConfig, prefix: str = "") -> dict[str, object]:
    """Every dotted key of the config schema and its annotation."""
    out: dict[str, object] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_schema(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


SCHEMA = {k: v for k, v in _schema().items() if k not in ("out_dir",)} | OPTION_KEYS

# --------------------------------------------------------------------------- value strategies

finite_or_not = st.sampled_from(["inf", "-inf", ".inf", "nan", ".nan", "1e400", "-1e400", "1e308/1e-308"])
fractions = st.sampled_from(["8/255", "1/0", "0/0", "2/3", "1/-4", "/", "8/", "1e-3", "0.5/0.25"])
# Beyond int64 only: 2**63 - 1 itself is a valid (and, as train.epochs, endless) value.
huge_ints = st.sampled_from([2**63, -(2**63) - 1, 2**70, 10**30, -(10**30)])
junk_text = st.one_of(
    st.sampled_from(["", " ", "abc", "[", "{", "{a: 1}", "[1, 2]", "null", "~", "yes", "no", "'x'", "-", "0x10",
                     "1_000", "True", "0o7", "\u00e9", "a=b", "a.b"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8),
)  # fmt: skip
junk = st.one_of(junk_text, finite_or_not, fractions, huge_ints, st.integers(-3, 3),
                 st.floats(allow_nan=False, allow_infinity=False, width=32), st.booleans())  # fmt: skip


def _valid_ish(key: str, tp) -> st.SearchStrategy[str]:
    """Values of the key's own type (small, so a run that passes stays fast), as --set text."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, __import__("types").UnionType):
        inner = [a for a in args if a is not type(None)]
        return st.one_of(st.just("null"), *[_valid_ish(key, a) for a in inner])
    if key in CHOICES:
        return st.sampled_from(CHOICES[key])
    if tp is bool:
        return st.sampled_from(["true", "false"] if key not in SLOW else ["false"])
    if tp is int:
        return st.integers(-2, 4).map(str)
    if tp is float:
        return st.one_of(st.floats(-1, 2, allow_nan=False).map(repr), st.sampled_from(["8/255", "0", "1e-3"]))
    if origin is tuple:
        return st.lists(st.floats(-0.5, 1.5, allow_nan=False), max_size=3).map(lambda v: yaml.safe_dump(v).strip())
    if origin is dict:
        return st.sampled_from(["{}", "{a: 1}", "[]", "x"])
    return st.sampled_from(["", "x"])


def _is_true(text: str) -> bool:
    try:
        return yaml.safe_load(text) is True  # YAML 1.1: yes, on, True...
    except yaml.YAMLError:
        return False


def _value(key: str) -> st.SearchStrategy[str]:
    tp = SCHEMA.get(key, str)
    wrong = junk.map(lambda v: v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip()
                     .removesuffix("\n...").removesuffix("..."))  # fmt: skip
    bare = next((a for a in typing.get_args(tp) if a is not type(None)), tp)  # int | None -> int
    # Edge values of the key's own kind first: out-of-range ints for ints, non-finite numbers for floats.
    edge = {int: huge_ints.map(str), float: st.one_of(finite_or_not, fractions)}.get(bare, wrong)
    values = st.one_of(_valid_ish(key, tp), _valid_ish(key, tp), edge, wrong)
    return values.filter(lambda v: not _is_true(v)) if key in SLOW else values


junk_keys = st.one_of(
    st.sampled_from(["nope", "train.nope", "data.options.nope", "model.options.nope", "train.attack.nope",
                     "train.lr.x", "data.path", "model.width", "eval..x", ".train", "train.", "a.b.c.d"]),
    st.from_regex(r"\A[a-z_]{1,6}(\.[a-z_]{1,6}){0,2}\Z"),
)  # fmt: skip
# The open option mappings (data.options, model.options) are where the schema checks least: drawn more often.
known_keys = st.one_of(st.sampled_from(sorted(SCHEMA)), st.sampled_from(sorted(OPTION_KEYS)))
override = st.one_of(known_keys, known_keys, known_keys, junk_keys).flatmap(
    lambda k: _value(k).map(lambda v: f"{k}={v}")
)


# --------------------------------------------------------------------------- running the command


def _tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 (or 'dir') of everything under folder."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class Sandbox:
    """A fresh working directory with a data root that has no data, and no network."""

    def __init__(self, base: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(dir=base))
        (self.dir / "data").mkdir()

    def run(self, capsys, argv: list[str], out: Path) -> tuple[int, str]:
        """main(argv) from the sandbox; checks the promises and returns (exit code, stderr)."""
        before_out = _tree(out) if out.exists() else None
        before = _tree(self.dir)
        cwd = os.getcwd()
        os.chdir(self.dir)
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: a flag value of the wrong type
            code = e.code
        finally:
            os.chdir(cwd)
        captured = capsys.readouterr()
        err = captured.err
        assert "Traceback" not in err, f"{argv}\n{err}"
        assert code in (0, 2), f"{argv}: exit {code}\n{err}"
        if code == 2:
            lines = [line for line in err.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("advmend: error:"), f"{argv}\n{err}"
            now = _tree(out) if out.exists() else None
            assert now == before_out, f"{argv}: exit 2 changed {out}\n{err}"
            after = _tree(self.dir)
            assert after == before, f"{argv}: exit 2 changed {sorted(set(after.items()) ^ set(before.items()))}\n{err}"
        return code, err


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(autouse=True)
def _no_data_no_network(monkeypatch, tmp_path):
    """Built-in data sets are not found (no ADVMEND_DATA, an empty root) and downloads fail at once."""
    monkeypatch.setenv("ADVMEND_DATA", str(tmp_path / "no-data"))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)


COUNTS: dict[str, list[int]] = {}


def _count(test: str, code: int) -> None:
    COUNTS.setdefault(test, []).append(code)


plausible = known_keys.filter(lambda k: k not in SLOW).flatmap(
    lambda k: _valid_ish(k, SCHEMA[k]).map(lambda v: f"{k}={v}")
)


@given(overrides=st.lists(override, min_size=1, max_size=2))
@fuzz_settings(150)
def test_fuzz_train_overrides(fuzz_base, capsys, overrides):
    _fuzz_train(fuzz_base, capsys, overrides)


@given(overrides=st.lists(plausible, min_size=1, max_size=3))
@fuzz_settings(60)
def test_fuzz_train_plausible_values(fuzz_base, capsys, overrides):
    """Values of the right type only: more runs get past validation, into training and evaluation."""
    _fuzz_train(fuzz_base, capsys, ["eval.after_train=true", *overrides])


def _fuzz_train(fuzz_base, capsys, overrides):
    box = Sandbox(fuzz_base)
    config = box.dir / "config.yaml"
    config.write_text(yaml.safe_dump(BASE, sort_keys=False))
    out = box.dir / "run"
    argv = ["train", str(config), "--out", str(out)]
    for o in overrides:
        argv += ["--set", o]
    code, _ = box.run(capsys, argv, out)
    _count("train", code)
    shutil.rmtree(box.dir, ignore_errors=True)


def _edges(key: str) -> list[str]:
    """The edge values of one key, for the exhaustive sweep below."""
    tp = SCHEMA[key]
    bare = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    origin = typing.get_origin(bare)
    if bare is int:  # 2**62 is valid int64: only where a large value is cheap or must be refused early
        return [str(2**70), "-1", "0", "1.5", "x"] + ([str(2**62)] if key not in COST_KEYS else [])
    if bare is float:
        return ["inf", "nan", "1e400", "-1", "1/0", "x"]
    if bare is bool:
        return ["maybe", "2", "[]"]
    if origin is tuple:
        return ["[inf]", "x", "[[1]]", "[]"]
    if origin is dict:
        return ["x", "[1]", "{1: 2}", "{nope: 1}"]
    return ["", "[x]", "{a: 1}", "0"]


@pytest.mark.parametrize("key", sorted(SCHEMA))
def test_every_key_at_its_edges(fuzz_base, capsys, key):
    """Deterministic sweep: every key of the schema, one at a time, at each of its edge values."""
    for value in _edges(key):
        _fuzz_train(fuzz_base, capsys, [f"{key}={value}"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-ckpt")
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(BASE, sort_keys=False))
    assert main(["train", str(config), "--out", str(folder / "run")]) == 0
    return folder / "run"


EVAL_KEYS = sorted(k for k in SCHEMA if k.startswith(("data.", "eval.")))
eval_override = st.one_of(st.sampled_from(EVAL_KEYS), st.sampled_from(EVAL_KEYS), junk_keys).flatmap(
    lambda k: _value(k).map(lambda v: f"{k}={v}")
)
flag = st.one_of(
    st.tuples(st.just("--n-examples"), st.sampled_from(["0", "-1", "4", "99999", "x", "1.5", str(2**70)])),
    st.tuples(st.just("--batch-size"), st.sampled_from(["0", "-3", "3", "", str(2**70)])),
    st.tuples(st.just("--eps"), st.one_of(finite_or_not, fractions, st.sampled_from(["0", "-1", "", "1e-9", "2"]))),
    st.tuples(st.just("--norm"), st.sampled_from(["linf", "l2", "l1"])),
    st.tuples(st.just("--protocol"), st.sampled_from(["quick", "nope", ""])),
    st.tuples(st.just("--device"), st.sampled_from(["cpu", "auto", "cuda", "x"])),
    st.tuples(st.just("--save-adv"), st.sampled_from(["adv.pt", "adv.txt", "adv.safetensors", ""])),
)


@given(overrides=st.lists(eval_override, max_size=3), flags=st.lists(flag, max_size=3))
@fuzz_settings(60)
def test_fuzz_eval(fuzz_base, checkpoint, capsys, overrides, flags):
    box = Sandbox(fuzz_base)
    out = box.dir / "report"
    argv = ["eval", str(checkpoint / "last.safetensors"), "--out", str(out), "--quiet", "--no-plot"]
    for name, value in flags:
        argv += [name, value] if not value.startswith("-") else [f"{name}={value}"]
    for o in overrides:
        argv += ["--set", o]
    before = _tree(checkpoint)
    code, _ = box.run(capsys, argv, out)
    assert _tree(checkpoint) == before  # evaluation never writes into the run
    _count("eval", code)
    shutil.rmtree(box.dir, ignore_errors=True)


# --------------------------------------------------------------------------- hand-made bad files


def _npz_bytes(folder: Path, **arrays) -> Path:
    path = folder / "data.npz"
    np.savez(path, **arrays)
    return path


def _u8(*shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _good(n: int = 24) -> dict[str, np.ndarray]:
    y = np.arange(n) % 4
    return {"x_train": _u8(n, 8, 8, 3), "y_train": y, "x_test": _u8(n // 2, 8, 8, 3, seed=1), "y_test": y[: n // 2]}


def _truncated(folder: Path) -> Path:
    path = _npz_bytes(folder, **_good())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _garbled_member(folder: Path) -> Path:
    path = _npz_bytes(folder, **_good())
    data = bytearray(path.read_bytes())
    data[60:90] = b"\xff" * 30  # inside the first member's .npy header
    path.write_bytes(bytes(data))
    return path


def _pickled_member(folder: Path) -> Path:
    path = folder / "data.npz"
    with zipfile.ZipFile(path, "w") as z:  # an object array: np.load(allow_pickle=False) must refuse it
        import io

        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        z.writestr("x_train.npy", buf.getvalue())
        for k, v in _good().items():
            if k != "x_train":
                buf = io.BytesIO()
                np.save(buf, v)
                z.writestr(f"{k}.npy", buf.getvalue())
    return path


def _with(**changes):
    return lambda folder: _npz_bytes(folder, **(_good() | changes))


NPZ_CASES = {
    "truncated": _truncated,
    "garbled member": _garbled_member,
    "object array (pickle)": _pickled_member,
    "not a zip": lambda f: (f / "data.npz").write_bytes(b"PK\x03\x04 not really") and f / "data.npz",
    "empty file": lambda f: (f / "data.npz").write_bytes(b"") or f / "data.npz",
    "a .npy array": lambda f: np.save(f / "data.npy", _u8(4, 8, 8, 3)) or (f / "data.npy").rename(f / "data.npz"),
    "a folder": lambda f: (f / "data.npz").mkdir() or f / "data.npz",
    "float images in [0,1]": _with(x_train=np.random.default_rng(0).random((24, 8, 8, 3))),
    "NaN images": _with(x_train=np.full((24, 8, 8, 3), np.nan, np.float32)),
    "float images outside [0,1]": _with(x_train=np.full((24, 8, 8, 3), 3.5)),
    "int64 images": _with(x_train=np.full((24, 8, 8, 3), 300, np.int64)),
    "float labels": _with(y_train=np.arange(24) / 2),
    "negative labels": _with(y_train=-np.ones(24, np.int64)),
    "huge labels": _with(y_train=np.full(24, 2**40, np.int64)),
    "NCHW images": _with(x_train=_u8(24, 3, 8, 8)),
    "2-D images": _with(x_train=_u8(24, 64)),
    "5-D images": _with(x_train=_u8(24, 8, 8, 3, 1)),
    "labels too few": _with(y_train=np.arange(10) % 4),
    "2-D labels": _with(y_train=np.zeros((24, 1), np.int64)),
    "missing y_test": lambda f: _npz_bytes(f, **{k: v for k, v in _good().items() if k != "y_test"}),
    "empty test split": _with(x_test=_u8(0, 8, 8, 3), y_test=np.zeros(0, np.int64)),
    "test images of another size": _with(x_test=_u8(12, 6, 6, 3)),
    "test has one channel": _with(x_test=_u8(12, 8, 8, 1)),
    "classes not strings": _with(classes=np.array([[1, 2], [3, 4]])),
    "one class name for 4 labels": _with(classes=np.array(["a"])),
    "images 1x1": _with(x_train=_u8(24, 1, 1, 3), x_test=_u8(12, 1, 1, 3)),
}


@pytest.mark.parametrize("case", sorted(NPZ_CASES))
def test_bad_npz_at_train(tmp_path, capsys, case):
    box = Sandbox(tmp_path)
    path = NPZ_CASES[case](box.dir)
    cfg = dict(BASE, data={"name": "npz", "val_size": 4, "options": {"path": str(path)}},
               eval=dict(BASE["eval"], after_train=True))  # fmt: skip
    config = box.dir / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = box.dir / "run"
    code, _ = box.run(capsys, ["train", str(config), "--out", str(out)], out)
    _count("npz", code)
    assert code == 2, case  # none of these is usable data


@pytest.mark.parametrize("case", sorted(NPZ_CASES))
def test_bad_npz_at_eval(tmp_path, checkpoint, capsys, case):
    box = Sandbox(tmp_path)
    path = NPZ_CASES[case](box.dir)
    out = box.dir / "report"
    argv = ["eval", str(checkpoint / "last.safetensors"), "--out", str(out), "--quiet", "--no-plot",
            "--set", "data.name=npz", "--set", f"data.options={{path: {path}}}"]  # fmt: skip
    code, _ = box.run(capsys, argv, out)
    _count("npz", code)
    # Eval reads the test split alone, so a bad train split may go unnoticed; these spoil the test split.
    if "test" in case or case in (
        "truncated",
        "not a zip",
        "empty file",
        "a .npy array",
        "a folder",
        "images 1x1",
        "huge labels",
    ):
        assert code == 2, case


YAML_CASES = {
    "corrupt yaml": "name: [unclosed\n  data: {",
    "tabs": "name:\tx\n\tdata: 1\n",
    "top-level list": "- a\n- b\n",
    "top-level scalar": "42\n",
    "section is a scalar": "train: 5\n",
    "section is a list": "data: [1, 2]\n",
    "int keys": "1: 2\n",
    "options not a mapping": "model: {name: small_cnn, options: [1]}\n",
    "option with int key": "model: {name: small_cnn, options: {1: 2}}\n",
    "binary junk": "\x00\x01\x02\xff",
    "anchors bomb": "a: &a [x, x, x, x]\nb: &b [*a, *a, *a, *a]\nc: &c [*b, *b, *b, *b]\ntrain: *c\n",
    "python tag": "train: !!python/object/apply:os.system ['echo pwned']\n",
    "empty": "",
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_bad_yaml(tmp_path, capsys, case):
    box = Sandbox(tmp_path)
    config = box.dir / "config.yaml"
    config.write_bytes(YAML_CASES[case].encode("utf-8", "surrogateescape") if case != "binary junk"
                       else b"\x00\x01\x02\xff")  # fmt: skip
    out = box.dir / "run"
    code, _ = box.run(capsys, ["train", str(config), "--out", str(out), "--set", "train.epochs=1",
                               "--set", "train.progress=false", "--set", "model.name=small_cnn",
                               "--set", "data.name=synthetic", "--set", "data.options={n_train: 16, n_test: 8}",
                               "--set", "data.val_size=0", "--set", "train.attack.steps=1",
                               "--set", "model.options.width=2", "--set", "fsr.enabled=false"], out)  # fmt: skip
    _count("yaml", code)
    assert code == (0 if case == "empty" else 2), case


def _ckpt_copy(checkpoint: Path, folder: Path) -> Path:
    dst = folder / "run"
    shutil.copytree(checkpoint, dst)
    return dst


def _edit_json(path: Path, fn) -> None:
    record = json.loads(path.read_text())
    fn(record)
    path.write_text(json.dumps(record))


CKPT_CASES = {
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    "header length garbled": lambda f: f.write_bytes(b"\xff" * 8 + f.read_bytes()[8:]),
    "header json garbled": lambda f: f.write_bytes(f.read_bytes()[:8] + b"{" * 20 + f.read_bytes()[28:]),
    "a tensor byte flipped": lambda f: f.write_bytes(f.read_bytes()[:-9] + bytes([f.read_bytes()[-9] ^ 0xFF])
                                                     + f.read_bytes()[-8:]),
    "empty": lambda f: f.write_bytes(b""),
    "not safetensors": lambda f: f.write_bytes(b"PK\x03\x04" + b"\x00" * 64),
    "sidecar edited eps": lambda f: _edit_json(f.with_suffix(".json"), lambda r: r.update(eps=0.5)),
    "sidecar garbage": lambda f: f.with_suffix(".json").write_text("{not json"),
    "sidecar removed": lambda f: f.with_suffix(".json").unlink(),
    "record eps edited in place": lambda f: _edit_embedded_eps(f),
}  # fmt: skip


def _edit_embedded_eps(path: Path) -> None:
    """Change one digit of the eps in the record embedded in the safetensors header (same length)."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    at = data.find(b'eps\\": 0.0', 8, 8 + header_len)
    assert at > 0, "the embedded record has no eps to edit"
    digit = at + len(b'eps\\": 0.0')
    data[digit] = ord("1") if data[digit] != ord("1") else ord("2")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", sorted(CKPT_CASES))
def test_bad_checkpoint_at_eval(tmp_path, checkpoint, capsys, case):
    box = Sandbox(tmp_path)
    run = _ckpt_copy(checkpoint, box.dir)
    CKPT_CASES[case](run / "last.safetensors")
    out = box.dir / "report"
    code, _ = box.run(capsys, ["eval", str(run / "last.safetensors"), "--out", str(out), "--quiet", "--no-plot"],
                      out)  # fmt: skip
    _count("checkpoint", code)
    if not case.startswith("sidecar"):  # the sidecar is a readable copy; the embedded record counts
        assert code == 2, case


@pytest.mark.parametrize("case", sorted(CKPT_CASES))
def test_bad_checkpoint_at_resume(tmp_path, checkpoint, capsys, case):
    box = Sandbox(tmp_path)
    run = _ckpt_copy(checkpoint, box.dir)
    CKPT_CASES[case](run / "last.safetensors")
    config = box.dir / "config.yaml"
    config.write_text(yaml.safe_dump(BASE, sort_keys=False))
    code, _ = box.run(capsys, ["train", str(config), "--out", str(run), "--resume", "--set", "train.epochs=2"],
                      run)  # fmt: skip
    _count("checkpoint", code)
    if not case.startswith("sidecar"):
        assert code == 2, case


def test_zz_report_counts(capsys):
    """Prints how many cases ran and how they ended (see `pytest -s`); runs last in this file."""
    total = sum(len(v) for v in COUNTS.values())
    with capsys.disabled():
        summary = ", ".join(f"{k}: {len(v)} ({v.count(0)} exit 0, {v.count(2)} exit 2)" for k, v in COUNTS.items())
        print(f"\nfuzz cases: {total}; {summary}")
