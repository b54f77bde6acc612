"""Speed switches (channels_last, bf16 / fp16 autocast, torch.compile): each equivalent to the fp32 default."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from advmend.attacks.pgd import PGD, pgd
from advmend.checkpoint import load_checkpoint
from advmend.config import RunConfig, from_dict
from advmend.models import create_model
from advmend.training.loop import train
from advmend.training.objectives import AdversarialCE
from advmend.training.precision import Precision


def _cfg(fsr: bool = False, **train_opts) -> RunConfig:
    return from_dict(RunConfig, {
        "data": {"name": "synthetic", "val_size": 32, "options": {"n_train": 64, "n_test": 16, "image_size": 16}},
        "model": {"name": "small_cnn", "options": {"width": 4}},
        "fsr": {"enabled": fsr, "hidden": 8},
        "train": {"method": "pgd_at", "epochs": 1, "batch_size": 16, "lr": 0.05, "progress": False, "device": "cpu",
                  "attack": {"steps": 2, "step_size": 0.01, "random_start": False}, "val_attack": {"steps": 1},
                  **train_opts},
    })  # fmt: skip


def _weights(out) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "last.safetensors")[0]


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32") / "run"
    train(_cfg(), out, log=lambda s: None)
    return out


def test_channels_last_equals_default_layout(tmp_path, fp32_run):
    out = tmp_path / "cl"
    train(_cfg(channels_last=True), out, log=lambda s: None)
    # 4 PGD-AT steps: only the summation order of the convolutions differs.
    assert _max_diff(_weights(out), _weights(fp32_run)) < 1e-5


def _loss_and_grads(model, x, y, precision: Precision):
    # Clean inputs: attacks under autocast are compared separately (sign steps amplify tiny differences).
    objective = AdversarialCE(None)
    model.zero_grad(set_to_none=True)
    with precision.autocast():
        out = objective(model, x, y)
    out.loss.backward()
    return out.loss.detach().float(), torch.cat([p.grad.flatten() for p in model.parameters()])


# Stated tolerances: bf16 keeps 8 mantissa bits (~3e-3 relative per op), fp16 11 bits (~5e-4).
@pytest.mark.parametrize("mode, loss_rtol, min_cosine", [("bf16", 2e-2, 0.98), ("fp16", 5e-3, 0.995)])
def test_autocast_loss_and_gradients_close_to_fp32(mode, loss_rtol, min_cosine):
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, width=4).train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
    loss32, grad32 = _loss_and_grads(model, x, y, Precision("off", torch.device("cpu")))
    loss_lp, grad_lp = _loss_and_grads(model, x, y, Precision(mode, torch.device("cpu")))
    assert abs(loss_lp - loss32) / loss32 < loss_rtol
    assert F.cosine_similarity(grad_lp, grad32, dim=0) > min_cosine
    assert (grad_lp.norm() / grad32.norm() - 1).abs() < 10 * loss_rtol


def test_fp16_attack_gradients_do_not_underflow():
    """Under fp16 autocast the PGD core scales its loss: the attack still moves the input and agrees
    with the fp32 attack on most pixels (sign steps are robust to small gradient errors)."""
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, width=4).eval()
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
    # keep_best=False, as in training: every example takes all steps (none stops once fooled).
    attack = PGD(eps=8 / 255, steps=5, step_size=2 / 255, random_start=False, keep_best=False)
    ref = pgd(model, x, y, attack)
    with torch.autocast("cpu", dtype=torch.float16):
        adv = pgd(model, x, y, attack)
    moved = (adv - x).abs() > 1e-6
    assert moved.float().mean() > 0.99  # zero gradients would leave the input unmoved (sign(0) = 0)
    assert ((adv - x).abs() <= attack.eps + 1e-6).all() and adv.min() >= 0 and adv.max() <= 1
    assert torch.isclose(adv, ref, atol=1e-6).float().mean() > 0.8  # measured: 0.865


SCALER_KEYS = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}


def test_fp16_training_uses_and_checkpoints_the_grad_scaler(tmp_path, fp32_run):
    out = tmp_path / "fp16"
    result = train(_cfg(amp="fp16"), out, log=lambda s: None)
    _, record = load_checkpoint(out / "last.safetensors")
    assert set(record["scaler"]) == SCALER_KEYS == set(torch.amp.GradScaler("cpu").state_dict())
    assert record["scaler"]["scale"] > 0
    assert _max_diff(_weights(out), _weights(fp32_run)) < 1e-2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    # Resume restores the scaler state (scale and growth tracker) exactly: one epoch, then a resumed
    # second, ends where two epochs in one go end. A scaler restarted from its defaults (scale 2^16,
    # tracker 0) would end elsewhere, as the first check shows.
    resumed = from_dict(
        RunConfig, {**json.loads(json.dumps(record["config"])), "train": {**record["config"]["train"], "epochs": 2}}
    )
    train(resumed, out, resume=True, log=lambda s: None)
    _, rec2 = load_checkpoint(out / "last.safetensors")
    straight = tmp_path / "fp16_straight"
    train(_cfg(amp="fp16", epochs=2), straight, log=lambda s: None)
    _, rec_straight = load_checkpoint(straight / "last.safetensors")
    assert record["scaler"] != torch.amp.GradScaler("cpu").state_dict()  # epoch 1 moved the state
    assert rec2["epoch"] == rec_straight["epoch"] == 2
    assert rec2["scaler"] == rec_straight["scaler"]
    assert _max_diff(_weights(out), _weights(straight)) == 0


def test_bf16_training_is_close_to_fp32(tmp_path, fp32_run):
    out = tmp_path / "bf16"
    train(_cfg(amp="bf16"), out, log=lambda s: None)
    assert _max_diff(_weights(out), _weights(fp32_run)) < 2e-2


def test_wrapped_fsr_view_keeps_the_fsr_losses():
    """What objectives see of a DDP / compiled FSR model: still a model with its own loss terms, same loss
    and metrics."""
    from advmend.defenses.hooks import AuxiliaryLoss
    from advmend.defenses.insert import FSRModel
    from advmend.training.distributed import _AuxiliaryLossView, _Dispatch

    torch.manual_seed(0)
    model = FSRModel(create_model("small_cnn", num_classes=10, width=4), at=["stage3"], num_classes=10,
                     input_shape=(3, 16, 16), hidden=8).train()  # fmt: skip
    twin = copy.deepcopy(model)  # each call updates BatchNorm statistics: give each its own copy
    view = _AuxiliaryLossView(_Dispatch(twin))
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    objective = AdversarialCE(PGD(eps=8 / 255, steps=2, step_size=2 / 255))
    torch.manual_seed(1)
    ref = objective(model, x, y)
    torch.manual_seed(1)
    got = objective(view, x, y)
    assert isinstance(view, AuxiliaryLoss) and set(got.metrics) == set(ref.metrics) >= {"fsr_sep", "fsr_rec"}
    assert torch.equal(got.loss, ref.loss)
    assert view.training and twin.training  # modes are restored through the view
    got.loss.backward()
    assert all(p.grad is not None for p in twin.parameters())  # gradients reach every parameter


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile needs a C++ compiler"
)
def test_compile_equals_eager(tmp_path):
    # Clean training (no attack, no FSR Gumbel noise, whose compiled RNG stream differs from eager's):
    # fewer graphs to compile, and the two runs must then agree to float rounding.
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    h_eager = train(_cfg(method="standard"), eager, log=lambda s: None).history
    h_comp = train(_cfg(method="standard", compile=True), compiled, log=lambda s: None).history
    assert h_comp[0]["loss"] == pytest.approx(h_eager[0]["loss"], rel=1e-4)
    assert _max_diff(_weights(compiled), _weights(eager)) < 1e-4
    assert set(_weights(compiled)) == set(_weights(eager))  # checkpoints hold the uncompiled module's keys
