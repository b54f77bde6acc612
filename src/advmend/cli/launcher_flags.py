"""The `--launcher` flags of `advmend study` and `advmend train`: run through a scheduler with submitit
(docs/cluster.md) instead of in this process."""

from __future__ import annotations

import argparse


def add_launcher_flags(p: argparse.ArgumentParser, *, study: bool) -> None:
    g = p.add_argument_group('through a scheduler (pip install "advmend[cluster]"; see docs/cluster.md)')
    what = (
        "each pending run as its own job"
        if study
        else "this training as one job of --nodes x --tasks-per-node DDP ranks"
    )
    g.add_argument(
        "--launcher",
        choices=["slurm", "local"],
        help=f"submit {what} and return once queued (local: processes on this machine)",
    )
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--account", help="SLURM account")
    if study:
        g.add_argument("--gpus", type=int, help="GPUs per run (default: the study's launch.gpus, 1)")
        g.add_argument("--cpus", type=int, help="CPUs per run (default: launch.cpus, 8)")
        g.add_argument(
            "--max-attempts",
            type=int,
            help="launches of a run whose job failed for an error before it is left as failed (default 3)",
        )
    else:
        g.add_argument("--nodes", type=int, help="nodes (default 1)")
        g.add_argument("--gpus-per-node", type=int, help="GPUs per node (default 0)")
        g.add_argument("--tasks-per-node", type=int, help="DDP ranks per node (default: --gpus-per-node, else 1)")
        g.add_argument("--cpus", type=int, help="CPUs per rank (default 8)")
    g.add_argument("--mem-gb", type=float, help="memory per node, GB (default: the partition's)")
    g.add_argument("--time-min", type=int,
                   help="time limit per job, minutes; a job that reaches it is requeued and resumes"
                        + (" (default: launch.time_min, 1440)" if study else " (default 1440)"))  # fmt: skip
    g.add_argument(
        "--sbatch",
        action="append",
        metavar="KEY=VALUE",
        help="a further sbatch option, e.g. --sbatch qos=high --sbatch exclusive (repeatable)",
    )
    g.add_argument("--wait", action="store_true", help="stay until the submitted jobs end, then report them")


def check_launcher_flags(args: argparse.Namespace, names: list[str]) -> None:
    """Resource flags only mean something with --launcher: without it they are an error, not ignored."""
    from advmend.errors import ConfigError

    given = [n for n in names if getattr(args, n, None) not in (None, False)]
    if given and not args.launcher:
        raise ConfigError(f"--{given[0].replace('_', '-')} needs --launcher slurm (or local)")


STUDY_FLAGS = ["partition", "account", "gpus", "cpus", "max_attempts", "mem_gb", "time_min", "sbatch", "wait"]
TRAIN_FLAGS = ["partition", "account", "nodes", "gpus_per_node", "tasks_per_node", "cpus", "mem_gb", "time_min",
               "sbatch", "wait"]  # fmt: skip


def launch_train_command(args: argparse.Namespace, main) -> int:
    """`advmend train CONFIG --launcher ...`: submit `main(resume)` (the command's own training) as one
    job of DDP ranks; print its id and logs (and with --wait, how it ended)."""
    from pathlib import Path

    from advmend.config import load_run_config
    from advmend.launch.executor import Resources
    from advmend.launch.train_job import launch_training

    cfg = load_run_config(args.config, args.overrides)
    out_dir = Path(args.out or cfg.out_dir or Path("runs") / cfg.name)
    gpus = args.gpus_per_node or 0
    res = Resources(nodes=args.nodes or 1, tasks_per_node=args.tasks_per_node or max(gpus, 1), gpus_per_node=gpus,
                    cpus_per_task=args.cpus or 8, mem_gb=args.mem_gb, time_min=args.time_min or 24 * 60,
                    partition=args.partition, account=args.account, sbatch=tuple(args.sbatch or ()))  # fmt: skip
    job = launch_training(main, out_dir, args.launcher, res, resume=args.resume, name=cfg.name)
    print(f"submitted {cfg.name} -> {out_dir}: {args.launcher} job {job.job_id} "
          f"({res.nodes} node(s) x {res.tasks_per_node} rank(s)); logs in {job.paths.folder}")  # fmt: skip
    if not args.wait:
        return 0
    job.wait()
    error = job.exception()
    print(f"{args.launcher} job {job.job_id}: " + ("finished" if error is None else f"failed; see {job.paths.stderr}"))
    return 0 if error is None else 1
