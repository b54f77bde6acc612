"""The L1 threat model: its geometry (sparse direction, exact projection onto the L1 ball and [0, 1]), the
PGD core and AutoAttack in it, its default radii, and `--norm l1` from training to the report card.

The contracts every attack honours (inputs, modes, determinism, no_grad) run over L1 members of the shared
parametrisations in test_attacks.py and test_promises_attacks.py; this file holds what is L1's own."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import error_line, fit
from torch import nn

from advmend.attacks import PGD, AutoAttackSpec, cw_margin, fgsm, pgd, protocol_attacks
from advmend.attacks.l1 import L1_QUANTILE, l1_direction, l1_size, project_l1_box, random_l1
from advmend.cli import main
from advmend.data import ArrayDataset, load_dataset
from advmend.data.sources import DATASET_INFO, dataset_radii
from advmend.errors import ConfigError
from advmend.evaluation import evaluate
from advmend.evaluation.evaluate import check_bound
from advmend.evaluation.run import evaluation_threat
from advmend.evaluation.sanity import check_eps_sweep, check_noise
from advmend.types import L1_EPS, STANDARD_RADII, ThreatModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _bisection_projection(z: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The projection by another route: 200 bisection steps on the threshold lam of
    d_i = sign(z_i) * min(max(|z_i| - lam, 0), room_i), the KKT form of the separable problem."""
    a, room = z.abs(), torch.where(z > 0, 1 - x, x)

    def size(lam):
        return torch.minimum((a - lam).clamp_min(0), room).sum(1, keepdim=True)

    lo, hi = torch.zeros(z.shape[0], 1, dtype=z.dtype), a.max(1, keepdim=True).values
    for _ in range(200):
        mid = (lo + hi) / 2
        over = size(mid) > eps
        lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    lam = torch.where(size(torch.zeros_like(lo)) <= eps, torch.zeros_like(lo), hi)
    return z.sign() * torch.minimum((a - lam).clamp_min(0), room)


# --------------------------------------------------------------------------- the geometry


@pytest.mark.parametrize("n", [1, 7, 192, 3072])
@pytest.mark.parametrize("scale", [0.01, 0.3, 3.0])
def test_projection_is_the_exact_euclidean_projection(n, scale):
    g = torch.Generator().manual_seed(n)
    x = torch.rand(6, n, generator=g, dtype=torch.float64)
    x[0] = (x[0] > 0.5).double()  # a batch-mate with every pixel at the box's edges
    z = scale * torch.randn(6, n, generator=g, dtype=torch.float64)
    for eps in (0.05, 1.0, 12.0):
        d = project_l1_box(z, x, eps)
        torch.testing.assert_close(d, _bisection_projection(z, x, eps), atol=1e-9, rtol=0)
        assert (l1_size(d) <= eps).all() and ((x + d) >= 0).all() and ((x + d) <= 1).all()


def test_projection_is_optimal_and_leaves_points_of_the_set_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 300, generator=g, dtype=torch.float64)
    z = torch.randn(4, 300, generator=g, dtype=torch.float64)
    eps = 2.0
    d = project_l1_box(z, x, eps)
    # Variational inequality of a projection onto a convex set: <z - d, y - d> <= 0 for every y in it.
    ys = project_l1_box(torch.randn(64, 4, 300, generator=g, dtype=torch.float64).flatten(0, 1),
                        x.repeat(64, 1), eps).view(64, 4, 300)  # fmt: skip
    assert (((z - d) * (ys - d)).sum(-1) <= 1e-9).all()
    torch.testing.assert_close(project_l1_box(d, x, eps), d, atol=1e-12, rtol=0)  # idempotent
    inside = 0.5 * d
    torch.testing.assert_close(project_l1_box(inside, x, eps), inside, atol=0, rtol=0)


def test_projection_keeps_its_dtype_and_shape_and_a_float32_example_stays_in_the_ball():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 3, 32, 32, generator=g)
    z = torch.randn(5, 3, 32, 32, generator=g)
    d = project_l1_box(z, x, 12.0)
    assert d.dtype == torch.float32 and d.shape == z.shape
    x_adv = x + d  # stored in float32: the rounding must not carry it out of the ball
    assert (l1_size(x_adv.double() - x.double()) <= 12.0).all()
    assert l1_size(d).min() > 12.0 - 1e-3  # and the radius is used, up to that rounding allowance


