"""Contracts of the attack core's options: TRADES' normal start, EOT, the KL loss, fp16 autocast, BPDA."""

import pytest
import torch
from torch import nn

from advmend.attacks import BPDA, PGD, bpda, kl_loss, pgd, pgd_tracked
from advmend.attacks.pgd import NORMAL_START_STD, _random_start
from advmend.errors import ConfigError


def test_normal_start_is_small_and_inside_ball_and_box(batch):
    x, _ = batch
    for norm, eps in (("linf", 8 / 255), ("l2", 0.5), ("linf", 1e-4), ("l1", 4.0), ("l1", 1e-3)):
        cfg = PGD(eps=eps, norm=norm, start="normal")
        delta = _random_start(x, cfg, torch.Generator().manual_seed(0))
        assert ((x + delta) >= 0).all() and ((x + delta) <= 1).all()
        if norm == "linf":
            assert delta.abs().max() <= min(eps, 6 * NORMAL_START_STD) + 1e-7
        elif norm == "l1":
            assert (delta.flatten(1).double().abs().sum(1) <= eps).all()
            assert delta.abs().max() <= 6 * NORMAL_START_STD
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


def test_eot_one_equals_plain_and_eot_on_a_deterministic_model_changes_nothing(tiny_net, batch):
    x, y = batch
    cfg = PGD(eps=8 / 255, steps=3, random_start=False)
    a = pgd(tiny_net, x, y, cfg)
    b = pgd(tiny_net, x, y, PGD(eps=8 / 255, steps=3, random_start=False, eot=1))
    assert torch.equal(a, b)
    # a deterministic model: averaging identical gradients changes nothing
    c = pgd(tiny_net, x, y, PGD(eps=8 / 255, steps=3, random_start=False, eot=4))
    assert torch.allclose(a, c, atol=1e-6)


def test_eot_results_do_not_depend_on_the_batch(tiny_net, batch):
    """An example's adversarial example is the same alone, in its batch, or in a reordered batch.

    No random start: a random start is drawn for the whole batch from the generator, so with it an
    example's start (and result) legitimately depends on its position; the gradient averaging, the
    best-iterate bookkeeping and the scoring must not."""
    x, y = batch
    cfg = PGD(eps=8 / 255, steps=4, step_size=2 / 255, random_start=False, eot=3)
    full = pgd(tiny_net, x, y, cfg)
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    shuffled = pgd(tiny_net, x[perm], y[perm], cfg)
    torch.testing.assert_close(shuffled, full[perm], atol=1e-6, rtol=0)
    for i in range(len(x)):
        alone = pgd(tiny_net, x[i : i + 1], y[i : i + 1], cfg)
        torch.testing.assert_close(alone, full[i : i + 1], atol=1e-6, rtol=0)
    assert (full != x).any()  # the attack did move


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


# --------------------------------------------------------------------------- random start, step, restarts


def test_uniform_start_fills_the_eps_ball():
    x = torch.full((8, 3, 16, 16), 0.5)  # away from the box: no clipping
    eps = 8 / 255
    delta = _random_start(x, PGD(eps=eps), torch.Generator().manual_seed(0))
    assert delta.abs().max() <= eps + 1e-7
    assert delta.max() > 0.99 * eps and delta.min() < -0.99 * eps  # reaches the ball's faces
    assert delta.std().item() == pytest.approx(eps / 3**0.5, rel=0.05)  # U(-eps, eps)
    norms = _random_start(x, PGD(eps=0.5, norm="l2"), torch.Generator().manual_seed(0)).flatten(1).norm(dim=1)
    assert (norms <= 0.5 + 1e-6).all() and (norms > 0.45).all()  # radius r^(1/d): mass near the sphere
    l1 = _random_start(x, PGD(eps=12.0, norm="l1"), torch.Generator().manual_seed(0)).flatten(1).double().abs().sum(1)
    assert (l1 <= 12.0).all() and (l1 > 0.98 * 12.0).all()


class TwoClassLinear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        return self.lin(x.flatten(1))


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_one_step_has_the_step_size_and_ascends(norm):
    """On a linear model the CE gradient is along w_other - w_y: one step of `step_size` along it."""
    model = TwoClassLinear()
    x = torch.full((4, 3, 4, 4), 0.5)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps, step = {"linf": (8 / 255, 2 / 255), "l2": (0.5, 0.1), "l1": (2.0, 0.4)}[norm]
    x_adv = pgd(model, x, y, PGD(eps=eps, steps=1, step_size=step, norm=norm, random_start=False, keep_best=False))
    w = model.lin.weight.detach()
    for i, c in enumerate(y.tolist()):
        direction = (w[1 - c] - w[c]).view_as(x[i])
        d = x_adv[i] - x[i]
        if norm == "linf":
            torch.testing.assert_close(d, step * direction.sign(), atol=1e-6, rtol=0)
        elif norm == "l1":  # 48 pixels: the top 1 % is the one pixel with the largest |gradient|
            top = torch.zeros_like(direction).flatten()
            top[direction.abs().argmax()] = 1.0
            torch.testing.assert_close(d, step * direction.sign() * top.view_as(d), atol=1e-6, rtol=0)
        else:
            torch.testing.assert_close(d, step * direction / direction.norm(), atol=1e-6, rtol=0)


class RecordStarts(nn.Module):
    """Never fooled (class 0 by a wide margin); records the input of every gradient-enabled pass."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3 * 8 * 8, 3)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        if torch.is_grad_enabled():
            self.seen.append(x.detach().clone())
        return self.lin(x.flatten(1)) + torch.tensor([50.0, 0.0, 0.0])


def test_each_restart_draws_its_own_random_start(batch):
    x, _ = batch
    y = torch.zeros(len(x), dtype=torch.int64)
    model = RecordStarts()
    eps = 8 / 255
    pgd(model, x, y, PGD(eps=eps, steps=1, restarts=3), generator=torch.Generator().manual_seed(0))
    starts = model.seen  # one gradient pass per run (steps=1), every example in every run (never fooled)
    assert len(starts) == 3
    for s in starts:
        assert s.shape == x.shape and (s - x).abs().max() <= eps + 1e-6 and not torch.equal(s, x)
    assert all(not torch.equal(starts[i], starts[j]) for i in range(3) for j in range(i + 1, 3))


class Gamble(nn.Module):
    """One pixel decides: the loss grows away from its clean value in both directions, but only the +
    side fools the model. From a random start each run fools an example with probability 1/2."""

    def forward(self, x):
        u = (x[:, 0, 0, 0] - 0.5) / (8 / 255)
        margin = -1 + 2 * torch.relu(u) + 0.5 * torch.relu(-u)
        return torch.stack([torch.zeros_like(margin), margin], 1)


def test_more_restarts_fool_strictly_more_examples():
    x = torch.full((32, 3, 4, 4), 0.5)
    y = torch.zeros(32, dtype=torch.int64)
    fooled = {}
    for restarts in (1, 8):
        cfg = PGD(eps=8 / 255, steps=10, restarts=restarts)
        _, fooled[restarts] = pgd_tracked(Gamble(), x, y, cfg, generator=torch.Generator().manual_seed(0))
    assert 4 < int(fooled[1].sum()) < 28  # one run: about half
    assert int(fooled[8].sum()) > 28  # eight: all but about 1 in 256
    assert not (fooled[1] & ~fooled[8]).any()  # the first run is the same; later ones only add
