"""timm/<arch> and torchvision/<arch> models by name: build, FSR at a module path, PGD-AT, evaluation,
checkpoints and resume exactly as for the registered models; their normalisation, weights and options;
and every bad input a one-line error. Random init only: nothing is downloaded."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from advmend.checkpoint import load_checkpoint
from advmend.config import ModelConfig, RunConfig, from_dict, load_run_config, to_dict
from advmend.data import dataset_radii
from advmend.defenses.classifier import build_classifier
from advmend.errors import ConfigError
from advmend.evaluation.run import load_trained_model
from advmend.models import create_model, describe_normalization
from advmend.training.build import build_objective
from advmend.training.loop import LAST, train
from advmend.training.run import evaluate_after_training

pytest.importorskip("timm")

SHAPE = (3, 32, 32)

# name, model.options, an FSR layer (a feature map the model returns once per forward pass)
MODELS = [
    # a CNN; timm zero-initialises each block's last BN scale, which leaves the block's other weights no gradient
    ("timm/test_resnet", {"zero_init_last": False}, "net.layer2"),
    ("timm/test_vit", {"img_size": 32}, "net.patch_embed.proj"),  # a ViT: FSR on its patch embedding's map
    # layer scale starts at 1 (timm's 1e-6 makes the blocks' first step below float32 resolution)
    ("timm/test_convnext", {"ls_init_value": 1.0}, "net.stages.1"),
    ("torchvision/squeezenet1_1", {}, "net.features.4"),
    ("torchvision/shufflenet_v2_x0_5", {}, "net.stage2"),
]
IDS = [m[0] for m in MODELS]


def _cfg(name: str, options: dict, layer: str | None, **sections) -> RunConfig:
    data = {"name": "synthetic", "val_size": 0, "options": {"n_train": 32, "n_test": 8, "image_size": 32}}
    d = {
        "name": "ext", "data": data, "model": {"name": name, "options": options},
        "fsr": {"enabled": layer is not None, "layers": [layer] if layer else None, "hidden": 8},
        "train": {"method": "pgd_at", "epochs": 1, "batch_size": 16, "lr": 0.01, "weight_decay": 0.0,
                  "schedule": "constant", "attack": {"steps": 1, "step_size": 2 / 255}, "val_attack": {"steps": 1},
                  "deterministic": True, "progress": False, "device": "cpu"},
        "eval": {"protocol": "quick", "n_examples": 8, "batch_size": 8, "plot": False},
    }  # fmt: skip
    for key, value in sections.items():
        d[key] = {**d.get(key, {}), **value}
    return from_dict(RunConfig, d)


@pytest.mark.parametrize("name,options,layer", MODELS, ids=IDS)
def test_one_pgd_at_step_with_fsr_changes_every_trainable_weight(name, options, layer, method="pgd_at"):
    torch.manual_seed(0)
    cfg = _cfg(name, options, layer, train={"method": method})
    model = build_classifier(cfg, 10, SHAPE)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    objective = build_objective(cfg, dataset_radii("cifar10"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(4, *SHAPE), torch.arange(4)
    model.train()
    objective(model, x, y).loss.backward()
    opt.step()
    unchanged = [k for k, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[k])]
    assert not unchanged
    assert any(k.startswith("fsr.") for k in before)  # the FSR block is in the model, and trained


@pytest.mark.parametrize("method", ["trades", "mart"])
@pytest.mark.parametrize("name,options,layer", [MODELS[1], MODELS[3]], ids=[IDS[1], IDS[3]])
def test_one_trades_and_mart_step_with_fsr_changes_every_trainable_weight(name, options, layer, method):
    test_one_pgd_at_step_with_fsr_changes_every_trainable_weight(name, options, layer, method)


@pytest.mark.parametrize("name,options,layer", MODELS, ids=IDS)
def test_train_evaluate_reload_and_resume(tmp_path, name, options, layer):
    """PGD-AT with FSR, the quick protocol after training, the sealed checkpoint reloaded bit for bit, and
    a run stopped after one epoch and resumed ending exactly where the uninterrupted run ends."""
    cfg = _cfg(name, options, layer, train={"epochs": 2}, eval={"after_train": True})
    full = train(cfg, tmp_path / "full", log=lambda s: None)
    evaluate_after_training(cfg, full.best, tmp_path / "full")  # what `advmend train` runs next
    (card,) = (tmp_path / "full").glob("eval*/report.json")
    report = json.loads(card.read_text())
    assert report["meta"]["normalization"]["source"].startswith(name.split("/")[0])
    assert "Input normalisation" in card.with_suffix(".md").read_text()

    state, record = load_checkpoint(full.last)
    assert record["config"]["model"] == {"name": name, "normalize": False, "options": options}
    assert record["normalization"] == report["meta"]["normalization"]
    model, _, _ = load_trained_model(full.last, torch.device("cpu"))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    x = torch.rand(2, *SHAPE)
    again, _, _ = load_trained_model(full.last, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(model(x), again(x))

    stopped = {"train": {"epochs": 1}, "eval": {"after_train": False}}
    train(_cfg(name, options, layer, **stopped), tmp_path / "part", log=lambda s: None)
    train(_cfg(name, options, layer, train={"epochs": 2}, eval={"after_train": False}), tmp_path / "part",
          resume=True, log=lambda s: None)  # fmt: skip
    resumed, _ = load_checkpoint(tmp_path / "part" / LAST)
    assert resumed.keys() == state.keys() and all(torch.equal(resumed[k], state[k]) for k in state)


# --------------------------------------------------------------------------- each mechanism bites


@pytest.mark.parametrize("name", ["timm/test_convnext", "torchvision/shufflenet_v2_x0_5"])
def test_normalisation_comes_from_the_models_metadata(name):
    torch.manual_seed(0)
    model = build_classifier(_cfg(name, {}, None), 10, SHAPE).eval()
    if name.startswith("timm"):
        cfg = model.net.pretrained_cfg
        mean, std = cfg["mean"], cfg["std"]
    else:
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet transforms
    x = torch.rand(2, *SHAPE)
    manual = model.net((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    with torch.no_grad():
        assert torch.allclose(model(x), manual, atol=1e-6)
    assert describe_normalization(model)["mean"] == pytest.approx(list(mean))


def test_normalisation_from_the_config_or_the_data_set_replaces_the_metadata():
    given = build_classifier(_cfg("timm/test_resnet", {}, None, model={"normalize": {"mean": [0.1, 0.2, 0.3],
                                                                                      "std": [2, 2, 2]}}), 10, SHAPE)  # fmt: skip
    assert describe_normalization(given) == {"source": "model.normalize", "mean": pytest.approx([0.1, 0.2, 0.3]),
                                             "std": [2.0, 2.0, 2.0]}  # fmt: skip
    data = build_classifier(_cfg("timm/test_resnet", {}, None, model={"normalize": True}), 10, SHAPE)
    assert describe_normalization(data)["source"] == "data set synthetic"


def test_options_reach_the_librarys_factory():
    vit = build_classifier(_cfg("timm/test_vit", {"img_size": 32}, None), 10, SHAPE)
    assert tuple(vit.net.patch_embed.img_size) == (32, 32)
    sq = build_classifier(_cfg("torchvision/squeezenet1_1", {"dropout": 0.25}, None), 10, SHAPE)
    assert sq.net.classifier[0].p == 0.25


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_file_sets_the_initial_weights(tmp_path, suffix):
    torch.manual_seed(1)
    source = build_classifier(_cfg("timm/test_resnet", {}, None), 10, SHAPE).net
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)
    torch.manual_seed(2)
    model = build_classifier(_cfg("timm/test_resnet", {}, None, model={"weights": str(path)}), 10, SHAPE)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.net.state_dict().items())


# --------------------------------------------------------------------------- bad input: one line


def _error(cfg_model: dict, layer: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        m = cfg_model.copy()
        build_classifier(_cfg(m.pop("name"), m.pop("options", {}), layer, model=m), 10, SHAPE)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_unknown_architecture_names_close_ones():
    assert "close names: test_vit" in _error({"name": "timm/tset_vit"})
    assert "resnet18" in _error({"name": "torchvision/resnet19"})


def test_weights_of_another_architecture_name_the_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(build_classifier(_cfg("timm/test_convnext", {}, None), 10, SHAPE).net.state_dict(), path)
    msg = _error({"name": "timm/test_resnet", "weights": str(path)})
    assert "does not fit timm/test_resnet" in msg and "missing" in msg and "unexpected" in msg


def test_weights_paths_the_filesystem_refuses_are_one_line(tmp_path):
    assert "cannot read" in _error({"name": "timm/test_resnet", "weights": str(tmp_path / ("x" * 300 + ".pt"))})
    (tmp_path / "dir.pt").mkdir()
    assert "cannot read" in _error({"name": "timm/test_resnet", "weights": str(tmp_path / "dir.pt")})
    assert "cannot read" in _error({"name": "timm/test_resnet", "weights": str(tmp_path / "missing.safetensors")})
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    assert "not a weights file" in _error({"name": "timm/test_resnet", "weights": str(tmp_path / "junk.pt")})


def test_pretrained_without_network_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network, whatever this machine has
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert "model.pretrained: cannot fetch timm/test_resnet" in _error({"name": "timm/test_resnet", "pretrained": True})


def test_fsr_layer_that_does_not_exist_names_the_nearest():
    assert "nearest: net.layer2" in _error({"name": "timm/test_resnet"}, layer="net.layer_2")
    msg = _error({"name": "timm/test_vit", "options": {"img_size": 32}}, layer="net.blocks.0")
    assert "(N, C, H, W)" in msg and "token sequence" in msg
    # torchvision's blocks call one ReLU twice: a block after it would run on two different maps
    assert _error({"name": "torchvision/resnet18"}, layer="net.layer1.0.relu").endswith(
        "FSR needs a layer that runs once"
    )


def test_output_that_is_not_one_logit_vector_per_image():
    msg = _error({"name": "timm/test_resnet", "options": {"features_only": True}})  # a list of feature maps
    assert "must return one vector of 10 logits per image, got list" in msg
    msg = _error({"name": "torchvision/googlenet", "options": {"aux_logits": True, "init_weights": False}})
    assert "GoogLeNetOutputs" in msg and "training mode" in msg  # its auxiliary heads, in training only


def test_options_the_architecture_does_not_take():
    assert "model.options.nope" in _error({"name": "timm/test_resnet", "options": {"nope": 1}})
    assert "model.options.nope" in _error({"name": "torchvision/squeezenet1_1", "options": {"nope": 1}})


def test_missing_library_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    assert 'pip install "advmend[timm]"' in _error({"name": "timm/test_resnet"})


def test_normalize_mapping_errors_name_the_problem():
    with pytest.raises(ConfigError, match="equal length, got 1 and 3"):
        from_dict(ModelConfig, {"name": "timm/test_resnet", "normalize": {"mean": [0.5], "std": [1, 1, 1]}})
    with pytest.raises(ConfigError, match=r"model\.normalize\.std: every value must be > 0"):
        from_dict(RunConfig, {"model": {"name": "timm/test_resnet", "normalize": {"mean": [0.5], "std": [0]}}})


def test_weights_and_pretrained_are_for_library_models_only():
    with pytest.raises(ConfigError, match="built in"):
        from_dict(ModelConfig, {"name": "small_cnn", "weights": "w.pt"})
    with pytest.raises(ConfigError, match="keep one"):
        from_dict(ModelConfig, {"name": "timm/test_resnet", "weights": "w.pt", "pretrained": True})


def test_new_keys_at_their_defaults_leave_resolved_configs_unchanged():
    cfg = load_run_config("quickstart")
    assert set(to_dict(cfg)["model"]) == {"name", "normalize", "options"}
    assert to_dict(from_dict(ModelConfig, {"name": "timm/test_resnet", "weights": "w.pt"}))["weights"] == "w.pt"


# --------------------------------------------------------------------------- the commands


def _advmend(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "advmend", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_layers_command_lists_insertion_points_and_refuses_bad_names():
    ok = _advmend("layers", "timm/test_vit", "--set", "model.options.img_size=32")
    assert ok.returncode == 0, ok.stderr
    assert re.search(r"^  net\.patch_embed\.proj +64 x 2 x 2$", ok.stdout, re.MULTILINE)
    assert not re.search(r"^  net\.blocks\.0 ", ok.stdout, re.MULTILINE)  # tokens (N, 5, 64), no feature map
    bad = _advmend("layers", "timm/tset_vit")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "close names" in bad.stderr
    offline = _advmend("layers", "timm/test_resnet", "--set", "model.pretrained=true")  # no network here
    assert offline.returncode == 2 and offline.stderr.count("\n") == 1 and "model.pretrained" in offline.stderr
    listed = _advmend("list", "--models", "torchvision", "--filter", "squeeze")
    assert listed.stdout.split() == ["torchvision/squeezenet1_0", "torchvision/squeezenet1_1"]


def test_a_checkpoint_rebuilds_without_its_initial_weights_file(tmp_path):
    """The trained weights replace model.weights: evaluating the checkpoint needs neither the file nor a
    download (model.pretrained), which may be gone or offline by then."""
    path = tmp_path / "init.safetensors"
    from safetensors.torch import save_file

    net = build_classifier(_cfg("timm/test_resnet", {}, None), 10, SHAPE).net
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    cfg = _cfg("timm/test_resnet", {}, None, model={"weights": str(path)})
    result = train(cfg, tmp_path / "run", log=lambda s: None)
    assert load_checkpoint(result.last)[1]["config"]["model"]["weights"] == str(path)
    path.unlink()
    _, loaded, _ = load_trained_model(result.last, torch.device("cpu"))
    assert loaded.model.weights == str(path)  # the record still says where training started


def test_bench_compares_the_evaluation_with_the_bare_models_pgd():
    from advmend.bench.external_speed import bench_external_eval, format_external_rows

    row = bench_external_eval("torchvision/squeezenet1_1", n=4, batch_size=2, steps=1, repeats=3)
    assert row.advmend_s > 0 and row.bare_s > 0 and len(row.ratios) == 3
    assert row.ratio == sorted(row.ratios)[1] and "[" in format_external_rows([row], "here")  # median, and spread
    bad = _advmend("bench", "--external-eval", "--models", "small_cnn")
    assert bad.returncode == 2 and "timm/ARCH and torchvision/ARCH" in bad.stderr


def test_the_bare_loop_counts_what_the_evaluation_counts():
    """The baseline does the evaluation's work, no less: the same normalisation, and an example fooled at
    any iterate counts as fooled; so both count the same robust examples."""
    from advmend.attacks.pgd import PGD
    from advmend.bench.external_speed import _bare_pgd_eval
    from advmend.data import ArrayDataset
    from advmend.evaluation import evaluate

    torch.manual_seed(0)
    model = create_model("torchvision/squeezenet1_1", num_classes=10).eval()
    images = torch.randint(0, 256, (16, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    labels = model(images.float() / 255).argmax(1).detach()
    attack = PGD(eps=2 / 255, steps=3, step_size=1 / 255, random_start=False)
    result = evaluate(model, ArrayDataset(images, labels, tuple("0123456789")), [attack], batch_size=8)
    robust = _bare_pgd_eval(model.net, model.normalize.mean, model.normalize.std, images, labels, attack, 8)
    assert 0 < robust < 16 and robust == int(result.attacks[0].correct.sum())
