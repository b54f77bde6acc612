"""The study runner (skip, resume after a kill, record schema, bad records) and the results renderer
(tables and paired intervals from synthetic records with known answers)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from advmend.cli import main
from advmend.io import file_sha256
from advmend.study.page import render
from advmend.study.records import SCHEMA, STUDY_FILE, RecordError, load_record
from advmend.study.render import _ci, classifier_record, pssr_autoattack_against_classifier
from advmend.study.runner import plan_study, run_study, still_training, subset_indices
from advmend.study.stats import mean_std, paired_bootstrap
from advmend.training import loop as loop_mod

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {
    "name": "tiny",
    "data": {"name": "synthetic", "val_size": 32, "options": {"n_train": 128, "n_test": 48, "image_size": 16}},
    "model": {"name": "small_cnn", "options": {"width": 4}},
    "train": {"method": "pgd_at", "epochs": 3, "batch_size": 32, "lr": 0.05, "schedule": "cosine",
              "attack": {"steps": 2, "step_size": 0.01}, "val_attack": {"steps": 1}, "progress": False,
              "device": "cpu", "deterministic": True},
}  # fmt: skip


def _study(tmp: Path, rows=None, **eval_) -> Path:
    (tmp / "base.yaml").write_text(yaml.safe_dump(BASE))
    study = {
        "id": "tiny", "title": "Tiny", "base": "base.yaml", "records": str(tmp / "rec"), "runs": str(tmp / "runs"),
        "eval": {"attack_n": 24, "autoattack_n": 0, "batch_size": 48, "sanity": False, **eval_},
        "rows": rows or [{"name": "at", "seeds": [0]},
                         {"name": "at_fsr", "overrides": ["fsr.enabled=true", "fsr.hidden=4"], "seeds": [0],
                          "baseline": "at"}],
    }  # fmt: skip
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _quiet(_: str) -> None:
    pass


def test_records_are_written_then_skipped(tmp_path):
    path = _study(tmp_path)
    written = run_study(path, log=_quiet)
    assert [p.name for p in written] == ["at-s0.json", "at_fsr-s0.json"]
    stamp = {p: p.stat().st_mtime_ns for p in written}
    assert run_study(path, log=_quiet) == []  # finished runs are skipped ...
    assert {p: p.stat().st_mtime_ns for p in written} == stamp  # ... and left untouched

    rec = json.loads(written[1].read_text())
    assert rec["schema"] == SCHEMA and rec["study"] == "tiny" and rec["run"] == "at_fsr-s0"
    assert rec["config"]["fsr"]["enabled"] is True and rec["config"]["train"]["seed"] == 0
    assert len(rec["metrics"]) == 3 and rec["train"]["epochs"] == 3
    ev = rec["eval"]
    assert ev["clean"]["n"] == 48 and len(ev["clean"]["correct"]) == 48
    # An FSR row also meets the adaptive attack on its mask (its own cached stage); a plain row does not.
    assert sorted(ev["attacks"]) == ["CW-30", "CW-30 BPDA-mask", "FGSM", "PGD-20", "PGD-20 BPDA-mask"]
    assert sorted(json.loads(written[0].read_text())["eval"]["attacks"]) == ["CW-30", "FGSM", "PGD-20"]
    assert (tmp_path / "runs" / "tiny" / "at_fsr-s0" / "study-eval" / "adaptive.json").is_file()
    assert not (tmp_path / "runs" / "tiny" / "at-s0" / "study-eval" / "adaptive.json").exists()
    assert ev["attacks"]["PGD-20 BPDA-mask"]["settings"]["bpda_backward_tau"] == 1.0
    assert ev["attack_indices"] == subset_indices(48, 0)[:24].tolist()
    for _name, a in ev["attacks"].items():
        assert a["n"] == 24 and len(a["correct"]) == 24
        assert a["accuracy"] == pytest.approx(100 * a["correct"].count("1") / 24)
    # The worst case is the per-example AND of clean (at the same test indices) and every attack.
    clean = [ev["clean"]["correct"][i] == "1" for i in ev["attack_indices"]]
    worst = [c and all(a["correct"][k] == "1" for a in ev["attacks"].values()) for k, c in enumerate(clean)]
    assert ev["worst_case"]["correct"] == "".join("1" if w else "0" for w in worst)
    assert {"cpu", "cpu_count", "torch_threads"} <= set(rec["hardware"]["at_start"])
    # The record names the evaluated checkpoint (in the run folder, never in the records folder) and its hash.
    from advmend.evaluation.run import load_trained_model
    from advmend.io import file_sha256

    weights = Path(rec["checkpoint"]["file"])
    assert weights == tmp_path / "runs" / "tiny" / "at_fsr-s0" / "best.safetensors"
    assert file_sha256(weights) == rec["checkpoint"]["sha256"]
    assert not list((tmp_path / "rec").rglob("*.safetensors"))
    model, cfg, _ = load_trained_model(weights, torch.device("cpu"))
    assert cfg.fsr.enabled


def test_a_study_takes_over_a_run_another_study_trained_from_the_same_config(tmp_path, monkeypatch):
    """A test study that reuses a tuning study: the run with the same config hash is not trained again (its
    weights are the tuning run's, bit for bit, and its record says so); a run whose config differs is."""
    rows = [{"name": "at", "seeds": [0]}]
    tune = _study(tmp_path, rows, test=False)
    tune.rename(tmp_path / "tune.yaml")
    data = yaml.safe_load((tmp_path / "tune.yaml").read_text())
    data["id"] = "tune"
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(data))
    run_study(tmp_path / "tune.yaml", log=_quiet)
    tuned = tmp_path / "runs" / "tune" / "at-s0" / "best.safetensors"

    rows = [{"name": "at", "seeds": [0, 1]}]
    path = _study(tmp_path, rows)
    data = yaml.safe_load(path.read_text())
    data["reuse"] = ["tune.yaml"]
    path.write_text(yaml.safe_dump(data))
    seen: list[str] = []
    real, epochs = loop_mod.train_epoch, []
    monkeypatch.setattr(loop_mod, "train_epoch", lambda *a, **k: epochs.append(1) or real(*a, **k))
    written = run_study(path, log=seen.append)
    assert len(epochs) == 3  # seed 1's three epochs; seed 0 trains none
    recs = {p.stem: json.loads(p.read_text()) for p in written}
    assert recs["at-s0"]["trained_by"]["study"] == "tune" and recs["at-s0"]["trained_by"]["run"] == "at-s0"
    assert "trained_by" not in recs["at-s1"]  # seed 1 has another config: trained here
    assert recs["at-s0"]["checkpoint"]["sha256"] == file_sha256(tuned)
    assert recs["at-s0"]["metrics"] == json.loads((tmp_path / "rec" / "tune" / "at-s0.json").read_text())["metrics"]
    assert any("trained as tune/at-s0" in line for line in seen)
    assert recs["at-s0"]["eval"]["clean"]["n"] == 48  # evaluated on the test split all the same
    assert (tmp_path / "runs" / "tiny" / "at-s0" / "trained_by.json").is_file()
    assert not list((tmp_path / "runs" / "tiny").glob("*.copying"))
    text, _ = render(tmp_path / "rec", plot=False)
    assert "| at-s0 (trained as tune/at-s0, commit " in text  # the per-run table says where it was trained


