"""Tests for advmend.models: shapes, gradients, normalisation, registry and FSR presets."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from advmend.errors import ConfigError
from advmend.models import FSR_PRESETS, MODELS, Normalize, create_model, fsr_preset
from advmend.models.registry import check_model_options, model_options

HEAVY = {"wrn34_10", "wrn28_10"}
NUM_CLASSES = 10
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2471, 0.2435, 0.2616)

# Reference FSR hook output shapes (C, H, W) at 32x32 input.
FSR_SHAPES = {
    "small_cnn": (128, 8, 8),
    "resnet18": (512, 4, 4),
    "preact_resnet18": (512, 4, 4),
    "vgg16_bn": (512, 4, 4),
    "wrn34_10": (640, 8, 8),
    "wrn28_10": (640, 8, 8),
}
FEATURE_DIMS = {name: shape[0] for name, shape in FSR_SHAPES.items()}  # fc input = channels of the last map


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


ALL = _params(MODELS.names())


@functools.cache
def _model(name: str, in_channels: int = 3) -> nn.Module:
    """Cached model without normalisation (building WRNs costs ~1 s)."""
    torch.manual_seed(0)
    return create_model(name, num_classes=NUM_CLASSES, in_channels=in_channels)


def _batch(name: str) -> int:
    return 1 if name in HEAVY else 2


def test_registry_names():
    assert set(MODELS.names()) == set(FSR_SHAPES)
    assert set(FSR_PRESETS) == set(MODELS.names())


@pytest.mark.parametrize("name", ALL)
def test_output_shape_32(name):
    model = _model(name).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_output_shape_other_size(name):
    size = 40 if name in HEAVY else 64
    model = _model(name).eval()
    with torch.no_grad():
        out = model(torch.rand(_batch(name), 3, size, size))
    assert out.shape == (_batch(name), NUM_CLASSES)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_grayscale_28(name):
    model = _model(name, in_channels=1).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", ALL)
def test_backward_all_params_get_finite_grads(name):
    model = _model(name).train()
    model.zero_grad(set_to_none=True)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert x.grad is not None and torch.isfinite(x.grad).all()
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ALL)
def test_normalize_inside_model_matches_manual(name):
    torch.manual_seed(0)
    with_norm = create_model(name, num_classes=NUM_CLASSES, mean=MEAN, std=STD).eval()
    plain = create_model(name, num_classes=NUM_CLASSES).eval()
    result = plain.load_state_dict(with_norm.state_dict(), strict=False)
    assert result.missing_keys == []
    assert sorted(result.unexpected_keys) == ["normalize.mean", "normalize.std"]
    x = torch.rand(_batch(name), 3, 32, 32)
    manual = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(with_norm(x), plain(manual), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_fsr_preset_layer_shape(name):
    model = _model(name).eval()
    paths = fsr_preset(name)
    assert paths == FSR_PRESETS[name]
    seen: dict[str, torch.Size] = {}
    handles = [
        model.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: seen.__setitem__(p, o.shape)) for p in paths
    ]
    try:
        with torch.no_grad():
            model(torch.rand(1, 3, 32, 32))
    finally:
        for h in handles:
            h.remove()
    for p in paths:
        assert tuple(seen[p]) == (1, *FSR_SHAPES[name]), (name, p)


@pytest.mark.parametrize("name", ALL)
def test_features_match_fc_input(name):
    model = _model(name).eval()
    x = torch.rand(_batch(name), 3, 32, 32)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    assert feats.shape == (_batch(name), FEATURE_DIMS[name])
    torch.testing.assert_close(model.fc(feats), logits)


@pytest.mark.parametrize("name", ALL)
def test_no_inplace_relu_and_normalize_first(name):
    model = _model(name)
    assert isinstance(model.normalize, nn.Identity)
    assert next(iter(model.named_children()))[0] == "normalize"
    for mod in model.modules():
        if isinstance(mod, nn.ReLU):
            assert not mod.inplace


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        create_model("resnet9000", num_classes=10)
    for n in MODELS.names():
        assert n in str(err.value)


def test_unknown_fsr_preset():
    with pytest.raises(ConfigError, match="resnet18"):
        fsr_preset("nope")


@pytest.mark.parametrize("kwargs", [{"num_classes": 1}, {"num_classes": 10, "in_channels": 0}])
def test_bad_sizes(kwargs):
    with pytest.raises(ConfigError):
        create_model("small_cnn", **kwargs)


def test_mean_std_must_match_channels_and_come_together():
    with pytest.raises(ConfigError):
        create_model("small_cnn", num_classes=10, in_channels=1, mean=MEAN, std=STD)
    with pytest.raises(ConfigError):
        create_model("small_cnn", num_classes=10, mean=MEAN)


def test_none_kwargs_dropped_and_width():
    model = create_model("small_cnn", num_classes=10, width=None)
    assert model.fc.in_features == 128
    model = create_model("small_cnn", num_classes=10, width=8)
    assert model.features(torch.rand(2, 3, 32, 32)).shape == (2, 32)
    # An unknown option is a ConfigError naming it and listing the valid ones (a TypeError before).
    with pytest.raises(ConfigError, match=r"model\.options\.no_such_option.*its options: width"):
        create_model("small_cnn", num_classes=10, no_such_option=3)


@pytest.mark.parametrize(
    "name,options,needle",
    [
        ("small_cnn", {"nope": 1}, r"model\.options\.nope: model 'small_cnn' has no option 'nope'; its options: width"),
        ("small_cnn", {"width": "abc"}, r"model\.options\.width: expected an integer, got 'abc'"),
        ("small_cnn", {"width": 2.5}, r"model\.options\.width: expected an integer"),
        ("small_cnn", {"width": True}, r"model\.options\.width: expected an integer"),
        ("wrn28_10", {"dropout": "x"}, r"model\.options\.dropout: expected a number"),
        ("wrn28_10", {"dropout": float("nan")}, r"model\.options\.dropout: expected a finite number"),
        ("vgg16_bn", {"width": 8}, r"model\.options\.width: .*its options: none"),
        ("resnet18", {"num_classes": 3}, r"model\.options\.num_classes: .*from the data"),
        ("resnet18", {"normalize": True}, r"model\.options\.normalize: .*model\.normalize"),
    ],
)
def test_model_options_checked_against_the_factory_signature(name, options, needle):
    with pytest.raises(ConfigError, match=needle):
        check_model_options(name, options)
    if "num_classes" not in options:  # (that one would be a duplicate keyword argument here)
        with pytest.raises(ConfigError, match=needle):
            create_model(name, num_classes=10, **options)


def test_model_options_converted_like_config_values():
    assert check_model_options("wrn28_10", {"dropout": "1/10"}) == {"dropout": 0.1}
    assert check_model_options("wrn28_10", {"dropout": 0}) == {"dropout": 0.0}
    assert check_model_options("small_cnn", {"width": None}) == {"width": None}  # None: the default
    assert set(model_options("small_cnn")) == {"width"}
    assert set(model_options("resnet18")) == {"width"}
    assert model_options("vgg16_bn") == {}


def test_model_too_large_for_memory_is_config_error():
    with pytest.raises(ConfigError, match=r"cannot be built with model\.options\.width=1099511627776"):
        create_model("small_cnn", num_classes=10, width=2**40)  # 118 TB of conv weights


def test_model_too_small_for_images_is_config_error():
    from advmend.config import RunConfig, from_dict
    from advmend.defenses.build import build_model

    cfg = from_dict(RunConfig, {"model": {"name": "small_cnn", "options": {"width": 4}}})
    with pytest.raises(ConfigError, match=r"cannot take 3x1x1 images.*data\.options\.image_size"):
        build_model(cfg, 10, (3, 1, 1))
    assert build_model(cfg, 10, (3, 4, 4))(torch.rand(2, 3, 4, 4)).shape == (2, 10)


def test_normalize_module():
    norm = Normalize(MEAN, STD)
    assert norm.mean.shape == (1, 3, 1, 1) and norm.std.shape == (1, 3, 1, 1)
    assert set(norm.state_dict()) == {"mean", "std"}
    assert "mean=(0.4914" in repr(norm)
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(norm(x), (x - norm.mean) / norm.std)
    with pytest.raises(ConfigError):
        Normalize((0.5, 0.5), (0.2,))
    with pytest.raises(ConfigError):
        Normalize((0.5,), (0.0,))
    with pytest.raises(ConfigError):
        Normalize((), ())


def test_normalize_saved_in_model_state_dict():
    model = create_model("small_cnn", num_classes=10, mean=MEAN, std=STD)
    sd = model.state_dict()
    torch.testing.assert_close(sd["normalize.mean"].flatten(), torch.tensor(MEAN))
    torch.testing.assert_close(sd["normalize.std"].flatten(), torch.tensor(STD))


def test_wrn_bad_depth():
    from advmend.models.wide_resnet import WideResNet

    with pytest.raises(ConfigError):
        WideResNet(30, 10, num_classes=10)


def _resnet18_parameters(width: int, preact: bool) -> int:
    """ResNet-18's parameter count from its layer shapes (widths w, 2w, 4w, 8w; 10 classes)."""
    widths, convs = [width, 2 * width, 4 * width, 8 * width], 3 * 9 * width
    bns = 0 if preact else width  # ResNet's stem has a BN, PreAct's has none
    c_in = width
    for i, c in enumerate(widths):
        for block in range(2):
            c_prev = c_in if block == 0 else c
            convs += 9 * c_prev * c + 9 * c * c
            if block == 0 and (i > 0):
                convs += c_prev * c  # the projection shortcut
                bns += 0 if preact else c
            bns += (c_prev + c) if preact else 2 * c
        c_in = c
    bns += 8 * width if preact else 0  # PreAct's final BN
    return convs + 2 * bns + 8 * width * 10 + 10


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18"])
@pytest.mark.parametrize("width", [8, 16, 64])
def test_resnet_width_sets_the_channels_and_keeps_fsr_insertion_points(name, width):
    from advmend.defenses import insert_fsr

    model = create_model(name, num_classes=10, width=width)
    assert sum(p.numel() for p in model.parameters()) == _resnet18_parameters(width, name.startswith("preact"))
    if width == 64:  # the published model is the default
        default = create_model(name, num_classes=10)
        assert [p.shape for p in model.parameters()] == [p.shape for p in default.parameters()]
    layer = fsr_preset(name)[0]
    fsr = insert_fsr(model, [layer], num_classes=10, hidden=8)
    assert fsr(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert [b.channels for b in fsr.fsr.values()] == [8 * width]  # the preset layer carries 8 x width channels


@pytest.mark.parametrize("bad", [0, -4, 2.5, True])
def test_resnet_width_must_be_a_positive_integer(bad):
    with pytest.raises(ConfigError, match="width"):
        create_model("preact_resnet18", num_classes=10, width=bad)
