"""FSR contracts: the spec's formulas, modes, gradients, placement in any backbone, state dicts."""

import copy

import pytest
import torch
import torchvision
from torch import nn

from advmend.defenses import FSRBlock, FSRModel, fsr_losses, gumbel_sigmoid_mask, insert_fsr
from advmend.errors import ConfigError
from advmend.models import create_model, fsr_preset


def test_deterministic_mask_is_sigmoid_z_over_tau():
    z = torch.randn(2, 3, 4, 4) * 30  # includes |z| > 17, where the reference's log form saturates
    torch.testing.assert_close(gumbel_sigmoid_mask(z, 0.1, stochastic=False), torch.sigmoid(z / 0.1))


def test_stochastic_mask_matches_closed_form():
    z = torch.randn(2, 3, 4, 4)
    m = gumbel_sigmoid_mask(z, 0.1, stochastic=True, generator=torch.Generator().manual_seed(0))
    u = torch.rand(z.shape, generator=torch.Generator().manual_seed(0))
    expected = torch.sigmoid((z + torch.log(u) - torch.log1p(-u)) / 0.1)
    torch.testing.assert_close(m, expected)
    assert not torch.equal(m, gumbel_sigmoid_mask(z, 0.1, stochastic=False))


def test_block_is_masked_residual_and_aux_matches_forward():
    torch.manual_seed(0)
    block = FSRBlock(8, 5, hidden=4).eval()
    f = torch.randn(3, 8, 4, 4)
    m = torch.sigmoid(block.separation(f) / 0.1)
    expected = f + (1 - m) * block.recalibration((1 - m) * f)
    torch.testing.assert_close(block(f), expected)
    aux = block.forward_with_aux(f)
    torch.testing.assert_close(aux.features, expected)
    torch.testing.assert_close(aux.logits_robust, block.head((m * f).mean(dim=(2, 3))))
    torch.testing.assert_close(aux.logits_nonrobust, block.head(((1 - m) * f).mean(dim=(2, 3))))


class _Constant(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, f):
        return torch.full_like(f, self.value)


def test_all_ones_mask_gives_identity_and_all_zeros_gives_full_recalibration():
    torch.manual_seed(0)
    block = FSRBlock(8, 5, hidden=4)
    f = torch.randn(2, 8, 4, 4)
    block.separation = _Constant(1e4)  # m = 1 everywhere: everything is "robust"
    for mode in (block.eval(), block.train()):
        torch.testing.assert_close(mode(f), f)
    block.separation = _Constant(-1e4).eval()  # m = 0: output = f + R(f)
    block.eval()
    torch.testing.assert_close(block(f), f + block.recalibration(f))


