"""Objectives reduce to known results in their limit cases, and their FSR terms match the spec.

The FSR terms are recomputed here from docs/fsr.md, from each block's input feature map and
its sub-nets, never through `fsr_losses`: a test against the implementation itself cannot fail.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advmend.attacks import PGD, pgd
from advmend.defenses import FSRModel
from advmend.models import create_model
from advmend.training.mart import MART
from advmend.training.objectives import AdversarialCE
from advmend.training.trades import TRADES, trades_attack

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 8 / 255


def _fsr_model(layers=("stage3",), confident: bool = False):
    """A small FSR model. `confident` scales the classifier so that logits differ by several units: a
    fresh model's probabilities are all about 0.1, its KL terms ~1e-5 and MART's weight (1 - p_y)
    nearly constant, too small for a formula test to tell a dropped factor from rounding."""
    torch.manual_seed(0)
    backbone = create_model("small_cnn", num_classes=10, width=8)
    if confident:
        with torch.no_grad():
            backbone.fc.weight.mul_(40)
    return FSRModel(backbone, at=list(layers), num_classes=10, hidden=8)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def _spec_y_adv(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The highest-scoring wrong class: top-1 when it is wrong, else top-2."""
    top2 = logits.topk(2, dim=1).indices
    return torch.where(top2[:, 0] != y, top2[:, 0], top2[:, 1])


def _spec_fsr(model: FSRModel, x: torch.Tensor, y: torch.Tensor):
    """(final logits, L_sep, L_rec, y_adv) from the spec, for a model in eval mode (deterministic masks).

    Each block's input f is captured by a hook that runs before the FSR block's own hook; then
    m = sigmoid(S(f) / tau), f+ = m f, f- = (1 - m) f, f~- = f- + (1 - m) R(f-), the head A is global
    average pooling then Linear, L_sep = CE(A(f+), y) + CE(A(f-), y_adv), L_rec = CE(A(f~-), y),
    each averaged over the blocks.
    """
    feats = {}
    handles = [
        model.backbone.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: feats.__setitem__(name, out), prepend=True
        )
        for name in model.layers
    ]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    y_adv = _spec_y_adv(logits, y)
    sep = rec = 0.0
    for name in model.layers:
        block, f = model.fsr[name.replace(".", "__")], feats[name]
        m = torch.sigmoid(block.separation(f) / float(block.tau))
        f_plus, f_minus = m * f, (1 - m) * f
        f_tilde = f_minus + (1 - m) * block.recalibration(f_minus)
        a_plus, a_minus, a_tilde = (block.head(t.mean(dim=(2, 3))) for t in (f_plus, f_minus, f_tilde))
        sep = sep + F.cross_entropy(a_plus, y) + F.cross_entropy(a_minus, y_adv)
        rec = rec + F.cross_entropy(a_tilde, y)
    n = len(model.layers)
    return logits, sep / n, rec / n, y_adv


def _labels_half_right(model, x):
    """Labels the model gets right on the first half of x (after a small attack) and wrong on the rest."""
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    y = pred.clone()
    y[4:] = (pred[4:] + 1) % 10
    return y


def test_pgd_at_with_zero_steps_is_cross_entropy():
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, width=8).eval()
    x, y = _data()
    out = AdversarialCE(PGD(eps=EPS, steps=0))(model, x, y)
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x), y))


def test_pgd_at_trains_on_the_attack_output():
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, width=8).eval()
    x, y = _data()
    attack = PGD(eps=EPS, steps=3, random_start=False, keep_best=False)
    out = AdversarialCE(attack)(model, x, y)
    torch.testing.assert_close(out.loss, F.cross_entropy(model(pgd(model, x, y, attack)), y))
    assert out.loss > F.cross_entropy(model(x), y)


