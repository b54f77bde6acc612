"""`advmend list`: what can be named in a config."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("list", help="list models, defenses, training methods, attacks, protocols, datasets, configs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from advmend.attacks import LOSSES, PROTOCOLS
    from advmend.config import bundled_configs
    from advmend.data import DATASETS
    from advmend.models import FSR_PRESETS, MODELS
    from advmend.models.registry import model_options
    from advmend.training.build import OBJECTIVES

    sections = {
        "models (model.name)": [f"{m}  (FSR at {', '.join(FSR_PRESETS.get(m, ['-']))}; "
                                f"model.options: {', '.join(model_options(m)) or 'none'})" for m in MODELS.names()],
        "defenses": ["fsr  (fsr.enabled: true; fsr.layers: [...] for other placements)",
                     "pssr  (pssr.enabled: true; configs pssr/*; advmend pssr-analysis)"],
        "training methods (train.method)": OBJECTIVES.names(),
        "attacks": ["fgsm", "pgd (linf, l2; uniform or normal random start; restarts; targeted; eot)",
                    "autoattack (standard, rand; pyautoattack)", "transfer (advmend eval --transfer-from)",
                    "bpda (advmend.attacks.BPDA)",
                    f"losses (train.attack.loss, train.val_attack.loss, pssr.attack.loss): {', '.join(LOSSES.names())}"],
        "protocols (eval.protocol, --protocol)": PROTOCOLS.names(),
        "datasets (data.name)": DATASETS.names(),
        "configs (advmend train NAME)": bundled_configs(),
    }
    for title, items in sections.items():
        print(f"{title}:")
        for item in items:
            print(f"  {item}")
    return 0
