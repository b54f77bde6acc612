"""The submitit executor of a launch: SLURM (`sbatch`) or local processes, with a job's resources.

submitit is an optional dependency (`pip install "advmend[cluster]"`); `require_launcher` says so in
one line, before anything is written. The sbatch options come from one function, `slurm_parameters`,
so that the script a submission writes can be read back without a cluster (`sbatch_script`).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advmend.errors import ConfigError

LAUNCHERS = ("local", "slurm")
# Seconds between the scheduler's warning signal (USR2, before a time limit or a requeue) and the kill:
# enough for the job to leave its run cleanly; the run resumes from its last saved epoch.
SIGNAL_DELAY_S = 120
# Requeues after a time limit before a job gives up (a preemption does not count against it).
MAX_TIMEOUTS = 3
# sbatch options the launch sets itself: given through --sbatch they would silently conflict.
_OWN_OPTIONS = {"job-name", "partition", "time", "nodes", "ntasks-per-node", "cpus-per-task", "gpus-per-node",
                "mem", "account", "signal", "requeue", "output", "error", "open-mode"}  # fmt: skip


@dataclass(frozen=True)
class Resources:
    """What one job asks for. `tasks_per_node` processes run per node (one per GPU for DDP)."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    sbatch: tuple[str, ...] = ()  # further options: "key=value" or a bare flag ("exclusive")

    def checked(self) -> Resources:
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "time_min"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise ConfigError(f"--mem-gb must be > 0, got {self.mem_gb}")
        extra_sbatch(self.sbatch)
        return self


def extra_sbatch(options: tuple[str, ...]) -> dict[str, Any]:
    """`("qos=high", "exclusive")` -> `{"qos": "high", "exclusive": True}`; a malformed option or one
    the launch sets itself is a ConfigError."""
    out: dict[str, Any] = {}
    for opt in options:
        key, eq, value = opt.removeprefix("--").partition("=")
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", key) or (eq and not value):
            raise ConfigError(f"--sbatch {opt!r}: expected KEY=VALUE or a flag name, e.g. qos=high or exclusive")
        key = key.replace("_", "-")
        if key in _OWN_OPTIONS:
            raise ConfigError(f"--sbatch {opt!r}: {key} is set by the launch itself (see advmend study --help)")
        out[key] = value if eq else True
    return out


def require_launcher(launcher: str):
    """The submitit module for `launcher`, or a one-line ConfigError saying what is missing."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    try:
        import submitit
    except ImportError:
        raise ConfigError(f'--launcher {launcher} needs submitit: pip install "advmend[cluster]"') from None
    if launcher == "slurm" and (shutil.which("sbatch") is None or shutil.which("srun") is None):
        raise ConfigError("--launcher slurm: no SLURM command (sbatch, srun) on this machine; submit from a "
                          "cluster's login node, or try the launch here with --launcher local")  # fmt: skip
    return submitit


def slurm_parameters(res: Resources, name: str) -> dict[str, Any]:
    """The job's sbatch options, as submitit's SlurmExecutor (and its script writer) take them."""
    params: dict[str, Any] = {
        "job_name": name, "time": res.time_min, "nodes": res.nodes, "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task, "signal_delay_s": SIGNAL_DELAY_S,
        # Requeue on preemption or node failure (a cluster may default to no requeue); the job then
        # resumes its run from the last saved epoch.
        "additional_parameters": {"requeue": True, **extra_sbatch(res.sbatch)},
    }  # fmt: skip
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb is not None:
        params["mem"] = f"{int(res.mem_gb)}GB" if res.mem_gb == int(res.mem_gb) else f"{int(res.mem_gb * 1024)}MB"
    if res.partition:
        params["partition"] = res.partition
    if res.account:
        params["account"] = res.account
    return params


def sbatch_script(
    res: Resources, name: str, folder: Path, command: str = "python -u -m submitit.core._submit FOLDER"
) -> str:
    """The sbatch script a SLURM submission with these resources writes (readable without a cluster)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(res, name))


def make_executor(launcher: str, folder: Path, res: Resources, name: str):
    """A submitit executor writing its scripts, pickles and logs under `folder`."""
    submitit = require_launcher(launcher)
    res = res.checked()
    if launcher == "slurm":
        ex = submitit.SlurmExecutor(folder, max_num_timeout=MAX_TIMEOUTS)
        ex.update_parameters(**slurm_parameters(res, name))
        return ex
    if res.nodes != 1:
        raise ConfigError(f"--launcher local runs on this one machine: --nodes must be 1, got {res.nodes}")
    ex = submitit.LocalExecutor(folder, max_num_timeout=MAX_TIMEOUTS)
    ex.update_parameters(timeout_min=res.time_min, tasks_per_node=res.tasks_per_node,
                         gpus_per_node=res.gpus_per_node, signal_delay_s=SIGNAL_DELAY_S)  # fmt: skip
    return ex


def submit(executor, job):
    """executor.submit(job); a scheduler that refuses the job (a wrong partition or account, a limit) is
    a one-line ConfigError quoting it."""
    import subprocess

    from submitit.core.utils import FailedJobError, FailedSubmissionError

    try:
        return executor.submit(job)
    except (FailedSubmissionError, FailedJobError, subprocess.CalledProcessError, OSError) as e:
        detail = getattr(e, "stderr", None) or getattr(e, "output", None) or e
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        raise ConfigError(f"the scheduler refused the job: {str(detail).strip()}") from None