def test_eval_mode_is_deterministic_train_mode_is_not():
    torch.manual_seed(0)
    model = FSRModel(create_model("small_cnn", num_classes=10, width=8), at=["stage3"], num_classes=10, hidden=8)
    x = torch.rand(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model.forward_with_aux(x).blocks[0].mask, model.forward_with_aux(x).blocks[0].mask)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = FSRModel(create_model("small_cnn", num_classes=10, width=8), at=["stage2", "stage3"], num_classes=10,
                     hidden=8).train()  # fmt: skip
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = model.forward_with_aux(x)
    sep, rec = fsr_losses(out, y)
    (nn.functional.cross_entropy(out.logits, y) + sep + rec).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def _spec_y_adv(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """docs/fsr.md: the top-1 class when it is wrong, else the top-2 class."""
    top2 = logits.topk(2, dim=1).indices
    return torch.where(top2[:, 0] != y, top2[:, 0], top2[:, 1])


def test_y_adv_is_top1_when_wrong_and_top2_when_right():
    from advmend.defenses.fsr import FSRBlockOutput, fsr_terms

    logits = torch.tensor([[5.0, 4.0, 1.0],   # y=0 right: y_adv = top-2 = 1
                           [2.0, 9.0, 5.0],   # y=0 wrong: y_adv = top-1 = 1 (top-2 would be 2)
                           [1.0, 3.0, 9.0],   # y=1 wrong: y_adv = top-1 = 2 (top-2 would be y itself)
                           [0.0, 1.0, 9.0]])  # y=2 right: y_adv = top-2 = 1  # fmt: skip
    y = torch.tensor([0, 0, 1, 2])
    y_adv = torch.tensor([1, 1, 2, 1])
    assert torch.equal(_spec_y_adv(logits, y), y_adv)
    g = torch.Generator().manual_seed(0)
    robust, nonrobust, recal = (torch.randn(4, 3, generator=g) for _ in range(3))
    b = FSRBlockOutput(torch.zeros(1), torch.zeros(1), robust, nonrobust, recal)
    sep, rec = fsr_terms([b], logits, y)
    ce = nn.functional.cross_entropy
    torch.testing.assert_close(sep, ce(robust, y) + ce(nonrobust, y_adv))
    torch.testing.assert_close(rec, ce(recal, y))
    top2 = logits.topk(2, dim=1).indices[:, 1]
    assert not torch.isclose(sep, ce(robust, y) + ce(nonrobust, top2))  # the rows above tell them apart


def _spec_block(block: FSRBlock, f: torch.Tensor, tau: float) -> dict[str, torch.Tensor]:
    """The block's outputs recomputed from docs/fsr.md with its own sub-nets (deterministic mask)."""
    m = torch.sigmoid(block.separation(f) / tau)
    f_plus, f_minus = m * f, (1 - m) * f
    f_tilde = f_minus + (1 - m) * block.recalibration(f_minus)
    head = lambda t: block.head(t.mean(dim=(2, 3)))  # noqa: E731 - global average pool, then Linear
    return {"mask": m, "features": f_plus + f_tilde, "logits_robust": head(f_plus),
            "logits_nonrobust": head(f_minus), "logits_recalibrated": head(f_tilde)}  # fmt: skip


def test_aux_outputs_follow_the_spec_including_the_recalibrated_branch():
    torch.manual_seed(0)
    block = FSRBlock(8, 5, hidden=4).eval()
    f = torch.randn(3, 8, 4, 4)
    aux = block.forward_with_aux(f)
    spec = _spec_block(block, f, 0.1)
    for name, value in spec.items():
        torch.testing.assert_close(getattr(aux, name), value, msg=name)
    # A(f~-) is not A(f-): the recalibration changes what the head sees.
    assert not torch.allclose(aux.logits_recalibrated, spec["logits_nonrobust"], atol=1e-3)


def test_tau_sets_the_mask_sharpness():
    torch.manual_seed(0)
    block = FSRBlock(8, 5, hidden=4, tau=0.5).eval()
    f = torch.randn(3, 8, 4, 4)
    spec = _spec_block(block, f, 0.5)
    torch.testing.assert_close(block(f), spec["features"])
    torch.testing.assert_close(block.forward_with_aux(f).mask, spec["mask"])
    assert not torch.allclose(spec["mask"], _spec_block(block, f, 0.1)["mask"], atol=1e-3)


def test_train_mode_mask_draws_logistic_noise():
    torch.manual_seed(0)
    block = FSRBlock(8, 5, hidden=4, tau=0.3).train()
    f = torch.randn(3, 8, 4, 4)
    torch.manual_seed(1)
    aux = block.forward_with_aux(f)
    torch.manual_seed(1)
    z = block.separation(f)  # train-mode BatchNorm, as in the block's own pass
    u = torch.rand(z.shape)
    torch.testing.assert_close(aux.mask, torch.sigmoid((z + torch.log(u) - torch.log1p(-u)) / 0.3))


def test_insert_into_torchvision_resnet18_and_eject():
    torch.manual_seed(0)
    backbone = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(2, 3, 64, 64)
    reference = backbone(x)
    model = insert_fsr(backbone, ["layer3", "layer4"], 10, input_shape=(3, 64, 64)).eval()
    assert model.fsr["layer4"].channels == 512 and model.fsr["layer3"].channels == 256
    assert model(x).shape == (2, 10)
    assert not torch.allclose(model(x), reference)  # the blocks are active
    assert [k for k in model.state_dict() if k.startswith("backbone.")] == [
        "backbone." + k for k in backbone.state_dict()
    ]  # backbone weight names unchanged
    original = model.eject()
    assert original is backbone
    torch.testing.assert_close(original(x), reference)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "preact_resnet18", "vgg16_bn"])
def test_reference_placements_in_our_models(name):
    torch.manual_seed(0)
    model = FSRModel(create_model(name, num_classes=10), at=fsr_preset(name), num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    out = model.forward_with_aux(x)
    assert len(out.blocks) == 1 and out.blocks[0].logits_robust.shape == (2, 10)


def test_state_dict_round_trip_and_deepcopy_independence():
    torch.manual_seed(0)
    make = lambda: FSRModel(create_model("small_cnn", num_classes=10, width=8), at=["stage3"], num_classes=10,
                            hidden=8, tau=0.5)  # fmt: skip
    a = make().eval()
    x = torch.rand(3, 3, 32, 32)
    torch.manual_seed(1)
    b = make().eval()
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x))
    assert float(b.fsr["stage3"].tau) == 0.5  # tau travels with the weights
    c = copy.deepcopy(a)
    with torch.no_grad():
        for p in c.fsr.parameters():
            p.add_(1.0)
    assert not torch.allclose(c(x), a(x))  # the copy's hooks use the copy's blocks
    torch.testing.assert_close(a(x), b(x))


def test_bad_layer_names_and_shapes():
    backbone = create_model("small_cnn", num_classes=10, width=8)
    with pytest.raises(ConfigError, match="unknown layer 'nope'.*stage3"):
        FSRModel(backbone, at=["nope"], num_classes=10)
    with pytest.raises(ConfigError, match=r"\(N, C, H, W\)"):
        FSRModel(backbone, at=["fc"], num_classes=10)
    with pytest.raises(ConfigError, match="twice"):
        FSRModel(backbone, at=["stage3", "stage3"], num_classes=10)
    with pytest.raises(ConfigError, match="tau"):
        FSRBlock(8, 10, tau=0.0)


# --- BPDA through the mask (MaskBPDA): the adaptive attack on FSR's near-step mask ---


