"""PSSR's three threat models on tiny synthetic data: a threat model that ran no attack is "not run"
(never reported at clean accuracy), transfer runs without a user surrogate (another seed of the
classifier's recipe, trained once and cached), `--norm l2` runs L2 attacks, and mismatched
surrogates / classifiers are one-line errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import error_line as _error_line

from advmend.attacks.pgd import PGD
from advmend.cli import main
from advmend.data import ArrayDataset
from advmend.defenses.pssr import PSSRModel, Regenerator
from advmend.evaluation.pssr import (
    GRAYBOX,
    IDENTITY,
    MASK,
    TRANSFER,
    evaluate_pssr,
    markdown,
    not_run_text,
    report_dict,
)
from advmend.models import create_model

pytestmark = pytest.mark.slow

DATA = {"name": "synthetic", "val_size": 16, "options": {"n_train": 96, "n_test": 16, "image_size": 16}}
CONFIG = {
    "name": "pssr-threats",
    "data": DATA,
    "model": {"name": "small_cnn", "options": {"width": 4}},
    "train": {"method": "standard", "epochs": 1, "batch_size": 48, "val_attack": {"steps": 1}, "progress": False},
    "pssr": {"enabled": True, "width": 4, "epochs": 1, "batch_size": 48, "attack": {"steps": 1}},
}


def _write(folder: Path, cfg: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pssr-threats")
    assert main(["train", str(_write(folder, CONFIG)), "--out", str(folder / "run")]) == 0
    return folder / "run"


def _classifier_ckpt(folder: Path, **data_options) -> Path:
    cfg = {k: v for k, v in CONFIG.items() if k != "pssr"}
    cfg = dict(cfg, name=folder.name, data=dict(DATA, options=dict(DATA["options"], **data_options)))
    assert main(["train", str(_write(folder, cfg)), "--out", str(folder / "run")]) == 0
    return folder / "run" / "best.safetensors"


def test_a_threat_model_without_attacks_is_not_run_never_clean_accuracy():
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 10
    ds = ArrayDataset((x * 255).round().to(torch.uint8), y, tuple(str(i) for i in range(10)))
    model = PSSRModel(
        create_model("small_cnn", num_classes=10, in_channels=3, width=4), Regenerator(3, (16, 16), width=4)
    ).eval()
    ev = evaluate_pssr(model, ds, [PGD(eps=8 / 255, steps=1, name="PGD-1")], batch_size=8)  # no surrogate
    assert ev.threat_models == [GRAYBOX, MASK, "whitebox-bpda-identity", TRANSFER]  # always listed
    assert not ev.ran(TRANSFER) and ev.threat_accuracy(TRANSFER) is None and "surrogate" in ev.not_run[TRANSFER]
    assert ev.headline_threat != TRANSFER
    rep = report_dict(ev)
    assert rep["threat_models"][TRANSFER]["status"] == "not run"
    assert rep["threat_models"][TRANSFER]["robust_accuracy"] is None
    assert rep["threat_models"][GRAYBOX]["status"] == "run"
    md = markdown(ev, {})
    assert f"| {TRANSFER} | not run | not run |" in md
    assert not_run_text(ev) == f"{TRANSFER}: not run (no surrogate was given)\n"  # the console table too
    # the headline is the per-example worst over the attacks that ran
    assert rep["headline"]["robust_accuracy"] == 100 * ev.result.worst_accuracy
    # an empty protocol: every threat model "not run", no headline at clean accuracy
    ev = evaluate_pssr(model, ds, [], batch_size=8)
    assert all(not ev.ran(t) for t in ev.threat_models) and ev.headline_threat is None
    assert "headline" not in report_dict(ev)


def test_transfer_runs_without_a_user_surrogate_and_the_surrogate_is_cached(run, tmp_path, capsys):
    ckpt = run / "best.safetensors"
    args = ["eval", str(ckpt), "--protocol", "quick", "--n-examples", "8", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rep["threat_models"][TRANSFER]["status"] == "run"
    assert len(rep["threat_models"][TRANSFER]["attacks"]) == 2
    surrogate = Path(rep["meta"]["surrogate"])
    assert surrogate.is_file() and surrogate.parent.name == "transfer-surrogate-seed1"  # recipe seed 0 -> 1
    assert rep["meta"]["surrogate_origin"].startswith("trained by advmend")
    assert "transfer-surrogate-seed1" in (tmp_path / "a" / "report.md").read_text()
    stamp = surrogate.stat().st_mtime_ns
    assert main([*args, "--out", str(tmp_path / "b")]) == 0  # the second evaluation reuses it
    assert surrogate.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("other", [{"image_size": 8}, {"num_classes": 5}])
def test_a_surrogate_of_another_data_set_is_a_one_line_error(run, tmp_path, capsys, other):
    bad = _classifier_ckpt(tmp_path / "other", **other)
    capsys.readouterr()
    code = main(["eval", str(run / "best.safetensors"), "--protocol", "quick", "--n-examples", "8", "--quiet",
                 "--transfer-from", str(bad), "--out", str(tmp_path / "ev")])  # fmt: skip
    assert code == 2
    assert "surrogate" in _error_line(capsys)


def test_norm_l2_on_a_pssr_checkpoint_runs_l2_attacks(run, tmp_path):
    assert main(["eval", str(run / "best.safetensors"), "--protocol", "quick", "--n-examples", "8", "--quiet",
                 "--norm", "l2", "--out", str(tmp_path / "l2")]) == 0  # fmt: skip
    rep = json.loads((tmp_path / "l2" / "report.json").read_text())
    assert rep["meta"]["norm"] == "l2" and rep["meta"]["eps"] == pytest.approx(0.5)  # synthetic's L2 radius
    assert rep["attacks"] and all(a["settings"]["norm"] == "l2" for a in rep["attacks"])


def test_a_regenerator_paired_with_a_classifier_of_another_shape_is_a_one_line_error(run, tmp_path, capsys):
    other = _classifier_ckpt(tmp_path / "small", image_size=8)
    capsys.readouterr()
    cfg = _write(tmp_path, CONFIG)
    # classifier of another image shape than the data
    assert main(["train", str(cfg), "--out", str(tmp_path / "a"), "--set", f"pssr.classifier={other}"]) == 2
    assert "classes of shape" in _error_line(capsys)
    # the regenerator of a finished 16x16 run resumed in front of an 8x8 classifier (and its data)
    assert main(["train", str(cfg), "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    code = main(["train", str(cfg), "--out", str(tmp_path / "b"), "--resume", "--set", f"pssr.classifier={other}",
                 "--set", "data.options.image_size=8", "--set", "pssr.epochs=2"])  # fmt: skip
    assert code == 2
    assert "regenerator" in _error_line(capsys)
    # a classifier of the same shape, but not the one G was trained in front of (another seed)
    twin = {k: v for k, v in CONFIG.items() if k != "pssr"}
    twin = dict(twin, name="twin", train=dict(twin["train"], seed=1))
    assert main(["train", str(_write(tmp_path / "twin", twin)), "--out", str(tmp_path / "twin" / "run")]) == 0
    capsys.readouterr()
    code = main(["train", str(cfg), "--out", str(tmp_path / "b"), "--resume", "--set", "pssr.epochs=2",
                 "--set", f"pssr.classifier={tmp_path / 'twin' / 'run' / 'best.safetensors'}"])  # fmt: skip
    assert code == 2
    assert "is not the one the regenerator" in _error_line(capsys)


def _foolable_pssr() -> tuple[PSSRModel, ArrayDataset]:
    """A PSSR pipeline (residual G: the identity on kept pixels at initialisation) and 16 images labelled
    with its own clean predictions, so that every example is clean-correct and small attacks fool most."""
    torch.manual_seed(0)
    model = PSSRModel(create_model("small_cnn", num_classes=10, in_channels=3, width=4),
                      Regenerator(3, (16, 16), width=4, residual=True)).eval()  # fmt: skip
    images = (torch.rand(16, 3, 16, 16) * 255).round().to(torch.uint8)
    with torch.no_grad():
        y = model(images.float() / 255).argmax(1)
    return model, ArrayDataset(images, y, tuple(str(i) for i in range(10)))


@pytest.mark.parametrize("threats", [(GRAYBOX, MASK, IDENTITY, TRANSFER), (GRAYBOX,), (TRANSFER,)])
def test_keep_adv_keeps_an_adversarial_example_of_any_threat_model_per_fooled_example(threats):
    model, ds = _foolable_pssr()
    surrogate = create_model("small_cnn", num_classes=10, in_channels=3, width=4).eval()
    eps = 0.02
    ev = evaluate_pssr(model, ds, [PGD(eps=eps, steps=5, name="PGD-5")], surrogate=surrogate, threat_models=threats,
                       batch_size=8, keep_adv=True)  # fmt: skip
    r = ev.result
    x = ds.images.float() / 255
    fooled = r.clean_correct & ~r.worst_correct  # the headline's fooled examples
    assert fooled.any() and (~fooled).any()
    assert r.adv.shape == x.shape and torch.equal(r.labels, ds.labels)
    assert torch.equal(r.adv[~fooled], x[~fooled])  # never fooled: the clean image
    assert float((r.adv - x).abs().max()) <= eps + 1e-6 and 0 <= float(r.adv.min()) and float(r.adv.max()) <= 1
    with torch.no_grad():
        pred = model(r.adv[fooled]).argmax(1)
    assert (pred != ds.labels[fooled]).all()  # each kept example really fools PSSR
    no_adv = evaluate_pssr(model, ds, [PGD(eps=eps, steps=1, name="PGD-1")], threat_models=threats[:1], batch_size=8)
    assert no_adv.result.adv is None


def test_restoration_is_measured_in_eval_mode_and_restores_the_modes():
    from advmend.evaluation.image_quality import restoration_quality
    from advmend.evaluation.pssr import restoration

    torch.manual_seed(0)
    model = PSSRModel(create_model("small_cnn", num_classes=10, in_channels=3, width=4),
                      Regenerator(3, (16, 16), width=4, dropout=0.5))  # fmt: skip
    _, ds = _foolable_pssr()
    model.train()  # e.g. straight from training: dropout in G would change every number
    q = restoration(model, ds, batch_size=8)
    assert model.regenerator.training  # modes restored
    model.eval()
    plain = restoration_quality(model.preprocess, ds, batch_size=8)
    assert (q["psnr"], q["ssim"], q["n_examples"]) == (plain["psnr"], plain["ssim"], plain["n_examples"])
    assert q["n_examples"] == 16 and 0 < q["psnr"] < 100 and -1 <= q["ssim"] <= 1


def test_restoration_says_where_the_error_and_the_clean_accuracy_go():
    from advmend.defenses.pssr.regenerator import fill_holes
    from advmend.evaluation.evaluate import evaluate
    from advmend.evaluation.pssr import restoration, restoration_breakdown

    torch.manual_seed(0)
    f = create_model("small_cnn", num_classes=10, in_channels=3, width=4)
    _, ds = _foolable_pssr()
    full = PSSRModel(f, Regenerator(3, (16, 16), width=4, residual=True), alpha=1.0).eval()
    q = restoration(full, ds, batch_size=8)
    x = ds.images.float() / 255
    _, mask, surgical = full.surgery(x)
    assert q["removed"] == pytest.approx(float(mask.mean()))
    with torch.no_grad():
        interpolated = (f(fill_holes(surgical, mask)).argmax(1) == ds.labels).float().mean()
    a = q["accuracy"]
    assert a["surgery_interpolated"] == pytest.approx(100 * float(interpolated))
    assert a["pssr"] == pytest.approx(100 * evaluate(full, ds, []).clean_accuracy)
    assert a["classifier_alone"] == pytest.approx(100 * evaluate(f, ds, []).clean_accuracy)
    assert q["psnr_removed"] < q["psnr_kept"] < 100  # the residual G copies kept pixels, interpolates holes
    # Only the removed pixels regenerated: the kept ones are x's exactly; without surgery nothing is removed.
    assert restoration(PSSRModel(f, full.regenerator, alpha=1.0, mode="hole"), ds)["psnr_kept"] == float("inf")
    none = restoration(PSSRModel(f, full.regenerator, surgery=False), ds)
    assert none["removed"] == 0 and none["psnr_removed"] is None
    assert none["accuracy"]["surgery_interpolated"] == none["accuracy"]["classifier_alone"]
    text = " ".join(restoration_breakdown(q))
    assert f"{100 * q['removed']:.1f} % of them" in text and f"{a['surgery_interpolated']:.2f} %" in text
    assert restoration_breakdown({"psnr": 30.0, "ssim": 0.9, "n_examples": 4}) == []  # an older record


def test_graybox_and_transfer_craft_with_the_protocol_pgd_or_a_pgd20_of_its_ball():
    """Crafting on a source model needs the PGD core: a protocol's PGD attacks craft; a protocol of
    external attacks only (AutoAttack) crafts with PGD-20 in its ball, so those threat models still run."""
    from advmend.attacks.autoattack import AutoAttackSpec
    from advmend.attacks.transfer import crafting_attacks

    pgd10 = PGD(eps=8 / 255, steps=10, name="PGD-10")
    assert crafting_attacks([AutoAttackSpec(eps=8 / 255), pgd10]) == [pgd10]
    (made,) = crafting_attacks([AutoAttackSpec(eps=0.5, norm="l2")])
    assert (made.eps, made.norm, made.steps, made.name) == (0.5, "l2", 20, "PGD-20")
    assert made.step_size == pytest.approx(2.5 * 0.5 / 20)
    assert crafting_attacks([]) == []
