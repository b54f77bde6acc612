"""How each defense is trained, registered under its name in `advmend.defenses.registry.DEFENSES`.

An entry is `train(cfg, out_dir, *, resume, log) -> TrainResult`; its metadata may name
`prepare_evaluation(cfg, checkpoint, meta, log) -> (cfg, meta)`: what an evaluation of the defense's
checkpoint needs that only training can provide (PSSR: its transfer surrogate, trained once and
cached). The registrations sit next to the trainers (`loop`, `pssr_loop`); `training.run` reads them.
"""

from __future__ import annotations

from advmend.registry import Registry

TRAINERS: Registry = Registry("trainer")
