"""Measure training-pass and adversarial-training throughput and report ratios.

For each model: images/s of one forward+backward training pass (the unit of cost), of one PGD-10
adversarial-training step (attack + loss + backward + optimizer step), with and without FSR, and the
ratios the project's targets are stated in:
- at_cost = AT-step time / forward+backward time (target <= 11: 10 attack steps need only input
  gradients, so each should cost less than a training pass);
- fsr_overhead = AT+FSR step time / AT step time - 1 (target <= 10 % on ResNet-18).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from advmend.attacks.pgd import PGD
from advmend.defenses.insert import FSRModel
from advmend.models import create_model, fsr_preset
from advmend.training.objectives import AdversarialCE


@dataclass
class BenchRow:
    model: str
    batch_size: int
    train_pass_ips: float
    at_ips: float
    at_fsr_ips: float

    @property
    def at_cost(self) -> float:
        return self.train_pass_ips / self.at_ips

    @property
    def fsr_overhead(self) -> float:
        return self.at_ips / self.at_fsr_ips - 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images_per_s(step, batch_size: int, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return batch_size * iters / (time.perf_counter() - t0)


def bench_model(
    name: str, *, batch_size: int, iters: int, warmup: int, device: torch.device, image_size: int = 32
) -> BenchRow:
    """Throughputs of one model on random CIFAR-shaped data."""
    torch.manual_seed(0)
    x = torch.rand(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def make(fsr: bool):
        model = create_model(name, num_classes=10).to(device)
        if fsr:
            model = FSRModel(model, at=fsr_preset(name), num_classes=10, input_shape=(3, image_size, image_size))
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        return model, opt

    model, opt = make(False)

    def train_pass():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    train_ips = _images_per_s(train_pass, batch_size, iters, warmup, device)
    objective = AdversarialCE(PGD(eps=8 / 255, steps=10, step_size=2 / 255, keep_best=False))

    def at_step_for(model, opt):
        def step():
            out = objective(model, x, y)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()

        return step

    at_ips = _images_per_s(at_step_for(model, opt), batch_size, iters, warmup, device)
    fsr_model, fsr_opt = make(True)
    at_fsr_ips = _images_per_s(at_step_for(fsr_model, fsr_opt), batch_size, iters, warmup, device)
    return BenchRow(name, batch_size, train_ips, at_ips, at_fsr_ips)


def format_rows(rows: list[BenchRow], device: str) -> str:
    head = (
        "| model | batch | train pass img/s | PGD-10 AT img/s | PGD-10 AT + FSR img/s "
        "| AT cost (train passes, target <= 11) | FSR overhead on AT (target <= 10 % on resnet18) |"
    )
    lines = [f"device: {device}", "", head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.batch_size} | {r.train_pass_ips:.1f} | {r.at_ips:.1f} | {r.at_fsr_ips:.1f} "
            f"| {r.at_cost:.2f} | {100 * r.fsr_overhead:+.1f} % |"
        )
    return "\n".join(lines)
