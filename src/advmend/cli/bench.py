"""`advmend bench`: throughput of training passes and PGD-10 AT with and without FSR."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure forward+backward and PGD-10 AT images/s, with and without FSR")
    p.add_argument("--models", default="small_cnn,resnet18", help="comma-separated model names")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=3, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from advmend.bench.throughput import bench_model, format_rows
    from advmend.errors import ConfigError
    from advmend.models import MODELS
    from advmend.training.build import resolve_device

    device = resolve_device(args.device)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        MODELS.get(n)
    if args.batch_size < 1 or args.iters < 1 or args.warmup < 0:
        raise ConfigError("--batch-size and --iters must be >= 1, --warmup >= 0")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")  # fmt: skip
    rows = []
    for n in names:
        rows.append(bench_model(n, batch_size=args.batch_size, iters=args.iters, warmup=args.warmup, device=device))
        print(f"measured {n}", flush=True)
    print(format_rows(rows, where))
    if args.json:
        payload = {"device": where, "torch": torch.__version__, "rows": [
            {**r.__dict__, "at_cost": r.at_cost, "fsr_overhead": r.fsr_overhead} for r in rows]}  # fmt: skip
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0
