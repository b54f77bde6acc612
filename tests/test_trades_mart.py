"""Contracts of the training objectives: PGD-AT, TRADES, MART and fast AT, with and without FSR.

Every objective: finite loss, gradients to every trainable parameter, inputs and model modes left
as they were, adversarial batch inside the eps-ball and [0, 1], deterministic in eval mode; each
reduces to a known result in a limit case and matches the reference code's formula.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TinyNet
from torch import nn

from advmend.attacks import PGD, pgd
from advmend.attacks.losses import LOSSES
from advmend.cli import main
from advmend.config import bundled_configs, load_run_config
from advmend.data import dataset_radii
from advmend.defenses import FSRModel, fsr_losses
from advmend.errors import ConfigError
from advmend.models import create_model
from advmend.training.build import OBJECTIVES, build_objective
from advmend.training.mart import MART, boosted_ce
from advmend.training.objectives import AdversarialCE, fast_at_attack
from advmend.training.trades import TRADES, trades_attack

EPS = 8 / 255
METHODS = ("pgd_at", "trades", "mart", "fast_at")


def make_objective(method: str, eps: float = EPS, *, beta: float = 6.0, lambda_sep=1.0, lambda_rec=1.0):
    """A 2-step version of each method (1 step for fast AT)."""
    lam = (lambda_sep, lambda_rec)
    if method == "pgd_at":
        return AdversarialCE(PGD(eps=eps, steps=2, step_size=eps / 2, keep_best=False), *lam)
    if method == "trades":
        return TRADES(trades_attack(eps, steps=2, step_size=eps / 2), beta, *lam)
    if method == "mart":
        return MART(PGD(eps=eps, steps=2, step_size=eps / 2, keep_best=False), beta, *lam)
    return AdversarialCE(fast_at_attack(eps), *lam)


def fsr_model() -> FSRModel:
    torch.manual_seed(0)
    return FSRModel(create_model("small_cnn", num_classes=10, width=8), at=["stage3"], num_classes=10, hidden=8)


def sharp(model: FSRModel) -> FSRModel:
    """Confident predictions: on an untrained model the KL terms are ~1e-5, below the comparison's
    tolerance, so a formula that dropped them would still match."""
    with torch.no_grad():
        model.backbone.fc.weight.mul_(40)
    return model


def fsr_data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


@pytest.fixture(params=["tiny", "fsr"])
def setup(request, batch):
    """(model, x, y): TinyNet (BatchNorm + Dropout) or an FSRModel on a small CNN."""
    if request.param == "tiny":
        torch.manual_seed(0)
        return TinyNet(), *batch
    return fsr_model(), *fsr_data()


def modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("method", METHODS)
def test_objective_contract(method, setup):
    model, x, y = setup
    model.train()
    model.drop.eval() if isinstance(model, TinyNet) else model.fsr.eval()  # a mixed-mode model
    before_modes, flags = modes(model), [p.requires_grad for p in model.parameters()]
    x0, y0 = x.clone(), y.clone()
    torch.manual_seed(1)
    out = make_objective(method)(model, x, y)

    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert modes(model) == before_modes and [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert out.logits.shape == (x.shape[0], model(x).shape[1])
    assert all(not v.requires_grad and v.ndim == 0 for v in out.metrics.values())
    if isinstance(model, FSRModel):
        assert {"fsr_sep", "fsr_rec"} <= set(out.metrics)

    x_adv = out.x_adv
    assert x_adv is not None and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)  # the attack moved

    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_objective_is_deterministic_in_eval_mode(method, setup):
    model, x, y = setup
    model.eval()
    losses = []
    for _ in range(2):
        torch.manual_seed(3)  # the random start
        losses.append(make_objective(method)(model, x, y).loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_fsr_weights_zero_is_the_method_without_fsr(method):
    """lambda = 0 gives exactly the plain method; otherwise the method's loss plus the weighted terms."""
    model, (x, y) = fsr_model().eval(), fsr_data()  # eval: one deterministic function for every pass

    class Plain(nn.Module):  # the same network, but not an FSRModel: no FSR terms possible
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    def run(obj, m):
        torch.manual_seed(5)
        return obj(m, x, y)

    zero = run(make_objective(method, lambda_sep=0.0, lambda_rec=0.0), model)
    plain = run(make_objective(method), Plain(model))
    torch.testing.assert_close(zero.loss, plain.loss, rtol=0, atol=0)
    assert not {"fsr_sep", "fsr_rec"} & set(zero.metrics)

    full = run(make_objective(method, lambda_sep=0.5, lambda_rec=2.0), model)
    torch.testing.assert_close(full.x_adv, zero.x_adv)  # the inner attack is unchanged by FSR
    sep, rec = fsr_losses(model.forward_with_aux(full.x_adv), y)
    torch.testing.assert_close(full.loss, zero.loss + 0.5 * sep + 2.0 * rec)


