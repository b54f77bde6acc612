"""Cost of one PGD step per threat model: L-inf, L2 and L1 on the same model, batch and step count.

    python -m advmend.bench.norm_cost --model small_cnn --batch-size 128 --steps 10 --repeats 3

An L1 step adds a top-k over each example's pixels (the sparse direction) and a sort of 2n breakpoints
(the exact projection onto the L1 ball and the box) to the forward and backward pass every norm pays. The
benchmark times whole PGD runs (the attack as evaluation runs it, no random start, last iterate) and the
L1 geometry alone on the same batch, and prints seconds per step and the L1 / L2 ratio. Random images
labelled by the model's own predictions: the numbers measure cost, not robustness.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from advmend.attacks.l1 import l1_step
from advmend.attacks.pgd import PGD, pgd
from advmend.models import create_model
from advmend.types import STANDARD_RADII

NORMS = ("linf", "l2", "l1")


def _best_of(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls (after one untimed warm-up): the least disturbed by other load."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_norms(model_name: str = "small_cnn", batch_size: int = 128, steps: int = 10, repeats: int = 3,
                image_size: int = 32, device: str = "cpu", seed: int = 0) -> dict:  # fmt: skip
    """Seconds per PGD step for each norm at CIFAR-10's standard radius, and of the L1 geometry alone."""
    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=10).to(device).eval()
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.rand(batch_size, 3, image_size, image_size, generator=g, device=device)
    with torch.no_grad():
        y = model(x).argmax(1)
    radii = STANDARD_RADII["cifar10"]
    per_step = {}
    for norm in NORMS:
        attack = PGD(eps=radii[norm], steps=steps, norm=norm, random_start=False, keep_best=False)
        per_step[norm] = _best_of(lambda a=attack: pgd(model, x, y, a, validate=False), repeats) / steps
    grad = torch.randn(x.shape, generator=g, device=device)
    delta = torch.zeros_like(x)
    alpha = 2.5 * radii["l1"] / steps
    geometry = _best_of(lambda: l1_step(delta, grad, x, radii["l1"], alpha), repeats)
    return {"model": model_name, "batch_size": batch_size, "steps": steps, "image_size": image_size,
            "seconds_per_step": per_step, "l1_geometry_seconds": geometry,
            "l1_over_l2": per_step["l1"] / per_step["l2"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = bench_norms(args.model, args.batch_size, args.steps, args.repeats, args.image_size, args.device)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")  # fmt: skip
    print(f"{r['model']}, batch {r['batch_size']}, {r['image_size']}x{r['image_size']}, PGD-{r['steps']} on {where}")
    for norm, s in r["seconds_per_step"].items():
        print(f"  {norm:>4}: {1000 * s:8.2f} ms per step")
    print(f"  L1 geometry alone (direction + projection): {1000 * r['l1_geometry_seconds']:.2f} ms per step")
    print(f"  L1 / L2 cost per step: {r['l1_over_l2']:.2f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
