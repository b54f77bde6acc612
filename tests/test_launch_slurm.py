"""The SLURM path as far as it goes without a cluster: the sbatch script a study's jobs are submitted
with (resources from the study and the command line, requeue, the warning signal), and the one-line
refusals before anything is written (no submitit, no SLURM commands, bad resources)."""

from __future__ import annotations

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
        "#SBATCH --partition=gpu", "#SBATCH --account=robust", "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=10", "#SBATCH --mem=1536MB", "#SBATCH --time=480", "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1", "#SBATCH --job-name=tiny/at-s0",
        "#SBATCH --requeue",  # preempted or failed nodes: back to the queue, not lost
        f"#SBATCH --signal=USR2@{SIGNAL_DELAY_S}",  # the warning before a kill, which submitit turns into a requeue
        "#SBATCH --qos=high", "#SBATCH --constraint=a100", "#SBATCH --open-mode=append",
    } <= _sbatch_lines(script), script
    assert "srun --unbuffered" in script and "submitit.core._submit" in script
    # One rank per GPU across nodes for a multi-node training job.
    ddp = sbatch_script(Resources(nodes=4, tasks_per_node=8, gpus_per_node=8, cpus_per_task=6, mem_gb=400), "x", tmp_path)
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
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.name not in ("study.yaml", "base.yaml"))


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
