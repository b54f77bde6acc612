"""A study: a list of (config, overrides, seed) runs, one evaluation protocol, one folder of records.

The study YAML (e.g. ``configs/study/cifar10_cpu.yaml``) is strict like every advmend config: an unknown
key is an error naming its dotted path. Each row is a base config plus ``--set`` style overrides, trained
once per seed (the seed sets ``train.seed``; the data split and the test subsets stay the same, so rows
are paired example by example and seed by seed).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from advmend.config import RunConfig, from_dict, load_run_config, load_yaml, resolve_config_path, to_dict
from advmend.errors import ConfigError

# Config keys that cannot change a result: they are left out of a run's config hash.
NON_RESULT_KEYS = ("name", "out_dir", "train.progress", "train.device", "train.tensorboard")


@dataclass(frozen=True)
class StudyEval:
    """The one evaluation protocol of a study (L-inf at the training eps of each run).

    Clean accuracy on `clean_n` test images (None: all), the FSR paper's FGSM, PGD-20 and CW-30 on
    `attack_n`, AutoAttack standard on `autoattack_n` (0: not run). The subsets are nested prefixes of
    one seeded permutation of the test split, identical for every run of the study.
    """

    seed: int = 0
    clean_n: int | None = None
    attack_n: int = 2000
    autoattack_n: int = 500
    batch_size: int = 500
    sanity: bool = True  # the cheap sanity checks on the attack subset, stored in the record
    test: bool = True  # false: a tuning study, judged on the validation split only (no test evaluation)


@dataclass(frozen=True)
class StudyRow:
    """One row of the table: a config trained once per seed, optionally compared to a baseline row."""

    name: str
    overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    baseline: str | None = None  # the row this one is compared with, pair by pair (and judged against the goal)
    compare: tuple[str, ...] = ()  # further rows to compare with, pair by pair (an ablation against its parent)
    note: str = ""


@dataclass(frozen=True)
class StudyLaunch:
    """What each (row, seed) asks of a cluster when the study is launched as one job per run
    (`advmend study STUDY --launcher slurm`; the command line's flags override these). Nothing here
    changes a result: it is not part of any run's config hash."""

    partition: str | None = None
    account: str | None = None
    gpus: int = 1  # per run
    cpus: int = 8  # per run
    mem_gb: float | None = None  # None: the partition's default
    time_min: int = 24 * 60  # a run that reaches it is requeued and resumes from its last epoch
    max_attempts: int = 3  # launches of a run that failed for an error before it is left as failed
    sbatch: tuple[str, ...] = ()  # further sbatch options, e.g. ["qos=high", "constraint=a100"]


@dataclass(frozen=True)
class StudyConfig:
    id: str
    title: str = ""
    description: str = ""
    base: str = "quickstart"  # a bundled config name or a YAML path (relative to the study file)
    overrides: tuple[str, ...] = ()  # applied to every row before its own
    records: str = "docs/results"  # records go to <records>/<id>/
    runs: str = "runs/study"  # checkpoints go to <runs>/<id>/<row>-s<seed>/ (not committed)
    eval: StudyEval = field(default_factory=StudyEval)
    rows: tuple[StudyRow, ...] = ()
    launch: StudyLaunch = field(default_factory=StudyLaunch)
    # Other study files (relative to this one) whose finished runs this study takes over instead of training
    # again when a run's config hash is the same: a tuning study's selected run is the test study's seed.
    reuse: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunSpec:
    """One (row, seed) run, fully resolved."""

    row: StudyRow
    seed: int
    cfg: RunConfig
    config_sha256: str

    @property
    def run_id(self) -> str:
        return f"{self.row.name}-s{self.seed}"


def config_digest(cfg: RunConfig) -> str:
    """SHA-256 of the resolved config without the keys in NON_RESULT_KEYS (canonical JSON)."""
    d = to_dict(cfg)
    for key in NON_RESULT_KEYS:
        *path, last = key.split(".")
        node = d
        for p in path:
            node = node[p]
        node.pop(last, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _check_name(value: str, what: str) -> None:
    if not value or not all(c.isalnum() or c in "_.+" for c in value) or value.startswith("."):
        raise ConfigError(f"{what} {value!r} must be a non-empty name of letters, digits, '_', '.' or '+'")


def load_study(path: str | Path) -> StudyConfig:
    """Read and check a study YAML (a path or a bundled name such as `study/cifar10_cpu`)."""
    p = resolve_config_path(str(path))
    study = from_dict(StudyConfig, load_yaml(p), "")
    _check_name(study.id, "study id")
    names = [r.name for r in study.rows]
    if not names:
        raise ConfigError(f"{p}: the study has no rows")
    for r in study.rows:
        _check_name(r.name, "rows[].name")
        if names.count(r.name) > 1:
            raise ConfigError(f"{p}: row name {r.name!r} appears twice")
        if not r.seeds or len(set(r.seeds)) != len(r.seeds) or min(r.seeds) < 0:
            raise ConfigError(f"{p}: row {r.name!r}: seeds must be distinct non-negative integers, got {list(r.seeds)}")
        if r.baseline is not None and (r.baseline not in names or r.baseline == r.name):
            raise ConfigError(f"{p}: row {r.name!r}: baseline {r.baseline!r} is not another row of this study")
        for other in r.compare:
            if other not in names or other == r.name or other == r.baseline:
                raise ConfigError(
                    f"{p}: row {r.name!r}: compare {other!r} is not another row of this study (nor its baseline)"
                )
    for other in study.reuse:
        if not (p.parent / other).is_file():
            raise ConfigError(f"{p}: reuse {other!r} is not a study file (a path relative to this study's file)")
    e = study.eval
    if e.clean_n is not None and e.clean_n < 1 or e.attack_n < 1 or e.autoattack_n < 0 or e.batch_size < 1:
        raise ConfigError(f"{p}: eval sizes must be positive (autoattack_n may be 0), got {e}")
    if e.autoattack_n > e.attack_n or (e.clean_n is not None and e.attack_n > e.clean_n):
        raise ConfigError(f"{p}: the subsets must nest: autoattack_n <= attack_n <= clean_n")
    return study


def base_path(study_file: str | Path, study: StudyConfig) -> str:
    """The base config: a bundled name, or a path relative to the study file."""
    rel = Path(study_file).parent / study.base
    return str(rel) if rel.is_file() else study.base


def resolve_runs(study_file: str | Path, study: StudyConfig) -> list[RunSpec]:
    """Every (row, seed) run of the study with its resolved config; a bad row is an error naming it."""
    base = base_path(study_file, study)
    specs = []
    for row in study.rows:
        for seed in row.seeds:
            try:
                cfg = load_run_config(base, [*study.overrides, *row.overrides, f"train.seed={seed}",
                                             f"name={study.id}-{row.name}-s{seed}"])  # fmt: skip
            except ConfigError as e:
                raise ConfigError(f"study {study.id}, row {row.name!r}: {e}") from None
            specs.append(RunSpec(row, seed, cfg, config_digest(cfg)))
    return specs
