"""Tests for advmend.config: YAML loading, strict keys and types, dotted --set overrides."""

from __future__ import annotations

import pytest

from advmend.config import (
    AttackConfig,
    DataConfig,
    FSRConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    bundled_configs,
    from_dict,
    load_run_config,
    load_yaml,
    resolve_config_path,
    to_dict,
)
from advmend.errors import ConfigError

MINIMAL = "name: t\ndata: {name: synthetic}\nmodel: {name: small_cnn, options: {width: 8}}\n"


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(MINIMAL)
    return p


# --------------------------------------------------------------------------- bundled configs


def test_bundled_config_names_include_quickstart_and_cifar_recipes():
    names = bundled_configs()
    assert "quickstart" in names
    assert any(n.startswith("cifar10/") for n in names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", bundled_configs())
def test_every_bundled_config_loads(name):
    cfg = load_run_config(name)
    assert isinstance(cfg, RunConfig)
    assert isinstance(cfg.train, TrainConfig) and isinstance(cfg.train.attack, AttackConfig)
    # The YAML's own values were applied, not silently replaced by defaults.
    raw = load_yaml(resolve_config_path(name))
    if "name" in raw:
        assert cfg.name == raw["name"]
    if "model" in raw and "name" in raw["model"]:
        assert cfg.model.name == raw["model"]["name"]
    # Every float field really is a float (fractions such as 8/255 were converted).
    for att in (cfg.train.attack, cfg.train.val_attack):
        assert att.eps is None or isinstance(att.eps, float)
        assert att.step_size is None or isinstance(att.step_size, float)
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.train.weight_decay, float)


def test_quickstart_values():
    cfg = load_run_config("quickstart")
    assert cfg.model.name == "small_cnn"
    assert cfg.fsr.enabled is True
    assert cfg.train.attack.eps == 8 / 255
    assert cfg.eval.after_train is True
    # The quickstart shows the CPU study's tuned recipe, on fewer images and epochs.
    study = load_run_config("cifar10/pgdat_small_cnn_cpu")
    assert cfg.model == study.model
    for key in ("method", "batch_size", "lr", "schedule", "attack", "val_attack", "amp"):
        assert getattr(cfg.train, key) == getattr(study.train, key), key


def test_bundled_name_with_yaml_suffix_and_path_both_resolve(cfg_file):
    assert resolve_config_path("quickstart.yaml") == resolve_config_path("quickstart")
    assert load_run_config(str(cfg_file)).data.name == "synthetic"


# --------------------------------------------------------------------------- overrides


def test_override_dotted_keys_and_yaml_types(cfg_file):
    cfg = load_run_config(
        str(cfg_file),
        [
            "train.epochs=5",
            "train.progress=false",
            "train.lr=0.01",
            "eval.n_examples=null",
            "train.attack.steps=3",
            "model.normalize=true",
            "data.options.n_train=100",
            "name=renamed",
        ],
    )
    assert cfg.train.epochs == 5 and type(cfg.train.epochs) is int
    assert cfg.train.progress is False
    assert cfg.train.lr == 0.01
    assert cfg.eval.n_examples is None
    assert cfg.train.attack.steps == 3
    assert cfg.model.normalize is True
    assert cfg.model.options == {"width": 8}  # sibling keys of an overridden section survive
    assert cfg.data.options == {"n_train": 100}
    assert cfg.data.name == "synthetic"
    assert cfg.name == "renamed"


def test_override_int_given_to_float_field_becomes_float(cfg_file):
    cfg = load_run_config(str(cfg_file), ["train.lr=1"])
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float


def test_override_list_becomes_tuple(cfg_file):
    cfg = load_run_config(str(cfg_file), ["fsr.layers=[a,b]", "train.milestones=[0.5, 0.8]"])
    assert cfg.fsr.layers == ("a", "b")
    assert cfg.train.milestones == (0.5, 0.8)


def test_override_fraction(cfg_file):
    cfg = load_run_config(str(cfg_file), ["train.attack.eps=8/255", "train.attack.step_size=2 / 255"])
    assert isinstance(cfg.train.attack.eps, float)
    assert cfg.train.attack.eps == pytest.approx(8 / 255, rel=1e-12)
    assert cfg.train.attack.step_size == pytest.approx(2 / 255, rel=1e-12)


def test_fraction_in_yaml_file(tmp_path):
    p = tmp_path / "f.yaml"
    p.write_text("train:\n  attack: {eps: 8/255}\n")
    assert load_run_config(str(p)).train.attack.eps == pytest.approx(8 / 255, rel=1e-12)


@pytest.mark.parametrize("word", ["off", "on", "yes", "no"])
def test_yaml_1_1_boolean_words_stay_strings_in_files_and_overrides(tmp_path, cfg_file, word):
    # `train.amp: off` is a string setting; YAML 1.1 would read it as False and the run was refused.
    assert load_run_config(str(cfg_file), [f"name={word}"]).name == word
    p = tmp_path / "w.yaml"
    p.write_text(MINIMAL.replace("name: t", f"name: {word}") + "train: {amp: off}\n")
    cfg = load_run_config(str(p))
    assert cfg.name == word and cfg.train.amp == "off"
    assert load_run_config(str(cfg_file), ["train.amp=off"]).train.amp == "off"
    # true/false are still booleans, and a boolean where a string belongs is still refused
    assert load_run_config(str(cfg_file), ["fsr.enabled=true"]).fsr.enabled is True
    with pytest.raises(ConfigError, match=r"train\.amp: expected a string"):
        load_run_config(str(cfg_file), ["train.amp=false"])


