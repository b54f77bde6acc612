"""The SLURM path as far as it goes without a cluster: the sbatch script a study's jobs are submitted
with (resources from the study and the command line, requeue, the warning signal), and the one-line
refusals before anything is written (no submitit, no SLURM commands, bad resources)."""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import pytest
import yaml
from conftest import error_line
from test_study import _study

from advmend.cli import main
from advmend.errors import ConfigError
from advmend.launch.executor import SIGNAL_DELAY_S, Resources, extra_sbatch, sbatch_script
from advmend.launch.study_jobs import resources_for
from advmend.study.spec import load_study

pytest.importorskip("submitit")


def _sbatch_lines(script: str) -> set[str]:
    return {line for line in script.splitlines() if line.startswith("#SBATCH")}


def test_the_sbatch_script_of_a_study_job_asks_for_its_resources_requeue_and_the_warning_signal(tmp_path):
    path = _study(tmp_path)
    study = yaml.safe_load(path.read_text())
    study["launch"] = {"partition": "gpu", "gpus": 1, "cpus": 10, "mem_gb": 32, "time_min": 720,
                       "account": "robust", "sbatch": ["qos=high", "constraint=a100"]}  # fmt: skip
    path.write_text(yaml.safe_dump(study))
    launch = load_study(path).launch
    launch = replace(launch, time_min=480, mem_gb=1.5)  # what --time-min 480 --mem-gb 1.5 give
    script = sbatch_script(resources_for(launch), "tiny/at-s0", tmp_path / "jobs")
    assert {
        "#SBATCH --partition=gpu",
        "#SBATCH --account=robust",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=10",
        "#SBATCH --mem=1536MB",
        "#SBATCH --time=480",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --job-name=tiny/at-s0",
        "#SBATCH --requeue",  # preempted or failed nodes: back to the queue, not lost
        f"#SBATCH --signal=USR2@{SIGNAL_DELAY_S}",  # the warning before a kill, which submitit turns into a requeue
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        "#SBATCH --open-mode=append",
    } <= _sbatch_lines(script), script
    assert "srun --unbuffered" in script and "submitit.core._submit" in script
    # One rank per GPU across nodes for a multi-node training job.
    ddp = sbatch_script(
        Resources(nodes=4, tasks_per_node=8, gpus_per_node=8, cpus_per_task=6, mem_gb=400), "x", tmp_path
    )
    assert {"#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
            "#SBATCH --mem=400GB"} <= _sbatch_lines(ddp)  # fmt: skip
    assert not any("partition" in line for line in _sbatch_lines(ddp))  # unset: the cluster's default


@pytest.mark.parametrize("bad, match", [
    (("time=5",), "set by the launch itself"), (("--partition=x",), "set by the launch itself"),
    (("qos=",), "KEY=VALUE"), (("Bad Key",), "KEY=VALUE"),
])  # fmt: skip
def test_a_malformed_or_conflicting_sbatch_option_is_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        extra_sbatch(bad)
    assert extra_sbatch(("qos=high", "exclusive")) == {"qos": "high", "exclusive": True}


def _written(tmp_path) -> list[str]:
    return sorted(
        str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.name not in ("study.yaml", "base.yaml")
    )


@pytest.mark.parametrize("argv, message", [
    (["--launcher", "slurm"], "no SLURM command (sbatch, srun) on this machine"),
    (["--launcher", "local", "--gpus", "-1"], "--gpus-per-node must be >= 0"),
    (["--launcher", "local", "--max-attempts", "0"], "--max-attempts must be >= 1"),
    (["--launcher", "local", "--sbatch", "time=1"], "set by the launch itself"),
    (["--partition", "gpu"], "--partition needs --launcher"),
    (["--plan", "--launcher", "local"], "--plan shows every launch's jobs"),
])  # fmt: skip
def test_a_launch_that_cannot_go_stops_in_one_line_before_writing(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no sbatch here, whatever the machine has
    path = _study(tmp_path)
    assert main(["study", str(path), *argv]) == 2
    assert message in error_line(capsys)
    assert _written(tmp_path) == []


def test_without_submitit_the_launch_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` now raises ImportError
    path = _study(tmp_path)
    for argv in (["study", str(path), "--launcher", "local"],
                 ["train", "quickstart", "--launcher", "slurm", "--out", str(tmp_path / "run")]):  # fmt: skip
        assert main(argv) == 2
        assert 'needs submitit: pip install "advmend[cluster]"' in error_line(capsys)
    assert _written(tmp_path) == []


def test_train_launch_refusals(tmp_path, capsys):
    out = str(tmp_path / "run")
    for argv, message in [
        (["--launcher", "local", "--nodes", "2"], "--launcher local runs on this one machine"),
        (["--launcher", "local", "--resume"], "--resume: no last.safetensors"),
        (["--nodes", "2"], "--nodes needs --launcher"),
    ]:
        assert main(["train", "quickstart", "--out", out, *argv]) == 2
        assert message in error_line(capsys)
    assert _written(tmp_path) == []


def test_plan_shows_each_runs_slurm_job_as_sacct_reports_it(tmp_path, capsys, monkeypatch):
    from advmend.launch.ledger import add_job

    path = _study(tmp_path, [{"name": "at", "seeds": [0, 1, 2]}, {"name": "b", "seeds": [0], "baseline": "at"}])
    jobs = tmp_path / "runs" / "tiny" / "jobs"
    # A stand-in for the cluster's accounting command: `sacct ... --parsable2 -j ID ...` prints the header and
    # the lines of the jobs asked for, from this table of three jobs.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "accounts").write_text("101|PENDING|None assigned\n102|RUNNING|gpu1\n102.batch|RUNNING|gpu1\n"
                                      "103|CANCELLED by 42|gpu2\n")  # fmt: skip
    (bin_dir / "sacct").write_text("#!/bin/sh\necho 'JobID|State|NodeList'\nwhile [ $# -gt 0 ]; do\n"
                                   f'  [ "$1" = -j ] && grep "^$2[|.]" {bin_dir / "accounts"}\n  shift\ndone\n')  # fmt: skip
    (bin_dir / "sacct").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for run_id, job_id in [("at-s0", "101"), ("at-s1", "102"), ("at-s2", "103")]:
        add_job(jobs, run_id, "slurm", job_id)
    (jobs / "103_0_log.err").write_text("loading\nsrun: error: gpu2: task 0: Killed\n")
    assert main(["study", str(path), "--plan"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "queued  at-s0 (slurm job 101)",
        "pending b-s0",
        "running at-s1 (slurm job 102)",
        "failed  at-s2 (slurm job 103, 1 failed)",  # cancelled without a result: counts as a failed attempt
        "    | loading",
        "    | srun: error: gpu2: task 0: Killed",
    ]


def test_a_local_job_whose_process_is_gone_without_a_result_counts_as_failed(tmp_path):
    import subprocess

    from advmend.launch.ledger import add_job, run_job_state

    jobs = tmp_path / "jobs"
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        while ended.poll() is None:
            pass
        # A zombie (ended, not yet reaped) is not a running job either.
        zombie = subprocess.Popen([sys.executable, "-c", "pass"])
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # wait for its end, leave it unreaped
        for run_id, proc in [("a-s0", running), ("b-s0", ended), ("c-s0", zombie)]:
            add_job(jobs, run_id, "local", str(proc.pid))
        states = {r: run_job_state(jobs, r) for r in ("a-s0", "b-s0", "c-s0")}
        assert [(s.state, s.failures) for s in states.values()] == [("running", 0), ("failed", 1), ("failed", 1)]
    finally:
        running.kill()
        running.wait()
        zombie.wait()
