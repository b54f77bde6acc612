"""One training run over several nodes as one scheduler job: every task of the job is one DDP rank.

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each process; here each
task reads them from the job's environment (submitit's view of SLURM's, or of the local executor's),
exports them, and runs the same training entry point, so the outputs, checkpoints and resume are those
of a torchrun launch. The entry point is handed in by the caller (`advmend train`'s own command), so
this layer does not reach up into the CLI.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from advmend.errors import ConfigError
from advmend.launch.executor import Resources, make_executor, require_launcher, submit
from advmend.training.loop import LAST

try:  # submitit is optional: without it this class is never submitted (require_launcher stops first)
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover - exercised where submitit is absent
    Checkpointable = object  # type: ignore[assignment,misc]


class TrainJob(Checkpointable):
    """`main(resume)` on every task of the job, as one DDP rank. Checkpointable: on the scheduler's signal
    submitit requeues this job, and the next attempt resumes from the run folder's last checkpoint."""

    def __init__(self, main: Callable[[bool], int], out_dir: str, resume: bool, cwd: str) -> None:
        self.main, self.out_dir, self.resume, self.cwd = main, out_dir, resume, cwd

    def __call__(self) -> int:
        from submitit.helpers import TorchDistributedEnvironment

        os.chdir(self.cwd)
        # Each rank picks its GPU from LOCAL_RANK (training.distributed), as under torchrun: the job's
        # CUDA_VISIBLE_DEVICES is left as the scheduler set it.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        # The launch refused a folder holding a run unless asked to resume, so a `last` found here was
        # written by an earlier attempt of this job (preempted, or over its time limit): continue it.
        return self.main(self.resume or (Path(self.out_dir) / LAST).is_file())


def launch_training(main: Callable[[bool], int], out_dir: Path, launcher: str, res: Resources, *, resume: bool,
                    name: str):  # fmt: skip
    """Submit one training job of `res.nodes` x `res.tasks_per_node` ranks; returns the submitit job.
    The run folder is checked as `advmend train` checks it, before anything is submitted."""
    require_launcher(launcher)
    res = res.checked()
    if not resume and (out_dir / LAST).exists():
        raise ConfigError(f"{out_dir} already holds a run: pass --resume to continue it, or choose another --out")
    if resume and not (out_dir / LAST).exists():
        raise ConfigError(f"--resume: no {LAST} in {out_dir} to resume from")
    executor = make_executor(launcher, out_dir.parent / f"{out_dir.name}.jobs", res, name)
    return submit(executor, TrainJob(main, str(out_dir.resolve()), resume, os.getcwd()))
