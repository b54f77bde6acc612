"""The defenses a run config can describe, registered like models: `DEFENSES`.

Each defense registers its builder `(cfg, num_classes, image_shape) -> nn.Module` next to its
definition, with what the layers above need to know about it as metadata:

- `enabled`: a rule on the run config that says the run is this defense (e.g. `pssr.enabled`);
- `order`: which rule is asked first (PSSR wraps a classifier that may itself carry FSR blocks);
- `label`: the name in headings ("PSSR"), "" for a plain classifier;
- `eval_prefix`: the report folder's prefix next to the checkpoint (eval-<prefix><protocol>);
- `transfer_key`: the config key that holds a transfer-attack source (`--transfer-from`), or None
  when the source is an extra PGD-20 transfer attack;
- `test_with_train_split`: whether the test split is checked together with the training split
  before training (a classifier's test split must match its training split).

How a defense is trained (`advmend.training.trainers.TRAINERS`), evaluated
(`advmend.evaluation.sections.SECTIONS`) and judged by a study (`advmend.study.protocols`) is
registered under the same name in those layers, since the code lives there.
"""

from __future__ import annotations

from advmend.config import RunConfig
from advmend.registry import Registry

DEFENSES: Registry = Registry("defense")
PLAIN = "none"  # the plain classifier: no defense rule holds


def defense_of(cfg: RunConfig) -> str:
    """The name of the defense `cfg` describes: the first registered one (by `order`) whose `enabled`
    rule holds for `cfg`, else PLAIN."""
    ruled = sorted((DEFENSES.meta(n)["order"], n) for n in DEFENSES.names() if "enabled" in DEFENSES.meta(n))
    return next((name for _, name in ruled if DEFENSES.meta(name)["enabled"](cfg)), PLAIN)


def defense_meta(cfg: RunConfig) -> dict:
    """The registered metadata of the defense `cfg` describes (`defense_of`), with its name."""
    name = defense_of(cfg)
    return dict(DEFENSES.meta(name), name=name)
