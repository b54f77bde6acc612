"""One DDP training as one launched job: 2 local tasks with the gloo backend, ranks and rendezvous from
the job's environment, end with the weights of 1 process (as under torchrun, tests/test_distributed.py)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_distributed import (  # noqa: F401 (no_batchnorm: a fixture)
    _build_without_batchnorm,
    _cfg,
    assert_matches_one_process,
    no_batchnorm,
)

import advmend.training.loop as loop_mod
from advmend.checkpoint import load_checkpoint
from advmend.training.loop import train

submitit = pytest.importorskip("submitit")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _rank_main(out: str, resume: bool) -> int:
    """What each task runs: the torchrun test's training, without BatchNorm (see its _cfg)."""
    torch.set_num_threads(1)
    loop_mod.build_model = _build_without_batchnorm  # this task's own copy of the module
    train(_cfg(), out, resume=resume, log=print)  # rank 0 alone logs
    return int(os.environ["RANK"])


@pytest.fixture
def job_env(monkeypatch):
    """The tasks import this module and test_distributed by name, as pytest does here; one thread each."""
    tests = str(Path(__file__).resolve().parent)
    src = str(Path(__file__).resolve().parents[1] / "src")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([src, tests, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _launch(out: Path):
    from advmend.launch.executor import Resources
    from advmend.launch.train_job import launch_training

    res = Resources(nodes=1, tasks_per_node=2, time_min=60)  # over 10 min: a signal before 80% is a preemption
    return launch_training(functools.partial(_rank_main, str(out)), out, "local", res, resume=False, name="ddp")


@pytest.mark.slow
@pytest.mark.usefixtures("no_batchnorm", "job_env")
def test_two_launched_gloo_tasks_match_one_process(tmp_path):
    single = tmp_path / "single"
    h_single = train(_cfg(), single, log=lambda s: None).history
    ddp = tmp_path / "ddp"
    job = _launch(ddp)
    assert sorted(job.results()) == [0, 1], job.stderr()  # both ranks ran to the end

    assert_matches_one_process(single, ddp, h_single)
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
    assert (tmp_path / "ddp.jobs").is_dir() and not (ddp / "ddp.jobs").exists()  # job files beside the run


def _rank0_task(controller: int) -> int:
    """The process of rank 0 among the local job's tasks (children of its controller)."""
    for pid in Path(f"/proc/{controller}/task/{controller}/children").read_text().split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if b"SUBMITIT_LOCAL_GLOBALID=0" in env:
            return int(pid)
    raise AssertionError("no rank 0 task")


@pytest.mark.slow
@pytest.mark.usefixtures("no_batchnorm", "job_env")
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the job's processes through /proc")
def test_a_preempted_ddp_job_is_requeued_and_resumes_to_the_same_weights(tmp_path):
    import signal
    import time

    single = tmp_path / "single"
    train(_cfg(), single, log=lambda s: None)
    ddp = tmp_path / "ddp"
    job = _launch(ddp)
    deadline = time.monotonic() + 180
    while not (ddp / "last.json").exists():  # after epoch 1 of 2
        assert job.state == "RUNNING" and time.monotonic() < deadline, job.stderr()
        time.sleep(0.01)
    os.kill(_rank0_task(int(job.job_id)), signal.SIGUSR2)  # the scheduler's warning before a requeue
    assert sorted(job.results()) == [0, 1], job.stderr()
    assert "this job is preempted" in job.stderr() and "resuming" in job.stdout()
    ref, _ = load_checkpoint(single / "last.safetensors")
    got, record = load_checkpoint(ddp / "last.safetensors")
    assert record["world_size"] == 2 and record["epoch"] == 2
    for k in ref:
        assert torch.allclose(got[k].double(), ref[k].double(), rtol=1e-4, atol=1e-5), k