# --- limit cases and the reference formulas


@pytest.mark.parametrize("model_kind", ["tiny", "fsr"])
def test_trades_with_beta_zero_is_clean_cross_entropy(model_kind, batch):
    model, (x, y) = (TinyNet(), batch) if model_kind == "tiny" else (fsr_model(), fsr_data())
    model.train()  # stochastic masks / dropout: seed the RNG identically for both computations
    obj = TRADES(trades_attack(EPS, steps=2, step_size=EPS / 2), beta=0.0, lambda_sep=0.0, lambda_rec=0.0)
    torch.manual_seed(7)
    out = obj(model, x, y)
    torch.manual_seed(7)
    with torch.no_grad():
        target = F.softmax(model.eval()(x), dim=1)
    pgd(model.train(), x, target, obj.attack, validate=False)  # consumes the start's random numbers
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x), y))


def test_trades_matches_the_reference_formula():
    model, (x, y) = sharp(fsr_model()).eval(), fsr_data()
    beta = 6.0
    out = TRADES(trades_attack(EPS, steps=3, step_size=2 / 255), beta, 0.0, 0.0)(model, x, y)
    # Zhang et al.'s code: CE(f(x), y) + beta * (1/B) * KLDivLoss(sum)(log_softmax(f(x')), softmax(f(x)))
    kl = nn.KLDivLoss(reduction="sum")(F.log_softmax(model(out.x_adv), dim=1), F.softmax(model(x), dim=1))
    assert kl / x.shape[0] > 1e-2  # the regulariser matters in this comparison
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x), y) + beta * kl / x.shape[0])
    assert set(out.metrics) == {"ce", "kl"}


def test_trades_attack_increases_the_kl_from_its_start():
    model, (x, _) = fsr_model().eval(), fsr_data()
    p = F.softmax(model(x), dim=1).detach()
    kl = LOSSES.get("kl")
    torch.manual_seed(0)
    start = pgd(model, x, p, trades_attack(EPS, steps=1, step_size=1e-9), validate=False)
    torch.manual_seed(0)
    x_adv = pgd(model, x, p, trades_attack(EPS, steps=10, step_size=2 / 255), validate=False)
    with torch.no_grad():
        assert kl(model(x_adv), p).mean() > 10 * kl(model(start), p).mean()


def test_kl_attack_loss_is_nonnegative_and_zero_at_the_clean_point():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(64, 10, generator=g)
    target = F.softmax(3 * torch.randn(64, 10, generator=g), dim=1)
    kl = LOSSES.get("kl")
    assert (kl(logits, target) >= 0).all()
    torch.testing.assert_close(kl(logits, F.softmax(logits, dim=1)), torch.zeros(64), atol=1e-6, rtol=0)


def test_trades_normal_start_is_0_001_scale_noise():
    g = torch.Generator().manual_seed(0)
    x = 0.1 + 0.8 * torch.rand(16, 3, 32, 32, generator=g)  # away from the box: no clipping
    model = create_model("small_cnn", num_classes=10, width=8).eval()
    p = F.softmax(model(x), dim=1).detach()
    step = 1e-7  # one negligible step: x_adv is the start
    d = pgd(model, x, p, trades_attack(EPS, steps=1, step_size=step), generator=g, validate=False) - x
    assert 0.00095 < d.std() < 0.00105 and abs(d.mean()) < 5e-5
    assert d.abs().max() < 0.006 + step  # 6 standard deviations