def test_every_bundled_study_loads_and_a_missing_reuse_is_one_line(tmp_path):
    from advmend.config import CONFIG_DIR
    from advmend.errors import ConfigError

    studies = sorted((CONFIG_DIR / "study").glob("*.yaml"))
    assert len(studies) >= 5
    for path in studies:
        plan_study(path)  # rows resolve, records match, every reused study file exists
    path = _study(tmp_path)
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(dict(data, reuse=["nope.yaml"])))
    with pytest.raises(ConfigError, match="reuse 'nope.yaml' is not a study file"):
        plan_study(path)


def test_subsets_nest_and_do_not_follow_the_class_order():
    perm = subset_indices(10000, 0)
    assert sorted(perm.tolist()) == list(range(10000))
    assert perm[:500].max() > 9000 and perm[:500].min() < 1000  # not a prefix of a class-sorted split
    assert perm.tolist() == subset_indices(10000, 0).tolist()


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _strip(rec: dict) -> dict:
    """A record without what a kill legitimately changes (times, load, the wall time of an attempt)."""
    rec = json.loads(json.dumps(rec))
    for key in ("finished", "hardware", "train", "commit"):
        rec.pop(key)
    for h in rec["metrics"]:
        for k in ("seconds", "images_per_s", "val_seconds"):
            h.pop(k, None)
    ev = rec["eval"]
    ev.pop("seconds")
    ev["clean"].pop("seconds")
    for a in ev["attacks"].values():
        a.pop("seconds")
    return rec


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_record(tmp_path):
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "kill"
    ref_dir.mkdir(), kill_dir.mkdir()
    rows = [{"name": "at", "seeds": [0]}]
    ref = run_study(_study(ref_dir, rows), log=_quiet)[0]

    path = _study(kill_dir, rows)
    cmd = [sys.executable, "-m", "advmend", "study", str(path)]
    last_json = kill_dir / "runs" / "tiny" / "at-s0" / "last.json"
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (last_json.exists() and json.loads(last_json.read_text() or "{}").get("epoch", 0) >= 1):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (kill_dir / "rec" / "tiny" / "at-s0.json").exists(), "the kill came after the record; nothing tested"
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stdout
    got = json.loads((kill_dir / "rec" / "tiny" / "at-s0.json").read_text())
    want = json.loads(ref.read_text())
    assert _strip(got)["eval"] == _strip(want)["eval"]
    assert _strip(got)["metrics"] == _strip(want)["metrics"]
    from advmend.checkpoint import load_checkpoint

    (ref_w, _), (got_w, _) = (
        load_checkpoint(d / "runs" / "tiny" / "at-s0" / "best.safetensors") for d in (ref_dir, kill_dir)
    )
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w) and set(ref_w) == set(got_w)


