"""Which job runs which run of a launched study, and what became of each job.

`<runs>/<study>/jobs/` holds submitit's files (scripts, pickles, logs) and one ledger per run,
`<run>.json`: the launcher and every job submitted for the run, oldest first. A launch submits a run
only when it has no record and no job that may still run it, and not after `max_attempts` jobs
failed for an error; two launches of one study take turns through `launch.lock`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from advmend.errors import ConfigError
from advmend.io import atomic_write_text
from advmend.study.runner import process_alive

JOBS = "jobs"
LOCK = "launch.lock"
LOG_TAIL = 12  # lines of a failed job's log that --plan shows

# SLURM job states (sacct / squeue) and what they mean for the run.
_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING", "SUSPENDED"}
_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "PREEMPTED"}


@dataclass(frozen=True)
class JobState:
    state: str  # queued, running, failed, ended (finished without error), unknown
    job_id: str
    launcher: str
    failures: int  # jobs of this run that failed for an error, this one included
    log_tail: str = ""  # the last lines of a failed job's log


def ledger_path(jobs_dir: Path, run_id: str) -> Path:
    return jobs_dir / f"{run_id}.json"


def read_ledger(jobs_dir: Path, run_id: str) -> dict | None:
    path = ledger_path(jobs_dir, run_id)
    if not path.is_file():
        return None
    try:
        ledger = json.loads(path.read_text())
        assert isinstance(ledger["jobs"], list) and ledger["launcher"] in ("local", "slurm")
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ConfigError(
            f"{path}: not a job ledger advmend wrote; delete it if no job of this run is queued"
        ) from None
    return ledger


def add_job(jobs_dir: Path, run_id: str, launcher: str, job_id: str) -> None:
    ledger = read_ledger(jobs_dir, run_id) or {"launcher": launcher, "jobs": []}
    ledger["launcher"] = launcher
    ledger["jobs"].append({"job_id": job_id, "submitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    jobs_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ledger_path(jobs_dir, run_id), json.dumps(ledger, indent=1) + "\n")


def _result(jobs_dir: Path, job_id: str) -> tuple[str, object] | None:
    """What submitit pickled when the job ended: ("success", value) or ("error", traceback)."""
    path = jobs_dir / f"{job_id}_0_result.pkl"
    if not path.is_file():
        return None
    with path.open("rb") as f:
        return pickle.load(f)  # a tuple of plain values: no code of the job is needed to read it


def _tail(jobs_dir: Path, job_id: str) -> str:
    lines: list[str] = []
    for name in (f"{job_id}_0_log.out", f"{job_id}_0_log.err"):
        p = jobs_dir / name
        if p.is_file():
            lines += p.read_text(errors="replace").splitlines()
    return "\n".join(lines[-LOG_TAIL:])


def _slurm_state(jobs_dir: Path, job_id: str) -> str:
    """The job's state as `sacct` gives it now (UNKNOWN where sacct or submitit cannot be asked)."""
    try:
        import submitit
    except ImportError:
        return "UNKNOWN"
    state = submitit.SlurmJob(jobs_dir, job_id).state or "UNKNOWN"  # a new job makes submitit ask sacct
    return state.split()[0].upper()  # "CANCELLED by 123" -> CANCELLED


def _job_state(jobs_dir: Path, launcher: str, job_id: str) -> tuple[str, bool]:
    """(state, failed for an error) of one job."""
    result = _result(jobs_dir, job_id)
    if result is not None:
        return ("failed", True) if result[0] == "error" else ("ended", False)
    if launcher == "local":
        return ("running", False) if job_id.isdigit() and process_alive(int(job_id)) else ("failed", True)
    state = _slurm_state(jobs_dir, job_id)
    if state in _QUEUED:
        return "queued", False
    if state in _RUNNING:
        return "running", False
    if state == "UNKNOWN":
        return "unknown", False
    return "failed", True  # ended without a result: cancelled, timed out too often, node failure, OOM


def run_job_state(jobs_dir: Path, run_id: str) -> JobState | None:
    """The state of the run's latest job (None: never launched), and how many of its jobs failed."""
    ledger = read_ledger(jobs_dir, run_id)
    if not ledger or not ledger["jobs"]:
        return None
    launcher = ledger["launcher"]
    failures = 0
    state = "unknown"
    for job in ledger["jobs"]:
        state, failed = _job_state(jobs_dir, launcher, str(job["job_id"]))
        failures += failed
    last = str(ledger["jobs"][-1]["job_id"])
    return JobState(state, last, launcher, failures, _tail(jobs_dir, last) if state == "failed" else "")


@contextlib.contextmanager
def launch_lock(jobs_dir: Path, wait_s: float = 300.0):
    """One launch of a study at a time submits (the other waits), so that two launches started together
    cannot both submit a run. A lock whose process ended on this machine is taken over."""
    jobs_dir.mkdir(parents=True, exist_ok=True)
    path = jobs_dir / LOCK
    me = f"{socket.gethostname()} {os.getpid()}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                host, pid = path.read_text().split()
            except (OSError, ValueError):  # gone, or its owner has not written it yet: look again
                host, pid = "", ""
            if host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid)):
                path.unlink(missing_ok=True)  # its launch was killed
                continue
            if time.monotonic() > deadline:
                raise ConfigError(f"{path}: another launch of this study ({host or '?'}, pid {pid or '?'}) is still "
                                  "submitting; delete the file if no launch is running") from None  # fmt: skip
            time.sleep(0.2)
    with os.fdopen(fd, "w") as f:
        f.write(me)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
