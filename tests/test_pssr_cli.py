"""PSSR end to end on the synthetic data set: `advmend train` (classifier trained first in the same
command), the three-threat-model report, `advmend eval`, `advmend pssr-analysis`, resume, errors,
and the bundled configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import error_line as _error_line

from advmend.cli import main
from advmend.config import load_run_config
from advmend.defenses.pssr import PSSRModel, Regenerator
from advmend.evaluation.run import load_trained_model
from advmend.training.pssr_loop import train_pssr

CONFIG = {
    "name": "pssr-cli-test",
    "data": {"name": "synthetic", "val_size": 32, "options": {"n_train": 160, "n_test": 32}},
    "model": {"name": "small_cnn", "options": {"width": 8}},
    "train": {"method": "standard", "epochs": 2, "batch_size": 64, "val_attack": {"steps": 2}, "progress": False},
    "eval": {"protocol": "quick", "after_train": True, "n_examples": 16},
    "pssr": {"enabled": True, "width": 4, "epochs": 2, "batch_size": 64, "attack": {"steps": 2}},
}
# End-to-end runs: a few seconds each on an idle 2-core CPU, more under load.
pytestmark = pytest.mark.slow

VAL_KEYS = {"val_clean_acc", "val_graybox_acc", "val_whitebox_acc", "val_robust_acc", "val_psnr", "val_ssim"}


def _write(folder: Path, cfg: dict) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pssr")
    assert main(["train", str(_write(folder, CONFIG)), "--out", str(folder / "run")]) == 0
    return folder / "run"


def test_train_trains_the_classifier_first_then_the_regenerator(run):
    assert (run / "classifier" / "best.safetensors").is_file()
    recs = _metrics(run)
    assert [r["epoch"] for r in recs] == [1, 2]
    assert VAL_KEYS <= set(recs[-1]) and {"pix_adv", "ce_adv", "rdrop", "removed"} <= set(recs[-1])
    assert recs[-1]["val_robust_acc"] <= min(recs[-1]["val_graybox_acc"], recs[-1]["val_whitebox_acc"])
    assert 0 < recs[-1]["val_psnr"] < 100 and -1 <= recs[-1]["val_ssim"] <= 1
    model, cfg, record = load_trained_model(run / "best.safetensors", torch.device("cpu"))
    assert isinstance(model, PSSRModel) and cfg.pssr.enabled
    assert record["classifier"]["path"].endswith("classifier/best.safetensors")
    # f inside the PSSR checkpoint is exactly the classifier checkpoint (frozen during training)
    f, _, _ = load_trained_model(run / "classifier" / "best.safetensors", torch.device("cpu"))
    for k, v in f.state_dict().items():
        assert torch.equal(model.classifier.state_dict()[k], v), k


def test_after_train_report_labels_every_number_with_its_threat_model(run):
    rep = json.loads((run / "eval-pssr-quick" / "report.json").read_text())
    assert set(rep["threat_models"]) == {"graybox", "whitebox-bpda-mask", "whitebox-bpda-identity", "transfer"}
    assert all(t["status"] == "run" for t in rep["threat_models"].values())
    assert all(a["settings"]["threat_model"] in rep["threat_models"] for a in rep["attacks"])
    head = rep["headline"]["robust_accuracy"]
    assert head == rep["worst_case"]["robust_accuracy"]
    assert head <= min(t["robust_accuracy"] for t in rep["threat_models"].values())
    md = (run / "eval-pssr-quick" / "report.md").read_text()
    assert "whitebox-bpda-identity" in md and "headline" in md


def test_advmend_eval_works_on_a_pssr_checkpoint(run, tmp_path, capsys):
    assert main(["eval", str(run / "best.safetensors"), "--protocol", "quick", "--n-examples", "8",
                 "--out", str(tmp_path / "ev"), "--quiet"]) == 0  # fmt: skip
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    # quick protocol (FGSM, PGD-20) under gray-box, both white-box BPDA threat models and transfer
    # (no surrogate given: another seed of the classifier's recipe, trained once and cached)
    assert rep["n_examples"] == 8 and len(rep["attacks"]) == 8
    assert set(rep["threat_models"]) == {"graybox", "whitebox-bpda-mask", "whitebox-bpda-identity", "transfer"}
    assert rep["meta"]["surrogate_origin"].startswith("trained by advmend") and "seed" in rep["meta"]["surrogate"]
    # per-example worst over all threat models: never above the weakest threat model's own number
    assert rep["headline"]["robust_accuracy"] <= min(t["robust_accuracy"] for t in rep["threat_models"].values())
    assert "headline" in capsys.readouterr().out


@pytest.mark.parametrize("which", ["best.safetensors", "classifier/best.safetensors"])
def test_pssr_analysis_writes_table_plot_and_grid(run, tmp_path, which):
    pytest.importorskip("matplotlib")
    out = tmp_path / "an"
    assert main(["pssr-analysis", str(run / which), "--n-examples", "16", "--steps", "2", "--grid", "3",
                 "--out", str(out)]) == 0  # fmt: skip
    for name in ("finding.json", "finding.md", "finding.png", "grid.png"):
        assert (out / name).stat().st_size > 0, name
    finding = json.loads((out / "finding.json").read_text())
    acc, pssr = finding["accuracy"], which == "best.safetensors"
    assert {"clean", "adversarial", "salient removed", "random removed", "PS only", "clean, holes interpolated"} <= set(
        acc
    )
    assert ("PSSR (gray-box)" in acc) == ("PSSR (clean)" in acc) == (finding["restoration"] is not None) == pssr
    # the clean rows are what the pipeline and the surgery alone do to the same clean test images
    from advmend.data import subset
    from advmend.defenses.pssr.regenerator import fill_holes
    from advmend.evaluation.evaluate import evaluate
    from advmend.training.build import build_data

    model, cfg, _ = load_trained_model(run / which, torch.device("cpu"))
    ds = subset(build_data(cfg.data, need_train=False).test, 16, 0)
    x = ds.images.float() / 255
    f = model.classifier if pssr else model
    pipe = model if pssr else PSSRModel(f, Regenerator(3, (16, 16), width=4)).eval()  # default surgery: alpha 1
    _, mask, surgical = pipe.surgery(x)
    with torch.no_grad():
        assert acc["clean, holes interpolated"]["accuracy"] == pytest.approx(
            100 * float((f(fill_holes(surgical, mask)).argmax(1) == ds.labels).float().mean())
        )
    if pssr:
        assert acc["PSSR (clean)"]["accuracy"] == pytest.approx(100 * evaluate(model, ds, []).clean_accuracy)
        q = finding["restoration"]
        assert q["removed"] == pytest.approx(float(mask.mean())) and q["n_examples"] == 16
        assert "PSNR over the kept pixels" in (out / "finding.md").read_text()


def test_the_finding_scores_f_on_the_images_its_rows_define():
    from advmend.defenses.pssr.regenerator import fill_holes
    from advmend.study.finding import PIPELINE_ROWS, ROWS
    from advmend.study.pssr_analysis import finding_inputs

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=g)
    x_adv = (x + 0.03 * torch.randn(2, 3, 8, 8, generator=g)).clamp(0, 1)
    m_s, m_r, m_c = ((torch.rand(2, 1, 8, 8, generator=g) < 0.2).float() for _ in range(3))
    rows = finding_inputs(x, x_adv, m_s, m_r, m_c, fill=0.0)
    assert list(rows) == [name for name, _ in ROWS if name not in PIPELINE_ROWS]
    delta = x_adv - x
    assert torch.equal(rows["salient removed"], x + (1 - m_s) * delta)
    assert torch.equal(rows["random only"], x + m_r * delta)
    assert torch.equal(rows["PS only"], x_adv * (1 - m_s))
    # the clean surgery's holes are interpolated from the kept pixels, never left at the fill value
    filled = rows["clean, holes interpolated"]
    assert torch.equal(filled, fill_holes(x * (1 - m_c), m_c))
    assert torch.equal(filled * (1 - m_c), x * (1 - m_c)) and (filled * m_c).sum() > 0


def test_resume_continues_and_a_second_run_is_refused(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg = _write(tmp_path, CONFIG)
    assert main(["train", str(cfg), "--out", str(copy)]) == 2
    assert "--resume" in _error_line(capsys)
    assert main(["train", str(cfg), "--out", str(copy), "--resume", "--set", "pssr.epochs=3",
                 "--set", "eval.after_train=false"]) == 0  # fmt: skip
    assert [r["epoch"] for r in _metrics(copy)] == [1, 2, 3]
    assert main(["train", str(cfg), "--out", str(copy), "--resume", "--set", "pssr.width=8",
                 "--set", "pssr.epochs=4"]) == 2  # fmt: skip
    assert "differs" in _error_line(capsys)
    # any setting of the recipe, not only G's architecture: a changed lr or loss weight is another run
    for change in ("pssr.lr=0.5", "pssr.lambda_pix=3", "train.amp=bf16"):
        assert main(["train", str(cfg), "--out", str(copy), "--resume", "--set", change,
                     "--set", "pssr.epochs=4"]) == 2  # fmt: skip
        assert f"at {change.split('=')[0]} (" in _error_line(capsys)
    # fewer epochs than already trained: nothing to train
    assert main(["train", str(cfg), "--out", str(copy), "--resume", "--set", "pssr.epochs=1"]) == 2
    assert "already trained 3 epochs" in _error_line(capsys)
    assert [r["epoch"] for r in _metrics(copy)] == [1, 2, 3]  # refused before anything was written


def test_two_step_training_from_a_given_classifier(run, tmp_path):
    cfg = load_run_config(str(_write(tmp_path, CONFIG)), [
        f"pssr.classifier={run / 'classifier' / 'best.safetensors'}", "pssr.epochs=1", "pssr.rdrop=literal",
        "pssr.threat=adaptive", "data.options.n_train=160", "data.val_size=32",  # 128 training images: 2 steps of 64
    ])  # fmt: skip
    logs: list[str] = []
    res = train_pssr(cfg, tmp_path / "given", log=logs.append)
    assert len(res.history) == 1 and res.best.is_file() and not (tmp_path / "given" / "classifier").exists()
    model, _, _ = load_trained_model(res.best, torch.device("cpu"))
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(model(x), model(x))  # deterministic in eval mode


def test_bad_pssr_inputs_are_one_line_errors_and_write_nothing(run, tmp_path, capsys):
    cfg = _write(tmp_path, CONFIG)
    cases = [
        (["--set", "pssr.classifier=missing.safetensors"], "not found"),
        (["--set", f"pssr.classifier={run / 'best.safetensors'}"], "PSSR checkpoint"),
        (["--set", "pssr.mask=top"], "pssr.mask"),
        (["--set", "pssr.rho=2"], "pssr.rho"),
        (["--set", "pssr.typo=1"], "pssr.typo"),
        (["--set", "data.options.image_size=30"], "divisible"),
    ]
    for i, (extra, needle) in enumerate(cases):
        out = tmp_path / f"bad{i}"
        assert main(["train", str(cfg), "--out", str(out), *extra]) == 2, extra
        assert needle in _error_line(capsys)
        assert not (out / "last.safetensors").exists()


# --------------------------------------------------------------------------- one evaluation front

CARD_KEYS = {"meta", "versions", "n_examples", "clean_accuracy", "attacks", "worst_case", "cascade", "seconds",
             "per_example", "sanity"}  # fmt: skip
THREAT_KEYS = {"threat_models", "whitebox", "headline", "undefended_classifier", "restoration"}


def _headings(md: str) -> list[str]:
    """The card's title (without the run's name) and its sections."""
    lines = md.splitlines()
    return [lines[0].partition(":")[0]] + [line for line in lines if line.startswith("## ")]


def test_pssr_eval_runs_the_sanity_suite_on_the_whole_pipeline(run, tmp_path, monkeypatch):
    import advmend.evaluation.run as run_module

    calls, real = [], run_module.run_sanity

    def spy(model, ds, result, *args, **kwargs):
        calls.append((model, [a.name for a in result.attacks]))
        return real(model, ds, result, *args, **kwargs)

    monkeypatch.setattr(run_module, "run_sanity", spy)
    out = tmp_path / "ev"
    assert main(["eval", str(run / "best.safetensors"), "--protocol", "quick", "--n-examples", "4", "--sanity-full",
                 "--no-plot", "--out", str(out), "--quiet"]) == 0  # fmt: skip
    [(model, names)] = calls  # the pipeline, white box with the mask constant: the model being defended
    assert isinstance(model, PSSRModel) and names == ["whitebox-bpda-mask/FGSM", "whitebox-bpda-mask/PGD-20"]
    rep = json.loads((out / "report.json").read_text())
    status = {c["code"]: c["status"] for c in rep["sanity"]["checks"]}
    assert len(status) == 12 and rep["meta"]["sanity_full"] is True
    assert all(status[code] != "skip" for code in ("S01-eps-sweep", "S02-unbounded", "S03-convergence", "S04-restarts"))
    assert "## Sanity checks" in (out / "report.md").read_text()


def test_no_plot_on_a_pssr_checkpoint_writes_no_png(run, tmp_path):
    out = tmp_path / "ev"
    assert main(["eval", str(run / "best.safetensors"), "--protocol", "quick", "--n-examples", "4", "--no-plot",
                 "--out", str(out), "--quiet"]) == 0  # fmt: skip
    assert not list(out.glob("*.png"))
    meta = json.loads((out / "report.json").read_text())["meta"]
    assert "plot" not in meta and "accuracy_vs_eps" not in meta


def test_save_adv_on_a_pssr_checkpoint_writes_the_adversarial_examples(run, tmp_path):
    from safetensors.torch import load_file

    from advmend.data import subset
    from advmend.training.build import build_data

    adv_file, out = tmp_path / "adv.safetensors", tmp_path / "ev"
    assert main(["eval", str(run / "best.safetensors"), "--protocol", "quick", "--n-examples", "8", "--no-plot",
                 "--save-adv", str(adv_file), "--out", str(out), "--quiet"]) == 0  # fmt: skip
    rep = json.loads((out / "report.json").read_text())
    assert rep["meta"]["adv_file"] == str(adv_file) and "adv_complete" in rep["meta"]["adv_layout"]
    saved = load_file(adv_file)
    model, cfg, _ = load_trained_model(run / "best.safetensors", torch.device("cpu"))
    ds = subset(build_data(cfg.data, need_train=False).test, 8, cfg.eval.seed)  # the evaluated examples
    x, adv = ds.images.float() / 255, saved["adv_complete"]
    assert adv.shape == x.shape and torch.equal(saved["labels"], ds.labels)
    assert float((adv - x).abs().max()) <= rep["meta"]["eps"] + 1e-6
    # the headline's fooled examples are stored adversarial (misclassified by PSSR), the others clean
    fooled = torch.tensor(rep["per_example"]["clean"], dtype=torch.bool) & ~torch.tensor(
        rep["per_example"]["worst_case"], dtype=torch.bool
    )
    assert torch.equal(adv[~fooled], x[~fooled])
    with torch.no_grad():
        assert (model(adv[fooled]).argmax(1) != ds.labels[fooled]).all()


def test_the_pssr_report_has_the_restoration_of_clean_images(run, tmp_path):
    from advmend.attacks.modes import attack_mode
    from advmend.data import subset
    from advmend.evaluation.image_quality import restoration_quality
    from advmend.training.build import build_data

    rep = json.loads((run / "eval-pssr-quick" / "report.json").read_text())
    q = rep["restoration"]
    assert q["n_examples"] == rep["n_examples"] == 16 and 0 < q["psnr"] < 100 and -1 <= q["ssim"] <= 1
    model, cfg, _ = load_trained_model(run / "best.safetensors", torch.device("cpu"))
    ds = subset(build_data(cfg.data, need_train=False).test, 16, cfg.eval.seed)
    with attack_mode(model):
        expected = restoration_quality(model.preprocess, ds, batch_size=cfg.eval.batch_size)
    assert q["psnr"] == pytest.approx(expected["psnr"]) and q["ssim"] == pytest.approx(expected["ssim"])
    md = (run / "eval-pssr-quick" / "report.md").read_text()
    assert "## Restoration of clean images" in md and f"PSNR {q['psnr']:.2f} dB" in md


def test_both_train_paths_go_through_the_one_after_training_evaluation(run, tmp_path, monkeypatch, capsys):
    import advmend.training.run as training_run

    calls, real = [], training_run.evaluate_after_training

    def spy(cfg, best, out_dir):
        calls.append(cfg.pssr.enabled)
        return real(cfg, best, out_dir)

    monkeypatch.setattr(training_run, "evaluate_after_training", spy)
    classifier = {k: v for k, v in CONFIG.items() if k != "pssr"}
    cfg_file = _write(tmp_path, dict(classifier, name="classifier-card", train=dict(CONFIG["train"], epochs=1)))
    assert main(["train", str(cfg_file), "--out", str(tmp_path / "clf")]) == 0
    pssr_run = tmp_path / "pssr"  # a finished PSSR run resumed: nothing to train, the evaluation only
    shutil.copytree(run, pssr_run)
    shutil.rmtree(pssr_run / "eval-pssr-quick")
    assert main(["train", str(_write(tmp_path, CONFIG)), "--out", str(pssr_run), "--resume"]) == 0
    assert calls == [False, True]
    # the same card: the classifier's sections, keys and plot, PSSR's threat models and restoration added
    clf_dir, pssr_dir = tmp_path / "clf" / "eval-quick", pssr_run / "eval-pssr-quick"
    clf, pssr = (json.loads((d / "report.json").read_text()) for d in (clf_dir, pssr_dir))
    assert CARD_KEYS <= set(clf) and set(pssr) == set(clf) | THREAT_KEYS
    clf_md, pssr_md = ((d / "report.md").read_text() for d in (clf_dir, pssr_dir))
    assert _headings(clf_md) == ["# advmend evaluation", "## Sanity checks"]
    assert _headings(pssr_md) == ["# advmend evaluation", "## Threat models", "## Restoration of clean images",
                                  "## Sanity checks"]  # fmt: skip
    assert (clf_dir / "accuracy_vs_eps.png").is_file() and (pssr_dir / "accuracy_vs_eps.png").is_file()
    out = capsys.readouterr().out
    assert out.count("best checkpoint (epoch") == 2 and "headline (worst over all threat models)" in out


@pytest.mark.parametrize("item", ["train.lr=1", "model.name=small_cnn", "data.root"])
def test_pssr_analysis_changes_only_data_settings(tmp_path, capsys, item):
    # refused in one line before the checkpoint is read (this one does not even exist)
    assert main(["pssr-analysis", str(tmp_path / "none.safetensors"), "--set", item]) == 2
    line = _error_line(capsys)
    assert item in line and ("only data.*" in line or "key.sub=value" in line)
