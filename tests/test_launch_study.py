"""A study launched as one job per run through submitit's local executor (the SLURM path's twin):
records equal those of the in-process runner, a preempted job resumes, a failing job is retried a
bounded number of times, two launches never train a run twice; and the SLURM script and errors."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_study import _quiet, _strip, _study

from advmend.study.runner import run_study

submitit = pytest.importorskip("submitit")
pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [{"name": "at", "seeds": [0, 1]}, {"name": "at_fsr", "overrides": ["fsr.enabled=true", "fsr.hidden=4"],
                                          "seeds": [0, 1], "baseline": "at"}]  # fmt: skip


@pytest.fixture
def job_env(monkeypatch):
    """Local jobs are processes of their own: one thread each, this checkout's advmend."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))


def _launch(path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "advmend", "study", str(path), "--launcher", "local", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=path.parent)


def _plan(path: Path) -> str:
    res = subprocess.run([sys.executable, "-m", "advmend", "study", str(path), "--plan"], capture_output=True,
                         text=True, cwd=path.parent)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout


def _trainings(jobs: Path) -> list[str]:
    """Every 'training/resuming in' line the jobs printed: one per run and attempt."""
    return sorted(line.split(":")[0] for p in jobs.glob("*_log.out") for line in p.read_text().splitlines()
                  if ": training in " in line)  # fmt: skip


def _ledgers(jobs: Path) -> dict[str, list[str]]:
    return {p.stem: [j["job_id"] for j in json.loads(p.read_text())["jobs"]]
            for p in jobs.glob("*.json")}  # fmt: skip


@pytest.mark.slow
def test_launched_study_writes_the_in_process_records_once(tmp_path, job_env):
    ref_dir, launch_dir = tmp_path / "ref", tmp_path / "launch"
    ref_dir.mkdir(), launch_dir.mkdir()
    ref = run_study(_study(ref_dir, ROWS), log=_quiet)
    path = _study(launch_dir, ROWS)
    res = _launch(path, "--wait")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 job(s) submitted" in res.stdout
    jobs = launch_dir / "runs" / "tiny" / "jobs"
    assert _trainings(jobs) == ["at-s0", "at-s1", "at_fsr-s0", "at_fsr-s1"]  # each run trained by one job
    ledgers = _ledgers(jobs)
    assert sorted(ledgers) == ["at-s0", "at-s1", "at_fsr-s0", "at_fsr-s1"] and all(
        len(v) == 1 for v in ledgers.values()
    )
    for run_id, (job_id,) in ledgers.items():  # each job wrote its own run's record, and no other
        status, records = pickle.loads((jobs / f"{job_id}_0_result.pkl").read_bytes())
        assert status == "success" and [Path(r).name for r in records] == [f"{run_id}.json"]
    for want in ref:
        got = json.loads((launch_dir / "rec" / "tiny" / want.name).read_text())
        w = json.loads(want.read_text())
        assert _strip(got)["eval"] == _strip(w)["eval"], want.name
        assert _strip(got)["metrics"] == _strip(w)["metrics"], want.name
    assert _plan(path).split() == ["done", "at-s0", "done", "at-s1", "done", "at_fsr-s0", "done", "at_fsr-s1"]
    again = _launch(path)  # nothing left to do: nothing submitted
    assert again.returncode == 0 and "0 job(s) submitted" in again.stdout


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the job's process through /proc")
# submitit reads the warning signal as a time limit when the job has run 80% of its time or is within
# 10 minutes of it (always, with a 5-minute limit), else as a preemption: both requeue the job.
@pytest.mark.parametrize("case, time_min", [("preempted", 24 * 60), ("timed-out", 5)])
def test_a_preempted_job_is_requeued_and_resumes_to_the_uninterrupted_record(tmp_path, job_env, monkeypatch, case,
                                                                             time_min):  # fmt: skip
    from advmend.launch.study_jobs import launch_states, launch_study
    from advmend.study.runner import plan_study

    rows = [{"name": "at", "seeds": [0]}]
    ref_dir, pre_dir = tmp_path / "ref", tmp_path / "pre"
    ref_dir.mkdir(), pre_dir.mkdir()
    ref = run_study(_study(ref_dir, rows), log=_quiet)[0]
    path = _study(pre_dir, rows)
    monkeypatch.chdir(pre_dir)
    _, (job,) = launch_study(path, "local", overrides={"time_min": time_min}, log=_quiet)
    state = launch_states(plan_study(path))["at-s0"]
    assert (state.state, state.job_id, state.launcher, state.failures) == ("running", job.job_id, "local", 0)
    last_json = pre_dir / "runs" / "tiny" / "at-s0" / "last.json"
    deadline = time.monotonic() + 180
    while not (last_json.exists() and json.loads(last_json.read_text() or "{}").get("epoch", 0) >= 1):
        assert job.state == "RUNNING", job.stderr()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # What a scheduler does before preempting or at the time limit: the warning signal to the job's task.
    (task,) = _children(int(job.job_id))
    os.kill(task, signal.SIGUSR2)
    job.wait()
    out = job.stdout()
    assert f"this job is {case}" in job.stderr() and "resuming" in out, out
    got = json.loads((pre_dir / "rec" / "tiny" / "at-s0.json").read_text())
    assert got["train"]["epochs"] == 3 and len(got["metrics"]) == 3
    want = json.loads(ref.read_text())
    assert _strip(got)["eval"] == _strip(want)["eval"]
    assert _strip(got)["metrics"] == _strip(want)["metrics"]


