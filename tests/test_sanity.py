"""The sanity suite: every check passes on a healthy model and raises its own flag on the broken model it
exists to catch (probabilities, randomness, masked gradients, train mode, noise fragility, ...)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TinyNet
from torch import nn

from advmend.data import ArrayDataset
from advmend.evaluation import evaluate
from advmend.evaluation.evaluate import AttackResult, EvalResult
from advmend.evaluation.sanity import CHECKS, PASS, SKIP, WARN, check_noise, check_square, run_sanity

EPS = 8 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(n: int = 24, classes: int = 5, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(30, 226, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, classes, (n,), generator=g)
    return ArrayDataset(images, labels, tuple(str(i) for i in range(classes)))


def _labelled_by(model: nn.Module, ds: ArrayDataset) -> ArrayDataset:
    """Images labelled with the model's own clean predictions (clean accuracy 100 %), keeping the
    examples farthest from the decision boundary so that random noise of size eps flips none."""
    pool = _dataset(n=20 * len(ds), classes=len(ds.classes), seed=1)
    with torch.no_grad():
        logits = model.eval()(pool.images.float() / 255)
    top2 = logits.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]).argsort(descending=True)[: len(ds)]
    return ArrayDataset(pool.images[keep], logits.argmax(1)[keep], ds.classes)


class Linear(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 8 * 8, classes)

    def forward(self, x):
        return self.fc(x.flatten(1)) * 10


class Probabilities(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = Linear()

    def forward(self, x):
        return self.net(x).softmax(1)


class Noisy(nn.Module):
    """Randomised at test time: logits plus fresh noise on every call."""

    def __init__(self):
        super().__init__()
        self.net = Linear()

    def forward(self, x):
        return self.net(x) + 0.5 * torch.randn(x.shape[0], 5)


class Quantised(nn.Module):
    """A hard quantiser in front: its input gradient is exactly zero almost everywhere."""

    def __init__(self):
        super().__init__()
        self.net = Linear()

    def forward(self, x):
        return self.net(torch.round(x * 4) / 4)


class StuckInTrainMode(TinyNet):
    """A `train()` override that ignores its argument, so `eval()` leaves BatchNorm and dropout on."""

    def train(self, mode: bool = True):
        return super().train(True)


class Constant(nn.Module):
    """Predicts class 0 whatever the input (no usable gradient; never fooled on class-0 examples)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([1.0, 0, 0, 0, -1.0]))  # logits, not a probability row

    def forward(self, x):
        return self.bias.expand(x.shape[0], 5) + 0 * x.flatten(1)[:, :1]


def _sanity(model, ds, costly=False, attacks=None):
    attacks = attacks if attacks is not None else []
    result = evaluate(model, ds, attacks, batch_size=16)
    return run_sanity(model, ds, result, EPS, costly=costly, batch_size=16)


def test_every_check_has_a_stable_code_and_docs():
    assert list(CHECKS) == [
        "S01-eps-sweep", "S02-unbounded", "S03-convergence", "S04-restarts", "S05-fgsm-vs-pgd",
        "S06-square-vs-whitebox", "S07-noise", "S08-determinism", "S09-gradients", "S10-bound",
        "S11-logits", "S12-eval-mode",
    ]  # fmt: skip
    docs = (Path(__file__).parents[1] / "docs" / "evaluation.md").read_text()
    for code in CHECKS:
        assert code in docs


def test_healthy_model_passes_the_cheap_checks():
    model = Linear()
    ds = _labelled_by(model, _dataset())
    report = _sanity(model, ds, attacks=[])
    status = {c.code: c.status for c in report.checks}
    for code in ("S07-noise", "S08-determinism", "S09-gradients", "S11-logits", "S12-eval-mode", "S05-fgsm-vs-pgd"):
        assert status[code] == PASS, (code, report.get(code))
    for code in ("S01-eps-sweep", "S02-unbounded", "S03-convergence", "S04-restarts", "S06-square-vs-whitebox"):
        assert status[code] == SKIP
    assert status["S10-bound"] == SKIP  # no attack ran


class Sigmoids(nn.Module):
    """Per-class sigmoid scores: in [0, 1] but not a probability vector, so `evaluate` lets it through."""

    def __init__(self):
        super().__init__()
        self.net = Linear()

    def forward(self, x):
        return self.net(x).sigmoid()


class PartlyProbabilities(nn.Module):
    """Probability vectors for most inputs, logits for the rest (the rows `evaluate` does not reject)."""

    def __init__(self):
        super().__init__()
        self.net = Linear()

    def forward(self, x):
        z = self.net(x)
        bright = (x.flatten(1).mean(1) > 0.49)[:, None]
        return torch.where(bright, z.softmax(1), z)


def test_probabilities_model_is_rejected_and_borderline_ones_raise_S11():
    from advmend.errors import ModelContractError

    with pytest.raises(ModelContractError, match="probabilities"):
        _sanity(Probabilities(), _dataset())
    for model in (Sigmoids(), PartlyProbabilities()):
        ds = _dataset()
        report = _sanity(model, ds)
        check = report.get("S11-logits")
        assert check.status == WARN and "probabilities" in check.detail, (type(model).__name__, check)
        assert report.get("S08-determinism").status == PASS
    assert 0.5 <= check.values["probability_rows"] < 1  # PartlyProbabilities: some rows only
    assert _sanity(Linear(), _dataset()).get("S11-logits").status == PASS


