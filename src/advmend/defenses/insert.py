"""Insert FSR blocks after named layers of any nn.Module backbone, through forward hooks.

The backbone is left untouched (its weight names stay `backbone.<name>`), the blocks live in the
wrapper's own ModuleDict, and `eject()` gives the original model back. `model(x)` returns logits only;
the auxiliary outputs come from the explicit `forward_with_aux(x)`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from advmend.defenses.fsr import FSRBlock, FSRBlockOutput, fsr_terms
from advmend.errors import ConfigError


@dataclass
class FSROutput:
    """Final logits plus what each FSR block computed, in the order of `FSRModel.layers`."""

    logits: torch.Tensor
    blocks: list[FSRBlockOutput]


def _block_key(path: str) -> str:
    return path.replace(".", "__")  # ModuleDict keys may not contain dots


class FSRModel(nn.Module):
    """A backbone with FSR blocks after the named layers.

    Args:
        backbone: any module mapping (N, C, H, W) images in [0, 1] to (N, K) logits.
        at: dotted names of the layers whose output goes through an FSR block
            (e.g. ["layer4"] for a ResNet; `backbone.get_submodule` paths).
        num_classes: K, for the auxiliary heads.
        input_shape: (C, H, W) of one input, used once to infer each layer's channel count.
        tau: Gumbel-sigmoid temperature.
        hidden: width of the separation and recalibration nets.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        at: Sequence[str],
        num_classes: int,
        input_shape: Sequence[int] = (3, 32, 32),
        tau: float = 0.1,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        if isinstance(at, str):
            at = [at]
        if not at:
            raise ConfigError("fsr.layers must name at least one layer")
        if len(set(at)) != len(at):
            raise ConfigError(f"fsr.layers names a layer twice: {list(at)}")
        self.backbone = backbone
        self.layers = list(at)
        targets = {path: self._resolve(path) for path in self.layers}
        shapes = _probe_output_shapes(backbone, targets, input_shape)
        self.fsr = nn.ModuleDict(
            {
                _block_key(p): FSRBlock(shapes[p][0], num_classes, tau=tau, hidden=hidden)
                for p in self.layers
            }
        )
        # None: blocks run their cheap forward; a list: blocks also record auxiliary outputs.
        self._record: list[FSRBlockOutput] | None = None
        self._handles = [
            module.register_forward_hook(functools.partial(self._apply_block, _block_key(path)))
            for path, module in targets.items()
        ]

    def _resolve(self, path: str) -> nn.Module:
        try:
            return self.backbone.get_submodule(path)
        except AttributeError:
            names = [n for n, _ in self.backbone.named_modules() if n and n.count(".") <= 1]
            shown = ", ".join(names[:40]) + (", ..." if len(names) > 40 else "")
            raise ConfigError(f"unknown layer {path!r} for FSR; layers of this model: {shown}") from None

    def _apply_block(self, key: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        block = self.fsr[key]
        if self._record is None:
            return block(output)
        out = block.forward_with_aux(output)
        self._record.append(out)
        return out.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits only (N, K): what every attack and every metric sees."""
        return self.backbone(x)

    def forward_with_aux(self, x: torch.Tensor) -> FSROutput:
        """Logits plus each block's mask and auxiliary logits (for the FSR training losses)."""
        self._record = []
        try:
            logits = self.backbone(x)
            return FSROutput(logits, self._record)
        finally:
            self._record = None

    def eject(self) -> nn.Module:
        """Remove the hooks and return the untouched backbone; this wrapper stops working."""
        for h in self._handles:
            h.remove()
        self._handles = []
        return self.backbone

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's penultimate features, with the FSR blocks active."""
        if not hasattr(self.backbone, "features"):
            raise AttributeError("the backbone has no features() method")
        return self.backbone.features(x)


def _probe_output_shapes(
    backbone: nn.Module, targets: dict[str, nn.Module], input_shape: Sequence[int]
) -> dict[str, tuple[int, ...]]:
    """One eval-mode forward pass on zeros to read each target layer's output shape (C, H, W)."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for path, module in targets.items():

        def hook(_m, _i, out, path=path):
            if not isinstance(out, torch.Tensor) or out.dim() != 4:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ConfigError(f"FSR needs a (N, C, H, W) feature map after {path!r}, got {got}")
            shapes[path] = tuple(out.shape[1:])

        handles.append(module.register_forward_hook(hook))
    modes = [(m, m.training) for m in backbone.modules()]
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        backbone.eval()  # keep BatchNorm running statistics untouched
        with torch.no_grad():
            backbone(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    missing = [p for p in targets if p not in shapes]
    if missing:
        raise ConfigError(f"layer(s) {missing} are never called in the backbone's forward pass")
    return shapes


def insert_fsr(backbone: nn.Module, at: Sequence[str] | str, num_classes: int, **kwargs) -> FSRModel:
    """`FSRModel(backbone, at=at, num_classes=num_classes, **kwargs)`; see FSRModel."""
    return FSRModel(backbone, at=[at] if isinstance(at, str) else list(at), num_classes=num_classes, **kwargs)


def fsr_losses(out: FSROutput, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_sep, L_rec) of the spec, averaged over blocks, with y_adv from `out.logits`."""
    return fsr_terms(out.blocks, out.logits, y)


__all__ = ["FSRModel", "FSROutput", "insert_fsr", "fsr_losses"]
