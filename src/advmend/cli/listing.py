"""`advmend list`: what can be named in a config; `advmend layers MODEL`: where FSR can go in a model."""

from __future__ import annotations

import argparse

from advmend.cli import add_set_flag


def add_parser(sub) -> None:
    p = sub.add_parser("list", help="list models, defenses, training methods, attacks, protocols, datasets, configs")
    p.add_argument(
        "--models",
        choices=("timm", "torchvision"),
        help="instead: every architecture the installed library lists (model.name: LIBRARY/ARCH)",
    )
    p.add_argument("--filter", help="with --models: only names containing this text")
    p.set_defaults(func=run)
    q = sub.add_parser("layers", help="list a model's layers FSR can follow (fsr.layers), with their output shapes")
    q.add_argument("model", help="a model.name: a registered model, timm/ARCH or torchvision/ARCH")
    q.add_argument("--data", default="cifar10", help="the data set whose image shape and classes the model takes")
    q.add_argument("--shape", help="image shape C,H,W instead of the data set's (e.g. 3,64,64)")
    q.add_argument("--classes", type=int, help="number of classes instead of the data set's")
    add_set_flag(q, "a model setting, e.g. --set model.options.img_size=32 (repeatable)", metavar="model.KEY=VALUE")
    q.set_defaults(func=run_layers)


def run(args: argparse.Namespace) -> int:
    if args.models:
        return _run_architectures(args.models, args.filter)
    from advmend.attacks import LOSSES, PROTOCOLS
    from advmend.config import bundled_configs
    from advmend.data import DATASETS
    from advmend.models import FSR_PRESETS, MODELS
    from advmend.models.registry import model_options
    from advmend.training.build import OBJECTIVES

    sections = {
        "models (model.name)": [
            f"{m}  (FSR at {', '.join(FSR_PRESETS.get(m, ['-']))}; "
            f"model.options: {', '.join(model_options(m)) or 'none'})"
            for m in MODELS.names()
        ]
        + [
            "timm/ARCH, torchvision/ARCH  (advmend list --models timm|torchvision; FSR where `advmend layers "
            "MODEL` shows a feature map)"
        ],
        "defenses": [
            "fsr  (fsr.enabled: true; fsr.layers: [...] for other placements)",
            "pssr  (pssr.enabled: true; configs pssr/*; advmend pssr-analysis)",
        ],
        "training methods (train.method)": OBJECTIVES.names(),
        "attacks": [
            "fgsm",
            "pgd (linf, l2; uniform or normal random start; restarts; targeted; eot)",
            "autoattack (standard, rand; pyautoattack)",
            "transfer (advmend eval --transfer-from)",
            "bpda (advmend.attacks.BPDA)",
            f"losses (train.attack.loss, train.val_attack.loss, pssr.attack.loss): {', '.join(LOSSES.names())}",
        ],
        "protocols (eval.protocol, --protocol)": PROTOCOLS.names(),
        "datasets (data.name)": DATASETS.names(),
        "configs (advmend train NAME)": bundled_configs(),
    }
    for title, items in sections.items():
        print(f"{title}:")
        for item in items:
            print(f"  {item}")
    return 0


def _run_architectures(lib: str, text: str | None) -> int:
    from advmend.models.external import architectures

    for arch in architectures(lib):
        if text is None or text in arch:
            print(f"{lib}/{arch}")
    return 0


def _shape(text: str) -> tuple[int, int, int]:
    from advmend.errors import ConfigError

    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--shape must be C,H,W (three integers, e.g. 3,32,32), got {text!r}") from None
    if min(c, h, w) < 1:
        raise ConfigError(f"--shape values must be >= 1, got {text!r}")
    return c, h, w


def run_layers(args: argparse.Namespace) -> int:
    from advmend.config import RunConfig, apply_overrides, from_dict, parse_overrides
    from advmend.data import dataset_info
    from advmend.defenses.classifier import build_classifier
    from advmend.defenses.insert import insertion_points
    from advmend.errors import ConfigError

    overrides = parse_overrides(args.overrides, sections=("model",))
    cfg = from_dict(RunConfig, apply_overrides({"model": {"name": args.model}, "data": {"name": args.data}}, overrides))
    info = dataset_info(args.data)
    shape = _shape(args.shape) if args.shape else info["image_shape"]
    classes = args.classes if args.classes is not None else info["num_classes"]
    if shape is None or classes is None:
        raise ConfigError(f"data set {args.data!r} has no fixed image shape or class count: pass --shape and --classes")
    if classes < 2:
        raise ConfigError(f"--classes must be >= 2, got {classes}")
    model = build_classifier(cfg, classes, tuple(shape))
    # advmend's own input normalisation is not a layer of the model.
    points = {p: s for p, s in insertion_points(model, shape).items() if p != "normalize"}
    print(
        f"{cfg.model.name} on {'x'.join(map(str, shape))} images: layers FSR can follow (fsr.layers), their output "
        "per image as they return it (FSR reads the first axis as channels: C x H x W)"
    )
    width = max(len(p) for p in points) if points else 0
    for path, out in points.items():
        print(f"  {path:<{width}}  {' x '.join(map(str, out))}")
    return 0