def test_evaluation_stages_are_cached_across_a_failure(tmp_path, monkeypatch):
    import advmend.study.runner as runner

    path = _study(tmp_path, [{"name": "at", "seeds": [0]}])
    real = runner.evaluate
    calls = []

    def failing(model, ds, attacks, **kw):
        calls.append(len(attacks))
        if attacks:
            raise KeyboardInterrupt  # a stop during the attack stage
        return real(model, ds, attacks, **kw)

    monkeypatch.setattr(runner, "evaluate", failing)
    with pytest.raises(KeyboardInterrupt):
        run_study(path, log=_quiet)
    assert calls == [0, 3]
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: (calls.append(len(a[2])), real(*a, **k))[1])
    logs = []
    run_study(path, log=logs.append)
    assert calls == [0, 3, 3]  # the clean stage was not recomputed
    assert any("clean: cached" in line for line in logs)


# --- bad input: one-line error naming the file, nothing overwritten


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    path = _study(tmp)
    run_study(path, log=_quiet)
    return tmp, path


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, dirs_exist_ok=True)
    study = yaml.safe_load((dst / "study.yaml").read_text())
    study["records"], study["runs"] = str(dst / "rec"), str(dst / "runs")
    (dst / "study.yaml").write_text(yaml.safe_dump(study))
    return dst / "study.yaml"


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("advmend: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_changed_config_is_refused_naming_the_record(finished, tmp_path, capsys):
    path = _copy(finished[0], tmp_path)
    study = yaml.safe_load(path.read_text())
    study["rows"][0]["overrides"] = ["train.lr=0.01"]
    path.write_text(yaml.safe_dump(study))
    rec = tmp_path / "rec" / "tiny" / "at-s0.json"
    before = rec.read_bytes()
    err = _cli_error(capsys, ["study", str(path)])
    assert str(rec) in err and "another config" in err
    assert rec.read_bytes() == before
    # A key that cannot change a result (the progress bar) is not a change.
    study["rows"][0]["overrides"] = ["train.progress=true"]
    path.write_text(yaml.safe_dump(study))
    assert plan_study(path).pending() == []


def test_record_from_another_study_is_refused(finished, tmp_path, capsys):
    path = _copy(finished[0], tmp_path)
    rec = tmp_path / "rec" / "tiny" / "at-s0.json"
    data = json.loads(rec.read_text())
    data["study"] = "other"
    rec.write_text(json.dumps(data))
    err = _cli_error(capsys, ["study", str(path)])
    assert str(rec) in err and "'other'" in err
    assert json.loads(rec.read_text())["study"] == "other"
    err = _cli_error(capsys, ["results", str(tmp_path / "rec"), "--no-plot"])
    assert str(rec) in err
    assert not (tmp_path / "rec.md").exists()


@pytest.mark.parametrize("damage", ["truncated", "not json", "edited accuracy", "wrong length", "renamed"])
def test_corrupt_record_is_refused(finished, tmp_path, capsys, damage):
    path = _copy(finished[0], tmp_path)
    rec = tmp_path / "rec" / "tiny" / "at_fsr-s0.json"
    text = rec.read_text()
    if damage == "truncated":
        rec.write_text(text[: len(text) // 2])
    elif damage == "not json":
        rec.write_bytes(b"\x00\xff garbage")
    elif damage == "edited accuracy":
        data = json.loads(text)
        data["eval"]["attacks"]["PGD-20"]["accuracy"] += 5
        rec.write_text(json.dumps(data))
    elif damage == "wrong length":
        data = json.loads(text)
        data["eval"]["clean"]["correct"] += "1"
        rec.write_text(json.dumps(data))
    else:
        rec.rename(tmp_path / "rec" / "tiny" / "at-s9.json")
        rec = tmp_path / "rec" / "tiny" / "at-s9.json"
    before = rec.read_bytes()
    for argv in (["study", str(path)], ["results", str(tmp_path / "rec"), "--no-plot"]):
        assert str(rec) in _cli_error(capsys, argv)
    assert rec.read_bytes() == before
    assert not (tmp_path / "rec.md").exists()


def test_missing_records_folder_or_study_file(tmp_path, capsys):
    assert "no such records folder" in _cli_error(capsys, ["results", str(tmp_path / "nope")])
    (tmp_path / "rec" / "x").mkdir(parents=True)
    assert "no study folders" in _cli_error(capsys, ["results", str(tmp_path / "rec")])


def test_results_check_detects_a_hand_edit(finished, tmp_path, capsys):
    _copy(finished[0], tmp_path)
    root = tmp_path / "rec"
    assert main(["results", str(root)]) == 0
    md = tmp_path / "rec.md"
    assert (root / "tiny.png").is_file() and "at_fsr − at" in md.read_text()
    assert main(["results", str(root), "--check"]) == 0
    md.write_text(md.read_text().replace("| at |", "| at* |"))
    assert "differs" in _cli_error(capsys, ["results", str(root), "--check"])


# --- the renderer's numbers on synthetic records with known answers


def _default_digest() -> str:
    from advmend.config import RunConfig
    from advmend.study.spec import config_digest

    return config_digest(RunConfig())


def _record(run: str, clean: str, attacks: dict[str, str], worst: str, seconds: float = 60.0) -> dict:
    entry = lambda bits: {"n": len(bits), "accuracy": 100 * bits.count("1") / len(bits), "correct": bits}  # noqa: E731
    return {
        "schema": SCHEMA, "study": "syn", "run": run, "config_sha256": _default_digest(), "config": {},
        "commit": {"sha": "abc", "dirty": False}, "metrics": [{"epoch": 1}],
        "checkpoint": {"best_epoch": 1, "sha256": "y"},
        "train": {"epochs": 1, "seconds": seconds, "images_per_s": 100.0},
        "eval": {"clean": {**entry(clean), "seconds": 1.0}, "attacks": {k: entry(v) for k, v in attacks.items()},
                 "worst_case": entry(worst), "seconds": 1.0},
        "hardware": {"at_start": {"cpu": "cpu", "cpu_count": 2, "torch_threads": 2},
                     "at_end": {"cpu": "cpu", "cpu_count": 2, "torch_threads": 2}},
        "versions": {"torch": "t", "python": "p", "advmend": "a"},
    }  # fmt: skip


def _write_syn(root: Path, records: list[dict], rows: list[dict]) -> None:
    folder = root / "syn"
    folder.mkdir(parents=True)
    sha = _default_digest()  # the synthetic records' config is {}: every value at its default
    runs = {r["run"]: {"row": r["run"].rsplit("-s", 1)[0], "seed": int(r["run"].rsplit("-s", 1)[1]),
                       "config_sha256": sha} for r in records}  # fmt: skip
    for row in rows:
        for s in row["seeds"]:
            runs.setdefault(f"{row['name']}-s{s}", {"row": row["name"], "seed": s, "config_sha256": sha})
    (folder / STUDY_FILE).write_text(json.dumps({
        "schema": "advmend.study/1", "id": "syn", "source": "syn.yaml",
        "definition": {"id": "syn", "title": "Synthetic", "eval": {"attack_n": 100, "autoattack_n": 100, "seed": 0},
                       "rows": rows},
        "runs": runs}))  # fmt: skip
    for r in records:
        (folder / f"{r['run']}.json").write_text(json.dumps(r))


def test_table_and_paired_interval_from_known_records(tmp_path):
    n = 100
    base = lambda k: "1" * k + "0" * (n - k)  # noqa: E731
    records = [
        _record("at-s0", base(40), {"PGD-20": base(20), "AutoAttack": base(10)}, base(10)),
        _record("at-s1", base(50), {"PGD-20": base(30), "AutoAttack": base(20)}, base(20)),
        # The defense is right on exactly 10 more examples than the baseline under AutoAttack, every seed,
        # and on exactly the same ones clean.
        _record("fsr-s0", base(40), {"PGD-20": base(20), "AutoAttack": base(20)}, base(20)),
        _record("fsr-s1", base(50), {"PGD-20": base(30), "AutoAttack": base(30)}, base(30)),
    ]
    rows = [{"name": "at", "seeds": [0, 1]}, {"name": "fsr", "seeds": [0, 1, 2], "baseline": "at"}]
    _write_syn(tmp_path / "rec", records, rows)
    text, _ = render(tmp_path / "rec", plot=False)
    assert "4 of 5 runs finished; still missing: fsr-s2." in text
    # ... | worst | missed by PGD-20 (PGD-20 keeps 10 that AutoAttack breaks, both seeds) | train min | img/s |
    assert (
        "| at | 2/2 | 45.00 ± 7.07 | 25.00 ± 7.07 | 15.00 ± 7.07 | 15.00 ± 7.07 | 10.00 ± 0.00 | 1.0 ± 0.0 | 100 ± 0 |"
        in text
    )
    assert "| fsr | 2/3 | 45.00 ± 7.07 |" in text
    line = next(line for line in text.splitlines() if line.startswith("| fsr − at |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "2"
    assert cells[2] == "+0.00 [+0.00, +0.00]"  # identical clean results: no difference, no spread
    mean, low, high = (float(x) for x in cells[4].replace("[", "").replace("]", "").replace(",", "").split())
    assert mean == 10.0 and 4.0 < low < 10.0 < high < 16.0
    assert cells[-1] == "met"  # +10 AutoAttack points, clean unchanged


def _cells(text: str, row: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {row} |"))
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_masking_indicator_known_answers(tmp_path):
    """missed by PGD-20 = share of AutoAttack's examples that survive PGD-20 but not AutoAttack: identical
    rows differ by exactly 0 (a zero-width interval); a row planted with 20 such examples (of 100) more
    than its baseline differs by +20, whatever their accuracies under each attack alone."""
    n = 100
    bits = lambda *ones: "".join("1" if any(a <= i < b for a, b in ones) else "0" for i in range(n))  # noqa: E731
    # PGD-20 runs on 40 more examples than AutoAttack, whose examples are the first 100 of them.
    at = {"PGD-20": bits((0, 30)) + "1" * 40, "AutoAttack": bits((0, 25))}  # 5 missed by PGD-20
    masked = {"PGD-20": bits((0, 45)) + "1" * 40, "AutoAttack": bits((0, 20))}  # 25 missed: 20 more
    records = [_record("at-s0", bits((0, 60)), at, bits((0, 25))),
               _record("same-s0", bits((0, 60)), at, bits((0, 25))),
               _record("masked-s0", bits((0, 60)), masked, bits((0, 20)))]  # fmt: skip
    rows = [{"name": "at", "seeds": [0]}, {"name": "same", "seeds": [0], "baseline": "at"},
            {"name": "masked", "seeds": [0], "baseline": "at"}]  # fmt: skip
    _write_syn(tmp_path / "rec", records, rows)
    text, _ = render(tmp_path / "rec", plot=False)
    head = _cells(text, "row")
    col = head.index("missed by PGD-20")
    assert _cells(text, "at")[col] == "5.00" and _cells(text, "masked")[col] == "25.00"
    diff_head = _cells(text, "row − baseline")
    dcol = diff_head.index("missed by PGD-20")
    assert _cells(text, "same − at")[dcol] == "+0.00 [+0.00, +0.00]"
    mean, low, high = (float(x) for x in _cells(text, "masked − at")[dcol].strip("[]").replace("[", "")
                       .replace("]", "").replace(",", "").split())  # fmt: skip
    assert mean == 20.0 and 10.0 < low < 20.0 < high < 30.0


def test_an_ablation_is_compared_with_its_parent_as_well_as_judged_against_its_baseline(tmp_path):
    n = 100
    base = lambda k: "1" * k + "0" * (n - k)  # noqa: E731
    records = [
        _record("at-s0", base(40), {"AutoAttack": base(10)}, base(10)),
        _record("fsr-s0", base(40), {"AutoAttack": base(15)}, base(15)),
        _record("abl-s0", base(40), {"AutoAttack": base(20)}, base(20)),  # 5 more than fsr, 10 more than at
    ]
    rows = [{"name": "at", "seeds": [0]}, {"name": "fsr", "seeds": [0], "baseline": "at"},
            {"name": "abl", "seeds": [0], "baseline": "at", "compare": ["fsr"]}]  # fmt: skip
    _write_syn(tmp_path / "rec", records, rows)
    text, _ = render(tmp_path / "rec", plot=False)
    cells = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if " − " in line and line.startswith("| ") and "baseline" not in line
    }
    assert list(cells) == ["fsr − at", "abl − at", "abl − fsr"]  # baselines first, then the comparisons
    assert cells["abl − at"][3].startswith("+10.00") and cells["abl − at"][-1] == "met"
    assert cells["abl − fsr"][3].startswith("+5.00") and cells["abl − fsr"][-1] == "—"  # not judged: not its baseline


def test_an_attack_only_the_defense_ran_is_shown_but_never_paired(tmp_path):
    """FSR's adaptive attack runs on FSR rows only: its column shows the FSR row's accuracy, "—" for the
    baseline, and no paired difference (there is nothing on the other side to pair with)."""
    n = 100
    base = lambda k: "1" * k + "0" * (n - k)  # noqa: E731
    records = [
        _record("at-s0", base(40), {"PGD-20": base(20)}, base(20)),
        _record("fsr-s0", base(40), {"PGD-20": base(30), "PGD-20 BPDA-mask": base(12)}, base(12)),
    ]
    rows = [{"name": "at", "seeds": [0]}, {"name": "fsr", "seeds": [0], "baseline": "at"}]
    _write_syn(tmp_path / "rec", records, rows)
    text, _ = render(tmp_path / "rec", plot=False)
    col = _cells(text, "row").index("PGD-20 BPDA-mask")
    assert _cells(text, "row")[col - 1] == "PGD-20"  # beside the attack it adapts
    assert _cells(text, "fsr")[col] == "12.00" and _cells(text, "at")[col] == "—"
    dcol = _cells(text, "row − baseline").index("PGD-20 BPDA-mask")
    assert _cells(text, "fsr − at")[dcol] == "—"
    assert _cells(text, "fsr − at")[_cells(text, "row − baseline").index("worst")].startswith("-8.00")


@pytest.mark.parametrize("compare", [["nope"], ["abl"], ["at"]])
def test_compare_must_name_another_row_than_the_baseline(tmp_path, compare):
    from advmend.errors import ConfigError
    from advmend.study.spec import load_study

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"id": "s", "rows": [
        {"name": "at"}, {"name": "abl", "baseline": "at", "compare": compare}]}))  # fmt: skip
    with pytest.raises(ConfigError, match="compare"):
        load_study(path)


def test_paired_bootstrap_matches_the_normal_approximation():
    n, k = 4000, 400  # one seed: +1 on 10 % of the examples, 0 elsewhere
    diff = np.zeros((1, n))
    diff[0, :k] = 1
    mean, low, high = paired_bootstrap(diff)
    se = 100 * math.sqrt(0.1 * 0.9 / n)
    assert mean == pytest.approx(10.0)
    assert low == pytest.approx(10 - 1.96 * se, abs=0.25) and high == pytest.approx(10 + 1.96 * se, abs=0.25)
    # Seeds add their own spread: two seeds at +5 and +15 points give a much wider interval.
    two = np.zeros((2, n))
    two[0, : n // 20], two[1, : 3 * n // 20] = 1, 1
    m2, l2, h2 = paired_bootstrap(two)
    assert m2 == pytest.approx(10.0) and l2 < 6 and h2 > 14
    assert paired_bootstrap(two) == (m2, l2, h2)  # seeded: the page is reproducible


def test_mean_std():
    assert mean_std([40.0, 50.0]) == pytest.approx((45.0, math.sqrt(50)))
    assert mean_std([3.0]) == (3.0, None)


def test_load_record_rejects_a_record_of_another_config(finished, tmp_path):
    _copy(finished[0], tmp_path)
    rec = tmp_path / "rec" / "tiny" / "at-s0.json"
    with pytest.raises(RecordError, match="another config"):
        load_record(rec, "tiny", "0" * 64)


def test_runs_are_seed_major_and_claimed_by_one_process(tmp_path):
    from advmend.study.runner import claim

    rows = [{"name": "a", "seeds": [0, 1]}, {"name": "b", "seeds": [0, 1], "baseline": "a"}]
    plan = plan_study(_study(tmp_path, rows))
    assert [s.run_id for s in plan.pending()] == ["a-s0", "b-s0", "a-s1", "b-s1"]
    with claim(tmp_path / "runs", "a-s0") as mine:
        assert mine
        (tmp_path / "runs" / "a-s0.claim").write_text("1")  # pid 1 is alive: another process owns it
        with claim(tmp_path / "runs", "a-s0") as other:
            assert not other
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "runs" / "a-s0.claim").write_text(dead.stdout.strip())  # a killed process's claim
    with claim(tmp_path / "runs", "a-s0") as mine:
        assert mine
    assert not (tmp_path / "runs" / "a-s0.claim").exists()


def test_committed_results_page_matches_its_records():
    """docs/results.md is generated from docs/results/ alone: regenerating it gives the same bytes."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / "docs" / "results").is_dir():
        pytest.skip("no committed study records")
    text, _ = render(repo / "docs" / "results", plot=False)
    assert (repo / "docs" / "results.md").read_text() == text, "run `advmend results docs/results`"


def test_a_config_field_added_since_the_record_takes_its_default(finished, tmp_path):
    """Records stay valid when advmend gains an option: the record's config is resolved with today's
    defaults before it is compared (a value the run really used still has to match)."""
    path = _copy(finished[0], tmp_path)
    rec = tmp_path / "rec" / "tiny" / "at-s0.json"
    data = json.loads(rec.read_text())
    del data["config"]["pssr"]["residual"]  # as written before pssr.residual existed
    data["config_sha256"] = "0" * 64  # the stored hash is informative; the config itself is compared
    rec.write_text(json.dumps(data))
    assert [s.run_id for s in plan_study(path).pending()] == []
    data["config"]["train"]["lr"] = 0.5  # a value the run used differs: refused
    rec.write_text(json.dumps(data))
    with pytest.raises(RecordError, match="another config"):
        plan_study(path)


def test_a_pssr_row_waits_while_its_classifier_is_still_training(tmp_path, monkeypatch):
    """best.safetensors exists from the first epoch on: a PSSR row must not protect a half-trained model."""
    clf = tmp_path / "runs" / "tiny" / "at-s0" / "best.safetensors"
    pssr = {"name": "pssr_at", "seeds": [0], "overrides": ["pssr.enabled=true", f"pssr.classifier={clf.as_posix()}"]}
    path = _study(tmp_path, rows=[{"name": "at", "seeds": [0]}, pssr])
    real, calls = loop_mod.train_epoch, []

    def stop_in_second_epoch(stage, epoch):
        calls.append(epoch)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a stop (a kill, the end of a session) in the middle of the run
        return real(stage, epoch)

    monkeypatch.setattr(loop_mod, "train_epoch", stop_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_study(path, only=["at"], log=_quiet)
    assert clf.is_file() and still_training(clf)
    logs: list[str] = []
    assert run_study(path, only=["pssr_at"], log=logs.append) == []
    assert any("waits for its classifier" in line and "still training" in line for line in logs)
    monkeypatch.setattr(loop_mod, "train_epoch", real)
    assert [p.name for p in run_study(path, only=["at"], log=_quiet)] == ["at-s0.json"]
    assert not still_training(clf)


@pytest.mark.slow
def test_a_pssr_row_protects_another_rows_classifier_and_is_judged_against_it(tmp_path):
    """A row with pssr.enabled trains G in front of another run's checkpoint (waiting while it is
    missing), and its record holds f alone and PSSR on the same examples, every threat model, the
    restoration quality and the transfer source; the renderer adds the paired PSSR table."""
    clf = tmp_path / "runs" / "tiny" / "at-s0" / "best.safetensors"
    pssr = {"name": "pssr_at", "seeds": [0], "overrides": [
        "pssr.enabled=true", "pssr.width=4", "pssr.epochs=1", "pssr.batch_size=32", "pssr.attack.steps=1",
        "pssr.residual=true", f"pssr.classifier={clf.as_posix()}"]}  # fmt: skip
    path = _study(tmp_path, rows=[{"name": "at", "seeds": [0]}, pssr], autoattack_n=8)
    logs: list[str] = []
    assert run_study(path, only=["pssr_at"], log=logs.append) == []  # its classifier does not exist yet
    assert any("waits for its classifier" in line for line in logs)
    written = run_study(path, log=_quiet)
    assert [p.name for p in written] == ["at-s0.json", "pssr_at-s0.json"]
    rec = json.loads(written[1].read_text())
    ev = rec["eval"]
    assert ev["kind"] == "pssr" and rec["config"]["pssr"]["classifier"] == clf.as_posix()
    assert sorted(ev["attacks"]) == sorted(["graybox/PGD-20", "whitebox-bpda-mask/PGD-20", "whitebox-bpda-identity/PGD-20",
                                            "transfer/PGD-20", "whitebox-bpda-mask/AutoAttack"])  # fmt: skip
    assert len(ev["classifier_alone"]["clean"]["correct"]) == ev["clean"]["n"] == 48
    assert len(ev["classifier_alone"]["PGD-20"]["correct"]) == 24 and ev["worst_case"]["n"] == 8
    assert 0 < ev["restoration"]["psnr"] < 100 and ev["surrogate"]["file"].endswith("best.safetensors")
    q = ev["restoration"]  # where the clean images lose: the kept pixels, the holes, the surgery itself
    assert 0 < q["removed"] < 1 and q["psnr_removed"] < 100 and 0 <= q["surgery_interpolated_accuracy"] <= 100
    assert "transfer-surrogate-seed1" in ev["surrogate"]["file"]  # the classifier's recipe, next seed
    # f alone here is the classifier run's own model: its clean bits equal that run's record
    at = json.loads(written[0].read_text())
    assert ev["classifier_alone"]["clean"]["correct"] == at["eval"]["clean"]["correct"]
    assert ev["classifier_alone"]["PGD-20"]["correct"] == at["eval"]["attacks"]["PGD-20"]["correct"]
    text, _ = render(tmp_path / "rec", plot=False)
    assert "PSSR against the classifier it protects" in text and "| pssr_at-s0 |" in text
    assert f"surgery with its holes interpolated {q['surgery_interpolated_accuracy']:.2f} %" in text
    # the classifier's own AutoAttack, found by its results, against AutoAttack on the whole pipeline
    aa = pssr_autoattack_against_classifier(rec, classifier_record(rec, [at]))
    row = next(line for line in text.splitlines() if line.startswith("| pssr_at-s0 | "))
    assert aa is not None and f"| {aa[0]:.2f} | " in row and _ci(aa[1]) in row


def _pssr_pair(n: int = 100, f_aa: int = 40, pipe_aa: int = 25) -> tuple[dict, dict]:
    """A classifier record and a PSSR record in front of it: the same clean and PGD-20 results for f, and
    AutoAttack right on `f_aa` of the first n examples for f alone, `pipe_aa` (a subset) for the pipeline."""
    bits = lambda k, m=n: "1" * k + "0" * (m - k)  # noqa: E731
    f = _record("at-s0", bits(60, 2 * n), {"PGD-20": bits(30, 2 * n), "AutoAttack": bits(f_aa, 2 * n)}, bits(f_aa))
    f["eval"]["attack_indices"] = list(range(2 * n))
    p = _record("pssr_at-s0", bits(58, 2 * n), {"whitebox-bpda-mask/AutoAttack": bits(pipe_aa)}, bits(pipe_aa))
    p["eval"].update(attack_indices=list(range(n)), kind="pssr",
                     classifier_alone={"clean": {"correct": bits(60, 2 * n)}, "PGD-20": {"correct": bits(30, n)}})  # fmt: skip
    return f, p


def test_pssr_against_its_classifiers_autoattack_has_the_planted_answer():
    f, p = _pssr_pair(f_aa=40, pipe_aa=25)
    assert classifier_record(p, [f]) is f
    acc, (mean, low, high) = pssr_autoattack_against_classifier(p, f)
    # 15 of 100 examples lost, none gained
    assert acc == 40.0 and mean == pytest.approx(-15.0) and low < -15.0 < high < 0
    f, p = _pssr_pair(f_aa=30, pipe_aa=30)
    assert pssr_autoattack_against_classifier(p, f)[1] == (0.0, 0.0, 0.0)  # identical: zero, zero width


def test_a_pssr_record_finds_only_its_own_classifier():
    f, p = _pssr_pair()
    other = json.loads(json.dumps(f))
    other["eval"]["clean"]["correct"] = "0" + f["eval"]["clean"]["correct"][1:]  # another model: one result differs
    assert classifier_record(p, [other]) is None and classifier_record(p, [other, f]) is f
    assert classifier_record(p, [f, json.loads(json.dumps(f))]) is None  # two candidates: none is taken
    shifted = json.loads(json.dumps(f))
    shifted["eval"]["attack_indices"] = list(range(1, 201))  # other examples
    assert classifier_record(p, [shifted]) is None
    assert pssr_autoattack_against_classifier(p, None) is None
    fewer = json.loads(json.dumps(f))
    fewer["eval"]["attacks"]["AutoAttack"] = {"n": 50, "correct": "1" * 50}  # f's AutoAttack on fewer examples
    assert pssr_autoattack_against_classifier(p, fewer) is None
