"""`advmend bench --switches`: the speed-switch benchmark runs the training loop's own step set-up."""

from __future__ import annotations

import pytest

from advmend.bench.throughput import bench_switches, format_switch_rows
from advmend.cli import main


def test_switch_rows_are_ratios_to_fp32():
    import torch

    rows = bench_switches("small_cnn", batch_size=4, iters=1, warmup=0, device=torch.device("cpu"),
                          switches=("off", "channels_last"), fsr_options=(False, True))  # fmt: skip
    assert [(r.fsr, r.switch) for r in rows] == [(False, "off"), (False, "channels_last"), (True, "off"),
                                                 (True, "channels_last")]  # fmt: skip
    assert all(r.at_ips > 0 for r in rows) and rows[0].ratio == rows[2].ratio == 1.0
    assert rows[1].ratio == pytest.approx(rows[1].at_ips / rows[0].at_ips)
    assert "FSR overhead" in format_switch_rows(rows, "cpu")


@pytest.mark.parametrize("argv, msg", [(["--switches", "fast"], "unknown"), (["--switches", "fp16"], "CUDA"),
                                       (["--ddp-procs", "3"], "divide")])  # fmt: skip
def test_bad_scale_bench_options(capsys, argv, msg):
    assert main(["bench", "--models", "small_cnn", "--batch-size", "4", "--device", "cpu", *argv]) == 2
    assert msg in capsys.readouterr().err
