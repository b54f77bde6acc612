"""The threat model is one value: None resolved in one place (from the data set's row of standard radii:
its own, `data.radii`, or an image folder's size), recorded by training, read back by evaluation."""

import json

import pytest
from test_folder import make_folder, user_model  # noqa: F401 (user_model: a fixture)

from advmend.cli import main
from advmend.config import DataConfig, from_dict
from advmend.data import dataset_radii
from advmend.errors import ConfigError
from advmend.evaluation.run import evaluation_threat
from advmend.training.build import build_data
from advmend.types import L2_EPS, ThreatModel

CIFAR = dataset_radii("cifar10")


def test_none_means_the_data_sets_radius_for_its_norm():
    assert ThreatModel.resolve("linf", None, CIFAR) == ThreatModel("linf", 8 / 255)
    assert ThreatModel.resolve("l2", None, CIFAR) == ThreatModel("l2", L2_EPS)
    assert ThreatModel.resolve("linf", 4 / 255, CIFAR) == ThreatModel("linf", 4 / 255)


def test_evaluation_takes_the_training_threat_when_the_norms_agree():
    record = {"eps": 4 / 255, "norm": "linf"}
    assert evaluation_threat(record, "linf", CIFAR) == ThreatModel("linf", 4 / 255)
    assert evaluation_threat(record, "l2", CIFAR) == ThreatModel("l2", L2_EPS)
    assert evaluation_threat({"eps": 0.3}, "linf", CIFAR) == ThreatModel("linf", 0.3)  # before "norm" was recorded
    assert evaluation_threat({}, "l2", dataset_radii("folder", (3, 224, 224))) == ThreatModel("l2", 3.0)  # user model


def test_each_data_set_resolves_its_own_row_of_radii():
    """CIFAR-10 and the other built-in sets as before; a folder, npz or synthetic set by its image size
    (ImageNet's radii from 224 px a side), unless `data.radii` names the row."""
    assert CIFAR.eps == {"linf": 8 / 255, "l2": 0.5, "l1": 12.0}
    assert dataset_radii("mnist").eps == {"linf": 0.3, "l2": 0.5, "l1": 12.0}  # its own L-inf radius
    assert dataset_radii("cifar10", (3, 224, 224)).eps == CIFAR.eps  # a built-in set's row is its own
    for name in ("folder", "npz", "synthetic"):
        assert dataset_radii(name, (3, 224, 224)).eps == {"linf": 4 / 255, "l2": 3.0}
        assert dataset_radii(name, (3, 256, 300)).row == "imagenet"
        assert dataset_radii(name, (3, 64, 64)).eps == CIFAR.eps
        assert dataset_radii(name, (3, 223, 224)).row == "cifar10"
        assert dataset_radii(name).row == "cifar10"
    assert dataset_radii("folder", (3, 64, 64), "imagenet").eps == {"linf": 4 / 255, "l2": 3.0}
    assert dataset_radii("folder", (3, 224, 224), "cifar10").eps == CIFAR.eps
    with pytest.raises(ConfigError, match="data.radii must be one of"):
        from_dict(DataConfig, {"name": "folder", "radii": "tinyimagenet"})


def test_build_data_gives_a_224px_folder_imagenets_radii(tmp_path):
    base = make_folder(tmp_path / "f", per_class=1)
    info = build_data(DataConfig(name="folder", val_size=0, options={"path": str(base), "image_size": 224})).info
    assert info["radii"].eps == {"linf": 4 / 255, "l2": 3.0} and info["eps"] == 4 / 255
    small = build_data(DataConfig(name="folder", val_size=0, options={"path": str(base), "image_size": 48})).info
    assert small["radii"].eps == CIFAR.eps and small["eps"] == 8 / 255


@pytest.mark.parametrize("norm,radii,expected", [("linf", None, 4 / 255), ("l2", None, 3.0), ("l2", "cifar10", 0.5)])
def test_eval_on_a_224px_folder_attacks_at_imagenets_radius(tmp_path, user_model, norm, radii, expected):  # noqa: F811
    base = make_folder(tmp_path / "f", per_class=1)
    out = tmp_path / "report"
    extra = ["--set", f"data.radii={radii}"] if radii else []
    assert main(["eval", "--model", user_model, "--dataset", "folder", "--set", f"data.options.path={base}",
                 "--set", "data.options.image_size=224", "--norm", norm, *extra, "--protocol", "quick",
                 "--no-plot", "--quiet", "--out", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["norm"] == norm and report["meta"]["eps"] == pytest.approx(expected)
    assert all(a["settings"]["eps"] == pytest.approx(expected) for a in report["attacks"])


def test_l1_without_a_radius_on_an_imagenet_sized_folder_is_one_line(tmp_path, user_model, capsys):  # noqa: F811
    base = make_folder(tmp_path / "f", per_class=1)
    out = tmp_path / "report"
    code = main(["eval", "--model", user_model, "--dataset", "folder", "--set", f"data.options.path={base}",
                 "--set", "data.options.image_size=224", "--norm", "l1", "--protocol", "quick",
                 "--no-plot", "--quiet", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "has no standard l1 radius" in err and "--eps" in err, err
    assert not out.exists()


@pytest.mark.parametrize("radii,expected", [(None, 3.0), ("cifar10", 0.5)])
def test_training_at_224px_records_imagenets_l2_radius(tmp_path, radii, expected):
    """An unset train.attack.eps on 224-px images trains at, and records, ImageNet's L2 radius 3.0."""
    cfg = tmp_path / "c.yaml"
    row = f", radii: {radii}" if radii else ""
    cfg.write_text(
        f"name: t\ndata: {{name: synthetic, val_size: 4, options: {{n_train: 12, n_test: 4, image_size: 224}}{row}}}\n"
        "model: {name: small_cnn, options: {width: 2}}\n"
        "train: {epochs: 1, batch_size: 8, attack: {steps: 1, norm: l2}, val_attack: {steps: 1, norm: l2},"
        " progress: false}\neval: {protocol: none}\n"
    )
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out)]) == 0
    record = json.loads((out / "last.json").read_text())
    assert record["norm"] == "l2" and record["eps"] == pytest.approx(expected)


def test_training_records_the_attacks_real_eps_and_eval_reads_it_back(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "name: t\ndata: {name: synthetic, val_size: 32, options: {n_train: 96, n_test: 32}}\n"
        "model: {name: small_cnn, options: {width: 4}}\n"
        "train: {epochs: 1, batch_size: 32, attack: {steps: 1}, val_attack: {steps: 1}, progress: false}\n"
    )
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--set", "train.attack.eps=4/255"]) == 0
    record = json.loads((out / "last.json").read_text())
    assert record["eps"] == pytest.approx(4 / 255) and record["norm"] == "linf"
    ev = tmp_path / "ev"
    assert main(["eval", str(out / "last.safetensors"), "--protocol", "quick", "--n-examples", "8",
                 "--no-plot", "--quiet", "--out", str(ev)]) == 0  # fmt: skip
    assert json.loads((ev / "report.json").read_text())["meta"]["eps"] == pytest.approx(4 / 255)
