"""A study as one scheduler job per pending (row, seed): `launch_study` submits, `StudyRunJob` runs.

A job calls the study runner for its one run, in the folder the launch was made from, so the run's
folder, claim file, resume and record are exactly those of `advmend study` run by hand. The scheduler's
warning signal (preemption, time limit) ends the attempt through submitit, which requeues the job; the
next attempt resumes the run from its last saved epoch. A job that raised an error is not requeued:
the next launch submits the run again, at most `max_attempts` times in all.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from advmend.errors import ConfigError
from advmend.launch.executor import Resources, make_executor, require_launcher, submit
from advmend.launch.ledger import JOBS, JobState, add_job, launch_lock, run_job_state
from advmend.study.records import RecordError
from advmend.study.runner import StudyPlan, plan_study, run_study
from advmend.study.spec import StudyLaunch

try:  # submitit is optional: without it this class is never submitted (require_launcher stops first)
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover - exercised where submitit is absent
    Checkpointable = object  # type: ignore[assignment,misc]


class StudyRunJob(Checkpointable):
    """One (row, seed) of a study, as a job. Checkpointable: on the scheduler's signal submitit requeues
    this same job, and the runner resumes the run from disk (the job itself keeps no state)."""

    def __init__(self, study_file: str, run_id: str, cwd: str) -> None:
        self.study_file, self.run_id, self.cwd = study_file, run_id, cwd

    def __call__(self) -> list[str]:
        os.chdir(self.cwd)  # the study's relative records/runs folders are the launch's
        return [str(p) for p in run_study(self.study_file, run_ids=[self.run_id])]


@dataclass(frozen=True)
class Submitted:
    run_id: str
    job_id: str


def jobs_dir(plan: StudyPlan) -> Path:
    return plan.runs_dir / JOBS


def resources_for(study: StudyLaunch) -> Resources:
    """One run's job: one task on one node with the study's GPUs, CPUs, memory and time."""
    return Resources(nodes=1, tasks_per_node=1, gpus_per_node=study.gpus, cpus_per_task=study.cpus,
                     mem_gb=study.mem_gb, time_min=study.time_min, partition=study.partition,
                     account=study.account, sbatch=study.sbatch)  # fmt: skip


def launch_study(study_file: str | Path, launcher: str, *, only: list[str] | None = None,
                 max_runs: int | None = None, overrides: dict[str, Any] | None = None,
                 log: Callable[[str], None] = print) -> tuple[list[Submitted], list]:  # fmt: skip
    """Submit every pending run (of the rows in `only`) that has no job that may still run it; returns
    the submissions and the submitit jobs (to wait on). `overrides` replace values of the study's
    `launch:` section (the command line's resources).
    Nothing is written before the records, the rows, submitit and the launcher's commands are checked."""
    plan = plan_study(study_file)  # checks every record first, writes nothing
    if only:
        unknown = sorted(set(only) - {r.name for r in plan.study.rows})
        if unknown:
            raise RecordError(f"--only: no row {unknown[0]!r} in study {plan.study.id!r}")
    wanted = replace(plan.study.launch, **(overrides or {}))
    res = resources_for(wanted).checked()
    if wanted.max_attempts < 1:
        raise ConfigError(f"--max-attempts must be >= 1, got {wanted.max_attempts}")
    require_launcher(launcher)
    folder = jobs_dir(plan)
    submitted: list[Submitted] = []
    jobs: list = []
    with launch_lock(folder):
        executor = make_executor(launcher, folder, res, plan.study.id)
        for spec in plan.pending():
            if only and spec.row.name not in only:
                continue
            if max_runs is not None and len(submitted) >= max_runs:
                break
            state = run_job_state(folder, spec.run_id)
            if state is not None and state.state in ("queued", "running", "unknown"):
                log(f"{spec.run_id}: {state.state} ({state.launcher} job {state.job_id}); not submitted again")
                continue
            if state is not None and state.failures >= wanted.max_attempts:
                log(f"{spec.run_id}: failed {state.failures} time(s) (last: {state.launcher} job {state.job_id}); "
                    f"not submitted again (see `advmend study {study_file} --plan`, or raise --max-attempts)")  # fmt: skip
                continue
            if launcher == "slurm":
                executor.update_parameters(job_name=f"{plan.study.id}/{spec.run_id}")
            # The study file as given (the job starts in this folder): study.json names it as a run by hand does.
            job = submit(executor, StudyRunJob(str(study_file), spec.run_id, os.getcwd()))
            add_job(folder, spec.run_id, launcher, str(job.job_id))
            submitted.append(Submitted(spec.run_id, str(job.job_id)))
            jobs.append(job)
    return submitted, jobs


def launch_states(plan: StudyPlan) -> dict[str, JobState]:
    """The latest job of every run of the study that was ever launched."""
    folder = jobs_dir(plan)
    if not folder.is_dir():
        return {}
    states = {s.run_id: run_job_state(folder, s.run_id) for s in plan.specs}
    return {k: v for k, v in states.items() if v is not None}