def test_direction_is_sparse_unit_l1_and_skips_coordinates_the_box_blocks():
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(3, 3, 16, 16, generator=g)
    x = torch.rand(3, 3, 16, 16, generator=g)
    e = l1_direction(grad, x)
    k = math.ceil((1 - L1_QUANTILE) * 768)
    nonzero = (e != 0).flatten(1).sum(1)
    assert (nonzero == k).all()  # continuous gradients: no ties, exactly the top k
    torch.testing.assert_close(l1_size(e), torch.ones(3, dtype=torch.float64))
    assert torch.equal(e.sign()[e != 0], grad.sign()[e != 0])
    top = grad.abs().flatten(1).topk(k, dim=1).indices
    assert torch.equal((e.flatten(1) != 0).nonzero()[:, 1].view(3, k).sort(1).values, top.sort(1).values)
    # The largest gradient sits on a pixel already at 1 and pushes it up: it is skipped.
    blocked = x.clone().flatten(1)
    i = grad.flatten(1)[0].argmax()
    blocked[0, i] = 1.0
    e2 = l1_direction(grad, blocked.view_as(x)).flatten(1)
    assert e2[0, i] == 0 and (e2[0] != 0).sum() == k


def test_random_l1_noise_has_the_radius_and_uniform_starts_fill_the_ball():
    g = torch.Generator().manual_seed(3)
    sphere = random_l1((8, 3, 4, 4), 2.5, "cpu", torch.float64, g)
    torch.testing.assert_close(l1_size(sphere), torch.full((8,), 2.5, dtype=torch.float64))
    ball = random_l1((4000, 2), 1.0, "cpu", torch.float64, g, uniform_radius=True)
    r = l1_size(ball)
    assert (r <= 1.0 + 1e-12).all()
    assert abs(float((r <= 0.5).double().mean()) - 0.25) < 0.03  # area grows as r^2 in two dimensions


# --------------------------------------------------------------------------- PGD and AutoAttack in L1


def _trained(noise: float = 0.3, n: int = 200):
    ds = load_dataset("synthetic", "test", image_size=8, n_test=n, seed=2, noise=noise)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(32, 10))  # fmt: skip
    return fit(model, ds.images.float() / 255, ds.labels, steps=60), ds


@pytest.fixture(scope="module")
def trained():
    return _trained()


L1_ATTACKS = {
    "pgd": PGD(eps=8.0, steps=10, norm="l1"),
    "pgd_normal_start_last_iterate": PGD(eps=8.0, steps=5, norm="l1", start="normal", keep_best=False),
    "pgd_restarts": PGD(eps=4.0, steps=5, norm="l1", restarts=3),
    "fgsm": fgsm(8.0, "l1"),
    "cw_margin": cw_margin(8.0, "l1", steps=5),
    "targeted": PGD(eps=8.0, steps=5, norm="l1", targeted=True),
    "huge_step": PGD(eps=3.0, steps=3, step_size=50.0, norm="l1"),
}


@pytest.mark.parametrize("name", list(L1_ATTACKS))
def test_every_l1_attack_result_lies_in_the_ball_and_the_box_in_float64(name, trained):
    model, ds = trained
    x, y = ds.images[:64].float() / 255, ds.labels[:64]
    cfg = L1_ATTACKS[name]
    x_adv = pgd(model, x, y, cfg, generator=torch.Generator().manual_seed(0))
    size = l1_size(x_adv.double() - x.double())
    assert (size <= cfg.eps).all(), float(size.max())  # no tolerance: the projection leaves room for rounding
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert float(size.max()) > 0.5 * cfg.eps  # and it moved
    assert check_bound(x_adv, x, cfg) <= cfg.eps