def test_mart_with_beta_zero_is_the_boosted_ce():
    model, (x, y) = fsr_model().eval(), fsr_data()
    out = MART(PGD(eps=EPS, steps=2, step_size=EPS / 2, keep_best=False), 0.0, 0.0, 0.0)(model, x, y)
    logits_adv = model(out.x_adv)
    # Wang et al.'s code: the best wrong class by argsort, then nll_loss(log(1.0001 - p + 1e-12), new_y)
    probs = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(probs, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - probs + 1e-12), new_y)
    torch.testing.assert_close(out.loss, bce)
    torch.testing.assert_close(out.metrics["bce"], bce)


def test_mart_matches_the_reference_formula():
    model, (x, y) = sharp(fsr_model()).eval(), fsr_data()
    beta = 6.0
    out = MART(PGD(eps=EPS, steps=3, step_size=2 / 255, keep_best=False), beta, 0.0, 0.0)(model, x, y)
    logits, logits_adv = model(x), model(out.x_adv)
    adv_probs, nat_probs = F.softmax(logits_adv, dim=1), F.softmax(logits, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    true_probs = nat_probs.gather(1, y[:, None]).squeeze(1)
    kl = nn.KLDivLoss(reduction="none")(torch.log(adv_probs + 1e-12), nat_probs).sum(1)
    ref = loss_adv + beta * (kl * (1.0000001 - true_probs)).sum() / x.shape[0]
    assert (kl * (1.0000001 - true_probs)).mean() > 1e-3  # the weighted KL term matters here (tolerance 1e-5)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    assert out.metrics["kl"] > 0


def test_mart_bce_stays_finite_when_the_wrong_class_is_certain():
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 0.0], [1e4, 0.0]]))
        model.bias.zero_()
    x = torch.ones(4, 2)  # p_2 = 1 for every example, labels 0: the log would be -inf without the clamp
    loss = boosted_ce(model(x), torch.zeros(4, dtype=torch.long))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(model.weight.grad).all()


def test_fast_at_with_eps_zero_is_clean_cross_entropy(batch):
    model, (x, y) = TinyNet().train(), batch
    torch.manual_seed(9)
    out = AdversarialCE(fast_at_attack(0.0))(model, x, y)
    torch.manual_seed(9)  # dropout draws
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x), y))


def test_fast_at_is_one_fgsm_step_from_a_uniform_start():
    a = fast_at_attack(EPS)
    assert (a.steps, a.random_start, a.start, a.keep_best) == (1, True, "uniform", False)
    assert a.alpha == pytest.approx(1.25 * EPS)
    assert fast_at_attack(EPS, step_size=2 / 255).alpha == pytest.approx(2 / 255)
    # The start plus one signed step of alpha, projected: identical to a hand-made FGSM-RS.
    model, (x, y) = fsr_model().eval(), fsr_data()
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    x_adv = pgd(model, x, y, a, generator=g1)
    delta = (x + (2 * torch.rand(x.shape, generator=g2) - 1) * EPS).clamp(0, 1) - x
    x0 = (x + delta).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x0), y, reduction="sum"), x0)
    expected = x + ((delta + 1.25 * EPS * grad.sign()).clamp(-EPS, EPS) + x).clamp(0, 1) - x
    torch.testing.assert_close(x_adv, expected)


@pytest.mark.parametrize("method", ["trades", "mart"])
def test_objective_under_bf16_autocast_is_finite(method):
    model, (x, y) = fsr_model().train(), fsr_data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = make_objective(method)(model, x, y)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()


def test_objectives_reject_bad_weights():
    with pytest.raises(ConfigError, match="train.beta"):
        TRADES(trades_attack(EPS), beta=-1.0)
    with pytest.raises(ConfigError, match="train.beta"):
        MART(PGD(eps=EPS), beta=float("nan"))
    with pytest.raises(ConfigError, match="fsr.lambda_sep"):
        AdversarialCE(None, lambda_sep=-1.0)
    with pytest.raises(ConfigError, match="loss 'kl'"):
        TRADES(PGD(eps=EPS, keep_best=False))


# --- building from configs


def test_registry_has_every_method():
    assert set(METHODS) | {"standard"} <= set(OBJECTIVES.names())


@pytest.mark.parametrize("name", bundled_configs())
def test_bundled_config_builds_its_objective(name):
    cfg = load_run_config(name)
    obj = build_objective(cfg, dataset_radii(cfg.data.name))
    assert callable(obj)
    expected = {"trades": TRADES, "mart": MART}.get(cfg.train.method, AdversarialCE)
    assert isinstance(obj, expected)
    if cfg.train.method in ("trades", "mart"):
        assert obj.beta == 6.0
    if cfg.data.name == "svhn":
        assert obj.attack.alpha == pytest.approx(1 / 255) and cfg.data.augment is False and cfg.train.lr == 0.01


