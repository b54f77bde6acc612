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


def test_recipe_bench_times_the_configs_own_step(capsys):
    """`--config`: the objective, attack and FSR blocks come from the run config (here the quickstart's
    PGD-5 with FSR), so the benchmark measures the step that config trains with."""
    import torch

    from advmend.bench.recipe import bench_recipe, recipe_step
    from advmend.config import load_run_config
    from advmend.defenses.insert import FSRModel

    cfg = load_run_config("quickstart")
    rows = bench_recipe("quickstart", cfg, ["off", "bf16"], batch_size=4, iters=1, warmup=0, device=torch.device("cpu"))
    assert [r.switch for r in rows] == ["off", "bf16"] and rows[0].ratio == 1.0 and rows[1].images_per_s > 0
    step = recipe_step(cfg, "off", 4, torch.device("cpu"))
    model = next(c.cell_contents for c in step.__closure__ if isinstance(c.cell_contents, FSRModel))
    before = [p.detach().clone() for p in model.parameters()]
    step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # a real optimiser step
    assert main(["bench", "--config", "quickstart", "--switches", "compile", "--device", "cpu"]) == 2
    assert "unknown" in capsys.readouterr().err


def test_recipe_bench_set_overrides_the_config(capsys, monkeypatch):
    """`--config C --set fsr.enabled=true` times C's step with FSR (the ResNet recipe has none of its own);
    --set without --config and an unknown key are one-line errors."""
    import advmend.bench.recipe as recipe

    seen = {}

    def fake_bench(name, cfg, switches, **kw):
        seen["name"], seen["fsr"], seen["lambda"] = name, cfg.fsr.enabled, cfg.fsr.lambda_sep
        return []

    monkeypatch.setattr(recipe, "bench_recipe", fake_bench)
    argv = ["bench", "--config", "cifar10/pgdat_preact_resnet18_cpu", "--device", "cpu"]
    assert main([*argv, "--set", "fsr.enabled=true", "--set", "fsr.lambda_sep=0.3"]) == 0
    assert seen == {"name": "cifar10/pgdat_preact_resnet18_cpu --set fsr.enabled=true --set fsr.lambda_sep=0.3",
                    "fsr": True, "lambda": 0.3}  # fmt: skip
    assert main(argv) == 0 and seen["fsr"] is False
    capsys.readouterr()
    assert main(["bench", "--set", "fsr.enabled=true", "--device", "cpu"]) == 2
    assert "give --config" in capsys.readouterr().err
    assert main([*argv, "--set", "fsr.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err