def test_l1_pgd_beats_random_l1_noise_of_the_same_size(trained):
    model, ds = trained
    x, y = ds.images.float() / 255, ds.labels
    eps = 8.0
    noise = (x + random_l1(x.shape, eps, "cpu", x.dtype, torch.Generator().manual_seed(0))).clamp(0, 1)
    x_adv = pgd(model, x, y, PGD(eps=eps, steps=20, norm="l1"), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean, noisy, attacked = ((model(v).argmax(1) == y).float().mean().item() for v in (x, noise, x_adv))
    assert clean > 0.9 and noisy > 0.9
    assert attacked < noisy - 0.15, (attacked, noisy)


def test_l1_pgd_uses_the_radius_it_is_given(trained):
    model, ds = trained
    x, y = ds.images.float() / 255, ds.labels
    acc = []
    for eps in (2.0, 8.0, 16.0):
        x_adv = pgd(model, x, y, PGD(eps=eps, steps=20, norm="l1"), generator=torch.Generator().manual_seed(0))
        assert (l1_size(x_adv.double() - x.double()) <= eps).all()
        with torch.no_grad():
            acc.append((model(x_adv).argmax(1) == y).float().mean().item())
    assert acc[0] > acc[1] > acc[2]


def test_one_l1_step_on_a_linear_model_moves_the_top_coordinates_by_the_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 10 * 10, 2))
    x = torch.full((4, 3, 10, 10), 0.5)
    with torch.no_grad():
        y = model(x).argmax(1)
    x_adv = pgd(model, x, y, PGD(eps=5.0, steps=1, step_size=0.4, norm="l1", random_start=False, keep_best=False))
    k = math.ceil((1 - L1_QUANTILE) * 300)  # 3 coordinates, more than 2 * step_size = 0.8
    w = model[1].weight.detach()
    for i, c in enumerate(y.tolist()):
        direction = (w[1 - c] - w[c]).flatten()  # the CE gradient's direction on a two-class linear model
        top = direction.abs().topk(k).indices
        expected = torch.zeros(300)
        expected[top] = 0.4 / k * direction[top].sign()
        torch.testing.assert_close((x_adv[i] - x[i]).flatten(), expected, atol=1e-6, rtol=0)


def test_autoattack_l1_runs_end_to_end_through_the_evaluation(trained):
    pytest.importorskip("pyautoattack")
    model, ds = trained
    few = ArrayDataset(ds.images[:8], ds.labels[:8], ds.classes)
    spec = AutoAttackSpec(eps=16.0, norm="l1", n_iter=5, n_queries=20)
    res = evaluate(model, few, [spec], batch_size=8, cascade=True)
    (aa,) = res.attacks
    assert aa.settings["norm"] == "l1" and aa.settings["eps"] == 16.0
    assert [s["name"] for s in aa.stages] == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
    assert aa.accuracy < res.clean_accuracy  # it found adversarial examples ...
    assert 0 < aa.max_perturbation <= 16.0 + 1e-5  # ... inside the L1 ball (evaluate's bound check)
    adversary = spec.build(model, torch.device("cpu"), num_classes=10)
    assert adversary.norm == "L1" and adversary.apgd.use_largereps and adversary.apgd.n_iter_orig == 5
    assert adversary.apgd_targeted.n_target_classes == 5  # the package's L1 setting, kept
    assert aa.settings["restarts"] == adversary.apgd.n_restarts == 5


def test_l1_protocols_build_l1_attacks():
    for name in ("paper", "strong", "full"):
        attacks = protocol_attacks(name, 12.0, "l1")
        assert attacks and all(a.norm == "l1" and a.eps == 12.0 for a in attacks)


# --------------------------------------------------------------------------- radii and bad input


def test_default_radii_are_robustbenchs():
    cifar, imagenet = dataset_radii("cifar10"), dataset_radii("folder", (3, 224, 224))
    assert ThreatModel.resolve("l1", None, cifar) == ThreatModel("l1", 12.0) == ThreatModel("l1", L1_EPS)
    assert ThreatModel.resolve("l2", None, imagenet) == ThreatModel("l2", 3.0)
    assert ThreatModel.resolve("l1", 6.0, cifar) == ThreatModel("l1", 6.0)
    assert ThreatModel.resolve("l1", 6.0, imagenet) == ThreatModel("l1", 6.0)  # a given radius needs no row
    assert STANDARD_RADII["imagenet"]["linf"] == 4 / 255
    assert STANDARD_RADII["cifar10"]["linf"] == DATASET_INFO["cifar10"]["eps"]  # one L-inf radius, not two
    with pytest.raises(ConfigError, match="'folder' \\(standard radii of imagenet\\) has no standard l1 radius"):
        ThreatModel.resolve("l1", None, imagenet)
    assert evaluation_threat({"eps": 8 / 255, "norm": "linf"}, "l1", cifar) == ThreatModel("l1", 12.0)
    assert evaluation_threat({"eps": 6.0, "norm": "l1"}, "l1", cifar) == ThreatModel("l1", 6.0)


