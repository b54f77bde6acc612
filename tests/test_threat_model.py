"""The threat model is one value: None resolved in one place, recorded by training, read back by evaluation."""

import json

import pytest

from advmend.cli import main
from advmend.evaluation.run import evaluation_threat
from advmend.types import L2_EPS, ThreatModel


def test_none_means_the_data_sets_radius_for_its_norm():
    assert ThreatModel.resolve("linf", None, 8 / 255) == ThreatModel("linf", 8 / 255)
    assert ThreatModel.resolve("l2", None, 8 / 255) == ThreatModel("l2", L2_EPS)
    assert ThreatModel.resolve("linf", 4 / 255, 8 / 255) == ThreatModel("linf", 4 / 255)


def test_evaluation_takes_the_training_threat_when_the_norms_agree():
    record = {"eps": 4 / 255, "norm": "linf"}
    assert evaluation_threat(record, "linf", 8 / 255) == ThreatModel("linf", 4 / 255)
    assert evaluation_threat(record, "l2", 8 / 255) == ThreatModel("l2", L2_EPS)
    assert evaluation_threat({"eps": 0.3}, "linf", 8 / 255) == ThreatModel("linf", 0.3)  # before "norm" was recorded


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
