"""DistributedDataParallel under `torchrun`, and the views of a wrapped model that objectives train.

`torchrun --nproc_per_node N -m advmend train CONFIG` sets RANK, WORLD_SIZE and LOCAL_RANK; `train()`
then joins the process group (nccl on CUDA, gloo on CPU), each rank takes batch_size / N examples of
every global batch (BatchLoader rank/world_size: the union over ranks is the single-process batch),
gradients are averaged by DDP, and rank 0 alone logs and writes files.

Objectives receive `model` and check `isinstance(model, FSRModel)` to add the FSR losses through
`model.forward_with_aux`; a DDP or torch.compile wrapper would hide that. `training_view` therefore
wraps a dispatcher (plain or auxiliary forward) and hands objectives an FSRModel face for it, so the
FSR terms, the attack and the loss all run through DDP and the compiled graph.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from advmend.defenses.insert import FSRModel
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
    """One forward that DDP / compile can wrap: plain logits, or FSR's logits plus auxiliary outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, aux: bool = False):
        return self.model.forward_with_aux(x) if aux else self.model(x)  # type: ignore[operator]  # torch types a submodule attribute Tensor | Module


class _WrappedFSRView(FSRModel):
    """An FSRModel face for a wrapped FSRModel: objectives still add the FSR losses.

    Only forward and forward_with_aux are provided (all an objective uses); FSRModel.__init__ is not
    run because the blocks live in the wrapped model, which this view registers as its only child.
    """

    def __init__(self, wrapped: nn.Module) -> None:
        nn.Module.__init__(self)
        self.wrapped = wrapped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wrapped(x)

    def forward_with_aux(self, x: torch.Tensor):
        return self.wrapped(x, aux=True)


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
    # A plain model's wrapper is called as model(x) directly; an FSR model needs the FSRModel face.
    return _WrappedFSRView(wrapped) if isinstance(model, FSRModel) else wrapped
