"""Contracts every attack configuration must honour, plus limit cases with known answers."""

import pytest
import torch
from torch import nn

from advmend.attacks import (
    PGD,
    AutoAttackSpec,
    attack_mode,
    cw_margin,
    fgsm,
    margin_loss,
    pgd,
    pgd_tracked,
    protocol_attacks,
)
from advmend.attacks.losses import LOSSES
from advmend.errors import ConfigError, InputError, ModelContractError

EPS = 8 / 255
ATTACKS = {
    "fgsm": fgsm(EPS),
    "pgd_linf": PGD(eps=EPS, steps=5),
    "pgd_linf_restarts": PGD(eps=EPS, steps=3, restarts=3),
    "pgd_l2": PGD(eps=0.5, steps=5, norm="l2"),
    "pgd_l2_restarts": PGD(eps=0.5, steps=3, norm="l2", restarts=2),
    "cw": PGD(eps=EPS, steps=5, loss="margin", kappa=50.0, random_start=False),
    "train_style": PGD(eps=EPS, steps=4, keep_best=False),
    "targeted_ce": PGD(eps=EPS, steps=5, targeted=True),
    "targeted_margin": PGD(eps=EPS, steps=5, loss="margin", kappa=10.0, targeted=True, random_start=False),
    "cw_l2": cw_margin(0.5, "l2", steps=5),
    "pgd_l1": PGD(eps=4.0, steps=5, norm="l1"),
    "pgd_l1_restarts_normal_start": PGD(eps=4.0, steps=3, norm="l1", restarts=2, start="normal"),
    "cw_l1": cw_margin(4.0, "l1", steps=5),
}


def _size(d, norm):
    d = d.flatten(1).double()
    return d.abs().amax(1) if norm == "linf" else d.abs().sum(1) if norm == "l1" else d.norm(dim=1)


@pytest.mark.parametrize("name", ATTACKS)
def test_stays_in_ball_and_box(name, tiny_net, batch):
    cfg = ATTACKS[name]
    x, y = batch
    x_adv = pgd(tiny_net, x, y, cfg)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert (_size(x_adv - x, cfg.norm) <= cfg.eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("name", ATTACKS)
def test_leaves_inputs_modes_and_grads_untouched(name, tiny_net, batch):
    x, y = batch
    x0, y0 = x.clone(), y.clone()
    tiny_net.train()
    tiny_net.bn.eval()  # a mixed state must come back exactly as it was
    tiny_net.fc.weight.requires_grad_(False)
    modes = {n: m.training for n, m in tiny_net.named_modules()}
    flags = {n: p.requires_grad for n, p in tiny_net.named_parameters()}
    bn_stats = tiny_net.bn.running_mean.clone()
    pgd(tiny_net, x, y, ATTACKS[name])
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert {n: m.training for n, m in tiny_net.named_modules()} == modes
    assert {n: p.requires_grad for n, p in tiny_net.named_parameters()} == flags
    assert all(p.grad is None for p in tiny_net.parameters())
    assert torch.equal(tiny_net.bn.running_mean, bn_stats)  # attacked in eval mode


@pytest.mark.parametrize("name", ["fgsm", "cw", "cw_l1"])
def test_batch_consistent(name, tiny_net, batch):
    """Without random start an example's result does not depend on its batch-mates."""
    x, y = batch
    full = pgd(tiny_net, x, y, ATTACKS[name])
    parts = torch.cat([pgd(tiny_net, x[i : i + 2], y[i : i + 2], ATTACKS[name]) for i in range(0, 6, 2)])
    torch.testing.assert_close(full, parts, atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.5), ("l1", 4.0)])