@pytest.mark.parametrize("eps", [-1.0, math.inf, math.nan])
def test_a_negative_or_non_finite_l1_radius_is_refused(eps):
    with pytest.raises(ConfigError, match="finite"):
        ThreatModel.resolve("l1", eps, dataset_radii("cifar10"))
    with pytest.raises(ConfigError, match="finite"):
        PGD(eps=eps, norm="l1")
    with pytest.raises(ConfigError, match="eps"):
        AutoAttackSpec(eps=eps, norm="l1")


CONFIG = ("name: t\ndata: {name: synthetic, val_size: 32, options: {n_train: 96, n_test: 32, image_size: 8}}\n"
          "model: {name: small_cnn, options: {width: 4}}\n"
          "train: {epochs: 1, batch_size: 32, attack: {norm: l1, steps: 2}, val_attack: {norm: l1, steps: 1}, "
          "progress: false}\n")  # fmt: skip


@pytest.mark.parametrize("flags", [["--set", "train.attack.eps=-1"], ["--set", "train.attack.eps=.inf"],
                                   ["--set", "train.attack.eps=.nan"]])  # fmt: skip
def test_cli_train_refuses_a_bad_l1_radius_in_one_line(tmp_path, capsys, flags):
    (tmp_path / "c.yaml").write_text(CONFIG)
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(out), *flags]) == 2
    assert "train.attack.eps" in error_line(capsys) and not out.exists()


@pytest.mark.parametrize("eps", ["-1", "inf", "nan"])
def test_cli_eval_refuses_a_bad_l1_radius_in_one_line(tmp_path, capsys, eps):
    out = tmp_path / "ev"
    code = main(["eval", "--model", "torch.nn:Identity", "--dataset", "synthetic", "--norm", "l1",
                 f"--eps={eps}", "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 2 and "--eps" in error_line(capsys) and not out.exists()


def test_train_and_evaluate_with_norm_l1_record_and_report_the_l1_threat(tmp_path):
    (tmp_path / "c.yaml").write_text(CONFIG)
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(run)]) == 0
    record = json.loads((run / "last.json").read_text())
    assert record["norm"] == "l1" and record["eps"] == L1_EPS  # eps null: the data set's L1 radius
    ev = tmp_path / "ev"
    assert main(["eval", str(run / "last.safetensors"), "--norm", "l1", "--protocol", "quick", "--n-examples", "8",
                 "--no-plot", "--quiet", "--out", str(ev)]) == 0  # fmt: skip
    report = json.loads((ev / "report.json").read_text())
    assert report["meta"]["norm"] == "l1" and report["meta"]["eps"] == L1_EPS
    rows = report["attacks"]
    assert rows and all(a["settings"]["norm"] == "l1" for a in rows)
    assert all(a["max_perturbation"] <= L1_EPS + 1e-5 for a in rows)
    noise = [c for c in report["sanity"]["checks"] if c["code"] == "S07-noise"]
    assert noise and noise[0]["status"] in ("pass", "warn")


# --------------------------------------------------------------------------- sanity checks in L1


