"""`advmend study STUDY.yaml` (train, evaluate and record every run) and `advmend results RECORDS`
(docs/results.md, its PNGs and the results block of README.md, from the records alone)."""

from __future__ import annotations

import argparse
from pathlib import Path

from advmend.cli.launcher_flags import STUDY_FLAGS, add_launcher_flags, check_launcher_flags


def add_parser(sub) -> None:
    p = sub.add_parser("study", help="run every (config, overrides, seed) of a study and record each finished run")
    p.add_argument("study", help="study YAML (e.g. configs/study/cifar10_cpu.yaml) or bundled name (study/cifar10_cpu)")
    p.add_argument("--only", help="comma-separated rows to run (default: all)")
    p.add_argument("--max-runs", type=int, help="stop after this many runs (each resumes where a kill left it)")
    p.add_argument("--plan", action="store_true", help="only check the records and list what is done and pending")
    p.add_argument("--progress", action="store_true", help="progress bars during evaluation")
    add_launcher_flags(p, study=True)
    p.set_defaults(func=run_study_command)

    r = sub.add_parser(
        "results", help="regenerate docs/results.md, its PNGs and README.md's results table from study records"
    )
    r.add_argument("root", nargs="?", default="docs/results", help="records root holding one folder per study")
    r.add_argument("--out", help="the Markdown file (default: ROOT.md, e.g. docs/results.md)")
    r.add_argument(
        "--check", action="store_true", help="do not write: fail if the file differs from what the records give"
    )
    r.add_argument("--no-plot", action="store_true", help="do not draw the PNGs")
    r.add_argument(
        "--readme",
        help="also rewrite the results block of this file (default: the README.md two "
        "folders above ROOT, e.g. the repository's for docs/results, when it exists; '' for none)",
    )
    r.set_defaults(func=run_results_command)


def run_study_command(args: argparse.Namespace) -> int:
    from advmend.errors import ConfigError
    from advmend.io import check_input_path
    from advmend.study.runner import run_study

    check_input_path(args.study, "study file")
    if args.max_runs is not None and args.max_runs < 0:
        raise ConfigError(f"--max-runs must be >= 0, got {args.max_runs}")
    check_launcher_flags(args, STUDY_FLAGS)
    if args.plan:
        if args.launcher:
            raise ConfigError("--plan shows every launch's jobs: give it without --launcher")
        return print_plan(args.study)
    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    if args.launcher:
        return launch_study_command(args, only)
    written = run_study(args.study, only=only, max_runs=args.max_runs, progress=args.progress)
    print(f"{len(written)} record(s) written" + "".join(f"\n  {p}" for p in written))
    return 0


def print_plan(study_file: str) -> int:
    """Each run: done, pending, or the state of its latest launched job (queued, running, failed with the
    last lines of its log, ended without a record)."""
    from advmend.launch.study_jobs import launch_states
    from advmend.study.runner import plan_study

    plan = plan_study(study_file)
    pending = plan.pending()  # in the order they will run
    jobs = launch_states(plan)
    for s in [s for s in plan.specs if s not in pending] + pending:
        job = jobs.get(s.run_id) if s in pending else None
        if job is None:
            print(f"{'pending' if s in pending else 'done   '} {s.run_id}")
            continue
        failed = f", {job.failures} failed" if job.failures else ""
        state = "pending" if job.state == "ended" else job.state  # ended without a record: launch it again
        print(f"{state:<7} {s.run_id} ({job.launcher} job {job.job_id}{failed})")
        if job.log_tail:
            print("".join(f"    | {line}\n" for line in job.log_tail.splitlines()), end="")
    return 0


def launch_study_command(args: argparse.Namespace, only: list[str] | None) -> int:
    from advmend.launch.ledger import run_job_state
    from advmend.launch.study_jobs import launch_study

    flags = {"partition": args.partition, "account": args.account, "gpus": args.gpus, "cpus": args.cpus,
             "mem_gb": args.mem_gb, "time_min": args.time_min, "max_attempts": args.max_attempts,
             "sbatch": tuple(args.sbatch) if args.sbatch else None}  # fmt: skip
    submitted, jobs = launch_study(args.study, args.launcher, only=only, max_runs=args.max_runs,
                                   overrides={k: v for k, v in flags.items() if v is not None})  # fmt: skip
    print(
        f"{len(submitted)} job(s) submitted"
        + "".join(f"\n  {s.run_id}: {args.launcher} job {s.job_id}" for s in submitted)
    )
    if not args.wait or not jobs:
        return 0
    for job in jobs:
        job.wait()
    folder = jobs[0].paths.folder
    states = {s.run_id: run_job_state(folder, s.run_id) for s in submitted}
    for run_id, st in states.items():
        print(f"  {run_id}: {st.state if st else '?'}")
    return 0 if all(st is not None and st.state == "ended" for st in states.values()) else 1


def run_results_command(args: argparse.Namespace) -> int:
    from advmend.errors import ConfigError
    from advmend.io import atomic_write_text, check_input_path, check_output_path
    from advmend.study.page import render_page
    from advmend.study.readme import render_readme

    root = check_input_path(args.root, "records folder")
    out = Path(args.out) if args.out else root.with_suffix(".md")
    if not args.check:
        check_output_path(out, "--out", folder=False)
    if args.readme is None:  # the repository's README when ROOT is <repo>/docs/results
        default = root.resolve().parent.parent / "README.md"
        readme = default if default.is_file() else None
    else:
        readme = Path(args.readme) if args.readme else None
        if readme is not None and not readme.is_file():
            raise ConfigError(f"--readme {readme}: no such file")
    text, plots = render_page(root)
    # Every text is computed before anything is written (PNGs included): a bad README block leaves the
    # page, the README and the pictures as they were.
    targets = [(out, text)]
    if readme is not None:
        current = readme.read_text()
        block = render_readme(current, root, str(readme))
        if block is not None:
            targets.append((readme, block))
    if args.check:
        for path, expected in targets:
            if not path.is_file() or path.read_text() != expected:
                raise ConfigError(
                    f"{path} differs from what the records under {root} give; run `advmend results {root}`"
                )
        print(" and ".join(str(p) for p, _ in targets) + " match the records")
        return 0
    for path, draw in [] if args.no_plot else plots:
        draw(path)
    for path, expected in targets:
        atomic_write_text(path, expected)
    pngs = "" if args.no_plot else "".join(f", {path}" for path, _ in plots)
    print("wrote " + ", ".join(str(p) for p, _ in targets) + pngs)
    return 0