def test_randomised_model_raises_S08():
    torch.manual_seed(0)
    model = Noisy()
    report = _sanity(model, _dataset())
    assert report.get("S08-determinism").status == WARN
    assert report.get("S08-determinism").values["max_abs_logit_difference"] > 0
    assert report.get("S12-eval-mode").status == PASS  # randomness is not a train-mode problem


def test_dropout_left_on_raises_S08_and_S12():
    torch.manual_seed(0)
    model = StuckInTrainMode()
    report = _sanity(model, _dataset())
    assert report.get("S12-eval-mode").status == WARN
    assert "train mode" in report.get("S12-eval-mode").detail
    assert report.get("S08-determinism").status == WARN  # dropout draws differ between passes


def test_train_mode_batchnorm_raises_S12_and_its_stats_are_restored():
    torch.manual_seed(0)
    model = StuckInTrainMode()
    model.drop.p = 0.0  # only BatchNorm stays in train mode: deterministic, but batch statistics
    ds = _dataset()
    result = evaluate(model, ds, [], batch_size=16)  # a model stuck in train mode changes its stats here
    stats = model.bn.running_mean.clone()
    report = run_sanity(model, ds, result, EPS, batch_size=16)
    check = report.get("S12-eval-mode")
    assert check.status == WARN
    assert "bn.running_mean" in check.values["buffers_changed"]
    assert check.values["batch_relative_gap"] > 1e-4
    assert torch.equal(model.bn.running_mean, stats)  # the suite does not leave the model changed


def test_quantised_model_raises_S09():
    model = Quantised()
    report = _sanity(model, _dataset())
    check = report.get("S09-gradients")
    assert check.status == WARN
    assert check.values["all_zero"] == check.values["n"] == 24


def test_noise_fragile_model_raises_S07():
    class NoiseDetector(nn.Module):
        """Class 0 on images that are exact multiples of 1/255, class 1 otherwise."""

        def forward(self, x):
            frac = (x * 255 - torch.round(x * 255)).abs().flatten(1).amax(1)
            return torch.stack([1 - 100 * frac, 100 * frac], 1)

    ds = _dataset(classes=2)
    ds = ArrayDataset(ds.images, torch.zeros(len(ds), dtype=torch.int64), ds.classes)
    check = check_noise(NoiseDetector(), ds, EPS, "linf", 100.0, 16, torch.device("cpu"), 0)
    assert check.status == WARN and check.values["noisy"] == 0.0


def test_square_flag_reads_autoattack_stages():
    clean = torch.ones(100, dtype=torch.bool)
    stages = [{"name": "APGD-CE", "robust_accuracy": 50.0}, {"name": "Square", "robust_accuracy": 40.0}]
    result = EvalResult(clean, [AttackResult({"name": "AutoAttack", "eps": EPS}, clean, 1.0, 100, stages=stages)])
    assert check_square(result).status == WARN
    stages[1]["robust_accuracy"] = 49.9  # AutoAttack's own tolerance is 0.2 points
    assert check_square(result).status == PASS
    assert check_square(EvalResult(clean)).status == SKIP


def test_costly_checks_pass_on_a_linear_model():
    model = Linear()
    ds = _labelled_by(model, _dataset(n=16))
    report = _sanity(model, ds, costly=True, attacks=[])
    for code in ("S01-eps-sweep", "S02-unbounded", "S03-convergence", "S04-restarts"):
        assert report.get(code).status == PASS, report.get(code)
    eps = [e for e, _ in report.sweep]
    assert eps[0] == 0 and eps[-1] == pytest.approx(4 * EPS) and len(eps) == 6


def test_model_without_gradient_fails_sweep_unbounded_and_gradients():
    model = Constant()
    ds = _dataset(n=20)
    ds = ArrayDataset(ds.images, torch.zeros(20, dtype=torch.int64), ds.classes)  # always right when clean
    report = _sanity(model, ds, costly=True)
    assert report.get("S01-eps-sweep").status == WARN  # 100 % at 4 eps
    assert report.get("S02-unbounded").status == WARN  # an unbounded attack cannot fool it
    assert report.get("S09-gradients").status == WARN


def test_bound_check_reports_the_measured_perturbation():
    from advmend.attacks import PGD

    model = Linear()
    ds = _labelled_by(model, _dataset(n=16))
    report = _sanity(model, ds, attacks=[PGD(eps=EPS, steps=3, name="PGD-3")])
    check = report.get("S10-bound")
    assert check.status == PASS
    assert 0 < check.values["max_perturbation"]["PGD-3"] <= EPS + 1e-6


def test_to_dict_has_meaning_and_values():
    model = Sigmoids()
    report = _sanity(model, _dataset(n=8))
    entry = next(c for c in report.to_dict()["checks"] if c["code"] == "S11-logits")
    assert entry["status"] == WARN and entry["meaning"] and entry["passes_when"] and "max" in entry["values"]