def test_sanity_noise_is_l1_noise_and_the_sweep_is_not_capped_at_one(trained):
    model, ds = trained
    few = ArrayDataset(ds.images[:32], ds.labels[:32], ds.classes)
    x, y = few.images.float() / 255, few.labels
    # S07 draws its noise with the seeded generator in one batch: the same draw of L1 noise of size eps.
    noise = random_l1(x.shape, 8.0, torch.device("cpu"), x.dtype, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = 100 * (model((x + noise).clamp(0, 1)).argmax(1) == y).float().mean().item()
    check = check_noise(model, few, 8.0, "l1", 100.0, 32, torch.device("cpu"), 0)
    assert check.values["noisy"] == pytest.approx(expected)
    check, sweep = check_eps_sweep(model, few, 4.0, "l1", 32, torch.device("cpu"), 0, 100.0)
    assert [e for e, _ in sweep] == [0.0, 2.0, 4.0, 8.0, 12.0, 16.0]
    accs = [a for _, a in sweep]
    assert accs[-1] < accs[0]


def test_a_large_step_is_spread_over_enough_pixels_to_be_taken():
    """FGSM in L1 (one step of size eps): the box would cut a step on the top 1 % of 192 pixels (2 pixels can
    move at most 2 in L1) down to a fraction of eps; spread over 2 * eps pixels it is taken in full."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    x = torch.full((4, 3, 8, 8), 0.5)
    with torch.no_grad():
        y = model(x).argmax(1)
    x_adv = pgd(model, x, y, fgsm(8.0, "l1"))
    moved = (x_adv - x).flatten(1)
    assert ((moved != 0).sum(1) == 16).all()
    torch.testing.assert_close(l1_size(moved), torch.full((4,), 8.0, dtype=torch.float64), atol=1e-3, rtol=0)


def test_the_ball_check_measures_l1_and_refuses_an_example_outside_the_l1_ball():
    x = torch.full((2, 3, 8, 8), 0.5)
    attack = PGD(eps=4.0, norm="l1")
    inside = x + 4.0 / 192  # every pixel moved a little: L1 size exactly 4, L2 size only 0.29
    assert check_bound(inside, x, attack) == pytest.approx(4.0, abs=1e-5)
    with pytest.raises(RuntimeError, match="outside the threat model"):
        check_bound(x + 4.1 / 192, x, attack)


def test_the_norm_cost_benchmark_times_every_norm():
    from advmend.bench.norm_cost import NORMS, bench_norms, main

    r = bench_norms("small_cnn", batch_size=4, steps=1, repeats=1)
    assert set(r["seconds_per_step"]) == set(NORMS) and all(s > 0 for s in r["seconds_per_step"].values())
    assert r["l1_over_l2"] == r["seconds_per_step"]["l1"] / r["seconds_per_step"]["l2"]
    assert main(["--batch-size", "2", "--steps", "1", "--repeats", "1"]) == 0


@pytest.mark.parametrize("objective", ["pgd_at", "trades", "mart", "fast_at"])
def test_every_training_objective_trains_on_examples_in_the_l1_ball(objective, trained):
    import copy

    from advmend.training.mart import MART
    from advmend.training.objectives import AdversarialCE, fast_at_attack
    from advmend.training.trades import TRADES, trades_attack

    model, ds = trained
    model = copy.deepcopy(model).train()  # the objectives' train-mode passes move BatchNorm's statistics
    x, y = ds.images[:16].float() / 255, ds.labels[:16]
    build = {"pgd_at": lambda: AdversarialCE(PGD(eps=8.0, steps=3, norm="l1", keep_best=False)),
             "trades": lambda: TRADES(trades_attack(8.0, steps=3, norm="l1")),
             "mart": lambda: MART(PGD(eps=8.0, steps=3, norm="l1", keep_best=False)),
             "fast_at": lambda: AdversarialCE(fast_at_attack(8.0, norm="l1"))}  # fmt: skip
    out = build[objective]()(model, x, y)
    size = l1_size(out.x_adv.double() - x.double())
    assert (size <= 8.0).all() and float(size.max()) > 1.0
    assert out.x_adv.min() >= 0 and out.x_adv.max() <= 1 and torch.isfinite(out.loss)


def test_eval_of_a_users_model_with_norm_l1_takes_the_l1_radius(tmp_path, monkeypatch):
    (tmp_path / "l1_user_net.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", "l1_user_net:build", "--dataset", "synthetic", "--set",
                 "data.options={image_size: 8, n_test: 16}", "--norm", "l1", "--protocol", "quick",
                 "--no-plot", "--quiet", "--out", "ev"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["meta"]["norm"] == "l1" and report["meta"]["eps"] == L1_EPS
    assert [a["settings"]["norm"] for a in report["attacks"]] == ["l1", "l1"]
