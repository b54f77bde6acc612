"""Every promise holds, the attack side: probabilities rejected before evaluation, attacks
under no_grad/inference_mode, AutoAttack on any tensor layout, objectives on the last PGD iterate, one
transfer rule for both transfer paths, and a real accuracy-versus-eps curve in the report."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import TinyNet, fit
from torch import nn

from advmend.attacks import BPDA, PGD, AutoAttackSpec, Transfer, fgsm, pgd, pgd_tracked
from advmend.data import ArrayDataset, load_dataset, subset
from advmend.defenses import FSRModel
from advmend.errors import ConfigError, ModelContractError
from advmend.evaluation import evaluate
from advmend.evaluation.evaluate import (
    CURVE_FACTORS,
    accuracy_curve,
    check_not_probabilities,
)
from advmend.evaluation.pssr import transfer_attack
from advmend.models import create_model
from advmend.training.mart import MART
from advmend.training.objectives import AdversarialCE, fast_at_attack
from advmend.training.trades import TRADES, trades_attack

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = 8 / 255


class Linear(nn.Module):
    """(N, 3, 4, 4) images to K logits."""

    def __init__(self, k: int = 5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(48, k)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(k, 48, generator=g))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x.flatten(1))


class Apply(nn.Module):
    """`fn(net(x))`: a model whose output head is `fn` (softmax, log_softmax, ...)."""

    def __init__(self, net: nn.Module, fn):
        super().__init__()
        self.net, self.fn = net, fn

    def forward(self, x):
        return self.fn(self.net(x))


def _dataset(model: nn.Module, n: int = 32, lo: int = 0, hi: int = 256, seed: int = 3) -> ArrayDataset:
    """Random 3x4x4 images labelled by `model`, so every example is clean-correct."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(lo, hi, (n, 3, 4, 4), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        y = model(images.float() / 255).argmax(1)
    return ArrayDataset(images, y, tuple("abcde"))


# --------------------------------------------------------------------------- 1. probabilities are rejected


def test_a_model_returning_probabilities_is_rejected_before_any_attack():
    model = Apply(Linear(), lambda z: z.softmax(1))
    ds = _dataset(model)
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].requires_grad))
    with pytest.raises(ModelContractError, match="probabilities, not logits.*remove the final softmax"):
        evaluate(model, ds, [PGD(eps=EPS, steps=2)], batch_size=16)
    assert calls == [False]  # one clean probe batch, no attack step


@pytest.mark.parametrize("head", ["identity", "log_softmax", "relu", "centred_plus_1_over_k", "tiny_logits"])
def test_real_logit_models_are_never_rejected(head):
    heads = {
        "identity": lambda z: z,
        "log_softmax": lambda z: z.log_softmax(1),  # a valid input to CE/margin: shift-invariant
        "relu": lambda z: z.relu(),  # non-negative logits that do not sum to 1
        # rows summing exactly to 1, but with negative entries: still logits
        "centred_plus_1_over_k": lambda z: z - z.mean(1, keepdim=True) + 1 / z.shape[1],
        "tiny_logits": lambda z: 1e-3 * z,  # a near-uniform fresh model: rows sum to ~0
    }
    model = Apply(Linear(), heads[head])
    ds = _dataset(Linear())
    result = evaluate(model, ds, [fgsm(EPS)], batch_size=16)
    assert result.n == 32


def test_trained_networks_outputs_pass_the_probability_rule():
    ds = load_dataset("synthetic", "test", num_classes=5, image_size=8, n_test=32, seed=1)
    torch.manual_seed(0)
    model = fit(TinyNet(), ds.images.float() / 255, ds.labels, steps=20)
    with torch.no_grad():
        check_not_probabilities(model(ds.images.float() / 255))  # raises on failure
    result = evaluate(model, ds, [], batch_size=32)
    assert result.n == 32


def test_the_probability_rule_needs_every_row():
    p = torch.softmax(torch.randn(8, 5), 1)
    with pytest.raises(ModelContractError):
        check_not_probabilities(p)
    with pytest.raises(ModelContractError):
        check_not_probabilities(p + 5e-5 / 5)  # within 1e-4 of summing to 1
    check_not_probabilities(p + 2e-4 / 5)  # sums off by 2e-4: not this rule's call (S11 may flag it)
    mixed = p.clone()
    mixed[0] = torch.randn(5)  # one row of logits among probabilities: borderline, left to S11
    check_not_probabilities(mixed)
    scaled = p.clone()
    scaled[0] *= 2  # non-negative everywhere, one row summing to 2: not a batch of probabilities
    check_not_probabilities(scaled)
    negative = p.clone()
    negative[3, 1] += negative[3, 0] + 1e-3
    negative[3, 0] = -1e-3  # the row still sums to 1, but a probability is never negative
    check_not_probabilities(negative)


