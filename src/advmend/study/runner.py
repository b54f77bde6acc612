"""`advmend study STUDY.yaml`: train and evaluate every run of a study, one after another, resumably.

For each (row, seed) without a record: train (resuming from `last.safetensors` when a previous attempt
was stopped, so a kill loses at most the current epoch), evaluate the best checkpoint under the study's
one protocol on its fixed test subsets (each evaluation stage is cached next to the checkpoint, so a
kill during evaluation loses at most one stage), then write the run's record atomically. Runs whose
record exists are skipped after checking that the record still matches the run's config.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

import advmend.study.pssr_eval  # noqa: F401  (registers PSSR's study protocol)
from advmend.attacks.autoattack import AutoAttackSpec
from advmend.attacks.presets import protocol_attacks
from advmend.checkpoint import load_checkpoint
from advmend.config import to_dict
from advmend.data import take
from advmend.data.arrays import ImageDataset
from advmend.defenses.fsr_adaptive import adaptive_attacks
from advmend.defenses.registry import defense_of
from advmend.evaluation.evaluate import EvalResult, evaluate
from advmend.evaluation.load import load_trained_model, test_split
from advmend.evaluation.sanity import run_sanity
from advmend.io import file_sha256, versions
from advmend.study.protocols import STUDY_PROTOCOLS, subset_indices, subsets  # noqa: F401  (subset_indices: tests)
from advmend.study.records import (
    SCHEMA,
    STUDY_FILE,
    STUDY_SCHEMA,
    RecordError,
    bits,
    cached_stage,
    load_record,
    percent,
    read_json,
    record_path,
    write_json,
)  # fmt: skip
from advmend.study.spec import RunSpec, StudyConfig, load_study, resolve_runs
from advmend.training.build import resolve_device
from advmend.training.run import prepare_evaluation, train_run
from advmend.training.run_folder import LAST

# The study's attacks on the attack subset: the FSR paper's FGSM, PGD-20 and CW-30 (step eps/10, no
# random start). PGD-100 is left out: on these models it moves PGD-20 by a fraction of a point and
# costs five times as much; AutoAttack is the strong attack of the study.
STUDY_ATTACKS = ("FGSM", "PGD-20", "CW-30")
TRAINED_BY = "trained_by.json"  # in a run folder taken over from another study (`reuse_training`)


@dataclass
class StudyPlan:
    source: str  # the study YAML, as given
    study: StudyConfig
    specs: list[RunSpec]
    records_dir: Path
    runs_dir: Path

    def pending(self) -> list[RunSpec]:
        """Runs without a record, seed-major (every row's first seed before any second seed), so that
        the paired comparisons fill in early when a study is spread over several sittings."""
        rows = {r.name: k for k, r in enumerate(self.study.rows)}
        todo = [s for s in self.specs if not record_path(self.records_dir, s.run_id).exists()]
        return sorted(todo, key=lambda s: (s.row.seeds.index(s.seed), rows[s.row.name]))


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs on this machine: a claim's owner, a local job's controller. A
    zombie (ended, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux): kill(pid, 0) is all there is
        return True


@contextlib.contextmanager
def claim(runs_dir: Path, run_id: str):
    """Yields True when this process owns the run (a `<run>.claim` file holding its pid), False when
    another live process does. Several `advmend study` processes on one machine thus share a study's
    runs; the claim of a killed process is taken over."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = runs_dir / f"{run_id}.claim"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and process_alive(owner):
                yield False
                return
            path.unlink(missing_ok=True)  # a stale claim
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        try:
            yield True
        finally:
            path.unlink(missing_ok=True)
        return
    yield False


def plan_study(study_file: str | Path) -> StudyPlan:
    """Load the study, resolve its runs and check every existing record against them (nothing is
    written): a record of another study, a corrupt record, a record for a changed config, or a record
    of a run the study no longer has is a RecordError naming the file."""
    study = load_study(study_file)
    specs = resolve_runs(study_file, study)
    records_dir = Path(study.records) / study.id
    plan = StudyPlan(Path(study_file).as_posix(), study, specs, records_dir, Path(study.runs) / study.id)
    if records_dir.is_dir():
        index = records_dir / STUDY_FILE
        if index.exists():
            old = read_json(index, "study file")
            if old.get("schema") != STUDY_SCHEMA or old.get("id") != study.id:
                raise RecordError(f"{index}: belongs to study {old.get('id')!r}, not {study.id!r}; "
                                  "give this study its own records folder")  # fmt: skip
        by_id = {s.run_id: s for s in specs}
        for path in sorted(records_dir.glob("*.json")):
            if path.name == STUDY_FILE:
                continue
            spec = by_id.get(path.stem)
            if spec is None:
                raise RecordError(f"{path}: not a run of study {study.id!r} (row or seed removed?); "
                                  "restore the row or delete the record")  # fmt: skip
            load_record(path, study.id, spec.config_sha256)
    return plan


def write_study_file(plan: StudyPlan) -> None:
    """<records>/<id>/study.json: the study's definition and every run's config hash (the renderer's
    index; rewritten by each `advmend study` invocation)."""
    study = plan.study
    write_json(plan.records_dir / STUDY_FILE, {
        "schema": STUDY_SCHEMA, "id": study.id, "source": plan.source, "definition": to_dict(study),
        # Each run's resolved config, not only its hash: the renderer re-derives both hashes with its own
        # advmend, so records stay comparable after advmend gains an option (see records.record_config_digest).
        "runs": {s.run_id: {"row": s.row.name, "seed": s.seed, "config_sha256": s.config_sha256,
                            "config": to_dict(s.cfg)} for s in plan.specs},
    })  # fmt: skip


def still_training(checkpoint: Path) -> bool:
    """Whether `checkpoint` lies in the folder of a training run that has epochs left: its `last`
    checkpoint records fewer epochs than its config asks for, and the run did not stop early."""
    last = checkpoint.parent / LAST
    if not last.is_file():
        return False  # a checkpoint on its own, not a run folder: taken as it is
    _, record = load_checkpoint(last)
    stopped = (record.get("early_stopping") or {}).get("stopped")
    return not stopped and record.get("epoch", 0) < record["config"]["train"]["epochs"]


def run_study(study_file: str | Path, *, only: list[str] | None = None, max_runs: int | None = None,
              progress: bool = False, log: Callable[[str], None] = print,
              run_ids: list[str] | None = None) -> list[Path]:  # fmt: skip
    """Run every pending run of the study (or of the rows in `only`, or the runs `run_ids`: a launched
    job's one run); returns the records written."""
    plan = plan_study(study_file)
    if only:
        unknown = sorted(set(only) - {r.name for r in plan.study.rows})
        if unknown:
            raise RecordError(f"--only: no row {unknown[0]!r} in study {plan.study.id!r}")
    write_study_file(plan)
    todo = [s for s in plan.pending() if (not only or s.row.name in only) and (run_ids is None or s.run_id in run_ids)]
    done = len(plan.specs) - len(plan.pending())
    log(f"study {plan.study.id}: {len(plan.specs)} runs, {done} recorded, {len(todo)} to run now")
    written: list[Path] = []
    for spec in todo:
        if max_runs is not None and len(written) >= max_runs:
            break
        with claim(plan.runs_dir, spec.run_id) as mine:
            if not mine:
                log(f"{spec.run_id}: another advmend study process is running it; skipped")
                continue
            if record_path(plan.records_dir, spec.run_id).exists():  # finished while we waited
                continue
            p = spec.cfg.pssr
            # A PSSR row protects (and is attacked from) other runs' checkpoints: it waits until they exist
            # and their runs have finished training (best.safetensors is written from the first epoch on).
            needs = [(k, Path(v)) for k, v in (("classifier", p.classifier), ("surrogate", p.surrogate))
                     if p.enabled and v is not None]  # fmt: skip
            waiting = [(k, v, "run the study that makes it first") for k, v in needs if not v.is_file()]
            waiting += [(k, v, "its run is still training") for k, v in needs if v.is_file() and still_training(v)]
            if waiting:
                k, v, why = waiting[0]
                log(f"{spec.run_id}: waits for its {k} {v} ({why}); skipped")
                continue
            written.append(run_one(plan, spec, progress=progress, log=log))
    return written


def git_commit() -> dict:
    """The commit of the advmend code that produced a record (the checkout the package is imported
    from, not the current folder), and whether that checkout's source had local changes."""
    here = Path(__file__).resolve().parent
    try:
        run: dict[str, Any] = dict(capture_output=True, text=True, timeout=10, check=True, cwd=here)
        sha = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/src"], **run
            ).stdout.strip()
            != ""
        )
        return {"sha": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def hardware() -> dict:
    """What the run ran on, including the load (other jobs make timings slower, never accuracies)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}  # fmt: skip
    if hasattr(os, "getloadavg"):
        out["load_average_1m"] = round(os.getloadavg()[0], 2)
    return out


def _attack_entry(res: EvalResult, k: int) -> dict:
    a = res.attacks[k]
    return {"n": res.n, "accuracy": percent(a.correct), "correct": bits(a.correct), "settings": a.settings,
            "seconds": round(a.seconds, 2), **({"stages": a.stages} if a.stages else {})}  # fmt: skip


@STUDY_PROTOCOLS.register("fsr")
def evaluate_fsr_run(model, test: ImageDataset, eps: float, study: StudyConfig, device, checkpoint: Path, run_cfg,
                     cache_dir: Path, progress: bool, log) -> dict:  # fmt: skip
    """The classifier's protocol plus the adaptive attack on FSR's mask (`fsr_adaptive`): PGD-20 and CW-30
    differentiated through the softened mask, on the attack subset. Both count in the worst case, so an FSR
    row's robustness is never measured only by attacks its near-step mask may blind."""
    return evaluate_run(model, test, eps, study, device, checkpoint, run_cfg, cache_dir, progress, log,
                        adaptive=adaptive_attacks(eps, "linf"))  # fmt: skip


@STUDY_PROTOCOLS.register("none")
def evaluate_run(model, test: ImageDataset, eps: float, study: StudyConfig, device, checkpoint: Path, run_cfg,
                 cache_dir: Path, progress: bool, log, adaptive: list | None = None) -> dict:  # fmt: skip
    """The study protocol on the best checkpoint: clean, the paper's attacks, AutoAttack, worst case; the
    `adaptive` attacks a defense adds run on the attack subset as a stage of their own (cached apart, so a
    record evaluated before they existed gains them without repeating the other stages)."""
    e = study.eval
    sha = file_sha256(checkpoint)
    clean_idx, att_idx, aa_idx = subsets(len(test), e)
    n_att, n_aa = len(att_idx), len(aa_idx)
    kw = dict(batch_size=e.batch_size, device=device, seed=e.seed, progress=progress)

    def clean_stage() -> dict:
        res = evaluate(model, test if clean_idx is None else take(test, clean_idx), [], **kw)
        return {"n": res.n, "accuracy": percent(res.clean_correct), "correct": bits(res.clean_correct),
                "seconds": round(res.seconds, 2),
                "indices": None if clean_idx is None else clean_idx.tolist()}  # fmt: skip

    def attack_stage() -> dict:
        attacks = [a for a in protocol_attacks("paper", eps, "linf") if a.name in STUDY_ATTACKS]
        ds = take(test, att_idx)
        res = evaluate(model, ds, attacks, **kw)
        out = {"indices": att_idx.tolist(), "clean_correct": bits(res.clean_correct),
               "attacks": {a.name: _attack_entry(res, k) for k, a in enumerate(res.attacks)}}  # fmt: skip
        if e.sanity:
            rep = run_sanity(
                model, ds, res, eps, "linf", costly=False, batch_size=e.batch_size, device=device, seed=e.seed
            )
            out["sanity"] = [{"code": c.code, "status": c.status, "detail": c.detail} for c in rep.checks]
        return out

    def adaptive_stage() -> dict:
        res = evaluate(model, take(test, att_idx), adaptive or [], **kw)
        return {"attacks": {a.name: _attack_entry(res, k) for k, a in enumerate(res.attacks)}}

    def autoattack_stage() -> dict:
        res = evaluate(model, take(test, aa_idx), [AutoAttackSpec(eps=eps, norm="linf", seed=e.seed)],
                       cascade=True, **kw)  # fmt: skip
        return {"entry": _attack_entry(res, 0), "clean_correct": bits(res.clean_correct)}

    cache_dir.mkdir(parents=True, exist_ok=True)
    clean = cached_stage(cache_dir / "clean.json", sha, clean_stage, log)
    att = cached_stage(cache_dir / "attacks.json", sha, attack_stage, log)
    attacks = dict(att["attacks"])
    adapt = cached_stage(cache_dir / "adaptive.json", sha, adaptive_stage, log) if adaptive else None
    if adapt is not None:
        attacks.update(adapt["attacks"])
    aa = None
    if n_aa > 0:
        aa = cached_stage(cache_dir / "autoattack.json", sha, autoattack_stage, log)
        attacks["AutoAttack"] = aa["entry"]
    # Worst case per example on the smallest subset every attack ran on (a prefix of the others).
    n_w = n_aa if n_aa > 0 else n_att
    worst = torch.tensor([c == "1" for c in att["clean_correct"][:n_w]])
    for entry in attacks.values():
        worst &= torch.tensor([c == "1" for c in entry["correct"][:n_w]])
    return {
        "protocol": "study: clean on clean_n; FGSM, PGD-20, CW-30 (FSR paper settings) on attack_n; "
        + (f"{', '.join(a.describe()['name'] for a in adaptive)} (adaptive) on attack_n; " if adaptive else "")
        + "AutoAttack standard on autoattack_n; subsets are prefixes of one seeded permutation",
        "eps": eps,
        "norm": "linf",
        "seed": e.seed,
        "clean": {k: clean[k] for k in ("n", "accuracy", "correct", "seconds", "indices")},
        "attack_indices": att["indices"],
        "attacks": attacks,
        "worst_case": {
            "n": n_w,
            "accuracy": percent(worst),
            "correct": bits(worst),
            "attacks": list(attacks),
        },  # fmt: skip
        "sanity": att.get("sanity", []),
        "seconds": round(sum(s["stage_seconds"] for s in (clean, att, adapt, aa) if s is not None), 2),
    }


def reuse_training(plan: StudyPlan, spec: RunSpec, run_dir: Path, log: Callable[[str], None]) -> dict | None:
    """Take over a finished run of a study in `plan.study.reuse` trained from the same config (same hash):
    its run folder is copied to `run_dir` (whole, or not at all) and what trained it is returned for the
    record; None when no such run is on this machine. Only a run whose record exists and names the very
    checkpoint in its folder (same SHA-256) is taken: a run still training or retrained since is not."""
    for other_file in plan.study.reuse:
        other = plan_study(Path(plan.source).parent / other_file)
        for s in other.specs:
            rec_path, src = record_path(other.records_dir, s.run_id), other.runs_dir / s.run_id
            if s.config_sha256 != spec.config_sha256 or not rec_path.is_file() or not (src / LAST).is_file():
                continue
            rec = load_record(rec_path, other.study.id, s.config_sha256)
            best = src / Path(rec["checkpoint"]["file"]).name
            if not best.is_file() or file_sha256(best) != rec["checkpoint"]["sha256"]:
                continue
            tmp = run_dir.with_name(f"{run_dir.name}.copying")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("study-eval", "eval*", TRAINED_BY))
            origin = {"study": other.study.id, "run": s.run_id, "name": rec["config"]["name"], "commit": rec["commit"],
                      "finished": rec["finished"]}  # fmt: skip
            write_json(tmp / TRAINED_BY, origin)  # kept with the weights: an evaluation resumed later still knows
            os.replace(tmp, run_dir)
            log(f"{spec.run_id}: trained as {other.study.id}/{s.run_id} (same config); its run folder copied")
            return origin
    return None