# --------------------------------------------------------------------------- attack checks that warn
# Crafted models read a few pixels of a constant grey image (value BASE) in units of eps, so the
# attack's path is known exactly. Each is the smallest model showing the failure its check exists for.

BASE = 128 / 255


def _grey(n: int = 16) -> ArrayDataset:
    """n identical grey images, all labelled 0 (the crafted models classify them correctly)."""
    return ArrayDataset(torch.full((n, 3, 8, 8), 128, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64), ("0", "1"))


def _pixels(x: torch.Tensor, k: int) -> torch.Tensor:
    """The first k pixels of channel 0's first row, as offsets from BASE in units of eps: (N, k)."""
    return (x[:, 0, 0, :k] - BASE) / EPS


def _two_class(margin: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (0, margin): class 1 (wrong) wins when margin > 0. With `guide`, the forward value is
    `margin` but gradients follow `guide` (a model whose gradients mislead the attack)."""
    if guide is not None:
        margin = guide + (margin - guide).detach()
    return torch.stack([torch.zeros_like(margin), margin], 1)


class Chain(nn.Module):
    """Gradients move pixel a first, then b once a is at the ball's edge, then c once b is: an L-inf PGD
    with step eps/10 from x has (a, b, c) = (1, 1, 0) after 20 steps and (1, 1, 1) after 30 or more.

    "drift": fooled at (1, 1, 0) but correct again at (1, 1, 1), the attack ascending all the while:
        the last iterate of PGD-100 is less adversarial than PGD-20's.
    "slow": fooled only once c > 0.5: PGD-20 has not converged, PGD-100 has.
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        a, b, c = _pixels(x, 3).unbind(1)
        guide = a + torch.relu(a - 0.99) * b + torch.relu(b - 0.99) * c
        margin = 10 * (a - 0.95) - 20 * c if self.kind == "drift" else 10 * (c - 0.5)
        return _two_class(margin, guide)


class Gamble(nn.Module):
    """The loss grows away from 0 in both directions of one pixel, but only the + side fools the model:
    a random start decides, so one run fools about half the examples and five restarts nearly all."""

    def forward(self, x):
        u = _pixels(x, 1)[:, 0]
        return _two_class(-1 + 2 * torch.relu(u) + 0.5 * torch.relu(-u))


class Trap(nn.Module):
    """Gradient masking in one pixel: the loss has a local maximum at 0.3 eps that traps small steps,
    while the one large FGSM step lands past 0.95 eps, where the model is fooled."""

    def forward(self, x):
        u = _pixels(x, 1)[:, 0]
        return _two_class(-2 + u - 2 * torch.relu(u - 0.3) + 100 * torch.relu(u - 0.95))


class Band(nn.Module):
    """Gradients push one pixel down; the model is fooled in a thin band around -eps and below -3.5 eps.
    PGD at eps ends in the band; at 2 and 3 eps its larger steps often jump over it; at 4 eps it ends
    below -3.5 eps. Accuracy rises with eps although it is 0 % at 4 eps."""

    def forward(self, x):
        u = _pixels(x, 1)[:, 0]
        margin = torch.maximum(10 * (0.075 - (u + 0.975).abs()), 10 * (-3.5 - u))
        return _two_class(margin, -u)


def test_S03_warns_when_more_steps_undo_the_attack():
    """The "not higher" clause: scored on the best iterate PGD-100 could never be above PGD-20."""
    report = _sanity(Chain("drift"), _grey(8), costly=True)
    check = report.get("S03-convergence")
    assert (check.values["pgd20"], check.values["pgd100"]) == (0.0, 100.0)
    assert check.status == WARN and "higher" in check.detail


def test_S03_warns_when_pgd20_has_not_converged():
    report = _sanity(Chain("slow"), _grey(8), costly=True)
    check = report.get("S03-convergence")
    assert (check.values["pgd20"], check.values["pgd100"]) == (100.0, 0.0)
    assert check.status == WARN and "not converged" in check.detail


def test_S04_warns_when_restarts_change_the_result():
    report = _sanity(Gamble(), _grey(16), costly=True)
    check = report.get("S04-restarts")
    assert check.status == WARN
    assert check.values["restarts_1"] - check.values["restarts_5"] > 25  # about 50 % against about 3 %


def test_S05_warns_when_fgsm_beats_pgd():
    report = _sanity(Trap(), _grey(16))
    check = report.get("S05-fgsm-vs-pgd")
    assert check.status == WARN
    assert check.values["fgsm"] == 0.0 and check.values["pgd"] > 50


def test_S01_warns_when_accuracy_rises_with_eps():
    report = _sanity(Band(), _grey(16), costly=True)
    check = report.get("S01-eps-sweep")
    accuracy = dict(report.sweep)
    assert accuracy[EPS] == 0.0 and accuracy[2 * EPS] > 20 and accuracy[4 * EPS] <= 10  # only the rise is wrong
    assert check.status == WARN and "rises" in check.detail
