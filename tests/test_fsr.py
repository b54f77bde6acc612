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


def test_y_adv_is_highest_wrong_class():
    from advmend.defenses.fsr import FSRBlockOutput, fsr_terms

    logits = torch.tensor([[5.0, 4.0, 1.0], [0.0, 1.0, 9.0]])
    y = torch.tensor([0, 2])
    head = torch.zeros(2, 3, requires_grad=True)
    b = FSRBlockOutput(torch.zeros(1), torch.zeros(1), head, head * 0 + torch.tensor([[0, 9.0, 0], [0, 9.0, 0]]), head)
    sep, _ = fsr_terms([b], logits, y)
    # the non-robust branch predicts class 1 confidently: y_adv is 1 for both rows, so its CE is tiny
    expected = nn.functional.cross_entropy(head, y) + nn.functional.cross_entropy(b.logits_nonrobust, torch.tensor([1, 1]))
    torch.testing.assert_close(sep, expected)


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
