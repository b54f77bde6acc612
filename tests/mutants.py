#!/usr/bin/env python
"""Curated mutation check: do the tests catch the bugs they exist to catch?

Each mutant plants one known bug, named by the behaviour it breaks (a snippet of one named function
replaced by a broken one; the function is found wherever it is defined today) in a temporary COPY of src/advmend -- the real tree is never touched -- and runs only the tests that must
catch it, with the copy first on the import path (checked before the tests run). A mutant is
"killed" when those tests fail and "survived" when they all pass: a surviving mutant is a test gap.

    python tests/mutants.py            # all mutants, a table, exit 0 only when every one is killed
    python tests/mutants.py -k fsr     # mutants whose name contains "fsr"
    python tests/mutants.py --list     # the mutants and their tests, without running anything

First the union of all the mutants' tests runs once on an unmutated copy (the baseline): a test
that fails without any bug would "kill" every mutant and prove nothing, so a failing baseline is an
error (exit 2), as is a function that is gone or a snippet that no longer occurs exactly once in it
(the source changed: update the mutant); a function that only moved is followed. docs/testing.md explains how to add a mutant.

Speed: on Linux each mutant's pytest runs in a child forked from this process after torch, pytest and
the other heavy dependencies are imported (advmend itself is not, so each child imports its mutated
copy); that saves ~4 s of imports per mutant. `--no-fork` runs a fresh interpreter per mutant instead.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "advmend"
TIMEOUT_S = 300  # per mutant; a mutant that hangs the tests counts as killed ("timeout")


@dataclass(frozen=True)
class Mutant:
    """One planted bug, named by the behaviour it breaks: in the function `function` (its qualified name,
    e.g. "_step" or "FSRBlock._mask", defined exactly once in src/advmend, in whichever file), `original`
    (exactly once in that function, at any indentation) becomes `replacement`; `tests` (pytest node ids,
    relative to the repository root) must then fail. A function moved to another file, or into a class,
    is still found; a snippet or function that is gone is an error, never a skip."""

    name: str
    function: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    why: str = ""


T_CORE = "tests/test_attack_core_options.py::"
T_ATT = "tests/test_attacks.py::"
T_FSR = "tests/test_fsr.py::"
T_OBJ = "tests/test_objectives.py::"
T_SAN = "tests/test_sanity.py::"
T_PREC = "tests/test_precision.py::"

RESTART_TESTS = (
    T_CORE + "test_each_restart_draws_its_own_random_start",
    T_CORE + "test_more_restarts_fool_strictly_more_examples",
)

MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------ attack core (attacks/pgd.py, modes.py)
    Mutant(
        "pgd-restart-loop-removed", "_pgd_tracked",
        "        for _ in range(cfg.restarts - 1):\n",
        "        for _ in range(0):\n",
        RESTART_TESTS, "restarts > 1 silently runs one attack",
    ),
    Mutant(
        "pgd-restarts-start-at-x", "_pgd_tracked",
        "cand, cand_fooled, cand_loss = _run_once(model, x[todo], y[todo], cfg, generator)",
        "cand, cand_fooled, cand_loss = _run_once(model, x[todo], y[todo], replace(cfg, random_start=False), generator)",
        RESTART_TESTS, "every restart repeats the same deterministic run",
    ),
    Mutant(
        "pgd-restarts-reuse-first-start", "_pgd_tracked",
        "        x_adv, fooled, loss = _run_once(model, x, y, cfg, generator)\n"
        "        for _ in range(cfg.restarts - 1):\n"
        "            assert fooled is not None and loss is not None  # _run_once tracks when restarts > 1\n"
        "            todo = (~fooled).nonzero().squeeze(1)\n"
        "            if todo.numel() == 0:\n"
        "                break\n",
        "        state = generator.get_state() if generator is not None else torch.get_rng_state()\n"
        "        x_adv, fooled, loss = _run_once(model, x, y, cfg, generator)\n"
        "        for _ in range(cfg.restarts - 1):\n"
        "            assert fooled is not None and loss is not None  # _run_once tracks when restarts > 1\n"
        "            todo = (~fooled).nonzero().squeeze(1)\n"
        "            if todo.numel() == 0:\n"
        "                break\n"
        "            generator.set_state(state) if generator is not None else torch.set_rng_state(state)\n",
        RESTART_TESTS[:1], "the random generator is rewound: every restart draws the first run's start",
    ),
    Mutant(
        "pgd-projection-off", "_step",
        "delta = (delta + cfg.alpha * grad.sign()).clamp(-cfg.eps, cfg.eps)",
        "delta = delta + cfg.alpha * grad.sign()",
        (T_ATT + "test_stays_in_ball_and_box",), "L-inf steps leave the eps-ball",
    ),
    Mutant(
        "pgd-box-clamp-removed", "_step",
        "    return (x + delta).clamp(0, 1) - x\n",
        "    return delta\n",
        (T_ATT + "test_stays_in_ball_and_box",), "adversarial images leave [0, 1]",
    ),
    Mutant(
        "pgd-step-sign-flipped", "_step",
        "delta = (delta + cfg.alpha * grad.sign())",
        "delta = (delta - cfg.alpha * grad.sign())",
        (T_CORE + "test_one_step_has_the_step_size_and_ascends", T_ATT + "test_fgsm_on_linear_model_matches_closed_form"),
        "the attack descends the loss",
    ),
    Mutant(
        "pgd-random-start-not-scaled-by-eps", "_random_start",
        "delta = (2 * u - 1) * cfg.eps",
        "delta = 2 * u - 1",
        (T_CORE + "test_uniform_start_fills_the_eps_ball",), "the reference code's defect: a start in [-1, 1]",
    ),
    Mutant(
        "pgd-step-size-ignored", "_step",
        "delta = (delta + cfg.alpha * grad.sign())",
        "delta = (delta + cfg.eps * grad.sign())",
        (T_CORE + "test_one_step_has_the_step_size_and_ascends",), "every L-inf step has length eps",
    ),
    Mutant(
        "pgd-l2-step-not-normalised", "_step",
        "delta = delta + cfg.alpha * grad / g_norm",
        "delta = delta + cfg.alpha * grad",
        (T_CORE + "test_one_step_has_the_step_size_and_ascends",), "L2 steps scale with the gradient",
    ),
    Mutant(
        "attack-modes-not-restored", "attack_mode",
        "        for m, mode in modes:\n            m.training = mode\n",
        "        for m, mode in modes:\n            pass\n",
        (T_ATT + "test_leaves_inputs_modes_and_grads_untouched", T_OBJ + "test_objective_leaves_train_mode_and_gives_gradients"),
        "a training model stays in eval mode after its attack",
    ),
    Mutant(
        "eot-gradients-pooled-across-the-batch", "_input_grad",
        "grad = g if grad is None else grad + g\n",
        "grad = g if grad is None else grad + g.mean(0, keepdim=True)\n",
        (T_CORE + "test_eot_results_do_not_depend_on_the_batch",), "an example's EOT gradient mixes its batch-mates'",
    ),
    # ------------------------------------------------------------------ FSR (defenses/fsr.py)
    Mutant(
        "fsr-y-adv-always-top2", "fsr_terms",
        "        wrong = logits.detach().clone()\n"
        "        wrong.scatter_(1, y[:, None], float(\"-inf\"))\n"
        "        y_adv = wrong.argmax(dim=1)\n",
        "        y_adv = logits.detach().topk(2, dim=1).indices[:, 1]\n",
        (T_FSR + "test_y_adv_is_top1_when_wrong_and_top2_when_right", T_OBJ + "test_pgd_at_fsr_loss_matches_the_spec"),
        "y_adv is the top-2 class even when top-1 is already wrong",
    ),
    Mutant(
        "fsr-recalibrated-logits-from-unrecalibrated-features", "FSRBlock.forward_with_aux",
        "for t in (robust, nonrobust, recalibrated)",
        "for t in (robust, nonrobust, nonrobust)",
        (T_FSR + "test_aux_outputs_follow_the_spec_including_the_recalibrated_branch", T_OBJ + "test_pgd_at_fsr_loss_matches_the_spec"),
        "A(f~-) is computed on f- (L_rec ignores R)",
    ),
    Mutant(
        "fsr-mask-noise-in-eval-mode", "FSRBlock._mask",
        "stochastic = self.training if self.stochastic is None else self.stochastic",
        "stochastic = True if self.stochastic is None else self.stochastic",
        (T_FSR + "test_eval_mode_is_deterministic_train_mode_is_not", T_FSR + "test_aux_outputs_follow_the_spec_including_the_recalibrated_branch"),
        "an evaluated FSR model is random: attacks see another function than the one scored",
    ),
    Mutant(
        "fsr-no-mask-noise-in-training", "FSRBlock._mask",
        "stochastic = self.training if self.stochastic is None else self.stochastic",
        "stochastic = False if self.stochastic is None else self.stochastic",
        (T_FSR + "test_train_mode_mask_draws_logistic_noise", T_FSR + "test_eval_mode_is_deterministic_train_mode_is_not"),
        "training masks are deterministic",
    ),
    Mutant(
        "fsr-tau-ignored", "FSRBlock._mask",
        "return gumbel_sigmoid_mask(z, float(self.tau), stochastic=stochastic)",
        "return gumbel_sigmoid_mask(z, 0.1, stochastic=stochastic)",
        (T_FSR + "test_tau_sets_the_mask_sharpness",), "the block uses tau = 0.1 whatever it was built with",
    ),
    Mutant(
        "fsr-bpda-backward-at-model-tau", "_SigmoidSoftBackward.backward",
        "soft = torch.sigmoid(z / ctx.backward_tau)",
        "soft = torch.sigmoid(z / 0.1)",
        (T_FSR + "test_mask_bpda_gradient_reaches_a_saturated_mask",),
        "the adaptive attack through FSR's mask differentiates the model's own near-step mask",
    ),
    Mutant(
        "fsr-sep-nonrobust-term-on-true-label", "fsr_terms",
        "F.cross_entropy(b.logits_nonrobust, y_adv)",
        "F.cross_entropy(b.logits_nonrobust, y)",
        (T_FSR + "test_y_adv_is_top1_when_wrong_and_top2_when_right", T_OBJ + "test_pgd_at_fsr_loss_matches_the_spec"),
        "L_sep trains A(f-) towards the true class",
    ),
    Mutant(
        "fsr-terms-summed-not-averaged-over-blocks", "fsr_terms",
        "    return sep / n, rec / n\n",
        "    return sep, rec\n",
        (T_OBJ + "test_pgd_at_fsr_loss_matches_the_spec",), "two blocks double the FSR weights",
    ),
    Mutant(
        "fsr-main-path-without-recalibration", "FSRBlock.forward",
        "        return f + inv * self.recalibration(inv * f)\n",
        "        return f\n",
        (T_FSR + "test_block_is_masked_residual_and_aux_matches_forward", T_FSR + "test_tau_sets_the_mask_sharpness"),
        "the evaluated model is the plain backbone",
    ),
    # ------------------------------------------------------------------ objectives (training/)
    Mutant(
        "trades-beta-ignored", "TRADES.__call__",
        "loss = ce + self.beta * kl",
        "loss = ce + TRADES_BETA * kl",
        (T_OBJ + "test_trades_with_fsr_matches_the_spec",), "train.beta has no effect (always 6)",
    ),
    Mutant(
        "mart-kl-weight-dropped", "weighted_kl",
        "return (kl * (1 - p_clean.gather(1, y[:, None]).squeeze(1))).mean()",
        "return kl.mean()",
        (T_OBJ + "test_mart_with_fsr_matches_the_spec",),
        "MART's misclassification weight (1 - p_y(x)) is gone: TRADES-like KL",
    ),
    Mutant(
        "mart-boosted-ce-sign-flipped", "boosted_ce",
        "- torch.log(BCE_CLAMP - top_wrong).mean()",
        "+ torch.log(BCE_CLAMP - top_wrong).mean()",
        (T_OBJ + "test_mart_with_fsr_matches_the_spec",), "the boosting term rewards a confident wrong class",
    ),
    Mutant(
        "fsr-lambda-sep-ignored", "FSRModel.forward_with_loss",
        "lambda_sep * sep + lambda_rec * rec",
        "sep + lambda_rec * rec",
        (T_OBJ + "test_pgd_at_fsr_loss_matches_the_spec",), "fsr.lambda_sep has no effect",
    ),
    Mutant(
        "defense-loss-terms-ignored", "adversarial_forward",
        "if not isinstance(model, AuxiliaryLoss):",
        "if True:",
        (T_OBJ + "test_pgd_at_fsr_loss_matches_the_spec",
         "tests/test_defense_hooks.py::test_a_new_defense_trains_and_evaluates_through_its_registrations"),
        "a model's own loss terms (FSR's, a new defense's) are never added to the objective",
    ),
    Mutant(
        "wrapped-view-hides-defense-loss-terms", "training_view",
        "return _AuxiliaryLossView(wrapped) if isinstance(model, AuxiliaryLoss) else wrapped",
        "return wrapped",
        ("tests/test_distributed.py::test_ddp_keeps_an_fsr_model_own_loss_terms",),
        "under DDP / torch.compile the FSR terms silently drop out of the loss",
    ),
    Mutant(
        "pgd-at-trains-on-clean-inputs", "AdversarialCE.__call__",
        "model, x if x_adv is None else x_adv, y, self.lambda_sep, self.lambda_rec",
        "model, x, y, self.lambda_sep, self.lambda_rec",
        (T_OBJ + "test_pgd_at_trains_on_the_attack_output",), "PGD-AT silently becomes standard training",
    ),
    # ------------------------------------------------------------------ sanity checks (evaluation/sanity.py)
    Mutant(
        "S01-rise-ignored", "check_eps_sweep",
        "status = WARN if rises or sweep[-1][1] > 10.0 else PASS",
        "status = WARN if sweep[-1][1] > 10.0 else PASS",
        (T_SAN + "test_S01_warns_when_accuracy_rises_with_eps",), "accuracy rising with eps is not flagged",
    ),
    Mutant(
        "S03-always-pass", "check_convergence",
        'return Check("S03-convergence", WARN if problems else PASS, values, "; ".join(problems))',
        'return Check("S03-convergence", PASS, values, "")',
        (T_SAN + "test_S03_warns_when_more_steps_undo_the_attack", T_SAN + "test_S03_warns_when_pgd20_has_not_converged"),
        "S03 can never warn",
    ),
    Mutant(
        "S03-scored-on-best-iterate", "_last_iterate_accuracy",
        "attack = replace(attack, keep_best=False, restarts=1)",
        "attack = replace(attack, keep_best=True, restarts=1)",
        (T_SAN + "test_S03_warns_when_more_steps_undo_the_attack",),
        "the old S03: PGD-100 extends PGD-20's run, so 'PGD-100 higher' cannot fire",
    ),
    Mutant(
        "S04-always-pass", "check_restarts",
        'return Check("S04-restarts", PASS if abs(one - five) <= tol else WARN,',
        'return Check("S04-restarts", PASS,',
        (T_SAN + "test_S04_warns_when_restarts_change_the_result",), "S04 can never warn",
    ),
    Mutant(
        "S05-always-pass", "check_fgsm_vs_pgd",
        "status = PASS if pgd_acc <= fgsm_acc else WARN",
        "status = PASS",
        (T_SAN + "test_S05_warns_when_fgsm_beats_pgd",), "S05 can never warn",
    ),
    Mutant(
        "S07-always-pass", "check_noise",
        'return Check("S07-noise", PASS if gap <= tol else WARN,',
        'return Check("S07-noise", PASS,',
        (T_SAN + "test_noise_fragile_model_raises_S07",), "S07 can never warn",
    ),
    Mutant(
        "S08-always-pass", "check_determinism",
        "status = PASS if torch.equal(a, b) else WARN",
        "status = PASS",
        (T_SAN + "test_randomised_model_raises_S08",), "S08 can never warn",
    ),
    Mutant(
        "S09-zero-gradients-not-counted", "check_gradients",
        "zero += (g == 0).all(1).sum()",
        "zero += 0",
        (T_SAN + "test_quantised_model_raises_S09",), "masked (all-zero) gradients are not flagged",
    ),
    Mutant(
        "S11-sigmoid-outputs-not-flagged", "check_logits_not_probabilities",
        "status = WARN if in_unit or prob_rows >= 0.5 else PASS",
        "status = WARN if prob_rows >= 0.5 else PASS",
        (T_SAN + "test_probabilities_model_is_rejected_and_borderline_ones_raise_S11",), "outputs in [0, 1] pass as logits",
    ),
    # ------------------------------------------------------------------ mixed precision (training/precision.py)
    Mutant(
        "grad-scaler-not-restored-on-resume", "Precision.load_state",
        "            self.scaler.load_state_dict(state)\n",
        "            pass\n",
        (T_PREC + "test_fp16_training_uses_and_checkpoints_the_grad_scaler",), "--resume restarts fp16 loss scaling",
    ),
]  # fmt: skip


# --------------------------------------------------------------------------- applying a mutant


class MutantError(Exception):
    """A mutant that no longer fits the source (its snippet is missing or ambiguous)."""


def _definitions(tree: ast.Module):
    """(qualified name, node) of every function in a module, methods as Class.method."""

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not isinstance(child, ast.ClassDef):
                    yield prefix + child.name, child
                yield from walk(child, f"{prefix}{child.name}.")

    yield from walk(tree, "")


def locate(m: Mutant, src: Path = SRC) -> tuple[Path, int, int]:
    """(file relative to src, start, end): the characters of the one definition of `m.function` in src."""
    hits = []
    for path in sorted(src.rglob("*.py")):
        text = path.read_text()
        for qualname, node in _definitions(ast.parse(text)):
            if qualname == m.function:
                lines = text.splitlines(keepends=True)
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                start = sum(len(line) for line in lines[: first - 1])
                hits.append(
                    (path.relative_to(src), start, start + sum(len(x) for x in lines[first - 1 : node.end_lineno]))
                )
    if len(hits) != 1:
        where = "is not defined" if not hits else "is defined in " + ", ".join(str(h[0]) for h in hits)
        raise MutantError(f"{m.name}: function {m.function!r} {where} in src/advmend; update the mutant")
    return hits[0]


def _shift(text: str, d: int) -> str | None:
    """`text` with every line that starts indented moved by d spaces (None when a line has too few)."""
    out = []
    for line in text.splitlines(keepends=True):
        if line.startswith(" "):
            if d < 0 and not line.startswith(" " * -d):
                return None
            line = " " * d + line if d > 0 else line[-d:]
        out.append(line)
    return "".join(out)


def planted(m: Mutant, src: Path = SRC) -> tuple[Path, str]:
    """(file relative to src, its text with the bug planted). The snippet is looked up in the function's
    own source, as written or moved by whole indentation levels (a function moved into or out of a
    class); MutantError unless it occurs exactly once there."""
    rel, start, end = locate(m, src)
    text = (src / rel).read_text()
    body = text[start:end]
    found, tried = [], set()
    for d in (0, 4, -4, 8, -8):
        original, replacement = _shift(m.original, d), _shift(m.replacement, d)
        if original is None or replacement is None or original in tried:  # a snippet without indented lines
            continue
        tried.add(original)
        # An indented snippet starts a line: "    for" must not match inside "        for".
        pattern = ("(?m)^" if m.original.startswith(" ") else "") + re.escape(original)
        found += [(original, replacement, hit.start()) for hit in re.finditer(pattern, body)]
    if len(found) != 1:
        where = "does not occur" if not found else f"occurs {len(found)} times"
        raise MutantError(f"{m.name}: its snippet {where} in {m.function} (src/advmend/{rel}); update the mutant:\n"
                          f"{m.original}")  # fmt: skip
    original, replacement, at = found[0]
    return rel, text[: start + at] + replacement + text[start + at + len(original) :]


def mutated_text(m: Mutant, src: Path = SRC) -> str:
    """The text of the mutant's file with the bug planted (`planted`)."""
    return planted(m, src)[1]


