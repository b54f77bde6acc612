"""Speed switches for training: mixed precision (bf16 / fp16 with loss scaling) and channels_last.

- bf16 autocast (CPU and CUDA): same exponent range as fp32, so no loss scaling is needed.
- fp16 autocast: the weight gradients go through `torch.amp.GradScaler` (dynamic loss scaling,
  Micikevicius et al., "Mixed Precision Training", ICLR 2018); its state is checkpointed for resume.
  The attack runs inside the same autocast region, and the PGD core scales its own loss under fp16
  so input gradients do not underflow (attacks/pgd.py).
- channels_last: model weights and batches in NHWC memory format (faster convolutions on tensor cores).
All are off by default: they have not been measured on a GPU by this project (see docs/performance.md).
"""

from __future__ import annotations

import contextlib

import torch

from advmend.errors import ConfigError

AMP_MODES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(mode: str, device: torch.device) -> None:
    """ConfigError (naming train.amp) when `mode` is unknown or the device cannot run it."""
    if mode not in AMP_MODES:
        raise ConfigError(f"train.amp must be one of {tuple(AMP_MODES)}, got {mode!r}")
    if mode == "off":
        return
    if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.amp=bf16: this GPU does not support bfloat16; use train.amp=fp16 or off")
    try:
        with torch.autocast(device.type, dtype=AMP_MODES[mode]):
            torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3, device=device), torch.ones(1, 1, 1, 1, device=device))
        if mode == "fp16":
            torch.amp.GradScaler(device.type)
    except (RuntimeError, AttributeError, TypeError) as e:
        raise ConfigError(
            f"train.amp={mode} is not supported on {device.type} by this torch build ({str(e).splitlines()[0][:100]}); "
            "use train.amp=bf16 or off"
        ) from None


class Precision:
    """The autocast region and the backward/step of one training step for `train.amp`."""

    def __init__(self, mode: str, device: torch.device) -> None:
        check_amp(mode, device)
        self.mode = mode
        self.device_type = device.type
        self.dtype = AMP_MODES[mode]
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None

    def autocast(self):
        """Context for the forward passes (attack and loss); backward runs outside it."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        # Steps with inf/nan gradients are skipped and the scale is lowered: no host sync needed here.
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state(self) -> dict | None:
        """The GradScaler state (plain numbers: JSON, no tensors) for the checkpoint record."""
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def to_channels_last(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if enabled and x.ndim == 4 else x
