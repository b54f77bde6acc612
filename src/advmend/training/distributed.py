"""DistributedDataParallel under `torchrun`, and the views of a wrapped model that objectives train.

`torchrun --nproc_per_node N -m advmend train CONFIG` sets RANK, WORLD_SIZE and LOCAL_RANK; `train()`
then joins the process group (nccl on CUDA, gloo on CPU), each rank takes batch_size / N examples of
every global batch (BatchLoader rank/world_size: the union over ranks is the single-process batch),
gradients are averaged by DDP, and rank 0 alone logs and writes files.

Objectives ask whether `model` has its own loss terms (`defenses.hooks.AuxiliaryLoss`, an FSR
model's L_sep and L_rec) and then run its `forward_with_loss`; a DDP or torch.compile wrapper would
hide that method. `training_view` therefore wraps a dispatcher (plain forward or the model's loss
pass) and hands objectives a face with that method, so the model's own terms, the attack and the loss
all run through DDP and the compiled graph.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from advmend.defenses.hooks import AuxiliaryLoss
from advmend.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.broadcast(t, src=0)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if not self.enabled:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return out


def env_context() -> DistContext:
    """The ranks torchrun set in the environment (one process when they are absent)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (launch with torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"invalid distributed environment: RANK={rank} WORLD_SIZE={world}")
    return DistContext(rank, world, local)


def init_distributed(ctx: DistContext, device: torch.device) -> torch.device:
    """Join the process group (if not joined yet); returns this rank's device."""
    if not ctx.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size, timeout=timedelta(minutes=30))
    return device


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


class _Dispatch(nn.Module):
    """One forward that DDP / compile can wrap: the plain logits, or, given labels and loss weights, the
    model's loss pass with its own terms (`defenses.hooks.AuxiliaryLoss`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, weights: Mapping[str, float] | None = None):
        if y is None or weights is None:
            return self.model(x)
        return self.model.forward_with_loss(x, y, weights)  # type: ignore[operator]  # torch types a submodule attribute Tensor | Module


class _AuxiliaryLossView(nn.Module):
    """The `AuxiliaryLoss` face of a wrapped model that has one: objectives still get its own loss terms,
    computed inside the DDP / compiled forward. The wrapped module is this view's only child."""

    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wrapped(x)

    def forward_with_loss(self, x: torch.Tensor, y: torch.Tensor, weights: Mapping[str, float]):
        return self.wrapped(x, y, weights)


def training_view(
    model: nn.Module, ctx: DistContext, device: torch.device, *, compile: bool, find_unused: bool = False
) -> nn.Module:
    """The module objectives train: `model` itself, or DDP- and/or torch.compile-wrapped.

    Checkpoints, EMA and validation use `model` (the unwrapped module), never the view.
    """
    if not ctx.enabled and not compile:
        return model
    wrapped: nn.Module = _Dispatch(model)
    if ctx.enabled:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(wrapped, device_ids=ids, find_unused_parameters=find_unused)
    if compile:
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]  # compiling a Module gives an OptimizedModule; the stub says a callable
    # A wrapper is called as model(x) directly; a model with its own loss terms keeps that method's face.
    return _AuxiliaryLossView(wrapped) if isinstance(model, AuxiliaryLoss) else wrapped