def test_random_start_reproducible_with_generator(tiny_net, batch, norm, eps):
    x, y = batch
    cfg = PGD(eps=eps, steps=2, norm=norm)
    a = pgd(tiny_net, x, y, cfg, generator=torch.Generator().manual_seed(3))
    b = pgd(tiny_net, x, y, cfg, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_zero_steps_or_zero_eps_is_identity(tiny_net, batch):
    x, y = batch
    assert torch.equal(pgd(tiny_net, x, y, PGD(eps=EPS, steps=0)), x)
    assert torch.equal(pgd(tiny_net, x, y, PGD(eps=0.0, steps=5)), x)


class Linear2(nn.Module):
    """Two-class linear model z = W x + b on flattened images."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, 2)

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_fgsm_on_linear_model_matches_closed_form():
    """For a linear model the CE gradient's sign is sign(w_other - w_y): FGSM is exactly that step."""
    torch.manual_seed(0)
    x = torch.full((4, 1, 4, 4), 0.5)  # far from the box so clipping is inactive
    model = Linear2(16)
    y = model(x).argmax(1)  # correctly classified, so the step is taken (misclassified inputs are kept)
    w = model.lin.weight.detach()
    direction = torch.stack([(w[1 - c] - w[c]).sign() for c in y.tolist()]).view_as(x)
    x_adv = pgd(model, x, y, fgsm(0.1))
    torch.testing.assert_close(x_adv, x + 0.1 * direction)


def test_l2_pgd_on_linear_model_moves_along_weight_difference():
    """Margin PGD-L2 on a linear model ends on the ball boundary along w_other - w_y."""
    torch.manual_seed(0)
    x = torch.full((2, 1, 4, 4), 0.5)
    model = Linear2(16)
    y = model(x).argmax(1)
    w = model.lin.weight.detach()
    x_adv = pgd(model, x, y, PGD(eps=0.2, steps=10, step_size=0.05, norm="l2", loss="margin", kappa=50.0, random_start=False,
                                 keep_best=False))  # fmt: skip
    for i, c in enumerate(y.tolist()):
        d = (x_adv[i] - x[i]).flatten()
        u = (w[1 - c] - w[c]) / (w[1 - c] - w[c]).norm()
        torch.testing.assert_close(d, 0.2 * u, atol=1e-5, rtol=0)


def test_pgd_beats_fgsm_and_restarts_never_hurt(tiny_net, batch):
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    y = tiny_net.eval()(x).argmax(1)  # all correct by construction
    fooled = {}
    for name, cfg in {
        "fgsm": fgsm(0.05),
        "pgd": PGD(eps=0.05, steps=20, step_size=0.01, random_start=False),
        "pgd_r": PGD(eps=0.05, steps=20, step_size=0.01, random_start=False, restarts=3),
    }.items():
        _, f = pgd_tracked(tiny_net, x, y, cfg, generator=torch.Generator().manual_seed(0))
        fooled[name] = int(f.sum())
    assert fooled["pgd"] >= fooled["fgsm"]
    assert fooled["pgd_r"] >= fooled["pgd"]


def test_tracked_fooled_flags_are_true(tiny_net):
    torch.manual_seed(0)
    x = torch.rand(32, 3, 8, 8)
    y = tiny_net.eval()(x).argmax(1)
    x_adv, fooled = pgd_tracked(tiny_net, x, y, PGD(eps=0.1, steps=10))
    with torch.no_grad():
        assert torch.equal(tiny_net.eval()(x_adv).argmax(1) != y, fooled)


def test_margin_loss_value():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 5.0, 1.0]])
    y = torch.tensor([0, 2])
    torch.testing.assert_close(margin_loss(logits, y, 50.0), torch.tensor([-2.0, 4.0]))
    torch.testing.assert_close(margin_loss(logits, y, 1.0), torch.tensor([-2.0, 1.0]))  # flat past kappa


@pytest.mark.parametrize(
    "x, err",
    [
        (torch.rand(2, 3, 8), "shape"),
        (torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), "floating"),
        (torch.full((2, 3, 8, 8), float("nan")), "NaN"),
        (torch.rand(2, 3, 8, 8) * 2, "[0, 1]"),
    ],
)
def test_bad_images_rejected(tiny_net, x, err):
    with pytest.raises(InputError, match=err.replace("[", r"\[").replace("]", r"\]")):
        pgd(tiny_net, x, torch.zeros(x.shape[0], dtype=torch.long), fgsm(EPS))


