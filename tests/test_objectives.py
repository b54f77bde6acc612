"""Objectives reduce to known results in their limit cases."""

import torch
import torch.nn.functional as F

from advmend.attacks import PGD, pgd
from advmend.defenses import FSRModel, fsr_losses
from advmend.models import create_model
from advmend.training.objectives import AdversarialCE


def _fsr_model():
    torch.manual_seed(0)
    return FSRModel(create_model("small_cnn", num_classes=10, width=8), at=["stage3"], num_classes=10, hidden=8)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def test_pgd_at_with_zero_steps_is_cross_entropy():
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, width=8).eval()
    x, y = _data()
    out = AdversarialCE(PGD(eps=8 / 255, steps=0))(model, x, y)
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x), y))


def test_pgd_at_trains_on_the_attack_output():
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, width=8).eval()
    x, y = _data()
    attack = PGD(eps=8 / 255, steps=3, random_start=False, keep_best=False)
    out = AdversarialCE(attack)(model, x, y)
    torch.testing.assert_close(out.loss, F.cross_entropy(model(pgd(model, x, y, attack)), y))
    assert out.loss > F.cross_entropy(model(x), y)


def test_fsr_with_zero_weights_equals_pgd_at():
    model = _fsr_model().eval()  # eval: deterministic masks, so both passes see one function
    x, y = _data()
    attack = PGD(eps=8 / 255, steps=2, random_start=False, keep_best=False)
    plain = AdversarialCE(attack, lambda_sep=0.0, lambda_rec=0.0)(model, x, y)
    torch.testing.assert_close(plain.loss, F.cross_entropy(model(pgd(model, x, y, attack)), y))
    full = AdversarialCE(attack)(model, x, y)
    x_adv = pgd(model, x, y, attack)
    sep, rec = fsr_losses(model.forward_with_aux(x_adv), y)
    torch.testing.assert_close(full.loss, plain.loss + sep + rec)
    assert set(full.metrics) == {"ce", "fsr_sep", "fsr_rec"}


def test_objective_leaves_train_mode_and_gives_gradients():
    model = _fsr_model().train()
    x, y = _data()
    out = AdversarialCE(PGD(eps=8 / 255, steps=2, keep_best=False))(model, x, y)
    assert model.training  # the attack ran in eval mode and restored train mode
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
