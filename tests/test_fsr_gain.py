"""FSR's gain across studies (results page section, picture, README block) on synthetic records with known
answers: only FSR rows against a non-FSR baseline count, the numbers are the studies' paired differences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_study import _record

from advmend.cli import main
from advmend.config import RunConfig, from_dict
from advmend.study.fsr_gain import fsr_gains, verdict
from advmend.study.page import render
from advmend.study.readme import render_readme
from advmend.study.records import STUDY_FILE, RecordError
from advmend.study.render import load_study_records
from advmend.study.spec import config_digest

N = 100


def _bits(k: int) -> str:
    return "1" * k + "0" * (N - k)


def _config(*, fsr: bool, method: str = "pgd_at", weight: float = 1.0, width: int = 16) -> dict:
    return {"model": {"name": "small_cnn", "options": {"width": width}}, "train": {"method": method},
            "fsr": {"enabled": fsr, "lambda_sep": weight, "lambda_rec": weight}}  # fmt: skip


def _write_study(root: Path, study_id: str, rows: list[dict], records: dict[str, tuple], test: bool = True) -> None:
    """records: run id -> (config, clean bits, AutoAttack bits, seconds)."""
    folder = root / study_id
    folder.mkdir(parents=True)
    runs = {}
    for run, (cfg, clean, aa, seconds) in records.items():
        digest = config_digest(from_dict(RunConfig, cfg))
        rec = _record(run, clean, {"PGD-20": clean, "AutoAttack": aa}, aa, seconds=seconds)
        rec.update(study=study_id, config=cfg, config_sha256=digest)
        (folder / f"{run}.json").write_text(json.dumps(rec))
        runs[run] = {"row": run.rsplit("-s", 1)[0], "seed": int(run.rsplit("-s", 1)[1]), "config_sha256": digest}
    definition = {"id": study_id, "title": study_id, "rows": rows,
                  "eval": {"attack_n": N, "autoattack_n": N, "seed": 0, **({} if test else {"test": False})}}  # fmt: skip
    (folder / STUDY_FILE).write_text(json.dumps({"schema": "advmend.study/1", "id": study_id, "source": "s.yaml",
                                                 "definition": definition, "runs": runs}))  # fmt: skip


def _records_root(tmp_path: Path) -> Path:
    """Two studies: "small" with an FSR row 10 AutoAttack points above PGD-AT on every seed (same clean
    examples), an FSR row identical to PGD-AT, a TRADES row (no FSR) and an FSR row whose baseline has FSR
    too (neither counted); "wide" with an FSR
    row 8 points below its baseline on one seed."""
    root = tmp_path / "results"
    at, fsr = _config(fsr=False), _config(fsr=True, weight=0.3)
    _write_study(root, "small", [
        {"name": "pgdat", "seeds": [0, 1]},
        {"name": "fsr_up", "seeds": [0, 1], "baseline": "pgdat"},
        {"name": "fsr_same", "seeds": [0], "baseline": "pgdat"},
        {"name": "trades", "seeds": [0], "baseline": "pgdat"},
        {"name": "fsr_vs_fsr", "seeds": [0], "baseline": "fsr_same"},
    ], {
        "pgdat-s0": (at, _bits(50), _bits(20), 3600.0), "pgdat-s1": (at, _bits(60), _bits(30), 3600.0),
        "fsr_up-s0": (fsr, _bits(50), _bits(30), 7200.0), "fsr_up-s1": (fsr, _bits(60), _bits(40), 5400.0),
        "fsr_same-s0": (_config(fsr=True), _bits(50), _bits(20), 1800.0),
        "trades-s0": (_config(fsr=False, method="trades"), _bits(40), _bits(30), 3600.0),
        "fsr_vs_fsr-s0": (fsr, _bits(50), _bits(30), 3600.0),
    })  # fmt: skip
    _write_study(root, "wide", [{"name": "pgdat", "seeds": [0]}, {"name": "fsr", "seeds": [0], "baseline": "pgdat"}],
                 {"pgdat-s0": (_config(fsr=False, width=32), _bits(60), _bits(40), 3600.0),
                  "fsr-s0": (_config(fsr=True, width=32), _bits(60), _bits(32), 3600.0)})  # fmt: skip
    _write_study(root, "tuning", [{"name": "pgdat", "seeds": [0]}, {"name": "fsr", "seeds": [0], "baseline": "pgdat"}],
                 {"pgdat-s0": (at, _bits(60), _bits(40), 60.0), "fsr-s0": (fsr, _bits(60), _bits(50), 60.0)},
                 test=False)  # fmt: skip
    return root


def _studies(root: Path):
    return [load_study_records(p.parent) for p in sorted(root.glob(f"*/{STUDY_FILE}"))]


def test_gains_known_answers(tmp_path):
    gains = fsr_gains(_studies(_records_root(tmp_path)))
    # trades has no FSR, fsr_vs_fsr's baseline has it too, the tuning study never saw the test split.
    assert [(g.study, g.row) for g in gains] == [("small", "fsr_up"), ("small", "fsr_same"), ("wide", "fsr")]
    up, same, wide = gains
    assert up.seeds == 2 and up.weight == "0.3" and up.method == "PGD-AT" and up.backbone == "small_cnn (width 16)"
    assert up.diffs["clean"] == (0.0, 0.0, 0.0)  # right on the same clean examples: a zero-width interval
    mean, low, high = up.diffs["AutoAttack"]
    assert mean == 10.0 and 0.0 < low < 10.0 < high  # 10 more examples survive on each seed
    assert up.core_hours == pytest.approx(1.75 * 2) and up.baseline_core_hours == pytest.approx(2.0)  # 2 threads
    assert same.diffs["AutoAttack"] == (0.0, 0.0, 0.0) and same.seeds == 1
    assert wide.diffs["AutoAttack"][0] == -8.0 and wide.backbone == "small_cnn (width 32)"
    assert [verdict(g.diffs["AutoAttack"]) for g in gains] == ["higher", "no measurable difference", "lower"]


def test_results_page_and_picture_carry_the_section(tmp_path):
    root = _records_root(tmp_path)
    text, pngs = render(root, plot=True)
    section = text[text.index("## FSR's gain") :]
    line = next(x for x in section.splitlines() if "fsr_up − pgdat" in x)
    assert "| 0.3 | 2 | 3.50 / 2.00 | +0.00 [+0.00, +0.00] | +10.00 [" in line and line.endswith("| higher |")
    assert "tuning" not in section and "trades" not in section and "fsr_vs_fsr" not in section
    assert root / "fsr_gain.png" in pngs and (root / "fsr_gain.png").stat().st_size > 1000
    assert "](results/fsr_gain.png)" in section


def test_a_study_without_an_fsr_pair_has_no_section(tmp_path):
    root = tmp_path / "results"
    _write_study(root, "plain", [{"name": "pgdat", "seeds": [0]}, {"name": "fsr", "seeds": [0], "baseline": "pgdat"}],
                 {"pgdat-s0": (_config(fsr=False), _bits(50), _bits(20), 60.0)})  # fmt: skip
    text, pngs = render(root, plot=True)
    assert "FSR's gain" not in text and not pngs[1:] and not (root / "fsr_gain.png").exists()


README = (
    "# demo\n\n<!-- results:begin study=small -->\nstale\n<!-- results:end -->\n\nmiddle\n\n"
    "<!-- results:begin study=wide -->\n<!-- results:end -->\n\n<!-- results:begin fsr-gain -->\nold\n"
    "<!-- results:end -->\n\nend\n"
)


def test_readme_blocks_each_rewritten_and_checked(tmp_path, monkeypatch, capsys):
    root = _records_root(tmp_path / "repo" / "docs")
    (tmp_path / "repo" / "README.md").write_text(README)
    out = render_readme(README, root, "README.md")
    assert out is not None and "stale" not in out and "old" not in out
    assert out.startswith("# demo\n\n<!-- results:begin study=small -->\n") and out.endswith("\n\nend\n")
    small, wide, gain = out.split("<!-- results:begin ")[1:]
    assert "| fsr_up | 2/2 |" in small and "| fsr | 1/1 |" not in small and "\n\nmiddle\n\n" in small
    assert "| fsr | 1/1 |" in wide
    assert "`small`: fsr_up − pgdat" in gain and "`wide`: fsr − pgdat" in gain and "lower" in gain
    monkeypatch.chdir(tmp_path / "repo")
    assert main(["results", "docs/results", "--no-plot"]) == 0
    assert main(["results", "docs/results", "--check"]) == 0
    text = (tmp_path / "repo" / "README.md").read_text()
    (tmp_path / "repo" / "README.md").write_text(text.replace("+10.00 [", "+11.00 [", 1))
    capsys.readouterr()
    assert main(["results", "docs/results", "--check"]) == 2
    assert "README.md differs" in capsys.readouterr().err


@pytest.mark.parametrize("readme, why", [
    (README.replace("<!-- results:end -->\n\nmiddle", "\n\nmiddle"), "needs exactly one"),
    (README + "<!-- results:begin fsr-gain -->\n<!-- results:end -->\n", "more than once"),
    (README.replace("study=wide", "study=nope"), "no folder"),
])  # fmt: skip
def test_bad_readme_blocks_are_one_line(tmp_path, readme, why):
    root = _records_root(tmp_path)
    with pytest.raises(RecordError, match=why):
        render_readme(readme, root, "README.md")


def test_an_fsr_gain_block_without_any_pair_is_refused(tmp_path):
    root = tmp_path / "results"
    _write_study(root, "plain", [{"name": "pgdat", "seeds": [0]}],
                 {"pgdat-s0": (_config(fsr=False), _bits(50), _bits(20), 60.0)})  # fmt: skip
    with pytest.raises(RecordError, match="no FSR row"):
        render_readme("<!-- results:begin fsr-gain -->\n<!-- results:end -->\n", root, "README.md")
