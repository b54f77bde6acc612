"""`advmend study STUDY.yaml` (train, evaluate and record every run) and `advmend results RECORDS`
(docs/results.md and PNGs from the records alone)."""

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

    r = sub.add_parser("results", help="regenerate docs/results.md and the PNGs from study records")
    r.add_argument("root", nargs="?", default="docs/results", help="records root holding one folder per study")
    r.add_argument("--out", help="the Markdown file (default: ROOT.md, e.g. docs/results.md)")
    r.add_argument("--check", action="store_true", help="do not write: fail if the file differs from what the records give")
    r.add_argument("--no-plot", action="store_true", help="do not draw the PNGs")
    r.set_defaults(func=run_results_command)


def run_study_command(args: argparse.Namespace) -> int:
    from advmend.errors import ConfigError
    from advmend.study.runner import run_study

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
    print(f"{len(submitted)} job(s) submitted" + "".join(f"\n  {s.run_id}: {args.launcher} job {s.job_id}" for s in submitted))
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
    from advmend.study.render import render
    from advmend.io import atomic_write_text

    root = Path(args.root)
    out = Path(args.out) if args.out else root.with_suffix(".md")
    text, pngs = render(root, plot=not (args.no_plot or args.check))
    if args.check:
        if not out.is_file() or out.read_text() != text:
            raise ConfigError(f"{out} differs from what the records under {root} give; run `advmend results {root}`")
        print(f"{out} matches the records")
        return 0
    atomic_write_text(out, text)
    print(f"wrote {out}" + "".join(f", {p}" for p in pngs))
    return 0