def run_one(plan: StudyPlan, spec: RunSpec, *, progress: bool = False, log: Callable[[str], None] = print) -> Path:
    """Train (or resume, or take over from a study it reuses) one run, evaluate it and write its record;
    returns the record's path."""
    run_dir = plan.runs_dir / spec.run_id
    if run_dir.exists() and not (run_dir / LAST).exists():
        # An attempt stopped before its first checkpoint: nothing to resume. The folder belongs to the
        # study runner (runs/<study>/<run>), so start that run again from scratch.
        shutil.rmtree(run_dir)
    if not run_dir.exists():
        reuse_training(plan, spec, run_dir, log)
    trained_by = read_json(run_dir / TRAINED_BY, "run origin") if (run_dir / TRAINED_BY).is_file() else None
    resume = (run_dir / LAST).exists()
    log(f"{spec.run_id}: {'resuming' if resume else 'training'} in {run_dir}")
    load_start = hardware()
    t0 = time.perf_counter()
    sub_log = lambda s: log(f"  {s}")  # noqa: E731
    # A run taken over keeps the name it was trained under (a name is not part of the result or its hash).
    cfg = replace(spec.cfg, name=trained_by["name"]) if trained_by else spec.cfg
    result = train_run(cfg, run_dir, resume=resume, log=sub_log)
    train_wall = time.perf_counter() - t0
    device = resolve_device(spec.cfg.train.device)
    model, run_cfg, ckpt = load_trained_model(result.best, device)
    ev = None
    if plan.study.eval.test:  # a tuning study (test: false) never looks at the test split
        test = test_split(spec.cfg.data)
        run_cfg, _ = prepare_evaluation(run_cfg, result.best, {}, log=sub_log)  # PSSR: its transfer source
        protocol = STUDY_PROTOCOLS.get(defense_of(spec.cfg))
        ev = protocol(model, test, float(ckpt["eps"]), plan.study, device, result.best, run_cfg,
                      run_dir / "study-eval", progress, log)  # fmt: skip
    hist = result.history
    train_s = sum(h["seconds"] for h in hist)
    record = {
        "schema": SCHEMA,
        "study": plan.study.id,
        "run": spec.run_id,
        "row": spec.row.name,
        "seed": spec.seed,
        "config": to_dict(spec.cfg),
        "config_sha256": spec.config_sha256,
        "commit": git_commit(),
        # Run outputs stay out of the repository: the record names the evaluated checkpoint (in the run
        # folder, not committed) and its hash, so a re-check can verify the weights it was given.
        "checkpoint": {
            "file": result.best.as_posix(),
            "sha256": file_sha256(result.best),
            "best_epoch": ckpt["best"]["epoch"],
            "select": spec.cfg.train.select,
        },
        "metrics": hist,
        "train": {
            "epochs": len(hist),
            "seconds": round(train_s, 1),
            "validation_seconds": round(sum(h.get("val_seconds", 0) for h in hist), 1),
            "images_per_s": round(sum(h["images_per_s"] for h in hist) / max(len(hist), 1), 1),
            # wall time of this invocation only: a resumed run's earlier attempts are in the epochs
            "wall_seconds_this_attempt": round(train_wall, 1),
        },
        "eval": ev,
        **({"trained_by": trained_by} if trained_by else {}),
        "hardware": {"at_start": load_start, "at_end": hardware()},
        "versions": versions(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = record_path(plan.records_dir, spec.run_id)
    write_json(path, record)
    load_record(path, plan.study.id, spec.config_sha256)  # the record we wrote must read back
    if ev is None:
        best = ckpt["best"]["epoch"]
        m = next((h for h in hist if h["epoch"] == best), {})
        log(f"{spec.run_id}: validation at best epoch {best}: clean {m.get('val_clean_acc')} "
            f"robust {m.get('val_robust_acc')} -> {path}")  # fmt: skip
    else:
        acc = {k: f"{v['accuracy']:.2f}" for k, v in ev["attacks"].items()}
        log(
            f"{spec.run_id}: clean {ev['clean']['accuracy']:.2f} {acc} worst {ev['worst_case']['accuracy']:.2f} -> {path}"
        )
    return path
