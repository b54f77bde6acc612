"""AutoAttack through the reference implementation (pyautoattack), in advmend's model contract.

Reduced budgets (fewer APGD iterations and Square queries) keep these tests fast on a CPU; the report
shows the values used. Tests that need the package skip cleanly when it is not installed.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import fit
from torch import nn

from advmend.attacks import BPDA, AutoAttackSpec
from advmend.data import load_dataset
from advmend.errors import ConfigError
from advmend.evaluation import evaluate
from advmend.evaluation.sanity import run_sanity

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """An undefended tiny conv net trained a few steps on synthetic data (10 classes, 8x8)."""
    ds = load_dataset("synthetic", "test", image_size=8, n_test=40, seed=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(32, 10))  # fmt: skip
    return fit(model, ds.images.float() / 255, ds.labels, steps=40), ds


def _spec(**kw) -> AutoAttackSpec:
    return AutoAttackSpec(**{"n_iter": 10, "n_queries": 50, **kw})


@pytest.mark.parametrize("norm,eps", [("linf", 0.5), ("l2", 8.0), ("l1", 12.0)])
def test_autoattack_reaches_zero_at_large_eps_with_per_attack_numbers(trained, norm, eps):
    pytest.importorskip("pyautoattack")
    model, ds = trained
    result = evaluate(model, ds, [_spec(eps=eps, norm=norm)], batch_size=64, cascade=True)
    assert result.clean_accuracy > 0.3
    (aa,) = result.attacks
    assert aa.accuracy == 0.0 and result.worst_accuracy == 0.0
    assert [s["name"] for s in aa.stages] == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
    accs = [s["robust_accuracy"] for s in aa.stages]
    assert accs == sorted(accs, reverse=True) and accs[-1] == 0.0
    assert aa.stages[0]["attacked"] == int(result.clean_correct.sum())
    assert aa.settings["eps"] == eps and aa.settings["norm"] == norm and aa.settings["n_queries"] == 50
    assert aa.settings["implementation"].startswith("pyautoattack")
    assert 0 < aa.max_perturbation <= eps + 1e-5  # our bound assertion ran on its examples


def test_autoattack_at_small_eps_keeps_robust_examples_and_leaves_model_untouched(trained):
    pytest.importorskip("pyautoattack")
    model, ds = trained
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    stats = model[1].running_mean.clone()
    result = evaluate(model, ds, [_spec(eps=1 / 255)], batch_size=64, cascade=True)
    assert 0 < result.worst_accuracy <= result.clean_accuracy
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model[1].running_mean, stats)  # attacked in eval mode
    model.eval()


def test_square_flag_is_computed_from_autoattack_stages(trained):
    pytest.importorskip("pyautoattack")
    model, ds = trained
    result = evaluate(model, ds, [_spec(eps=0.5)], batch_size=64, cascade=True)
    report = run_sanity(model, ds, result, 0.5, batch_size=64)
    assert report.get("S06-square-vs-whitebox").status == "pass"


class Noisy(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) + 0.1 * torch.randn(x.shape[0], 10)


def test_rand_version_with_eot_on_a_randomised_model(trained):
    pytest.importorskip("pyautoattack")
    model, ds = trained
    torch.manual_seed(0)
    noisy = Noisy(model)
    spec = _spec(eps=0.5, version="rand", eot=2)
    result = evaluate(noisy, ds, [spec], batch_size=64, cascade=True)
    (aa,) = result.attacks
    assert [s["name"] for s in aa.stages] == ["APGD-CE", "APGD-DLR"]
    assert aa.settings["eot"] == 2 and aa.accuracy <= 0.1
    # The standard version's own check recognises the randomised model; its warning reaches the report.
    standard = evaluate(noisy, ds, [_spec(eps=0.5)], batch_size=64, cascade=True).attacks[0]
    assert any("randomized" in note for note in standard.notes)


def test_bpda_model_works_with_autoattack(trained):
    pytest.importorskip("pyautoattack")
    model, ds = trained
    quantised = BPDA(lambda x: torch.round(x * 8) / 8, model)
    result = evaluate(quantised, ds, [_spec(eps=0.5)], batch_size=64, cascade=True)
    assert result.worst_accuracy == 0.0


def test_missing_package_is_a_clear_error(monkeypatch, trained):
    model, ds = trained
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="pip install pyautoattack"):
        evaluate(model, ds, [_spec(eps=0.5)], batch_size=64)


@pytest.mark.parametrize("kw", [{"eps": 0}, {"eps": -1}, {"eps": 0.1, "norm": "l0"}, {"eps": 0.1, "version": "plus"},
                                {"eps": 0.1, "n_queries": 0}])  # fmt: skip
def test_bad_settings_rejected(kw):
    with pytest.raises(ConfigError):
        AutoAttackSpec(**kw)
