"""pssr.pretrain_epochs: reconstruction pre-training of the regenerator (clean images, L_pix only,
no attack) before the adversarial stage, in one epoch counter (so --resume stays exact)."""

from __future__ import annotations

import json

import pytest

from advmend.config import RunConfig, from_dict
from advmend.errors import ConfigError
from advmend.training.pssr_loop import train_pssr

CFG = {
    "name": "pssr-pretrain",
    "data": {"name": "synthetic", "val_size": 16, "options": {"n_train": 64, "n_test": 16, "image_size": 8}},
    "model": {"name": "small_cnn", "options": {"width": 4}},
    "train": {"method": "standard", "epochs": 1, "batch_size": 32, "val_attack": {"steps": 1},
              "progress": False, "device": "cpu"},
    # dropout 0: the pre-training's two paths are the same clean images, so their L1 must be equal
    "pssr": {"enabled": True, "width": 4, "epochs": 1, "pretrain_epochs": 2, "batch_size": 32, "dropout": 0.0,
             "attack": {"steps": 1, "step_size": 0.02, "random_start": True}},
}  # fmt: skip


def _cfg(**pssr) -> RunConfig:
    d = json.loads(json.dumps(CFG))
    d["pssr"].update(pssr)
    return from_dict(RunConfig, d)


@pytest.mark.slow
def test_pretraining_epochs_reconstruct_clean_images_then_the_adversarial_stage_runs(tmp_path):
    res = train_pssr(_cfg(), tmp_path / "run", log=lambda _m: None)
    stages = [h["stage"] for h in res.history]
    assert stages == ["pretrain", "pretrain", "adversarial"]
    for h in res.history[:2]:  # no attack: the "adversarial" path is the clean image itself
        assert h["pix_adv"] == pytest.approx(h["pix_cln"], abs=1e-7)
    last = res.history[-1]
    assert last["pix_adv"] != pytest.approx(last["pix_cln"], abs=1e-7)
    # one cosine schedule over both stages: the lr falls across the pre-training epochs
    assert res.history[0]["lr"] > res.history[1]["lr"] > res.history[2]["lr"]
    with pytest.raises(ConfigError, match="pretrain_epochs"):  # resuming with another split is refused
        train_pssr(_cfg(pretrain_epochs=1, epochs=3), tmp_path / "run", resume=True, log=lambda _m: None)


def test_pretrain_epochs_is_checked():
    from advmend.defenses.pssr import check_pssr_config

    with pytest.raises(ConfigError, match="pssr.pretrain_epochs"):
        check_pssr_config(_cfg(pretrain_epochs=-1).pssr)


def test_pssr_residual_reaches_the_regenerator():
    from advmend.defenses.build import build_model

    for residual in (False, True):
        model = build_model(_cfg(residual=residual), 10, (3, 8, 8))
        assert model.regenerator.residual is residual