def test_fsr_with_zero_weights_equals_pgd_at():
    model = _fsr_model().eval()  # eval: deterministic masks, so both passes see one function
    x, y = _data()
    attack = PGD(eps=EPS, steps=2, random_start=False, keep_best=False)
    plain = AdversarialCE(attack, lambda_sep=0.0, lambda_rec=0.0)(model, x, y)
    torch.testing.assert_close(plain.loss, F.cross_entropy(model(pgd(model, x, y, attack)), y))
    assert set(plain.metrics) == {"ce"}


@pytest.mark.parametrize("layers", [("stage3",), ("stage2", "stage3")])
def test_pgd_at_fsr_loss_matches_the_spec(layers):
    model = _fsr_model(layers).eval()
    x, _ = _data()
    y = _labels_half_right(model, x)
    lambda_sep, lambda_rec = 0.7, 1.3  # distinct weights: a swapped or dropped weight shows
    out = AdversarialCE(PGD(eps=1 / 255, steps=2, random_start=False), lambda_sep, lambda_rec)(model, x, y)
    logits, sep, rec, _ = _spec_fsr(model, out.x_adv, y)
    top1_wrong = logits.argmax(1) != y
    assert top1_wrong.any() and not top1_wrong.all()  # both rules for y_adv are exercised
    torch.testing.assert_close(out.metrics["fsr_sep"], sep)
    torch.testing.assert_close(out.metrics["fsr_rec"], rec)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, y) + lambda_sep * sep + lambda_rec * rec)


def test_trades_with_fsr_matches_the_spec():
    model = _fsr_model(confident=True).eval()
    x, _ = _data()
    y = _labels_half_right(model, x)
    beta, lambda_sep, lambda_rec = 2.5, 0.7, 1.3  # beta away from the default 6
    out = TRADES(trades_attack(EPS, steps=2, step_size=2 / 255), beta, lambda_sep, lambda_rec)(model, x, y)
    logits_clean = model(x)
    logits_adv, sep, rec, _ = _spec_fsr(model, out.x_adv, y)
    # Zhang et al.: CE(f(x), y) + beta * (1/B) * sum KL(p(x) || p(x')); FSR terms on x' (fsr.md)
    kl = nn.KLDivLoss(reduction="sum")(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1)) / len(x)
    expected = F.cross_entropy(logits_clean, y) + beta * kl + lambda_sep * sep + lambda_rec * rec
    torch.testing.assert_close(out.loss, expected)
    assert kl > 1e-2  # beta matters here


def test_mart_with_fsr_matches_the_spec():
    model = _fsr_model(confident=True).eval()
    x, _ = _data()
    y = _labels_half_right(model, x)
    beta, lambda_sep, lambda_rec = 2.5, 0.7, 1.3
    out = MART(PGD(eps=EPS, steps=2, step_size=2 / 255, keep_best=False), beta, lambda_sep, lambda_rec)(model, x, y)
    logits_clean = model(x)
    logits_adv, sep, rec, _ = _spec_fsr(model, out.x_adv, y)
    # Wang et al.: BCE(p(x'), y) + beta * mean_i KL(p(x_i) || p(x'_i)) (1 - p_y(x_i))
    p_adv, p_clean = F.softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1)
    top_wrong = torch.stack([torch.cat([p[:k], p[k + 1 :]]).max() for p, k in zip(p_adv, y.tolist())])
    bce = F.cross_entropy(logits_adv, y) - torch.log(1.0001 - top_wrong).mean()
    kl = (p_clean * (p_clean.log() - p_adv.log())).sum(1)
    weighted = (kl * (1 - p_clean[torch.arange(len(y)), y])).mean()
    expected = bce + beta * weighted + lambda_sep * sep + lambda_rec * rec
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    assert beta * (kl.mean() - weighted) > 1e-2  # the weight matters here: dropping it would show


def test_objective_leaves_train_mode_and_gives_gradients():
    model = _fsr_model().train()
    x, y = _data()
    out = AdversarialCE(PGD(eps=EPS, steps=2, keep_best=False))(model, x, y)
    assert model.training  # the attack ran in eval mode and restored train mode
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