def test_cli_rejects_a_probability_model_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from advmend.cli import main

    (tmp_path / "prob_net_p12.py").write_text(
        "from torch import nn\n\n"
        "def build():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10), nn.Softmax(dim=1))\n"
    )
    monkeypatch.chdir(tmp_path)
    code = main(["eval", "--model", "prob_net_p12:build", "--dataset", "synthetic", "--set",
                 "data.options={image_size: 8, n_test: 16}", "--eps", "8/255",
                 "--out", "out", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("advmend: error:") and "probabilities" in err[0]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 2. no_grad / inference_mode

CONFIGS = {
    "pgd": PGD(eps=0.1, steps=3),
    "fgsm": fgsm(0.1),
    "l2-restarts": PGD(eps=0.5, steps=3, norm="l2", restarts=2),
    "l1-restarts": PGD(eps=4.0, steps=3, norm="l1", restarts=2),
    "margin-eot-last": PGD(eps=0.1, steps=2, loss="margin", eot=2, keep_best=False),
    "targeted": PGD(eps=0.1, steps=3, targeted=True),
}


def _state(model):
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_attacks_run_under_no_grad_and_inference_mode(context, name, tiny_net, batch):
    cfg = CONFIGS[name]
    x, y = batch
    tiny_net.train()
    tiny_net.fc.weight.requires_grad_(False)  # a user's frozen layer stays frozen
    before = _state(tiny_net)
    ref_adv, ref_fooled = pgd_tracked(tiny_net, x, y, cfg, generator=torch.Generator().manual_seed(0))
    ctx = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with ctx:
        # inputs made inside the context (inference tensors under inference_mode)
        xi, yi = x.clone(), y.clone()
        x_adv, fooled = pgd_tracked(tiny_net, xi, yi, cfg, generator=torch.Generator().manual_seed(0))
        plain = pgd(tiny_net, xi, yi, cfg, generator=torch.Generator().manual_seed(0))
        outside = pgd(tiny_net, x, y, cfg, generator=torch.Generator().manual_seed(0))  # made outside it
    assert torch.equal(x_adv, ref_adv) and torch.equal(fooled, ref_fooled)
    assert torch.equal(outside, plain)
    assert torch.equal(xi, x) and torch.equal(yi, y)  # inputs untouched
    assert _state(tiny_net) == before
    assert (x_adv - x).abs().max() > 0  # the attack really moved


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_evaluate_transfer_and_bpda_run_under_no_grad_and_inference_mode(context):
    model = Linear()
    ds = _dataset(model, n=16, lo=51, hi=205)
    surrogate = Linear(seed=1)
    attacks = [PGD(eps=EPS, steps=3, name="PGD-3"), Transfer(surrogate, PGD(eps=EPS, steps=3))]
    ref = evaluate(model, ds, attacks, batch_size=8)
    bpda_ref = evaluate(BPDA(lambda x: x.round(), model), ds, attacks[:1], batch_size=8)
    with torch.no_grad() if context == "no_grad" else torch.inference_mode():
        res = evaluate(model, ds, attacks, batch_size=8)
        bpda = evaluate(BPDA(lambda x: x.round(), model), ds, attacks[:1], batch_size=8)
    for a, b in zip(ref.attacks + bpda_ref.attacks, res.attacks + bpda.attacks):
        assert torch.equal(a.correct, b.correct)
    assert ref.attacks[0].accuracy < 1.0


# --------------------------------------------------------------------------- 3. AutoAttack on any layout


def _convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 10)).eval()  # fmt: skip


