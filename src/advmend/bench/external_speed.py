"""What evaluating a timm/torchvision model through advmend costs over the same PGD on the bare model.

Through advmend: `evaluation.evaluate` with one PGD attack on the `create_model` model (advmend's
`Normalize` in front of the library's network; clean pass, the PGD core, ball checks). Bare: a plain
PGD loop written here on the library's network with the same normalisation arithmetic, the same images,
batch, steps and step size, and the same passes per example (a clean forward pass, `steps` forward and
backward passes, one forward pass to score the last iterate). What an evaluation must do the bare loop
does too, so the ratio is the price of advmend's plumbing alone: the normalisation (the bare model needs
it as much), and keeping each example's first fooling iterate (an example fooled at any step counts as
fooled; the bare loop keeps it the same way, from the logits of the step's own forward pass).

The two are timed in alternating rounds (a busy machine slows both alike); each round gives one ratio,
advmend's seconds over the bare loop's, and the row reports their median with the lowest and highest.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from advmend.attacks.pgd import PGD
from advmend.data import ArrayDataset
from advmend.evaluation.evaluate import evaluate
from advmend.models import Normalize, create_model
from advmend.models.external import ExternalModel


@dataclass
class ExternalEvalRow:
    model: str
    examples: int
    batch_size: int
    steps: int
    advmend_s: float  # median of the timed rounds through advmend
    bare_s: float  # median of the timed rounds of the same PGD on the bare library model
    ratios: list[float]  # advmend / bare, one per round (each round runs both, one after the other)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)


def _bare_pgd_eval(net: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor, images: torch.Tensor,
                   labels: torch.Tensor, attack: PGD, batch_size: int) -> int:  # fmt: skip
    """The plain loop: signed-gradient L-inf PGD from x, projected to the ball and [0, 1], an example fooled
    at any iterate counted as fooled; returns the number of examples still classified correctly."""
    robust = 0
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].to(mean.device).float().div(255)
        y = labels[i : i + batch_size].to(mean.device)
        with torch.no_grad():
            correct = net((x - mean) / std).argmax(1) == y
        x_adv = x.clone()
        fooled = torch.zeros_like(correct)
        for _ in range(attack.steps):
            x_adv.requires_grad_(True)
            logits = net((x_adv - mean) / std)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), x_adv)
            with torch.no_grad():
                fooled |= logits.argmax(1) != y
                x_adv = x_adv + attack.alpha * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - attack.eps), x + attack.eps).clamp(0, 1)
        with torch.no_grad():
            fooled |= net((x_adv - mean) / std).argmax(1) != y
            robust += int((correct & ~fooled).sum())
    return robust


def bench_external_eval(name: str, *, n: int = 64, batch_size: int = 32, steps: int = 10, repeats: int = 3,
                        options: dict[str, Any] | None = None, image_size: int = 32,
                        device: torch.device | str = "cpu") -> ExternalEvalRow:  # fmt: skip
    """Seconds (median of `repeats` alternating rounds) of a PGD-`steps` evaluation of `n` random images through
    advmend and on the bare model (random init, labels = the model's own predictions so every example is
    attacked), and the ratio of each round."""
    torch.manual_seed(0)
    device = torch.device(device)
    model = create_model(name, num_classes=10, **(options or {})).to(device).eval()
    if not isinstance(model, ExternalModel):
        raise TypeError(f"{name!r} is not a timm/ or torchvision/ model")
    net = model.net
    norm = model.normalize
    mean = norm.mean if isinstance(norm, Normalize) else torch.zeros(1, 3, 1, 1, device=device)
    std = norm.std if isinstance(norm, Normalize) else torch.ones(1, 3, 1, 1, device=device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        labels = model(images.to(device).float() / 255).argmax(1).cpu()
    ds = ArrayDataset(images, labels, tuple(str(i) for i in range(10)))
    eps = 8 / 255
    attack = PGD(eps=eps, steps=steps, step_size=eps / 4, random_start=False, name=f"PGD-{steps}")
    ours, bare = [], []
    for _ in range(repeats + 1):  # the first round warms both paths up and is not counted
        t0 = time.perf_counter()
        evaluate(model, ds, [attack], batch_size=batch_size, device=device)
        _sync(device)
        t1 = time.perf_counter()
        _bare_pgd_eval(net, mean, std, images, labels, attack, batch_size)
        _sync(device)
        t2 = time.perf_counter()
        ours.append(t1 - t0)
        bare.append(t2 - t1)
    ours, bare = ours[1:], bare[1:]
    ratios = [a / b for a, b in zip(ours, bare)]
    return ExternalEvalRow(name, n, batch_size, steps, statistics.median(ours), statistics.median(bare), ratios)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_external_rows(rows: list[ExternalEvalRow], where: str) -> str:
    lines = [f"PGD evaluation through advmend vs the same PGD on the bare model, {where}; medians of alternating "
             "rounds, the ratio's lowest and highest round in brackets",
             f"{'model':<34} {'images':>6} {'batch':>5} {'steps':>5} {'advmend s':>10} {'bare s':>8} {'ratio':>6}"]  # fmt: skip
    for r in rows:
        lines.append(f"{r.model:<34} {r.examples:>6} {r.batch_size:>5} {r.steps:>5} {r.advmend_s:>10.3f} "
                     f"{r.bare_s:>8.3f} {r.ratio:>6.3f} [{min(r.ratios):.3f}, {max(r.ratios):.3f}]")  # fmt: skip
    return "\n".join(lines)
