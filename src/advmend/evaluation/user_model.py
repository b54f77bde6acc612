"""A user's own model for `advmend eval --model module:function --weights FILE`, or a library model by name
for `advmend eval --model timm/ARCH --weights FILE` (or `--set model.pretrained=true`).

The function is called with no arguments and must return an `nn.Module` that maps [0, 1] images to
logits (normalisation inside). Weights are read without executing pickled code: safetensors, or a
.pt/.pth state dict through `torch.load(weights_only=True)`. A library model is built as `advmend train`
builds it (`model.*` of a run config: its normalisation, options, weights), for the classes and image
shape of the data set it is evaluated on.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
from torch import nn

from advmend.errors import CheckpointError, ConfigError
from advmend.io import check_input_path, file_sha256


def build_user_model(spec: str) -> nn.Module:
    """Import `module:function` (the current folder is importable) and call the function."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise ConfigError(f"--model must look like module:function (e.g. mypkg.models:build), got {spec!r}")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"--model {spec}: cannot import {module_name!r} ({e}); is it on PYTHONPATH?") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"--model {spec}: {module_name} has no function {func_name!r}")
    model = func()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {spec}: {func_name}() must return a torch.nn.Module, got {type(model).__name__}")
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .pt/.pth state dict (loaded with weights_only=True)."""
    path = check_input_path(path, "--weights")
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch raise several types for a bad file
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "give a safetensors file or a .pt/.pth state dict of tensors") from None  # fmt: skip
    for key in ("state_dict", "model"):  # common wrappers around a state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def load_user_model(spec: str, weights: str | Path | None, device: torch.device) -> tuple[nn.Module, dict]:
    """Build the user's model, load its weights strictly, move it to `device` in eval mode.

    Returns the model and metadata for the report (model spec, weights path and SHA-256).
    """
    model = build_user_model(spec)
    meta = {"model": spec}
    if weights is not None:
        state = read_state_dict(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise CheckpointError(f"{weights}: weights do not match the model from {spec} ({first})") from None
        meta.update(checkpoint=str(weights), checkpoint_sha256=file_sha256(weights))
    return model.to(device).eval(), meta


def load_library_model(name: str, weights: str | None, dataset: str | None, overrides, device: torch.device):
    """A timm/torchvision model by name, built from a run config whose `model` section is `name` with
    `weights` (`model.weights`) and whose data set is `dataset` (default cifar10), `overrides` applied
    (model.pretrained, model.normalize, model.options, data.*, eval.*). Its class count and image shape
    come from the test split. Returns the model (on `device`, eval mode), the config and the report's
    metadata (the model's name, and the weights file with its SHA-256)."""
    from advmend.config import DataConfig, ModelConfig, RunConfig, apply_overrides, from_dict, to_dict
    from advmend.defenses.build import build_model
    from advmend.evaluation.load import test_split

    base = RunConfig(name=name.replace("/", "_"), data=DataConfig(name=dataset or "cifar10"),
                     model=ModelConfig(name=name, weights=weights))  # fmt: skip
    cfg = from_dict(RunConfig, apply_overrides(to_dict(base), list(overrides)))
    if cfg.model.weights is None and not cfg.model.pretrained:
        raise ConfigError(f"--model {name}: give its weights (--weights FILE) or --set model.pretrained=true; "
                          "a randomly initialised model has no robustness to measure")  # fmt: skip
    test = test_split(cfg.data)
    model = build_model(cfg, test.num_classes, test.image_shape)
    meta: dict = {"model": name}
    if cfg.model.weights is not None:
        meta.update(checkpoint=str(cfg.model.weights), checkpoint_sha256=file_sha256(cfg.model.weights))
    return model.to(device).eval(), cfg, meta