@pytest.mark.slow
def test_a_failing_job_is_launched_a_bounded_number_of_times_and_shown_failed(tmp_path, job_env, monkeypatch):
    path = _study(tmp_path, [{"name": "at", "seeds": [0]}])
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["data"] = {"name": "cifar10", "val_size": 32}  # the jobs find no CIFAR-10 files: a real error
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    monkeypatch.setenv("ADVMEND_DATA", str(tmp_path / "no-data"))
    for _attempt in (1, 2):
        res = _launch(path, "--max-attempts", "2", "--wait")
        assert res.returncode == 1 and "1 job(s) submitted" in res.stdout, res.stdout + res.stderr
    res = _launch(path, "--max-attempts", "2")
    assert res.returncode == 0 and "0 job(s) submitted" in res.stdout and "failed 2 time(s)" in res.stdout
    jobs = tmp_path / "runs" / "tiny" / "jobs"
    assert len(_ledgers(jobs)["at-s0"]) == 2
    plan = _plan(path)
    assert plan.startswith("failed  at-s0 (local job") and "2 failed" in plan
    assert "    | " in plan and "cifar10" in plan.lower()  # the last lines of the failed job's log
    assert not (tmp_path / "rec" / "tiny" / "at-s0.json").exists()


@pytest.mark.slow
def test_two_launches_at_once_train_each_run_once(tmp_path, job_env):
    rows = [{"name": "at", "seeds": [0, 1]}]
    path = _study(tmp_path, rows)
    from advmend.launch.ledger import launch_lock

    cmd = [sys.executable, "-m", "advmend", "study", str(path), "--launcher", "local"]
    jobs = tmp_path / "runs" / "tiny" / "jobs"
    # Both launches start while a third holds the study's launch lock: they wait for it, then take turns.
    with launch_lock(jobs):
        procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]  # fmt: skip
        start = time.monotonic()  # long enough for both to load advmend and check the study
        while time.monotonic() < start + 20 and not list(jobs.glob("*.pkl")):
            time.sleep(0.2)
        assert all(p.poll() is None for p in procs) and not list(jobs.glob("*.pkl")), "a launch did not wait"
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    submitted = sorted(int(o.split(" job(s) submitted")[0].split()[-1]) for o, _ in outs)
    assert submitted == [0, 2], outs  # one launch submitted both runs, the other found them queued
    deadline = time.monotonic() + 300
    while any(not (jobs / f"{j}_0_result.pkl").exists() for v in _ledgers(jobs).values() for j in v):
        assert time.monotonic() < deadline, _plan(path)
        time.sleep(0.5)
    assert _trainings(jobs) == ["at-s0", "at-s1"]
    assert _plan(path).split() == ["done", "at-s0", "done", "at-s1"]
    assert all(len(v) == 1 for v in _ledgers(jobs).values())
