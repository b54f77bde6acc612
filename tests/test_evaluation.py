"""Evaluation: closed-form results on a linear model, targeted PGD, the cascade, transfer attacks, user
models, and the report card written by `advmend eval` (JSON, Markdown, PNG, adversarial examples)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import fit
from safetensors.torch import save_file
from torch import nn

from advmend.attacks import PGD, Transfer, cw_margin, fgsm, pgd, pgd_tracked, protocol_attacks, targeted_pgd
from advmend.cli import main
from advmend.data import ArrayDataset
from advmend.errors import ConfigError
from advmend.evaluation import evaluate
from advmend.evaluation.evaluate import check_bound

EPS = 8 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


class TwoClassLinear(nn.Module):
    def __init__(self, dim: int = 3 * 4 * 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(dim, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(2, dim, generator=g))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x.flatten(1))


def _linear_dataset(model: TwoClassLinear, n: int = 200) -> tuple[ArrayDataset, torch.Tensor]:
    """Images in [0.2, 0.8] (eps never reaches the box), labelled by the model: returns the data and
    the closed-form robustness of each example, margin > eps * ||w_y - w_j||_1."""
    g = torch.Generator().manual_seed(3)
    images = torch.randint(51, 205, (n, 3, 4, 4), generator=g, dtype=torch.uint8)
    x = images.float() / 255
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    w = model.fc.weight
    w_diff = (w[y] - w[1 - y]).abs().sum(1)
    margin = (logits.gather(1, y[:, None]) - logits.gather(1, (1 - y)[:, None])).squeeze(1)
    return ArrayDataset(images, y, ("a", "b")), margin > EPS * w_diff


@pytest.mark.parametrize(
    "attack",
    [
        fgsm(EPS),
        PGD(eps=EPS, steps=20, step_size=EPS / 10, random_start=False, name="PGD-20"),
        PGD(eps=EPS, steps=20, name="PGD-20-rand"),
        cw_margin(EPS, steps=20, step_size=EPS / 10),
    ],
    ids=lambda a: a.describe()["name"],
)
def test_linear_model_robust_accuracy_matches_closed_form(attack):
    model = TwoClassLinear()
    ds, robust = _linear_dataset(model)
    assert 0.2 < robust.float().mean() < 0.9  # the test separates robust from non-robust examples
    result = evaluate(model, ds, [attack], batch_size=64)
    assert torch.equal(result.attacks[0].correct, robust)


def test_linear_model_linf_perturbation_is_eps_sign_of_weight_difference():
    model = TwoClassLinear()
    ds, _ = _linear_dataset(model, n=32)
    x, y = ds.images.float() / 255, ds.labels
    w = model.fc.weight.detach()
    expected = -EPS * torch.sign(w[y] - w[1 - y]).view_as(x)  # descend the true-class margin
    for attack in (fgsm(EPS), PGD(eps=EPS, steps=20, step_size=EPS / 10, random_start=False, keep_best=False)):
        x_adv = pgd(model, x, y, attack)  # keep_best=False: the last iterate, the ball's corner
        assert torch.allclose(x_adv - x, expected, atol=1e-6)


def test_targeted_pgd_reaches_the_target_and_scores_the_true_label():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    x = torch.rand(40, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    target = (y + 1 + torch.arange(40) % 4) % 5
    for loss in ("ce", "margin"):
        attack = PGD(eps=0.5, steps=20, loss=loss, kappa=5.0, targeted=True)
        x_adv, hit = pgd_tracked(model, x, target, attack)
        pred = model(x_adv).argmax(1)
        assert hit.all() and torch.equal(pred, target)
    ds = ArrayDataset((x * 255).round().to(torch.uint8), y, tuple("abcde"))
    with torch.no_grad():
        ds = ArrayDataset(ds.images, model(ds.images.float() / 255).argmax(1), ds.classes)
    result = evaluate(model, ds, [targeted_pgd(0.5, steps=20)], batch_size=16)
    assert result.attacks[0].settings["targeted"] is True
    assert result.clean_accuracy == 1.0 and result.attacks[0].accuracy == 0.0


def test_targeted_requires_a_targetable_loss():
    with pytest.raises(ConfigError, match="targeted"):
        PGD(eps=EPS, loss="kl", keep_best=False, targeted=True)


def test_cascade_keeps_the_worst_case_exact_and_attacks_fewer_examples(tiny_model_and_data):
    model, ds = tiny_model_and_data
    attacks = protocol_attacks("paper", 0.1)  # large enough to fool some examples, not all
    plain = evaluate(model, ds, attacks, batch_size=32)
    cascade = evaluate(model, ds, attacks, batch_size=32, cascade=True)
    assert torch.equal(plain.worst_correct, cascade.worst_correct)
    assert all(c.attacked <= p.attacked for c, p in zip(cascade.attacks, plain.attacks))
    assert 0 < plain.worst_accuracy < plain.clean_accuracy
    assert sum(a.attacked for a in cascade.attacks) < sum(a.attacked for a in plain.attacks)
    running = cascade.clean_correct.clone()
    for a in cascade.attacks:  # each cascade number is "robust to this attack and all before it"
        running &= a.correct
        assert torch.equal(a.correct, running)


def test_bound_assertion_fails_on_an_out_of_ball_example():
    x = torch.full((2, 3, 4, 4), 0.5)
    with pytest.raises(RuntimeError, match="outside the threat model"):
        check_bound(x + 2 * EPS, x, fgsm(EPS))
    with pytest.raises(RuntimeError, match="outside the threat model"):
        check_bound((x * 3).clamp(max=1.2), x, PGD(eps=1.0))
    assert check_bound(x + EPS, x, fgsm(EPS)) == pytest.approx(EPS)


def test_keep_adv_holds_the_fooling_examples():
    model = TwoClassLinear()
    ds, robust = _linear_dataset(model, n=64)
    result = evaluate(model, ds, [fgsm(EPS)], batch_size=16, keep_adv=True)
    clean = ds.images.float() / 255
    with torch.no_grad():
        pred = model(result.adv).argmax(1)
    assert torch.equal(pred != ds.labels, ~robust)
    assert torch.equal(result.adv[robust], clean[robust])
    assert (result.adv - clean).abs().amax() <= EPS + 1e-6


# --------------------------------------------------------------------------- CLI: checkpoints, user models

CONFIG = {
    "name": "eval-test",
    "data": {"name": "synthetic", "val_size": 32, "options": {"n_train": 128, "n_test": 48, "image_size": 8}},
    "model": {"name": "small_cnn", "options": {"width": 8}},
    "train": {"epochs": 1, "batch_size": 64, "attack": {"steps": 1}, "val_attack": {"steps": 1}, "progress": False},
    "eval": {"protocol": "quick", "n_examples": 16},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    (folder / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    assert main(["train", str(folder / "config.yaml"), "--out", str(folder / "run")]) == 0
    return folder / "run" / "last.safetensors"


@pytest.fixture(scope="module")
def tiny_model_and_data():
    from advmend.data import load_dataset

    ds = load_dataset("synthetic", "test", num_classes=5, image_size=8, n_test=48, seed=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(32, 5))  # fmt: skip
    return fit(model, ds.images.float() / 255, ds.labels, steps=30), ds


def test_eval_writes_report_card_with_sanity_plot_transfer_and_adv(checkpoint, tmp_path, capsys):
    out = tmp_path / "report"
    adv = tmp_path / "adv.pth"
    code = main(["eval", str(checkpoint), "--protocol", "paper", "--n-examples", "12", "--out", str(out),
                 "--quiet", "--transfer-from", str(checkpoint), "--save-adv", str(adv)])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    names = [a["settings"]["name"] for a in report["attacks"]]
    assert names == ["FGSM", "PGD-20", "PGD-100", "CW-30", "transfer PGD-20"]
    assert report["attacks"][-1]["settings"]["surrogate"] == str(checkpoint)
    assert {c["code"] for c in report["sanity"]["checks"]} >= {"S05-fgsm-vs-pgd", "S09-gradients", "S12-eval-mode"}
    assert all(c["status"] in ("pass", "warn", "skip") for c in report["sanity"]["checks"])
    assert len(report["per_example"]["worst_case"]) == 12
    assert report["meta"]["timings"]["sanity_s"] >= 0 and "torch" in report["versions"]
    assert report["meta"]["plot"] == "accuracy_vs_eps.png"
    curve = report["meta"]["accuracy_vs_eps"]  # the picture's own PGD-10 sweep, 0 to 2 eps
    assert len(curve["eps"]) == len(curve["accuracy"]) == 6 and curve["n_examples"] == 12
    assert (out / "accuracy_vs_eps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "## Sanity checks" in md and "S09-gradients" in md and "accuracy_vs_eps.png" in md
    saved = torch.load(adv, weights_only=True)
    assert list(saved) == ["adv_complete"] and saved["adv_complete"].shape == (12, 3, 8, 8)
    assert 0 <= saved["adv_complete"].min() and saved["adv_complete"].max() <= 1
    assert "sanity:" in capsys.readouterr().out


def _write_user_module(folder: Path) -> None:
    (folder / "user_net_h3.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))\n"
    )


def test_eval_user_model_with_safetensors_and_pt_weights(tmp_path, monkeypatch):
    _write_user_module(tmp_path)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    for weights in ("w.safetensors", "w.pt"):
        out = tmp_path / f"rep-{weights}"
        code = main(["eval", "--model", "user_net_h3:build", "--weights", weights, "--dataset", "synthetic",
                     "--set", "data.options={image_size: 8, n_test: 16}", "--protocol", "quick",
                     "--eps", "8/255", "--out", str(out), "--quiet", "--no-plot", "--save-adv", "a.safetensors"])  # fmt: skip
        assert code == 0
        report = json.loads((out / "report.json").read_text())
        assert report["meta"]["model"] == "user_net_h3:build"
        assert report["meta"]["eps"] == pytest.approx(8 / 255)
        assert len(report["meta"]["checkpoint_sha256"]) == 64
        assert not (out / "accuracy_vs_eps.png").exists()
        assert "accuracy_vs_eps" not in report["meta"]  # --no-plot skips the sweep too


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("advmend: error:"), lines
    return lines[0]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "no_such_module_h3:build", "--dataset", "synthetic"], "no_such_module_h3"),
        (["--model", "user_net_h3", "--dataset", "synthetic"], "module:function"),
        (["--model", "user_net_h3:nope", "--dataset", "synthetic"], "nope"),
        (
            ["--model", "user_net_h3:build", "--weights", "missing.safetensors", "--dataset", "synthetic"],
            "missing.safetensors",
        ),
        (["--model", "user_net_h3:build", "--weights", "bad.pt", "--dataset", "synthetic"], "bad.pt"),
        (["--model", "user_net_h3:build", "--dataset", "synthetic", "--eps", "-1"], "--eps"),
        (["--model", "user_net_h3:build", "--dataset", "synthetic", "--save-adv", "x.npy"], "--save-adv"),
        ([], "CHECKPOINT"),
    ],
)
def test_eval_user_model_errors_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, args, needle):
    _write_user_module(tmp_path)
    (tmp_path / "bad.pt").write_bytes(b"not a pickle at all")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "rep"
    code = main(["eval", *args, "--set", "data.options={image_size: 8, n_test: 8}", "--out", str(out), "--quiet"])
    assert code == 2
    assert needle in _error(capsys)
    assert not out.exists()


def test_transfer_attack_from_checkpoint(checkpoint):
    from advmend.data import load_dataset
    from advmend.evaluation.run import load_trained_model

    surrogate, _, _ = load_trained_model(checkpoint, torch.device("cpu"))
    target, _, _ = load_trained_model(checkpoint, torch.device("cpu"))
    ds = load_dataset("synthetic", "test", image_size=8, n_test=16)
    attack = Transfer(surrogate, PGD(eps=EPS, steps=5), str(checkpoint))
    (transfer,) = evaluate(target, ds, [attack], batch_size=8, seed=0).attacks
    (white_box,) = evaluate(target, ds, [PGD(eps=EPS, steps=5)], batch_size=8, seed=0).attacks
    assert transfer.name == "transfer PGD-5" and transfer.max_perturbation <= EPS + 1e-6
    assert transfer.settings["surrogate"] == str(checkpoint)
    # An identical surrogate with the same seed makes the transfer attack the white-box attack.
    assert torch.equal(transfer.correct, white_box.correct)


def test_pgd20_evaluation_costs_21_forward_and_20_backward_passes_per_example(tiny_model_and_data):
    from advmend.bench.eval_speed import PassCounter

    model, ds = tiny_model_and_data
    counter = PassCounter(model)
    result = evaluate(counter, ds, [PGD(eps=EPS, steps=20, step_size=EPS / 10, random_start=False)], batch_size=16)
    attacked = result.attacks[0].attacked
    assert attacked > 0
    assert counter.forward_examples - len(ds) == 21 * attacked  # minus the clean pass
    assert counter.backward_examples == 20 * attacked


def test_plot_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    import sys

    from advmend.evaluation.plots import accuracy_vs_eps_png

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    note = accuracy_vs_eps_png(tmp_path / "p.png", [(0.0, 90.0), (EPS, 40.0)])
    assert "matplotlib" in note and not (tmp_path / "p.png").exists()
