"""PSSR's cost: inference per image as a multiple of the classifier's forward pass, and regenerator
training images/s. Run: `python -m advmend.bench.pssr_speed [--models small_cnn,resnet18] [--batch-size 64]`.

The spec (docs/pssr.md) budgets inference at about 3 classifier passes plus one pass of
the regenerator G: PS is one forward and one backward pass of the scorer (f), then G, then f. The
target is `pipeline_minus_g <= 4`, where

    pipeline_x        = time(PSSR forward) / time(f forward)
    regenerator_x     = time(G forward)    / time(f forward)
    pipeline_minus_g  = pipeline_x - regenerator_x   (the classifier-pass equivalents PSSR adds)

all measured per batch in eval mode (inference as deployed: outer `torch.no_grad`; PS enables
gradients for its own input gradient). Training: images/s of one full regenerator step (gray-box
PGD-10 on f, PS + G + f on the adversarial and clean batch, backward, Adam step), and of the same
step without the attack; `--amp bf16` runs the step under autocast as PSSR's training stage does with
`train.amp: bf16`.
"""

from __future__ import annotations

import argparse
import time

import torch

from advmend.attacks.pgd import PGD
from advmend.defenses.pssr.objective import PSSRObjective
from advmend.defenses.pssr.pipeline import PSSRModel
from advmend.defenses.pssr.regenerator import Regenerator
from advmend.models import create_model
from advmend.training.precision import Precision


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeats):  # the minimum is the least disturbed by other processes
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_model(name: str, batch_size: int = 64, width: int = 32, repeats: int = 5, train_steps: int = 2,
                device: str = "cpu", amp: str = "off") -> dict:  # fmt: skip
    dev = torch.device(device)
    torch.manual_seed(0)
    f = create_model(name, num_classes=10).to(dev)
    g = Regenerator(3, (32, 32), width=width).to(dev)
    model = PSSRModel(f, g).to(dev).eval()
    x = torch.rand(batch_size, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch_size,), device=dev)
    zeros = torch.zeros(batch_size, 1, 32, 32, device=dev)
    with torch.no_grad():
        t_f = _time(lambda: f(x), repeats, dev)
        t_g = _time(lambda: g(x, zeros), repeats, dev)
        t_p = _time(lambda: model(x), repeats, dev)
    out = {"model": name, "batch_size": batch_size, "regenerator_width": width,
           "regenerator_params": sum(p.numel() for p in g.parameters()),
           "classifier_ms_per_image": 1e3 * t_f / batch_size, "pipeline_x": t_p / t_f,
           "regenerator_x": t_g / t_f, "pipeline_minus_g": (t_p - t_g) / t_f}  # fmt: skip
    opt = torch.optim.Adam(g.parameters(), lr=1e-3)
    precision = Precision(amp, dev)
    out["amp"] = amp
    for label, attack in (("train_ips_pgd10", PGD(eps=8 / 255, steps=10, step_size=2 / 255, keep_best=False)),
                          ("train_ips_no_attack", None)):  # fmt: skip
        objective = PSSRObjective(attack)

        def step():
            model.train()
            with precision.autocast():
                loss = objective(model, x, y).loss  # noqa: B023 (step runs within this iteration)
            opt.zero_grad(set_to_none=True)
            precision.backward_and_step(loss, opt)

        out[label] = batch_size / _time(step, train_steps, dev)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m advmend.bench.pssr_speed", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="small_cnn,resnet18")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width", type=int, default=32, help="regenerator width")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="off", help="precision of the training step: off, bf16 (or fp16 on CUDA)")
    args = p.parse_args(argv)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, batch {args.batch_size}, 32x32, regenerator width {args.width}, training amp {args.amp}"
    )
    print(
        "model       f ms/img  pipeline/f  G/f    pipeline-G (target <= 4)  train img/s (PGD-10)  train img/s (no attack)"
    )
    for name in args.models.split(","):
        r = bench_model(
            name.strip(), args.batch_size, args.width, args.repeats, args.train_steps, args.device, args.amp
        )
        print(f"{r['model']:<11} {r['classifier_ms_per_image']:8.3f}  {r['pipeline_x']:10.2f}  {r['regenerator_x']:5.2f}"
              f"  {r['pipeline_minus_g']:24.2f}  {r['train_ips_pgd10']:20.1f}  {r['train_ips_no_attack']:23.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
