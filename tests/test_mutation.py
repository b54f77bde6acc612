"""The curated mutation check (tests/mutants.py): every planted bug is caught by the tests named for it.

The fast tests keep the mutant list in step with the source (each snippet still occurs exactly once,
each named test still exists); the slow one plants every mutant in a copy of src/advmend and requires
zero survivors. See docs/testing.md.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mutants
import pytest
from mutants import MUTANTS, ROOT, SRC, Mutant, MutantError, make_copy, mutant_file, mutated_text


def test_mutant_names_are_unique_and_each_changes_its_file():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names))
    for m in MUTANTS:
        assert m.original != m.replacement, m.name
        text = mutated_text(m)  # raises MutantError unless the snippet occurs exactly once
        assert text != (SRC / mutant_file(m)).read_text()
        ast.parse(text)  # a planted bug is a wrong program, not a syntax error


def test_every_named_test_exists():
    for m in MUTANTS:
        assert m.tests, m.name
        for node in m.tests:
            path, _, name = node.partition("::")
            source = (ROOT / path).read_text()
            assert f"def {name.split('[')[0]}(" in source, f"{m.name}: no test {node}"


def test_mutants_are_planted_in_a_copy_never_in_the_tree(tmp_path):
    m = MUTANTS[0]
    before = (SRC / mutant_file(m)).read_text()
    root = make_copy(tmp_path, m)
    assert (root / "advmend" / mutant_file(m)).read_text() == mutated_text(m)
    assert (SRC / mutant_file(m)).read_text() == before
    assert not list((root / "advmend").rglob("__pycache__"))  # no stale bytecode can shadow the bug


def _tree_with_step_moved_into_a_class(tmp_path):
    """A copy of src/advmend where attacks/pgd.py's `_step` now lives in a new module, as a static method."""
    import shutil
    import textwrap

    src = tmp_path / "advmend"
    shutil.copytree(SRC, src, ignore=shutil.ignore_patterns("__pycache__"))
    pgd = (src / "attacks" / "pgd.py").read_text()
    start = pgd.index("def _step(")
    end = pgd.index("\ndef ", start + 1)
    (src / "attacks" / "pgd.py").write_text(pgd[:start] + pgd[end + 1 :])
    method = textwrap.indent(pgd[start:end].rstrip() + "\n", "    ")
    (src / "attacks" / "steps.py").write_text("class Steps:\n    @staticmethod\n" + method)
    return src


def test_a_mutant_follows_its_function_when_it_moves(tmp_path):
    src = _tree_with_step_moved_into_a_class(tmp_path)
    m = next(m for m in MUTANTS if m.name == "pgd-step-sign-flipped")
    moved = Mutant(m.name, "Steps._step", m.original, m.replacement, m.tests)
    assert mutant_file(moved, src).as_posix() == "attacks/steps.py"
    text = mutated_text(moved, src)
    assert "delta = (delta - cfg.alpha * grad.sign())" in text or text != (src / "attacks" / "steps.py").read_text()
    ast.parse(text)
    # The function's old name is gone from the tree: an error naming the mutant, never a silent skip.
    with pytest.raises(MutantError, match="pgd-step-sign-flipped: function '_step' is not defined"):
        mutated_text(m, src)


def test_a_stale_or_ambiguous_mutant_is_an_error(tmp_path):
    m = next(m for m in MUTANTS if m.name == "pgd-projection-off")
    with pytest.raises(MutantError, match="does not occur in _step"):
        mutated_text(Mutant(m.name, m.function, m.original + "  # changed", m.replacement, m.tests))
    with pytest.raises(
        MutantError, match="does not occur in _random_start"
    ):  # the snippet is looked up in its function only
        mutated_text(Mutant(m.name, "_random_start", m.original, m.replacement, m.tests))
    src = _tree_with_step_moved_into_a_class(tmp_path)
    with open(src / "attacks" / "more.py", "w") as f:
        f.write("class Steps:\n    def _step(self):\n        pass\n")
    with pytest.raises(MutantError, match="is defined in attacks/more.py, attacks/steps.py"):
        mutated_text(Mutant(m.name, "Steps._step", m.original, m.replacement, m.tests), src)


def test_the_required_mutants_are_listed():
    """Bugs the tests were once blind to, plus the attack core, FSR, objective and sanity ones."""
    required = {
        "pgd-restart-loop-removed", "pgd-restarts-start-at-x", "fsr-y-adv-always-top2",
        "fsr-recalibrated-logits-from-unrecalibrated-features", "S03-always-pass", "S03-scored-on-best-iterate",
        "S04-always-pass", "S05-always-pass", "grad-scaler-not-restored-on-resume", "pgd-projection-off",
        "pgd-box-clamp-removed", "pgd-step-sign-flipped", "pgd-random-start-not-scaled-by-eps",
        "pgd-step-size-ignored", "attack-modes-not-restored", "fsr-mask-noise-in-eval-mode", "fsr-tau-ignored",
        "trades-beta-ignored", "mart-kl-weight-dropped",
    }  # fmt: skip
    assert required <= {m.name for m in MUTANTS}


@pytest.mark.slow
def test_every_mutant_is_killed():
    """Runs `python tests/mutants.py` (about 1 minute on 2 free cores; each mutant runs only its tests)."""
    proc = subprocess.run([sys.executable, str(Path(mutants.__file__))], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200, check=False)  # fmt: skip
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert f"killed {len(MUTANTS)}, survived 0, errors 0" in report, report


def test_docs_list_every_mutant():
    docs = (ROOT / "docs" / "testing.md").read_text()
    missing = [m.name for m in MUTANTS if f"`{m.name}`" not in docs]
    assert not missing, f"add these mutants to the table in docs/testing.md: {missing}"
