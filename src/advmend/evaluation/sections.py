"""How each defense's evaluation differs, registered under its name in `advmend.defenses.registry.DEFENSES`.

A defense with its own threat models registers `evaluate(model, ds, cfg, attacks, device, meta, progress,
cascade, keep_adv) -> (details, result, attacked, meta)`: `result` holds the card's attack rows and
headline, `attacked` what the sanity suite checks, `details` the defense's own findings; its metadata
gives `report(details) -> dict` and `markdown(details, meta) -> str` (the card's extra section) and
`console(details) -> str` (the lines under the console table). A defense without an entry is evaluated
as a classifier (`evaluation.run.run_protocol`).
"""

from __future__ import annotations

from advmend.registry import Registry

SECTIONS: Registry = Registry("evaluation section")
