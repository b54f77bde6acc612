"""`advmend bench`: throughput of training passes and PGD-10 AT with and without FSR."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from advmend.cli import add_set_flag


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure forward+backward and PGD-10 AT images/s, with and without FSR")
    p.add_argument("--models", default="small_cnn,resnet18", help="comma-separated model names")
    p.add_argument(
        "--batch-size", type=int, help="batch size (default 64; with --config the config's train.batch_size)"
    )
    p.add_argument("--iters", type=int, default=3, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--switches",
        help="instead: PGD-10 AT img/s under speed switches, comma-separated from "
        "off,channels_last,bf16,fp16,compile (fp16 needs CUDA), with and without FSR",
    )
    p.add_argument(
        "--ddp-procs",
        type=int,
        help="instead: PGD-10 AT img/s of 1 vs N gloo DDP processes on CPU "
        "at the same global batch (first model of --models)",
    )
    p.add_argument(
        "--config",
        help="instead: the training step of this run config (its model, FSR, objective and "
        "attack) under --switches (default off,channels_last,bf16)",
    )
    add_set_flag(p, "with --config: override one of that config's keys (repeatable), e.g. fsr.enabled=true to "
                 "time the same step with FSR")  # fmt: skip
    p.add_argument(
        "--folder-memory",
        metavar="DIR",
        help="instead: peak RSS of a PGD evaluation streamed from "
        "generated image folders of 200 and 2,000 224-pixel images, written under DIR",
    )
    p.add_argument(
        "--loop",
        nargs="?",
        const="cifar10/pgdat_small_cnn_cpu",
        metavar="CONFIG",
        help="instead: images/s of `advmend train` against a minimal PGD-AT loop on the same images "
        "(fp32 + channels_last, 5,000 images; default config: the CPU study's recipe)",
    )
    p.add_argument(
        "--external-eval",
        action="store_true",
        help="instead: seconds of a PGD-10 evaluation of each "
        "--models name (timm/ARCH, torchvision/ARCH) through advmend vs the same PGD on the bare model",
    )
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=run)


def _write_json(path: str, payload: dict) -> None:
    """The results as JSON, written whole or not at all (the path was checked before the measurement)."""
    from advmend.io import atomic_write_text

    atomic_write_text(Path(path), json.dumps(payload, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    import torch

    from advmend.bench.throughput import bench_model, format_rows
    from advmend.errors import ConfigError
    from advmend.io import check_output_path
    from advmend.models import MODELS
    from advmend.training.build import resolve_device

    if args.json:  # before minutes of measurement, not after
        check_output_path(args.json, "--json", folder=False)
    if args.overrides and not args.config:
        raise ConfigError("--set overrides a key of --config's run config; give --config CONFIG")
    if args.folder_memory:
        from advmend.bench.folder_memory import format_result
        from advmend.bench.folder_memory import run as bench_folder

        res = bench_folder(Path(args.folder_memory))
        print(format_result(res, 200, 2000))
        if args.json:
            _write_json(args.json, {str(k): v for k, v in res.items()})
        return 0
    if args.loop:
        from advmend.bench.loop_overhead import bench_loop, format_loop_rows

        loop_rows = bench_loop(args.loop)
        where = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        print(f"device: {where}\n\n" + format_loop_rows(loop_rows))
        if args.json:
            rows_json = [
                {"loop": r.loop, "epochs_images_per_s": r.epochs_ips, "images_per_s": r.ips} for r in loop_rows
            ]
            _write_json(args.json, {"device": where, "torch": torch.__version__, "loop": rows_json})
        return 0
    device = resolve_device(args.device, "--device")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")  # fmt: skip
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if args.external_eval:
        return _run_external(args, names, device, where)
    for n in names:
        MODELS.get(n)
    if args.config:
        return _run_recipe(args, device, where)
    args.batch_size = 64 if args.batch_size is None else args.batch_size
    if args.batch_size < 1 or args.iters < 1 or args.warmup < 0:
        raise ConfigError("--batch-size and --iters must be >= 1, --warmup >= 0")
    if args.switches or args.ddp_procs:
        return _run_scale(args, names, device, where)
    rows = []
    for n in names:
        rows.append(bench_model(n, batch_size=args.batch_size, iters=args.iters, warmup=args.warmup, device=device))
        print(f"measured {n}", flush=True)
    print(format_rows(rows, where))
    if args.json:
        payload = {"device": where, "torch": torch.__version__, "rows": [
            {**r.__dict__, "at_cost": r.at_cost, "fsr_overhead": r.fsr_overhead} for r in rows]}  # fmt: skip
        _write_json(args.json, payload)
    return 0


def _run_external(args: argparse.Namespace, names: list[str], device, where: str) -> int:
    from advmend.bench.external_speed import bench_external_eval, format_external_rows
    from advmend.errors import ConfigError
    from advmend.models.external import check_name, is_external

    bad = [n for n in names if not is_external(n)]
    if bad:
        raise ConfigError(f"--external-eval compares timm/ARCH and torchvision/ARCH models, not {bad}")
    for n in names:
        check_name(n)
    batch = 32 if args.batch_size is None else args.batch_size
    if batch < 1 or args.iters < 1:
        raise ConfigError("--batch-size and --iters must be >= 1")
    rows = [bench_external_eval(n, n=2 * batch, batch_size=batch, repeats=args.iters, device=device)
            for n in names]  # fmt: skip
    print(format_external_rows(rows, where))
    if args.json:
        _write_json(args.json, {"device": where, "external_eval": [
            {**r.__dict__, "ratio": r.ratio} for r in rows]})  # fmt: skip
    return 0


def _run_recipe(args: argparse.Namespace, device, where: str) -> int:
    import torch

    from advmend.bench.recipe import bench_recipe, format_recipe_rows
    from advmend.bench.throughput import SWITCHES
    from advmend.config import load_run_config
    from advmend.errors import ConfigError

    cfg = load_run_config(args.config, args.overrides)
    if (args.batch_size is not None and args.batch_size < 1) or args.iters < 1 or args.warmup < 0:
        raise ConfigError("--batch-size and --iters must be >= 1, --warmup >= 0")
    switches = [s.strip() for s in (args.switches or "off,channels_last,bf16").split(",") if s.strip()]
    bad = [s for s in switches if s not in SWITCHES or s == "compile"]
    if bad:
        raise ConfigError(f"--switches with --config: unknown {bad}; choose from off,channels_last,bf16,fp16")
    if "fp16" in switches and device.type != "cuda":
        raise ConfigError("--switches: fp16 is measured on CUDA only (CPU fp16 kernels are not a speed-up)")
    name = " ".join([args.config, *(f"--set {o}" for o in args.overrides)])
    rows = bench_recipe(name, cfg, switches, batch_size=args.batch_size,
                        iters=args.iters, warmup=args.warmup, device=device)  # fmt: skip
    print(format_recipe_rows(rows, where))
    if args.json:
        _write_json(args.json, {"device": where, "torch": torch.__version__, "recipe": [r.__dict__ for r in rows]})
    return 0


def _run_scale(args: argparse.Namespace, names: list[str], device, where: str) -> int:
    import torch

    from advmend.bench.throughput import SWITCHES, bench_ddp, bench_switches, format_switch_rows
    from advmend.errors import ConfigError

    payload: dict = {"device": where, "torch": torch.__version__}
    if args.switches:
        switches = [s.strip() for s in args.switches.split(",") if s.strip()]
        bad = [s for s in switches if s not in SWITCHES]
        if bad:
            raise ConfigError(f"--switches: unknown {bad}; choose from {','.join(SWITCHES)}")
        if "fp16" in switches and device.type != "cuda":
            raise ConfigError("--switches: fp16 is measured on CUDA only (CPU fp16 kernels are not a speed-up)")
        rows = []
        for n in names:
            rows += bench_switches(n, batch_size=args.batch_size, iters=args.iters, warmup=args.warmup,
                                   device=device, switches=switches)  # fmt: skip
            print(f"measured {n}", flush=True)
        print(format_switch_rows(rows, where))
        payload["switches"] = [r.__dict__ for r in rows]
    if args.ddp_procs:
        if args.ddp_procs < 2 or args.batch_size % args.ddp_procs:
            raise ConfigError("--ddp-procs must be >= 2 and divide --batch-size")
        ips = bench_ddp(names[0], batch_size=args.batch_size, iters=args.iters, warmup=args.warmup,
                        procs=args.ddp_procs)  # fmt: skip
        n = args.ddp_procs
        print(f"\nDDP (gloo, CPU) {names[0]} PGD-10 AT, global batch {args.batch_size}: "
              f"1 process x {n} threads {ips[1]:.2f} img/s, {n} processes x 1 thread {ips[n]:.2f} img/s, "
              f"scaling {ips[n] / ips[1]:.2f}x")  # fmt: skip
        payload["ddp"] = {"procs": n, "images_per_s": {str(k): v for k, v in ips.items()}}
    if args.json:
        _write_json(args.json, payload)
    return 0
