"""Contracts of the attack core's options: TRADES' normal start, EOT, the KL loss, fp16 autocast, BPDA."""

import pytest
import torch
from torch import nn

from advmend.attacks import BPDA, PGD, bpda, kl_loss, pgd
from advmend.attacks.pgd import NORMAL_START_STD, _random_start
from advmend.errors import ConfigError


def test_normal_start_is_small_and_inside_ball_and_box(batch):
    x, _ = batch
    for norm, eps in (("linf", 8 / 255), ("l2", 0.5), ("linf", 1e-4)):
        cfg = PGD(eps=eps, norm=norm, start="normal")
        delta = _random_start(x, cfg, torch.Generator().manual_seed(0))
        assert ((x + delta) >= 0).all() and ((x + delta) <= 1).all()
        if norm == "linf":
            assert delta.abs().max() <= min(eps, 6 * NORMAL_START_STD) + 1e-7
        else:
            assert (delta.flatten(1).norm(dim=1) <= eps + 1e-6).all()
    # std is 0.001 where the ball does not clip it
    big = torch.full((4, 3, 32, 32), 0.5)
    d = _random_start(big, PGD(eps=1.0, start="normal"), torch.Generator().manual_seed(0))
    assert d.std().item() == pytest.approx(NORMAL_START_STD, rel=0.05)


def test_kl_loss_nonnegative_and_zero_at_the_target():
    torch.manual_seed(0)
    logits = torch.randn(5, 4)
    p = logits.softmax(1)
    assert torch.allclose(kl_loss(logits, p), torch.zeros(5), atol=1e-6)
    other = torch.randn(5, 4)
    assert (kl_loss(other, p) >= -1e-7).all() and kl_loss(other, p).sum() > 0


def test_kl_attack_moves_away_from_clean_prediction(tiny_net, batch):
    x, _ = batch
    tiny_net.eval()
    with torch.no_grad():
        p = tiny_net(x).softmax(1)
    cfg = PGD(eps=8 / 255, steps=5, step_size=2 / 255, loss="kl", start="normal", keep_best=False)
    x_adv = pgd(tiny_net, x, p, cfg, validate=False)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    with torch.no_grad():
        assert kl_loss(tiny_net(x_adv), p).sum() > kl_loss(tiny_net(x), p).sum()


class NoisyLinear(nn.Module):
    """Logits with random additive noise on the input: a randomised defense in miniature."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 5)

    def forward(self, x):
        return self.fc((x + 0.05 * torch.randn_like(x)).flatten(1))


def test_eot_one_equals_plain_and_eot_is_batch_consistent(tiny_net, batch):
    x, y = batch
    cfg = PGD(eps=8 / 255, steps=3, random_start=False)
    a = pgd(tiny_net, x, y, cfg)
    b = pgd(tiny_net, x, y, PGD(eps=8 / 255, steps=3, random_start=False, eot=1))
    assert torch.equal(a, b)
    # a deterministic model: averaging identical gradients changes nothing
    c = pgd(tiny_net, x, y, PGD(eps=8 / 255, steps=3, random_start=False, eot=4))
    assert torch.allclose(a, c, atol=1e-6)


def test_eot_averages_gradients_of_a_random_model(batch):
    x, y = batch
    torch.manual_seed(0)
    model = NoisyLinear()
    # One L2 step from x: the step direction is the normalised mean gradient over the draws.
    cfg = PGD(eps=10.0, steps=1, step_size=0.1, norm="l2", random_start=False, eot=8, keep_best=False)
    torch.manual_seed(1)
    x_adv = pgd(model, x, y, cfg)
    torch.manual_seed(1)
    grads = []
    for _ in range(8):
        xi = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(xi), y, reduction="none").sum()
        grads.append(torch.autograd.grad(loss, xi)[0])
    g = torch.stack(grads).mean(0)
    expected = (x + 0.1 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)
    assert torch.allclose(x_adv, expected, atol=1e-5)


def test_bad_eot_and_start_rejected():
    with pytest.raises(ConfigError, match="eot"):
        PGD(eps=0.1, eot=0)
    with pytest.raises(ConfigError, match="start"):
        PGD(eps=0.1, start="gaussian")


def test_fp16_autocast_attack_gradients_do_not_underflow(tiny_net, batch):
    """A confident model (margin 20: wrong-class probabilities ~1e-9) has input gradients far below fp16's
    smallest subnormal (6e-8); without the core's loss scaling every one of them is 0 under fp16 autocast."""
    x, _ = batch
    tiny_net.eval()
    with torch.no_grad():
        z = tiny_net(x)
        y = z.argmax(1)
        top2 = z.topk(2, dim=1).values
        factor = 20 / (top2[:, 0] - top2[:, 1]).min()
        tiny_net.fc.weight.mul_(factor)
        tiny_net.fc.bias.mul_(factor)
    cfg = PGD(eps=8 / 255, steps=1, step_size=2 / 255, random_start=False, keep_best=False)
    ref = pgd(tiny_net, x, y, cfg)
    assert (ref != x).float().mean() > 0.9  # fp32 gradients are tiny but not zero
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            half = pgd(tiny_net, x, y, cfg)
    except RuntimeError as e:  # pragma: no cover - CPU builds without fp16 autocast kernels
        pytest.skip(f"fp16 autocast unavailable on this CPU build: {e}")
    assert (half != x).float().mean() > 0.9, "fp16 input gradients underflowed: the attack did not move"
    assert (half - x).abs().max() <= 8 / 255 + 1e-6
    assert torch.isclose(half, ref, atol=1e-6).float().mean() > 0.8  # same signs for most pixels


def test_bpda_forward_is_exact_and_backward_is_the_stand_in():
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    quantise = lambda t: torch.round(t * 4) / 4  # noqa: E731 - zero gradient almost everywhere
    out = bpda(x, quantise)
    assert torch.equal(out, quantise(x.detach()))
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g, torch.ones_like(x))  # identity backward
    (g2,) = torch.autograd.grad(bpda(x, quantise, stand_in=lambda t: 3 * t).sum(), x)
    assert torch.equal(g2, torch.full_like(x, 3.0))


def test_bpda_gives_gradient_through_a_quantiser_where_plain_autograd_gives_none(tiny_net, batch):
    x, y = batch
    quantise = lambda t: torch.round(t * 4) / 4  # noqa: E731
    plain = nn.Sequential()
    plain.forward = lambda t: tiny_net(quantise(t))  # type: ignore[method-assign]
    cfg = PGD(eps=8 / 255, steps=3, random_start=False, keep_best=False)
    stuck = pgd(plain, x, y, cfg)
    moved = pgd(BPDA(quantise, tiny_net), x, y, cfg)
    assert torch.equal(stuck, x)  # zero gradients: sign(0) = 0, the attack never moves
    assert (moved - x).abs().max() > 0
