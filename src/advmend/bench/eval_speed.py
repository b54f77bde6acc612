"""Evaluation speed: images/s per attack, and the model passes each attack costs per example.

    python -m advmend.bench.eval_speed --models small_cnn,resnet18 --n 64

A counting wrapper records, per example, how many forward passes the model ran and how many backward
passes went through its output. The target: PGD-20 evaluation costs no more than 21
forward+backward passes per example: 20 forward+backward steps plus one forward pass to score the last
iterate (`pgd_tracked` reuses each step's forward pass to track success, so scoring needs no more).
The cascade's saving is measured on the paper protocol: examples attacked and seconds, off and on.

The data are random images labelled with the model's own predictions (clean accuracy 100 %), so every
example is attacked: the numbers measure attack cost, not robustness.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch import nn

from advmend.attacks.pgd import PGD, fgsm
from advmend.attacks.presets import cw_margin, protocol_attacks
from advmend.data import ArrayDataset
from advmend.evaluation.evaluate import evaluate
from advmend.models import create_model


class PassCounter(nn.Module):
    """Wraps a model; counts examples through forward, and through backward of its output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.forward_examples = 0
        self.backward_examples = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.forward_examples += x.shape[0]
        if out.requires_grad:
            n = x.shape[0]

            def count(grad: torch.Tensor) -> None:
                self.backward_examples += n

            out.register_hook(count)
        return out


def _data(model: nn.Module, n: int, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        labels = model.eval()(images.float() / 255).argmax(1)
    return ArrayDataset(images, labels, tuple(str(i) for i in range(10)))


def bench_model(name: str, n: int, batch_size: int, eps: float = 8 / 255) -> list[dict]:
    """Rows: attack, images/s, forward and backward passes per example."""
    torch.manual_seed(0)
    model = PassCounter(create_model(name, num_classes=10).eval())
    ds = _data(model.model, n)
    rows = []
    step = eps / 10
    attacks = [
        fgsm(eps),
        PGD(eps=eps, steps=20, step_size=step, random_start=False, name="PGD-20"),
        cw_margin(eps, steps=30, step_size=step, name="CW-30"),
    ]
    for attack in attacks:
        model.forward_examples = model.backward_examples = 0
        res = evaluate(model, ds, [attack], batch_size=batch_size)
        a = res.attacks[0]
        # The clean pass (1 forward per example) belongs to the evaluation, not to the attack.
        fwd = (model.forward_examples - n) / a.attacked
        rows.append({"model": name, "attack": a.name, "examples": a.attacked, "seconds": round(a.seconds, 3),
                     "images_per_s": round(a.attacked / a.seconds, 2), "forward_per_example": fwd,
                     "backward_per_example": model.backward_examples / a.attacked})  # fmt: skip
    return rows


def bench_cascade(name: str, n: int, batch_size: int, eps: float) -> list[dict]:
    """Paper protocol with the cascade off and on: same worst case, fewer examples attacked."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    ds = _data(model, n)
    rows = []
    for cascade in (False, True):
        t0 = time.perf_counter()
        res = evaluate(model, ds, protocol_attacks("paper", eps), batch_size=batch_size, cascade=cascade)
        rows.append({"model": name, "cascade": cascade, "attacked": sum(a.attacked for a in res.attacks),
                     "seconds": round(time.perf_counter() - t0, 2), "worst_case": 100 * res.worst_accuracy})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="small_cnn,resnet18")
    p.add_argument("--n", type=int, default=64, help="examples per model")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--cascade-eps",
        type=float,
        default=2 / 255,
        help="eps of the cascade comparison (small enough that some examples stay robust)",
    )
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, CPU only"
        if not torch.cuda.is_available()
        else f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}"
    )
    print(f"{'model':<10} {'attack':<7} {'examples':>8} {'seconds':>8} {'images/s':>9} {'fwd/ex':>7} {'bwd/ex':>7}")
    for name in args.models.split(","):
        for r in bench_model(name, args.n, args.batch_size):
            print(f"{r['model']:<10} {r['attack']:<7} {r['examples']:>8} {r['seconds']:>8.2f} {r['images_per_s']:>9.1f} "
                  f"{r['forward_per_example']:>7.2f} {r['backward_per_example']:>7.2f}")  # fmt: skip
    name = args.models.split(",")[0]
    print(f"\npaper protocol on {name}, eps {args.cascade_eps:.4g}: cascade off vs on")
    for r in bench_cascade(name, args.n, args.batch_size, args.cascade_eps):
        print(f"cascade={str(r['cascade']):<5} attacked={r['attacked']:>5} seconds={r['seconds']:>7.2f} "
              f"worst case={r['worst_case']:.2f} %")  # fmt: skip
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