def _build(name: str, *overrides: str):
    cfg = load_run_config(name, list(overrides))
    return build_objective(cfg, dataset_radii("cifar10"))


def test_beta_defaults_and_overrides():
    assert _build("cifar10/trades_resnet18", "train.beta=null").beta == 6.0
    assert _build("cifar10/mart_resnet18", "train.beta=null").beta == 6.0
    assert _build("cifar10/trades_resnet18", "train.beta=1").beta == 1.0
    trades = _build("cifar10/trades_resnet18")
    assert (trades.attack.loss, trades.attack.start, trades.attack.steps) == ("kl", "normal", 10)
    assert _build("cifar10/trades_resnet18", "train.attack.loss=ce").attack.loss == "kl"  # the default


@pytest.mark.parametrize(
    "name, overrides, key",
    [
        ("cifar10/pgdat_resnet18", ["train.beta=6"], "train.beta"),
        ("cifar10/fast_at_resnet18", ["train.beta=6"], "train.beta"),
        ("cifar10/trades_resnet18", ["train.beta=-1"], "train.beta"),
        ("cifar10/mart_resnet18", ["train.beta=-0.5"], "train.beta"),
        ("cifar10/trades_resnet18", ["train.attack.loss=margin"], "train.attack.loss"),
        ("cifar10/trades_resnet18", ["train.attack.random_start=false"], "train.attack.random_start"),
        ("cifar10/trades_resnet18", ["train.attack.restarts=2"], "train.attack.restarts"),
        ("cifar10/pgdat_resnet18", ["train.attack.loss=kl"], "train.attack.loss"),
        ("cifar10/mart_resnet18", ["train.attack.loss=kl"], "train.attack.loss"),
        ("cifar10/fast_at_resnet18", ["train.attack.steps=10"], "train.attack.steps"),
        ("cifar10/fast_at_resnet18", ["train.attack.random_start=false"], "train.attack.random_start"),
        ("cifar10/mart_resnet18", ["fsr.lambda_rec=-1"], "fsr.lambda_rec"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_key(name, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _build(name, *overrides)


def test_fast_at_step_size_override():
    assert _build("cifar10/fast_at_resnet18").attack.alpha == pytest.approx(10 / 255)
    assert _build("cifar10/fast_at_resnet18", "train.attack.step_size=8/255").attack.alpha == pytest.approx(8 / 255)


# --- the command line


def _tiny_config(method: str, fsr: bool) -> dict:
    return {
        "name": f"smoke-{method}",
        "data": {"name": "synthetic", "val_size": 32, "options": {"n_train": 160, "n_test": 32}},
        "model": {"name": "small_cnn", "options": {"width": 8}},
        "fsr": {"enabled": fsr, "hidden": 8},
        "train": {
            "method": method, "epochs": 1, "batch_size": 64, "attack": {"steps": 2},
            "val_attack": {"steps": 1}, "progress": False,
        },
        "eval": {"after_train": False},
    }  # fmt: skip


@pytest.mark.parametrize("method, fsr", [("trades", True), ("mart", False), ("fast_at", False)])
def test_cli_trains_one_epoch(method, fsr, tmp_path):
    cfg = _tiny_config(method, fsr)
    if method == "fast_at":
        cfg["train"]["attack"] = {"steps": 1}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out)]) == 0
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    expected = {"trades": {"ce", "kl"}, "mart": {"bce", "kl"}, "fast_at": {"ce"}}[method]
    assert expected <= set(rec) and all(rec[k] == rec[k] for k in expected)  # present and not NaN
    assert ({"fsr_sep", "fsr_rec"} <= set(rec)) == fsr
    assert (out / "best.safetensors").is_file() and (out / "last.safetensors").is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["method"] == method


def test_cli_rejects_a_misplaced_beta_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_tiny_config("pgd_at", False)))
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out), "--set", "train.beta=6"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("advmend: error:") and "train.beta" in err[0]
    assert not Path(out).exists() or not any(Path(out).iterdir())
