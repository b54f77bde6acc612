"""README's results block: rewritten by `advmend results` from the records, verified by `--check`, and the
committed README agrees with the committed records."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_study import _record, _write_syn

from advmend.cli import main
from advmend.study.readme import render_readme

N = 100
REPO = Path(__file__).resolve().parent.parent


def _bits(k: int) -> str:
    return "1" * k + "0" * (N - k)


def _repo(tmp_path: Path, readme: str) -> Path:
    """<tmp>/repo with README.md and docs/results/syn/: the defense is right on exactly 10 more
    examples than its baseline under AutoAttack on every seed, and on the same ones clean and PGD-20."""
    records = [
        _record("at-s0", _bits(40), {"PGD-20": _bits(20), "AutoAttack": _bits(10)}, _bits(10)),
        _record("at-s1", _bits(50), {"PGD-20": _bits(30), "AutoAttack": _bits(20)}, _bits(20)),
        _record("fsr-s0", _bits(40), {"PGD-20": _bits(20), "AutoAttack": _bits(20)}, _bits(20)),
        _record("fsr-s1", _bits(50), {"PGD-20": _bits(30), "AutoAttack": _bits(30)}, _bits(30)),
    ]
    rows = [{"name": "at", "seeds": [0, 1]}, {"name": "fsr", "seeds": [0, 1], "baseline": "at"}]
    repo = tmp_path / "repo"
    _write_syn(repo / "docs" / "results", records, rows)
    (repo / "README.md").write_text(readme)
    return repo


README = "# demo\n\nIntro.\n\n<!-- results:begin study=syn -->\nstale\n<!-- results:end -->\n\nOutro.\n"


def _cells(text: str, row: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {row} |"))
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_results_rewrites_the_readme_block_and_check_catches_a_hand_edit(tmp_path, capsys, monkeypatch):
    repo = _repo(tmp_path, README)
    monkeypatch.chdir(repo)
    assert main(["results", "docs/results", "--no-plot"]) == 0
    text = (repo / "README.md").read_text()
    assert text.startswith("# demo\n\nIntro.\n\n<!-- results:begin study=syn -->\n")  # outside the block: untouched
    assert text.endswith("<!-- results:end -->\n\nOutro.\n") and "stale" not in text
    assert _cells(text, "at") == ["at", "2/2", "45.00 ± 7.07", "25.00 ± 7.07", "15.00 ± 7.07", "—", "—", "—", "—"]
    fsr = _cells(text, "fsr")
    assert fsr[:6] == ["fsr", "2/2", "45.00 ± 7.07", "25.00 ± 7.07", "25.00 ± 7.07", "at (2 seeds)"]
    assert fsr[6] == fsr[7] == "+0.00 [+0.00, +0.00]"  # same examples right clean and under PGD-20
    mean, low, high = (float(x) for x in fsr[8].replace("[", "").replace("]", "").replace(",", "").split())
    assert mean == 10.0 and 4.0 < low < 10.0 < high < 16.0
    # The block's interval is the results page's own (one computation of the paired difference).
    page = (repo / "docs" / "results.md").read_text()
    assert _cells(page, "fsr − at")[4] == fsr[8]
    capsys.readouterr()
    assert main(["results", "docs/results", "--check"]) == 0
    assert "README.md match the records" in capsys.readouterr().out
    (repo / "README.md").write_text(text.replace("45.00 ± 7.07", "46.00 ± 7.07", 1))
    assert main(["results", "docs/results", "--check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "README.md differs" in err


@pytest.mark.parametrize("readme, why", [
    (README.replace("<!-- results:end -->\n", ""), "exactly one"),
    (README + "<!-- results:begin study=syn -->\n<!-- results:end -->\n", "exactly one"),
    ("<!-- results:end -->\n" + README.replace("<!-- results:end -->\n", ""), "exactly one"),
    (README.replace("study=syn", "study=nope"), "no folder"),
])  # fmt: skip
def test_a_bad_block_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, readme, why):
    repo = _repo(tmp_path, readme)
    monkeypatch.chdir(repo)
    assert main(["results", "docs/results"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and why in err and "README.md" in err
    assert not (repo / "docs" / "results.md").exists()  # the page is not written either
    assert not list((repo / "docs" / "results").glob("*.png"))  # nor its pictures
    assert (repo / "README.md").read_text() == readme


def test_a_readme_without_a_block_is_left_alone(tmp_path, monkeypatch, capsys):
    repo = _repo(tmp_path, "# demo\n\nNo table here.\n")
    monkeypatch.chdir(repo)
    assert main(["results", "docs/results", "--no-plot"]) == 0
    assert (repo / "README.md").read_text() == "# demo\n\nNo table here.\n"
    assert main(["results", "docs/results", "--check"]) == 0
    assert main(["results", "docs/results", "--check", "--readme", "missing.md"]) == 2
    assert "missing.md: no such file" in capsys.readouterr().err


def test_readme_option_names_the_file_and_empty_turns_it_off(tmp_path, monkeypatch):
    repo = _repo(tmp_path, "# demo\n")
    other = tmp_path / "FRONT.md"
    other.write_text(README)
    monkeypatch.chdir(repo)
    assert main(["results", "docs/results", "--no-plot", "--readme", str(other)]) == 0
    assert "| fsr | 2/2 |" in other.read_text()
    other.write_text(README)
    assert main(["results", "docs/results", "--no-plot", "--readme", ""]) == 0
    assert other.read_text() == README


def test_committed_readme_block_matches_its_records():
    """The README's central table is what `advmend results docs/results` gives from the committed records."""
    readme = REPO / "README.md"
    if not (REPO / "docs" / "results").is_dir():
        pytest.skip("no committed study records")
    text = readme.read_text()
    expected = render_readme(text, REPO / "docs" / "results", str(readme))
    assert expected is not None, "README.md has no results block"
    assert text == expected, "run `advmend results docs/results`"
