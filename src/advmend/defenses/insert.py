"""Insert FSR blocks after named layers of any nn.Module backbone, through forward hooks.

The backbone is left untouched (its weight names stay `backbone.<name>`), the blocks live in the
wrapper's own ModuleDict, and `eject()` gives the original model back. `model(x)` returns logits only;
the auxiliary outputs come from the explicit `forward_with_aux(x)`.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
            {_block_key(p): FSRBlock(shapes[p][0], num_classes, tau=tau, hidden=hidden) for p in self.layers}
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
            names = [n for n, _ in self.backbone.named_modules() if n]
            close = difflib.get_close_matches(path, names, n=6, cutoff=0.6) or [n for n in names if "." not in n]
            raise ConfigError(
                f"fsr.layers: unknown layer {path!r} for FSR; nearest: {', '.join(close[:6])} "
                "(`advmend layers MODEL` lists them with their output shapes)"
            ) from None

    def _apply_block(self, key: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        block = self.fsr[key]
        if self._record is None:
            return block(output)
        out = block.forward_with_aux(output)  # type: ignore[operator]  # torch types a submodule attribute Tensor | Module
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

    def forward_with_loss(
        self, x: torch.Tensor, y: torch.Tensor, weights: Mapping[str, float]
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """The loss pass every training objective runs (`defenses.hooks.AuxiliaryLoss`): the logits and
        lambda_sep * L_sep + lambda_rec * L_rec from one `forward_with_aux` pass (docs/fsr.md: y_adv from
        the final logits on x). With both weights 0 it is the plain forward pass, so a method with
        zero FSR weights is exactly the method without FSR."""
        lambda_sep, lambda_rec = weights["lambda_sep"], weights["lambda_rec"]
        if lambda_sep == 0 and lambda_rec == 0:
            return self(x), None, {}
        out = self.forward_with_aux(x)
        sep, rec = fsr_losses(out, y)
        return out.logits, lambda_sep * sep + lambda_rec * rec, {"fsr_sep": sep.detach(), "fsr_rec": rec.detach()}

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
        return self.backbone.features(x)  # type: ignore[operator]  # torch types a submodule attribute Tensor | Module


def layer_outputs(
    backbone: nn.Module, input_shape: Sequence[int], paths: Sequence[str] | None = None
) -> dict[str, list[tuple | str]]:
    """What each named submodule (all of them, or `paths`) outputs in one eval-mode forward pass on zeros:
    path -> one entry per call, the output's shape without the batch axis, or its type name when it is not
    a tensor. A module never called is absent. Modes, BatchNorm statistics and the RNG are left as they were."""
    modules = dict(backbone.named_modules())
    targets = {p: modules[p] for p in (paths if paths is not None else [n for n in modules if n])}
    outputs: dict[str, list[tuple | str]] = {}

    def hook(path: str, _m: nn.Module, _i: tuple, out: object) -> None:
        shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        outputs.setdefault(path, []).append(shape)

    handles = [m.register_forward_hook(functools.partial(hook, p)) for p, m in targets.items()]
    modes = [(m, m.training) for m in backbone.modules()]
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        backbone.eval()  # keep BatchNorm running statistics untouched
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            backbone(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return outputs


def insertion_points(backbone: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The layers FSR can follow: called once per forward pass, with a (C, H, W) feature map (per image)."""
    return {p: calls[0] for p, calls in layer_outputs(backbone, input_shape).items()
            if len(calls) == 1 and isinstance(calls[0], tuple) and len(calls[0]) == 3}  # fmt: skip


def _probe_output_shapes(
    backbone: nn.Module, targets: dict[str, nn.Module], input_shape: Sequence[int]
) -> dict[str, tuple[int, ...]]:
    """Each target layer's output shape (C, H, W); a ConfigError for a layer FSR cannot follow."""
    outputs = layer_outputs(backbone, input_shape, list(targets))
    shapes: dict[str, tuple[int, ...]] = {}
    for path in targets:
        calls = outputs.get(path)
        if not calls:
            raise ConfigError(f"fsr.layers: layer {path!r} is never called in the model's forward pass")
        if len(calls) > 1:
            raise ConfigError(f"fsr.layers: layer {path!r} runs {len(calls)} times per forward pass (a shared "
                              "module); FSR needs a layer that runs once")  # fmt: skip
        got = calls[0]
        if not isinstance(got, tuple) or len(got) != 3:
            token_hint = (
                " (a transformer's token sequence: choose a convolutional layer, e.g. its patch embedding's projection)"
                if isinstance(got, tuple) and len(got) == 2
                else ""
            )
            raise ConfigError(f"fsr.layers: FSR needs a (N, C, H, W) feature map after {path!r}, got "
                              f"{('N',) + got if isinstance(got, tuple) else got}{token_hint}")  # fmt: skip
        shapes[path] = got
    return shapes


def insert_fsr(backbone: nn.Module, at: Sequence[str] | str, num_classes: int, **kwargs) -> FSRModel:
    """`FSRModel(backbone, at=at, num_classes=num_classes, **kwargs)`; see FSRModel."""
    return FSRModel(backbone, at=[at] if isinstance(at, str) else list(at), num_classes=num_classes, **kwargs)


def fsr_losses(out: FSROutput, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_sep, L_rec) of the spec, averaged over blocks, with y_adv from `out.logits`."""
    return fsr_terms(out.blocks, out.logits, y)


__all__ = ["FSRModel", "FSROutput", "insert_fsr", "fsr_losses", "insertion_points", "layer_outputs"]
