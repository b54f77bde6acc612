"""PSSR's finding on the results page: finding folders under ROOT/pssr_finding/ rendered from their
per-example results (known answers), and a corrupt or inconsistent folder refused in one line naming
the file."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest

from advmend.study.finding import load_finding
from advmend.study.page import render
from advmend.study.records import RecordError
from advmend.study.render import FINDING_TITLE
from advmend.study.stats import paired_bootstrap

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
N = 10
# One 0/1 string per row, 10 examples. "known": distinct accuracies per row, salient removed - random
# removed = +50 points (0001111100), salient only - random only = -50 (0011111000).
KNOWN = {"clean": "1111111110", "adversarial": "1000000000", "salient removed": "1111111100",
         "salient only": "1100000000", "random removed": "1110000000", "random only": "1111111000",
         "PS only": "1111000000"}  # fmt: skip
# "same": the salient and the random mask give identical per-example results: exactly 0, no finding.
SAME = {"clean": "1111111111", "adversarial": "0000000000", "salient removed": "1110000000",
        "salient only": "0000001111", "random removed": "1110000000", "random only": "0000001111",
        "PS only": "0000000000"}  # fmt: skip


def _ci(a: str, b: str) -> dict:
    # the interval from the statistics module directly (not through the code under test)
    d = np.array([int(x) - int(y) for x, y in zip(a, b)], dtype=np.float64)[None, :]
    m, lo, hi = paired_bootstrap(d, seed=0)
    return {"difference": m, "ci95": [lo, hi], "n_examples": N, "covers_zero": lo <= 0 <= hi}


def _gap(t: dict) -> str:
    lo, hi = t["ci95"]
    return f"{t['difference']:+.2f} points, 95% CI [{lo:+.2f}, {hi:+.2f}] over {N} paired examples"


def _finding(rows: dict, verdict: str, verdict_only: str) -> dict:
    return {
        "schema": "advmend.pssr.finding/1", "command": "advmend pssr-analysis ck.safetensors --out x",
        "checkpoint": "ck.safetensors", "checkpoint_sha256": "ab" * 32, "data": "synthetic", "n_examples": N,
        "subset_seed": 0, "bootstrap_seed": 0, "mask": "alpha", "alpha": 1.0, "rho": 0.2, "fill": 0.0, "eps": 8 / 255,
        "attack": {"name": "PGD-20", "norm": "linf", "step_size": 1 / 255, "random_start": True},
        "removed_pixel_ratio": 37.5,
        "accuracy": {k: {"definition": "?", "accuracy": 100.0 * v.count("1") / N, "correct": v} for k, v in rows.items()},
        "paired_tests": {"salient removed - random removed": _ci(rows["salient removed"], rows["random removed"]),
                         "salient only - random only": _ci(rows["salient only"], rows["random only"])},
        "verdict": verdict, "verdict_only": verdict_only, "seconds": {"total": 1.5},
        "hardware": {"at_start": {"cpu": "test cpu", "cpu_count": 2, "torch_threads": 1}},
        "versions": {"torch": "t", "python": "p"}, "commit": {"sha": "0123456789abcdef", "dirty": False},
    }  # fmt: skip


@pytest.fixture
def root(tmp_path) -> Path:
    """A records root with two finding folders and no study: `known` and `same`."""
    root = tmp_path / "results"
    k = _finding(KNOWN, "", "")
    k["verdict"] = ("removing the salient part helps more than removing a random part of the same size ("
                    + _gap(k["paired_tests"]["salient removed - random removed"]) + ")")  # fmt: skip
    k["verdict_only"] = ("perturbing only the salient part keeps more of the attack than a random part of the same "
                         "size (" + _gap(k["paired_tests"]["salient only - random only"]) + ")")  # fmt: skip
    s = _finding(SAME, "no measurable difference between removing the salient part and a random part of the same "
                 "size (+0.00 points, 95% CI [+0.00, +0.00] over 10 paired examples)",
                 "no measurable difference between perturbing only the salient part and only a random part of the "
                 "same size (+0.00 points, 95% CI [+0.00, +0.00] over 10 paired examples)")  # fmt: skip
    for name, rec in (("known", k), ("same", s)):
        folder = root / "pssr_finding" / name
        folder.mkdir(parents=True)
        (folder / "finding.json").write_text(json.dumps(rec, indent=1))
        (folder / "finding.png").write_bytes(PNG)
    return root


def _section(text: str) -> list[str]:
    return text[text.index(f"## {FINDING_TITLE}") :].splitlines()


def _row(lines: list[str], first: str) -> list[str]:
    hit = [line for line in lines if line.startswith(f"| {first} |")]
    assert len(hit) == 1, (first, hit)
    return [c.strip() for c in hit[0].strip("|").split("|")]


def test_the_section_is_recomputed_from_the_per_example_results(root):
    lines = _section(render(root, plot=False)[0])
    assert _row(lines, "input to f")[2:] == ["known", "same"]
    expect = {"clean": ("90.00", "100.00"), "adversarial": ("10.00", "0.00"), "salient removed": ("80.00", "30.00"),
              "salient only": ("20.00", "40.00"), "random removed": ("30.00", "30.00"),
              "random only": ("70.00", "40.00"), "PS only": ("40.00", "0.00")}  # fmt: skip
    for row, (known, same) in expect.items():
        assert _row(lines, row)[2:] == [known, same], row
    assert not any(line.startswith("| PSSR (gray-box) |") for line in lines)  # no PSSR checkpoint: no such row
    # attack kept: (90 - 20) / (90 - 10) = 87.5 %, (90 - 70) / 80 = 25 %; (100 - 40) / 100 = 60 %
    assert _row(lines, "attack kept by salient only")[2:] == ["87.5", "60.0"]
    assert _row(lines, "attack kept by random only")[2:] == ["25.0", "60.0"]
    known = _row(lines, "known")
    lo, hi = paired_bootstrap(np.array([[0, 0, 0, 1, 1, 1, 1, 1, 0, 0]], dtype=float), seed=0)[1:]
    assert known[1] == f"+50.00 [{lo:+.2f}, {hi:+.2f}]" and lo > 0
    assert known[2] == f"-50.00 [{-hi:+.2f}, {-lo:+.2f}]"  # the mirrored difference: the mirrored interval
    assert _row(lines, "same")[1:] == ["+0.00 [+0.00, +0.00]", "+0.00 [+0.00, +0.00]", "10"]
    text = "\n".join(lines)
    assert "**same**, removing: no measurable difference between removing the salient part" in text
    assert "**same**, keeping only: no measurable difference" in text
    assert "**known**, removing: removing the salient part helps more" in text
    assert "**known**, keeping only: perturbing only the salient part keeps more of the attack" in text
    assert "Command: `advmend pssr-analysis ck.safetensors --out x`" in text
    assert "not the checkpoint of a committed study record" in text


def test_the_picture_is_linked_relative_to_the_page_wherever_the_command_runs(root, tmp_path, monkeypatch):
    text = render(root, plot=False)[0]
    assert "![pssr_finding/known](results/pssr_finding/known/finding.png)" in text
    assert str(tmp_path) not in text
    monkeypatch.chdir(tmp_path)
    assert render(Path("results"), plot=False)[0] == text  # the same page from a relative path elsewhere


def _error(root: Path) -> str:
    with pytest.raises(RecordError) as e:
        render(root, plot=False)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _edit(root: Path, name: str, change) -> Path:
    path = root / "pssr_finding" / name / "finding.json"
    rec = json.loads(path.read_text())
    change(rec)
    path.write_text(json.dumps(rec))
    return path


def test_a_corrupt_finding_file_is_one_line_naming_it(root):
    path = root / "pssr_finding" / "same" / "finding.json"
    path.write_text('{"schema": "advmend.pssr.finding/1", "n_ex')
    msg = _error(root)
    assert str(path) in msg and "corrupt" in msg


@pytest.mark.parametrize("change, words", [
    (lambda r: r["accuracy"]["salient only"].update(accuracy=30.0), "disagrees with its per-example results"),
    (lambda r: r["accuracy"]["random only"].update(correct="111"), "per-example results for n_examples=10"),
    (lambda r: r["accuracy"]["PS only"].update(correct="11110000x0"), "string of 0 and 1"),
    (lambda r: r["accuracy"].pop("random removed"), "'random removed' is missing"),
    (lambda r: r["paired_tests"]["salient only - random only"].update(ci95=[-60.0, -40.0]), "paired test"),
    (lambda r: r.update(verdict="no measurable difference"), "verdict disagrees"),
    (lambda r: r.update(schema="advmend.something/9"), "not an advmend PSSR finding"),
    (lambda r: r.update(checkpoint_sha256="xyz"), "not a SHA-256"),
    (lambda r: r.pop("command"), "'command'"),
])  # fmt: skip
def test_a_finding_that_disagrees_with_its_bits_is_refused(root, change, words):
    path = _edit(root, "known", change)
    msg = _error(root)
    assert msg.startswith(str(path)) and words in msg, msg


def test_a_missing_or_broken_picture_is_refused_naming_it(root):
    png = root / "pssr_finding" / "known" / "finding.png"
    png.write_bytes(b"not a png")
    assert _error(root).startswith(f"{png}: not a PNG")
    png.unlink()
    assert _error(root).startswith(f"{png}: the finding's picture is missing")
    (root / "pssr_finding" / "empty").mkdir()
    assert str(root / "pssr_finding" / "empty" / "finding.json") in _error(root)


def test_the_committed_findings_load_and_match_their_study_records():
    repo = Path(__file__).resolve().parent.parent
    folders = sorted((repo / "docs" / "results" / "pssr_finding").glob("*/finding.json"))
    if not folders:
        pytest.skip("no committed PSSR finding")
    studies = {}
    for p in (repo / "docs" / "results").glob("*/*.json"):
        ck = json.loads(p.read_text()).get("checkpoint")
        if isinstance(ck, dict) and "sha256" in ck:
            studies[ck["sha256"]] = p.stem
    for path in folders:
        rec = load_finding(path.parent)
        assert rec["n_examples"] == 500 and not (path.parent / "grid.png").exists()
        assert studies.get(rec["checkpoint_sha256"]) == path.parent.name  # the study run of the same name


@pytest.mark.slow
def test_pssr_analysis_writes_a_record_the_page_renders_and_its_command_reproduces(tmp_path):
    """End to end on a tiny synthetic classifier: the command stored in finding.json gives the same bits."""
    pytest.importorskip("matplotlib")
    import yaml

    from advmend.cli import main

    cfg = {"name": "finding-page-test", "data": {"name": "synthetic", "val_size": 0, "options": {"n_train": 64, "n_test": 24}},
           "model": {"name": "small_cnn", "options": {"width": 4}},
           "train": {"method": "standard", "epochs": 1, "batch_size": 32, "progress": False},
           "eval": {"after_train": False}}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]) == 0
    out = tmp_path / "results" / "pssr_finding" / "tiny"
    ck = tmp_path / "run" / "best.safetensors"
    assert main(["pssr-analysis", str(ck), "--n-examples", "16", "--steps", "2", "--batch-size", "8",
                 "--grid", "0", "--out", str(out)]) == 0  # fmt: skip
    assert not (out / "grid.png").exists() and (out / "finding.md").is_file()
    rec = load_finding(out)
    assert rec["n_examples"] == 16 and len(rec["checkpoint_sha256"]) == 64 and rec["seconds"]["total"] > 0
    text = render(tmp_path / "results", plot=False)[0]
    assert f"## {FINDING_TITLE}" in text and "(results/pssr_finding/tiny/finding.png)" in text
    argv = shlex.split(rec["command"])
    assert argv[:2] == ["advmend", "pssr-analysis"]
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    assert main(argv[1:]) == 0
    again = load_finding(tmp_path / "again")
    assert {k: v.tolist() for k, v in again["correct"].items()} == {k: v.tolist() for k, v in rec["correct"].items()}
    assert os.path.basename(again["command"].split("--out ")[1]) == "again"