def _fsr_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        FSRBlock(8, 10, hidden=8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()


def test_mask_bpda_forward_is_exact_and_leaves_the_model_as_it_was():
    from advmend.defenses.fsr import MaskBPDA

    net = _fsr_net()
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(MaskBPDA(net, backward_tau=2.0)(x), net(x))
    assert net[1].backward_tau is None and not net.training
    with pytest.raises(Exception):  # noqa: B017 (any error of the forward will do)
        MaskBPDA(net)(torch.rand(4, 5, 8, 8))  # the forward raises: the blocks are restored all the same
    assert net[1].backward_tau is None


def test_mask_bpda_at_the_model_temperature_is_the_exact_gradient():
    from advmend.defenses.fsr import MaskBPDA

    net = _fsr_net()
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    (exact,) = torch.autograd.grad(net(x).logsumexp(1).sum(), x)
    (same,) = torch.autograd.grad(MaskBPDA(net, backward_tau=0.1)(x).logsumexp(1).sum(), x)
    (soft,) = torch.autograd.grad(MaskBPDA(net, backward_tau=1.0)(x).logsumexp(1).sum(), x)
    torch.testing.assert_close(same, exact, rtol=1e-5, atol=1e-9)  # the same formula up to rounding
    assert not torch.allclose(exact, soft, rtol=1e-2, atol=1e-6)


def test_mask_bpda_gradient_reaches_a_saturated_mask():
    """Where sigmoid(z / 0.1) is flat (|z| = 4: gradient ~1e-16) the softened backward is not (~0.07)."""
    from advmend.defenses.fsr import _SigmoidSoftBackward

    z = torch.tensor([4.0, -4.0, 0.0], dtype=torch.float64, requires_grad=True)
    (exact,) = torch.autograd.grad(torch.sigmoid(z / 0.1).sum(), z)
    (soft,) = torch.autograd.grad(_SigmoidSoftBackward.apply(z, 0.1, 1.0).sum(), z)
    assert exact[:2].abs().max() < 1e-12
    expected = torch.sigmoid(z) * (1 - torch.sigmoid(z))
    assert torch.allclose(soft, expected.detach())
    assert torch.equal(_SigmoidSoftBackward.apply(z, 0.1, 1.0), torch.sigmoid(z / 0.1))


def test_mask_bpda_refuses_bad_settings():
    from advmend.defenses.fsr import MaskBPDA

    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="backward temperature"):
            MaskBPDA(_fsr_net(), backward_tau=bad)
    with pytest.raises(ConfigError, match="has none"):
        MaskBPDA(nn.Linear(3, 2))


def test_pgd_through_mask_bpda_stays_in_the_ball_and_scores_the_model():
    from advmend.attacks.pgd import PGD, pgd
    from advmend.defenses.fsr import MaskBPDA

    net = _fsr_net()
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    x0 = x.clone()
    x_adv = pgd(MaskBPDA(net), x, y, PGD(eps=8 / 255, steps=5))
    assert torch.equal(x, x0)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert not net.training and net[1].backward_tau is None


def test_fsr_adaptive_protocol_runs_the_attacks_through_the_soft_mask():
    from advmend.attacks.pgd import PGD
    from advmend.attacks.presets import PROTOCOLS, protocol_attacks
    from advmend.defenses.fsr_adaptive import ThroughSoftMask

    assert "fsr-adaptive" in PROTOCOLS.names() and PROTOCOLS.meta("fsr-adaptive")["cascade"] is False
    attacks = protocol_attacks("fsr-adaptive", 8 / 255)
    names = [a.describe()["name"] for a in attacks]
    assert names == ["PGD-20", "PGD-20 BPDA-mask", "CW-30", "CW-30 BPDA-mask"]
    assert attacks[1].attack == attacks[0] and attacks[1].eps == 8 / 255 and attacks[1].norm == "linf"
    net = _fsr_net()
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    attack = PGD(eps=8 / 255, steps=3, random_start=False)
    through = ThroughSoftMask(attack, backward_tau=2.0).run(net, x, y, device=torch.device("cpu"), batch_size=4)
    direct = attack.run(MaskBPDA_(net, 2.0), x, y, device=torch.device("cpu"), batch_size=4)
    assert torch.equal(through.x_adv, direct.x_adv) and torch.equal(through.fooled, direct.fooled)
    seen = []  # the backward temperature each forward pass of the block ran with
    net[1].register_forward_hook(lambda m, i, o: seen.append(m.backward_tau))
    ThroughSoftMask(attack, backward_tau=2.0).run(net, x, y, device=torch.device("cpu"), batch_size=4)
    assert seen and set(seen) == {2.0} and net[1].backward_tau is None
    with pytest.raises(ConfigError, match="FSR blocks"):
        ThroughSoftMask(attack).run(nn.Sequential(nn.Flatten(), nn.Linear(192, 10)), x, y, device=torch.device("cpu"))


def MaskBPDA_(model, tau):  # noqa: N802 - the class under its own name, imported late like the others
    from advmend.defenses.fsr import MaskBPDA

    return MaskBPDA(model, tau)