def mutant_file(m: Mutant, src: Path = SRC) -> Path:
    """The file (relative to src) that holds the mutant's function today."""
    return locate(m, src)[0]


def make_copy(dest: Path, m: Mutant | None) -> Path:
    """`dest`/advmend: a fresh copy of src/advmend (no bytecode caches), with `m` planted; returns `dest`."""
    shutil.copytree(SRC, dest / "advmend", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if m is not None:
        rel, text = planted(m)
        (dest / "advmend" / rel).write_text(text)
    return dest


# --------------------------------------------------------------------------- running tests on a copy

CHECK_IMPORT = 99  # exit code of a child that found the wrong advmend on its import path


def _child_env(copy_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy_root), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # never leave (or reuse) bytecode of a mutated file
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    return env


def _pytest_args(tests: tuple[str, ...]) -> list[str]:
    # -x: one failing test is enough to kill a mutant. No cache: the real tree's .pytest_cache stays.
    return ["-x", "-q", "--no-header", "-rfE", "-p", "no:cacheprovider", "-o", "addopts=", *tests]


def _child(copy_root: Path, tests: tuple[str, ...], log: Path) -> None:  # pragma: no cover - runs in a fork
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        os.environ.clear()
        os.environ.update(_child_env(copy_root))
        os.chdir(ROOT)
        sys.path.insert(0, str(copy_root))
        import advmend

        if not Path(advmend.__file__).resolve().is_relative_to(copy_root.resolve()):
            print(f"harness error: advmend imported from {advmend.__file__}, not from the copy {copy_root}")
            code = CHECK_IMPORT
        else:
            import pytest
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # the parent imported torch before
            code = int(pytest.main(_pytest_args(tests)))
    except BaseException as e:  # noqa: BLE001 - report anything, then exit without running parent cleanup
        print(f"harness error in the child: {e!r}")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# The --no-fork runner: the same import check as the forked child, then pytest.
RUNNER = (
    "import sys, pathlib, advmend, pytest\n"
    "if not pathlib.Path(advmend.__file__).resolve().is_relative_to(pathlib.Path(sys.argv[1]).resolve()):\n"
    f"    print('harness error: advmend imported from', advmend.__file__); sys.exit({CHECK_IMPORT})\n"
    "sys.exit(int(pytest.main(sys.argv[2:])))\n"
)


class Job:
    """One pytest run on one copy: a forked child or a fresh interpreter."""

    def __init__(self, label: str, copy_root: Path, tests: tuple[str, ...], log: Path, fork: bool) -> None:
        self.label, self.log, self.start = label, log, time.monotonic()
        self.proc = self.pid = None
        if fork:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # pragma: no cover
                _child(copy_root, tests, log)
            self.pid = pid
        else:
            env = _child_env(copy_root)
            cmd = [sys.executable, "-c", RUNNER, str(copy_root), *_pytest_args(tests)]
            with open(log, "wb") as out:
                self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def poll(self) -> int | None:
        """The exit code (negative: killed by that signal) or None while running."""
        if self.proc is not None:
            return self.proc.poll()
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        return os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start


@dataclass
class Outcome:
    label: str
    result: str  # "killed", "survived", "timeout", "error", or for the baseline "pass"/"FAIL"
    seconds: float
    log: Path
    detail: str = ""
    tests: tuple[str, ...] = field(default_factory=tuple)


def _first_failure(log: Path) -> str:
    """The first FAILED/ERROR line of a pytest log, for the table."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(("FAILED", "ERROR")):
            return line.split(" - ")[0].replace("FAILED ", "").replace("ERROR ", "error ")
    return ""


def run_all(mutants: list[Mutant], jobs: int, fork: bool, workdir: Path, timeout: float = TIMEOUT_S,
            progress=print) -> tuple[Outcome, list[Outcome]]:  # fmt: skip
    """The baseline (every test of `mutants` on an unmutated copy) and one outcome per mutant."""
    for m in mutants:  # fail fast, before any test runs, on a mutant that no longer fits the source
        mutated_text(m)
    baseline_tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
    queue: list[tuple[str, Mutant | None, tuple[str, ...]]] = [("baseline", None, baseline_tests)]
    queue += [(m.name, m, m.tests) for m in mutants]
    running: dict[str, tuple[Job, tuple[str, ...]]] = {}
    done: dict[str, Outcome] = {}
    while queue or running:
        while queue and len(running) < jobs:
            label, m, tests = queue.pop(0)
            root = make_copy(workdir / label, m)
            running[label] = (Job(label, root, tests, workdir / f"{label}.log", fork), tests)
        time.sleep(0.05)
        for label, (job, tests) in list(running.items()):
            code = job.poll()
            if code is None and job.seconds < timeout:
                continue
            if code is None:
                job.kill()
                result, detail = "timeout", f"no result after {timeout:.0f} s"
            elif code == CHECK_IMPORT:
                result, detail = "error", "the copy was not what got imported"
            elif label == "baseline":
                result, detail = ("pass", "") if code == 0 else ("FAIL", _first_failure(job.log))
            elif code == 0:
                result, detail = "survived", "all its tests passed"
            elif code == 1:
                result, detail = "killed", _first_failure(job.log)
            else:  # 2: interrupted/collection error, 4: usage error, 5: no tests collected
                result, detail = "error", f"pytest exit code {code}: see the log"
            done[label] = Outcome(label, result, job.seconds, job.log, detail, tests)
            del running[label]
            progress(f"  {label}: {result} ({job.seconds:.1f} s)")
    return done["baseline"], [done[m.name] for m in mutants]


def table(baseline: Outcome, outcomes: list[Outcome], mutants: list[Mutant]) -> str:
    by_name = {m.name: m for m in mutants}
    width = max(len(o.label) for o in outcomes)
    lines = [f"{'mutant':<{width}}  {'file':<22}  {'result':<8}  {'s':>5}  caught by", "-" * (width + 60)]
    for o in outcomes:
        lines.append(
            f"{o.label:<{width}}  {str(mutant_file(by_name[o.label])):<22}  {o.result:<8}  {o.seconds:5.1f}  {o.detail}"
        )
    killed = [o for o in outcomes if o.result in ("killed", "timeout")]
    survived = [o for o in outcomes if o.result == "survived"]
    errors = [o for o in outcomes if o.result == "error"]
    lines.append("-" * (width + 60))
    lines.append(f"baseline ({len(baseline.tests)} tests, unmutated copy): {baseline.result} ({baseline.seconds:.1f} s)"
                 + (f": {baseline.detail}" if baseline.detail else ""))  # fmt: skip
    lines.append(f"mutants: {len(outcomes)}, killed {len(killed)}, survived {len(survived)}, errors {len(errors)}")
    for o in survived:
        lines.append(f"SURVIVED {o.label}: {by_name[o.label].why}; its tests: {', '.join(o.tests)}")
    for o in errors:
        lines.append(f"ERROR {o.label}: {o.detail} ({o.log})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="select", default="", help="only mutants whose name contains this")
    parser.add_argument("-j", "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="mutants run at once")
    parser.add_argument("--no-fork", action="store_true", help="a fresh interpreter per mutant (slower)")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (copies and logs)")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if args.select in m.name]
    if not mutants:
        print(f"advmend: error: no mutant name contains {args.select!r}", file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.name}  [{m.function} in src/advmend/{mutant_file(m)}]  {m.why}\n    " + "\n    ".join(m.tests))
        return 0
    fork = hasattr(os, "fork") and not args.no_fork
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models; one thread per mutant run is fastest
    if fork:  # the heavy imports the children share; NOT advmend (each child imports its own copy)
        import numpy  # noqa: F401
        import pytest  # noqa: F401
        import torch  # noqa: F401
        import torchvision  # noqa: F401
        import yaml  # noqa: F401
    workdir = Path(tempfile.mkdtemp(prefix="advmend-mutants-"))
    start = time.monotonic()
    try:
        print(f"{len(mutants)} mutants, {args.jobs} at a time, copies under {workdir}", flush=True)
        try:
            baseline, outcomes = run_all(mutants, max(1, args.jobs), fork, workdir)
        except MutantError as e:
            print(f"advmend: error: {e}", file=sys.stderr)
            return 2
        print(table(baseline, outcomes, mutants))
        print(f"total {time.monotonic() - start:.0f} s")
        if baseline.result != "pass":
            print(f"the tests fail WITHOUT any mutant, so no kill means anything; log: {baseline.log}")
            args.keep = True
            return 2
        if any(o.result == "error" for o in outcomes):
            args.keep = True
            return 2
        return 1 if any(o.result == "survived" for o in outcomes) else 0
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