def test_bad_labels_rejected(tiny_net, batch):
    x, _ = batch
    with pytest.raises(InputError, match="shape"):
        pgd(tiny_net, x, torch.zeros(3, dtype=torch.long), fgsm(EPS))
    with pytest.raises(InputError, match="integer"):
        pgd(tiny_net, x, torch.zeros(6), fgsm(EPS))
    with pytest.raises(InputError, match="class indices"):
        pgd(tiny_net, x, torch.full((6,), -1), fgsm(EPS))


def test_model_returning_tuple_rejected(batch):
    class TupleNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 8 * 8, 5)

        def forward(self, x):
            z = self.fc(x.flatten(1))
            return z, z

    x, y = batch
    with pytest.raises(ModelContractError, match="tuple"):
        pgd(TupleNet(), x, y, fgsm(EPS))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eps": -1.0},
        {"eps": 0.1, "steps": -1},
        {"eps": 0.1, "restarts": 0},
        {"eps": 0.1, "norm": "l3"},
        {"eps": 0.1, "loss": "nope"},
        {"eps": float("nan")},
    ],  # fmt: skip
)
def test_bad_settings_rejected(kwargs):
    with pytest.raises(ConfigError):
        PGD(**kwargs)


def test_paper_protocol_settings():
    atks = {a.name: a for a in protocol_attacks("paper", EPS)}
    assert set(atks) == {"FGSM", "PGD-20", "PGD-100", "CW-30"}
    for name in ("PGD-20", "PGD-100", "CW-30"):
        assert atks[name].alpha == pytest.approx(EPS / 10) and not atks[name].random_start
    assert atks["CW-30"].loss == "margin" and atks["CW-30"].kappa == 50
    assert atks["FGSM"].steps == 1 and atks["FGSM"].alpha == EPS


def test_attack_mode_restores_after_error(tiny_net):
    tiny_net.train()
    with pytest.raises(RuntimeError):
        with attack_mode(tiny_net):
            assert not tiny_net.training
            raise RuntimeError("boom")
    assert tiny_net.training and all(p.requires_grad for p in tiny_net.parameters())


def test_targeted_losses_values():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    target = torch.tensor([1, 2])
    ce = LOSSES.get("ce_targeted")(logits, target, 0.0)
    assert torch.allclose(ce, -torch.nn.functional.cross_entropy(logits, target, reduction="none"))
    margin = LOSSES.get("margin_targeted")(logits, target, 1.0)
    # z_t - max_{j != t} z_j, capped at kappa: example 0 is 2 below its target (-2), example 1 is
    # 3 above it, capped at kappa = 1.
    assert torch.allclose(margin, torch.tensor([-2.0, 1.0]))


def test_targeted_fooled_means_classified_as_target(tiny_net, batch):
    x, _ = batch
    with torch.no_grad():
        pred = tiny_net.eval()(x).argmax(1)
    # With zero steps nothing moves: "fooled" is true exactly where the target is the prediction.
    x_adv, hit = pgd_tracked(tiny_net, x, pred, PGD(eps=EPS, steps=0, targeted=True))
    assert hit.all()
    x_adv, hit = pgd_tracked(tiny_net, x, (pred + 1) % 5, PGD(eps=EPS, steps=0, targeted=True))
    assert not hit.any()


def test_untargeted_describe_is_unchanged_apart_from_the_flag():
    d = PGD(eps=EPS, steps=3).describe()
    assert d["targeted"] is False and d["loss"] == "ce"


def test_autoattack_and_full_protocols():
    (aa,) = protocol_attacks("autoattack", EPS)
    assert isinstance(aa, AutoAttackSpec) and aa.eps == EPS and aa.version == "standard"
    assert aa.describe()["n_queries"] == 5000 and aa.describe()["n_iter"] == 100
    names = [a.describe()["name"] for a in protocol_attacks("full", EPS, "l2")]
    assert names == ["FGSM", "PGD-20", "PGD-100", "CW-30", "PGD-50x5", "CW-50x5", "AutoAttack"]
    assert all(a.norm == "l2" for a in protocol_attacks("full", EPS, "l2"))
    strong = {a.name: a for a in protocol_attacks("strong", EPS)}
    assert strong["PGD-50x5"].restarts == 5 and strong["CW-50x5"].loss == "margin"