def test_bad_fraction_is_config_error(cfg_file):
    with pytest.raises(ConfigError, match=r"train\.attack\.eps"):
        load_run_config(str(cfg_file), ["train.attack.eps=8/0"])


def test_override_later_wins_and_input_not_mutated():
    data = {"train": {"epochs": 1}}
    out = apply_overrides(data, ["train.epochs=2", "train.epochs=3"])
    assert out["train"]["epochs"] == 3
    assert data == {"train": {"epochs": 1}}


@pytest.mark.parametrize("bad", ["train.epochs", "=3"])
def test_malformed_override_is_config_error(cfg_file, bad):
    with pytest.raises(ConfigError):
        load_run_config(str(cfg_file), [bad])


def test_override_through_a_scalar_is_config_error(cfg_file):
    with pytest.raises(ConfigError, match="name"):
        load_run_config(str(cfg_file), ["name.sub=1"])


# --------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key(cfg_file):
    with pytest.raises(ConfigError, match=r"'trian'"):
        load_run_config(str(cfg_file), ["trian.epochs=3"])


@pytest.mark.parametrize(
    "override,path",
    [
        ("train.epoch=3", "train.epoch"),
        ("train.attack.epss=0.1", "train.attack.epss"),
        ("fsr.layer=[a]", "fsr.layer"),
    ],
)
def test_unknown_nested_key_names_dotted_path(cfg_file, override, path):
    with pytest.raises(ConfigError) as info:
        load_run_config(str(cfg_file), [override])
    assert path in str(info.value)


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  attack:\n    stpes: 3\n")
    with pytest.raises(ConfigError, match=r"train\.attack\.stpes"):
        load_run_config(str(p))


# --------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "override,path",
    [
        ("train.epochs=3.5", "train.epochs"),
        ("train.epochs=true", "train.epochs"),  # a bool is not an int
        ("train.epochs=ten", "train.epochs"),
        ("train.progress=maybe", "train.progress"),
        ("train.progress=1", "train.progress"),
        ("train.lr=fast", "train.lr"),
        ("train.lr=true", "train.lr"),
        ("train.attack.eps=big", "train.attack.eps"),
        ("data.train_subset=2.5", "data.train_subset"),
        ("model.name=3", "model.name"),
        ("model.options=3", "model.options"),
        ("fsr.layers=stage3", "fsr.layers"),
        ("fsr.layers=[1, 2]", "fsr.layers[0]"),
        ("train.attack=5", "train.attack"),
    ],
)
def test_wrong_type_names_path(cfg_file, override, path):
    with pytest.raises(ConfigError) as info:
        load_run_config(str(cfg_file), [override])
    assert path in str(info.value)


def test_from_dict_wrong_type_names_path():
    with pytest.raises(ConfigError, match=r"train\.val_attack\.steps"):
        from_dict(RunConfig, {"train": {"val_attack": {"steps": 3.5}}})
    with pytest.raises(ConfigError, match=r"fsr\.enabled"):
        from_dict(RunConfig, {"fsr": {"enabled": "maybe"}})


def test_config_error_is_value_error():
    with pytest.raises(ValueError):
        from_dict(RunConfig, {"nope": 1})


# --------------------------------------------------------------------------- to_dict / from_dict


def test_round_trip_default():
    cfg = RunConfig()
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_round_trip_non_default():
    cfg = RunConfig(
        name="x",
        out_dir="/tmp/x",
        data=DataConfig(name="synthetic", options={"n_train": 10, "image_size": 8}, train_subset=5, augment=False),
        model=ModelConfig(name="small_cnn", normalize=True, options={"width": 4}),
        fsr=FSRConfig(enabled=True, layers=("stage2", "stage3"), tau=0.5, hidden=8),
        train=TrainConfig(
            epochs=3,
            milestones=(0.5,),
            attack=AttackConfig(norm="l2", eps=0.5, step_size=0.1, steps=3, restarts=2),
            val_attack=AttackConfig(eps=8 / 255, loss="margin", kappa=5.0),
        ),
    )
    d = to_dict(cfg)
    assert d["fsr"]["layers"] == ["stage2", "stage3"]  # tuples become lists (YAML/JSON ready)
    assert d["train"]["milestones"] == [0.5]
    assert d["train"]["attack"]["norm"] == "l2"
    back = from_dict(RunConfig, d)
    assert back == cfg
    assert back.fsr.layers == ("stage2", "stage3")
    assert to_dict(back) == d


def test_to_dict_is_json_and_yaml_serialisable(tmp_path):
    import json

    import yaml

    cfg = load_run_config("quickstart", ["fsr.layers=[stage3]"])
    d = to_dict(cfg)
    assert json.loads(json.dumps(d)) == d
    p = tmp_path / "dump.yaml"
    p.write_text(yaml.safe_dump(d))
    assert load_run_config(str(p)) == cfg


# --------------------------------------------------------------------------- files


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(str(missing))
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_yaml(missing)


def test_missing_bundled_name():
    with pytest.raises(ConfigError, match="quickstart"):  # lists the valid bundled names
        load_run_config("no_such_config_name")


def test_invalid_yaml(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("train: {epochs: [1, 2\nmodel: : :\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_run_config(str(p))
    assert "broken.yaml" in str(info.value)


def test_top_level_not_a_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(str(p))


def test_empty_yaml_gives_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_run_config(str(p)) == RunConfig()


def test_override_exponent_notation_float(cfg_file):
    cfg = load_run_config(str(cfg_file), ["train.lr=1e-3", "train.weight_decay=5e-4"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.weight_decay == pytest.approx(5e-4)