class ChannelsLastInside(nn.Module):
    """Computes in NHWC through a permuted view: its input gradient comes back channels_last even
    for a contiguous input, as cuDNN's is for a channels_last model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mix = nn.Linear(3, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.mix(x.permute(0, 2, 3, 1))).mean((1, 2)))


LAYOUTS = {
    "contiguous": lambda x: x,
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "permuted_view": lambda x: x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
    "transposed_view": lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),
    "sliced_view": lambda x: torch.stack([x, x], -1)[..., 0],
}


@pytest.mark.parametrize("model_kind", ["plain", "channels_last_model", "nhwc_inside"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_autoattack_runs_on_any_layout_and_channels_last_models(layout, model_kind):
    pytest.importorskip("pyautoattack")
    model = {"plain": _convnet, "nhwc_inside": ChannelsLastInside,
             "channels_last_model": lambda: _convnet().to(memory_format=torch.channels_last)}[model_kind]()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    xl = LAYOUTS[layout](x)
    assert torch.equal(xl, x)
    # A tiny eps keeps every example robust, so every sub-attack (APGD-CE, APGD-T, FAB-T, Square) runs.
    spec = AutoAttackSpec(eps=1e-3, n_iter=2, n_queries=5)
    run = spec.run(model, xl, y, device=torch.device("cpu"), batch_size=64)
    ref = spec.run(model, x, y, device=torch.device("cpu"), batch_size=64)
    assert [s["attacked"] for s in run.stages] == [4, 4, 4, 4]
    assert torch.equal(run.x_adv, ref.x_adv) and torch.equal(run.fooled, ref.fooled)
    assert (run.x_adv - x).abs().max() <= 1e-3 + 1e-6
    assert torch.equal(xl, x)  # the caller's tensor is untouched


def test_autoattack_through_evaluate_on_a_channels_last_model_with_channels_last_data_and_inference_mode():
    pytest.importorskip("pyautoattack")
    model = _convnet().to(memory_format=torch.channels_last)
    ds = load_dataset("synthetic", "test", image_size=8, n_test=8, seed=2)
    with torch.no_grad():
        ds = ArrayDataset(ds.images, model(ds.images.float() / 255).argmax(1), ds.classes)
    with torch.inference_mode():  # large eps: APGD-CE fools everything at once, keeping this fast
        res = evaluate(model, ds, [AutoAttackSpec(eps=0.5, n_iter=3, n_queries=5)], batch_size=8)
    assert res.clean_accuracy == 1.0 and res.attacks[0].accuracy == 0.0


# --------------------------------------------------------------------------- 4. objectives: last iterate


def _fsr_model():
    torch.manual_seed(0)
    return FSRModel(create_model("small_cnn", num_classes=10, width=8), at=["stage3"], num_classes=10, hidden=8)


def _plain_model():
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=10, width=8)


def _objective_data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


OBJECTIVES = {
    "pgd_at": lambda a: AdversarialCE(a),
    "pgd_at_no_fsr_terms": lambda a: AdversarialCE(a, lambda_sep=0.0, lambda_rec=0.0),
    "mart": lambda a: MART(a),
}
ATTACKS = {
    "pgd": PGD(eps=16 / 255, steps=4, random_start=False, keep_best=True),
    "pgd_restarts": PGD(eps=16 / 255, steps=4, restarts=2, keep_best=True),
    "fast_at": replace(fast_at_attack(16 / 255), keep_best=True),
}


@pytest.mark.parametrize("fsr", [False, True], ids=["plain", "fsr"])
@pytest.mark.parametrize("attack_name", list(ATTACKS))
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_objectives_train_on_the_last_iterate_whatever_keep_best_says(objective, attack_name, fsr):
    attack = ATTACKS[attack_name]
    model = (_fsr_model() if fsr else _plain_model()).train()
    x, y = _objective_data()
    # References first: the objective's train-mode loss pass moves BatchNorm's running statistics.
    torch.manual_seed(1)
    last = pgd(model, x, y, replace(attack, keep_best=False))
    torch.manual_seed(1)
    best = pgd(model, x, y, attack)
    torch.manual_seed(1)
    out = OBJECTIVES[objective](attack)(model, x, y)
    assert not torch.equal(best, last)  # keep_best would have given another batch: the test can tell
    assert torch.equal(out.x_adv, last)
    assert model.training


def test_trades_trains_on_the_last_iterate_and_keep_best_cannot_reach_it():
    with pytest.raises(ConfigError, match="keep_best=False"):
        PGD(eps=EPS, steps=2, loss="kl", keep_best=True)  # the kl attack has no "first fooling iterate"
    for model in (_plain_model(), _fsr_model()):
        model.train()
        x, y = _objective_data()
        attack = trades_attack(16 / 255, steps=3)
        model.eval()
        with torch.no_grad():
            p = model(x).float().softmax(1)
        torch.manual_seed(1)
        last = pgd(model, x, p, attack, validate=False)
        model.train()
        torch.manual_seed(1)
        out = TRADES(attack)(model, x, y)
        assert torch.equal(out.x_adv, last)


# --------------------------------------------------------------------------- 5. one transfer rule


class Recorder(nn.Module):
    """A real model that keeps every batch it is asked to classify (to see what a transfer path hands it)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.net(x)


