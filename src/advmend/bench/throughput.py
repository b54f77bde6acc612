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
from advmend.training.distributed import DistContext, training_view
from advmend.training.objectives import AdversarialCE
from advmend.training.precision import Precision, to_channels_last


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
    model = create_model(name, num_classes=10).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_pass():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    train_ips = _images_per_s(train_pass, batch_size, iters, warmup, device)
    at_ips, at_fsr_ips = (
        _images_per_s(_at_step(name, fsr, "off", batch_size, device, image_size), batch_size, iters, warmup, device)
        for fsr in (False, True)
    )
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


# --------------------------------------------------------------------------- speed switches and DDP scaling

SWITCHES = ("off", "channels_last", "bf16", "fp16", "compile")


@dataclass
class SwitchRow:
    model: str
    fsr: bool
    switch: str
    batch_size: int
    at_ips: float
    ratio: float  # images/s over the fp32 "off" row of the same model and FSR setting


def _at_step(name: str, fsr: bool, switch: str, batch_size: int, device: torch.device, image_size: int = 32,
             rank_batch: int | None = None, ctx=None):  # fmt: skip
    """One PGD-10 AT training step (attack + loss + backward + step) set up exactly as the training loop
    does for `switch` (training/precision.py, training/distributed.py)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).to(device)
    if fsr:
        model = FSRModel(model, at=fsr_preset(name), num_classes=10, input_shape=(3, image_size, image_size))
    objective = AdversarialCE(PGD(eps=8 / 255, steps=10, step_size=2 / 255, keep_best=False))
    return switched_step(model, objective, switch, image_shape=(3, image_size, image_size), num_classes=10,
                         batch_size=rank_batch or batch_size, device=device, ctx=ctx)  # fmt: skip


def switched_step(model: torch.nn.Module, objective, switch: str, *, image_shape, num_classes: int, batch_size: int,
                  device: torch.device, lr: float = 0.01, momentum: float = 0.9, ctx=None):  # fmt: skip
    """One training step of `objective` (attack + loss + backward + SGD step) on a random batch, set up as
    the training loop does for `switch` (training/precision.py, training/distributed.py)."""
    model = model.to(device).train()
    channels_last = switch == "channels_last"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    precision = Precision(switch if switch in ("bf16", "fp16") else "off", device)
    view = training_view(model, ctx or DistContext(), device, compile=switch == "compile")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    x = to_channels_last(torch.rand(batch_size, *image_shape, device=device), channels_last)
    y = torch.randint(0, num_classes, (batch_size,), device=device)

    def step():
        with precision.autocast():
            out = objective(view, x, y)
        opt.zero_grad(set_to_none=True)
        precision.backward_and_step(out.loss, opt)

    return step


def bench_switches(
    name: str, *, batch_size: int, iters: int, warmup: int, device: torch.device, switches=SWITCHES,
    fsr_options=(False, True),
) -> list[SwitchRow]:  # fmt: skip
    """PGD-10 AT images/s of `name` under each speed switch, with and without FSR."""
    rows = []
    for fsr in fsr_options:
        base = None
        for switch in ("off", *[s for s in switches if s != "off"]):
            step = _at_step(name, fsr, switch, batch_size, device)
            # torch.compile compiles on the first calls (train/eval graphs): at least 2 warm-up steps.
            ips = _images_per_s(step, batch_size, iters, max(warmup, 2) if switch == "compile" else warmup, device)
            base = ips if switch == "off" else base
            assert base is not None  # "off" comes first
            rows.append(SwitchRow(name, fsr, switch, batch_size, ips, ips / base))
    return rows


def format_switch_rows(rows: list[SwitchRow], device: str) -> str:
    lines = [f"device: {device}", "", "| model | FSR | switch | batch | PGD-10 AT img/s | vs fp32 off |",
             "|---|---|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r.model} | {'yes' if r.fsr else 'no'} | {r.switch} | {r.batch_size} | {r.at_ips:.2f} "
                     f"| {r.ratio:.2f}x |")  # fmt: skip
    by = {(r.fsr, r.switch): r.at_ips for r in rows}
    overheads = [f"{s}: {by[(False, s)] / by[(True, s)] - 1:+.1%}" for s in dict.fromkeys(r.switch for r in rows)
                 if (False, s) in by and (True, s) in by]  # fmt: skip
    if overheads:
        lines += ["", "FSR overhead on PGD-10 AT (AT img/s / AT+FSR img/s - 1): " + ", ".join(overheads)]
    return "\n".join(lines)


def _ddp_worker(rank, world, port, name, batch_size, iters, warmup, threads, queue) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = DistContext(rank, world, rank)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        step = _at_step(name, False, "off", batch_size, torch.device("cpu"), rank_batch=batch_size // world, ctx=ctx)
        for _ in range(warmup):
            step()
        ctx.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        ctx.barrier()
        if rank == 0:
            queue.put(batch_size * iters / (time.perf_counter() - t0))
    finally:
        if world > 1:
            dist.destroy_process_group()


def bench_ddp(name: str, *, batch_size: int, iters: int, warmup: int, procs: int = 2) -> dict[int, float]:
    """PGD-10 AT images/s on CPU of 1 process (all `procs` threads) and of `procs` gloo DDP processes
    (one thread each), at the same global batch."""
    import socket

    import torch.multiprocessing as mp

    if batch_size % procs:
        raise ValueError(f"batch size {batch_size} must be divisible by {procs} processes")
    out = {}
    mpctx = mp.get_context("spawn")
    for world in (1, procs):
        queue = mpctx.SimpleQueue()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_ddp_worker, args=(world, port, name, batch_size, iters, warmup, procs // world, queue),
                           nprocs=world, join=True, start_method="spawn")  # fmt: skip
        out[world] = queue.get()
    return out