@pytest.mark.parametrize("random_start", [False, True])
def test_eval_transfer_and_pssr_transfer_hand_over_identical_examples(random_start):
    target_net = Linear(k=5, seed=0)
    surrogate = Linear(k=5, seed=1)
    ds = _dataset(target_net, n=24, lo=51, hi=205)
    n = len(ds)
    # advmend eval --transfer-from builds Transfer(surrogate, PGD(eps, steps=20, ...)): keep_best's default
    cli_attack = PGD(eps=4 * EPS, steps=8, random_start=random_start, name="PGD-8")
    assert cli_attack.keep_best

    target = Recorder(target_net)
    res = evaluate(target, ds, [Transfer(surrogate, cli_attack, "surrogate.safetensors")], batch_size=64, seed=5)
    eval_adv = target.seen[-1]  # the last call scores the transferred examples
    assert eval_adv.shape[0] == n and res.attacks[0].settings["final_iterate"]

    target = Recorder(target_net)
    gen = torch.Generator().manual_seed(5)
    pssr_res, _ = transfer_attack(surrogate, target, ds, cli_attack, torch.ones(n, dtype=torch.bool),
                                  label="transfer", batch_size=64, generator=gen)  # fmt: skip
    pssr_adv = target.seen[0]
    assert torch.equal(eval_adv, pssr_adv)
    assert torch.equal(res.attacks[0].correct, pssr_res.correct)

    # ... and both are the last iterate on the surrogate, which differs from keep_best's here
    x = ds.images.float() / 255
    gen = torch.Generator().manual_seed(5)
    last = pgd(surrogate, x, ds.labels, replace(cli_attack, keep_best=False), generator=gen)
    gen = torch.Generator().manual_seed(5)
    first = pgd(surrogate, x, ds.labels, cli_attack, generator=gen)
    assert torch.equal(eval_adv, last) and not torch.equal(first, last)


# --------------------------------------------------------------------------- 6. accuracy against eps


def test_accuracy_curve_is_a_real_non_increasing_curve_consistent_with_the_attack():
    model = Linear(k=2)
    ds = _dataset(model, n=260, lo=51, hi=205)  # [0.2, 0.8]: 2 eps never reaches the box
    curve = accuracy_curve(model, ds, EPS, "linf", batch_size=128, seed=7)
    assert curve["n_examples"] == 200 and len(curve["eps"]) == len(curve["accuracy"]) == len(CURVE_FACTORS) == 6
    assert curve["eps"] == pytest.approx([f * EPS for f in CURVE_FACTORS])
    acc = curve["accuracy"]
    assert all(a >= b for a, b in zip(acc, acc[1:])), acc
    assert acc[0] == 100.0 and acc[-1] < acc[0] and len(set(acc)) >= 4  # a curve, not two points
    # The point at the threat eps is exactly PGD-10 (step 2.5 eps/10) alone, same seed, same subset ...
    sub = subset(ds, 200, 7)
    k = CURVE_FACTORS.index(1.0)
    alone = evaluate(model, sub, [PGD(eps=EPS, steps=10, step_size=2.5 * EPS / 10)], batch_size=128, seed=7)
    assert acc[k] == pytest.approx(100 * alone.worst_accuracy)
    # ... and on a linear model it is the closed form: robust iff margin > e * ||w_y - w_j||_1.
    x = sub.images.float() / 255
    with torch.no_grad():
        z = model(x)
    y = sub.labels
    w = model.fc.weight
    margin = z.gather(1, y[:, None]).squeeze(1) - z.gather(1, (1 - y)[:, None]).squeeze(1)
    w_l1 = (w[y] - w[1 - y]).abs().sum(1)
    for e, a in zip(curve["eps"], acc):
        assert a == pytest.approx(100 * float((margin > e * w_l1).float().mean()), abs=1e-9), e


def test_report_records_the_curve_and_no_plot_skips_it(tmp_path, monkeypatch):
    from advmend.cli import main

    (tmp_path / "curve_net_p12.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))\n"
    )
    monkeypatch.chdir(tmp_path)
    base = ["eval", "--model", "curve_net_p12:build", "--dataset", "synthetic", "--set",
            "data.options={image_size: 8, n_test: 24}", "--eps", "8/255", "--protocol", "quick", "--quiet"]  # fmt: skip
    assert main(base + ["--out", "with"]) == 0
    report = json.loads((tmp_path / "with" / "report.json").read_text())
    curve = report["meta"]["accuracy_vs_eps"]
    assert len(curve["eps"]) == 6 and curve["n_examples"] == 24 and curve["attack"] == "PGD-10"
    assert curve["accuracy"][0] == pytest.approx(report["clean_accuracy"])
    assert all(a >= b for a, b in zip(curve["accuracy"], curve["accuracy"][1:]))
    if "plot" in report["meta"]:
        assert (tmp_path / "with" / "accuracy_vs_eps.png").read_bytes()[:4] == b"\x89PNG"
    assert main(base + ["--out", "without", "--no-plot"]) == 0
    report = json.loads((tmp_path / "without" / "report.json").read_text())
    assert "accuracy_vs_eps" not in report["meta"] and not (tmp_path / "without" / "accuracy_vs_eps.png").exists()
