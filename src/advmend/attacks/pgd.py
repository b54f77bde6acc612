"""The one iterative gradient attack core: FGSM, BIM, PGD (L-inf, L2 and L1), restarts, CW-margin.

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018, https://arxiv.org/abs/1706.06083. FGSM (Goodfellow et al. 2015) is PGD with one
step of size eps and no random start. Every attack in advmend, for training and for evaluation, is a
`PGD` configuration run by `pgd()`.

Threat model: untargeted (or targeted, `PGD.targeted`), ||x_adv - x|| <= eps in L-inf, L2 or L1
(the L1 geometry is in `attacks.l1`), x_adv in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from advmend.attacks.l1 import l1_random_start, l1_step
from advmend.attacks.losses import LOSSES
from advmend.attacks.modes import attack_mode
from advmend.config import NORMS, STARTS  # the choices of an attack section, checked there too
from advmend.errors import ConfigError
from advmend.types import AttackRun
from advmend.validate import check_images, check_labels, check_logits

NORMAL_START_STD = 1e-3  # TRADES (Zhang et al. 2019): x + 0.001 * N(0, I)
# Under fp16 autocast the backward pass runs through fp16 activations, where per-element input
# gradients (often ~1e-7) underflow to zero. Sign (L-inf) and normalised (L2) steps are invariant to a
# positive factor, so the loss is multiplied by this constant before differentiation.
FP16_GRAD_SCALE = 2.0**12


@dataclass(frozen=True)
class PGD:
    """Settings of one PGD-family attack.

    Args:
        eps: radius of the threat model.
        steps: gradient steps; 0 means no attack (x is returned unchanged).
        step_size: step length; None gives min(eps, 2.5 * eps / steps) (Madry et al.).
        norm: "linf" (signed steps), "l2" (normalised steps) or "l1" (sparse steps, `attacks.l1`).
        random_start: start from a random point near x instead of x.
        start: the random start's law: "uniform" in the ball (Madry) or "normal" with standard
            deviation 0.001 (TRADES), clipped to the ball.
        restarts: independent runs; each example keeps its worst case, and later restarts only
            run on the examples no earlier restart fooled.
        loss: "ce" or "margin" (CW).
        kappa: confidence of the margin loss.
        eot: gradient samples averaged per step (Expectation over Transformation, Athalye et al.
            2018) for models with random parts; 1 for deterministic models.
        keep_best: return, per example, the first iterate that fools the model (evaluation)
            rather than the last iterate (training, Madry's PGD-AT). An evaluation option only: the
            training objectives and transfer attacks always use the last iterate, whatever it says.
        targeted: the labels passed to the attack are target classes: the loss becomes its
            targeted form ("ce" descends CE towards the target, "margin" the targeted CW margin) and
            an example counts as fooled when it is classified as its target.
        name: label used in reports.

    Example:
        >>> x_adv = pgd(model, x, y, PGD(eps=8/255, steps=20, step_size=0.8/255, random_start=False))
    """

    eps: float
    steps: int = 10
    step_size: float | None = None
    norm: str = "linf"
    random_start: bool = True
    restarts: int = 1
    loss: str = "ce"
    kappa: float = 0.0
    start: str = "uniform"
    eot: int = 1
    keep_best: bool = True
    targeted: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        if not (self.eps >= 0 and math.isfinite(self.eps)):
            raise ConfigError(f"attack eps must be a finite number >= 0, got {self.eps}")
        if self.steps < 0:
            raise ConfigError(f"attack steps must be >= 0, got {self.steps}")
        if self.restarts < 1:
            raise ConfigError(f"attack restarts must be >= 1, got {self.restarts}")
        if self.eot < 1:
            raise ConfigError(f"attack eot must be >= 1, got {self.eot}")
        if self.start not in STARTS:
            raise ConfigError(f"attack start must be one of {STARTS}, got {self.start!r}")
        if self.norm not in NORMS:
            raise ConfigError(f"attack norm must be one of {NORMS}, got {self.norm!r}")
        LOSSES.get(self.loss)  # raises a ConfigError naming the valid losses
        if self.loss == "kl" and (self.keep_best or self.restarts > 1):
            # "fooled" compares a prediction with a label; the KL loss's target is a probability row.
            raise ConfigError("the kl loss takes clean probabilities, not labels: use keep_best=False and restarts=1")
        if self.targeted and self.loss not in ("ce", "margin"):
            raise ConfigError(f"a targeted attack needs loss 'ce' or 'margin', got {self.loss!r}")
        if self.step_size is not None and not self.step_size > 0:
            raise ConfigError(f"attack step_size must be > 0, got {self.step_size}")

    def for_training(self) -> PGD:
        """This attack as every training objective runs it: on its LAST iterate (Madry et al.'s PGD-AT,
        TRADES, MART, fast AT, PSSR's regenerator), whatever `keep_best` says. `keep_best` (the first
        iterate that fools the model) is an evaluation option; training on it would stop each example's
        inner maximisation at the model's decision boundary, a weaker and differently distributed batch."""
        return self if not self.keep_best else replace(self, keep_best=False)

    @property
    def alpha(self) -> float:
        """The step size actually used."""
        if self.step_size is not None:
            return self.step_size
        return min(self.eps, 2.5 * self.eps / max(self.steps, 1))

    def describe(self) -> dict:
        """Exact settings, for reports."""
        return {
            "name": self.name or f"PGD-{self.steps}",
            "norm": self.norm,
            "eps": self.eps,
            "steps": self.steps,
            "step_size": self.alpha,
            "random_start": self.random_start,
            "restarts": self.restarts,
            "loss": self.loss,
            "kappa": self.kappa,
            "start": self.start if self.random_start else None,
            "eot": self.eot,
            "targeted": self.targeted,
        }

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: torch.device,
            batch_size: int = 256, generator: torch.Generator | None = None, progress: bool = False) -> AttackRun:  # fmt: skip
        """Attack (x, y) in batches of `batch_size`, as every attack in an evaluation runs (`AttackRun`).

        Each example keeps its first fooling iterate with `keep_best` (`pgd_tracked`); a targeted attack
        aims at a uniformly random other class per example (`random_targets`, drawn from `generator`
        batch by batch before that batch's random start), and is judged against the true label.
        """
        chunks: list[torch.Tensor] = []
        fooled: list[torch.Tensor] = []
        num_classes = None
        bar = tqdm(range(0, x.shape[0], batch_size), desc=self.describe()["name"], disable=not progress, leave=False)
        for i in bar:
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            if not self.targeted:
                x_adv, hit = pgd_tracked(model, xb, yb, self, generator=generator, validate=False)
            else:
                if num_classes is None:
                    with attack_mode(model), torch.no_grad():
                        num_classes = model(xb[:1]).shape[1]
                x_adv, _ = pgd_tracked(model, xb, random_targets(yb, num_classes, generator), self, generator=generator,
                                       validate=False)  # fmt: skip
                with attack_mode(model), torch.no_grad():  # robustness is judged against the true label
                    hit = model(x_adv).argmax(1) != yb
            assert hit is not None  # pgd_tracked scores by default
            chunks.append(x_adv)
            fooled.append(hit)
        return AttackRun(torch.cat(chunks), torch.cat(fooled))

    @property
    def loss_fn(self):
        """The per-example loss the attack ascends (the targeted form when `targeted`)."""
        return LOSSES.get(f"{self.loss}_targeted" if self.targeted else self.loss)


def fgsm(eps: float, norm: str = "linf") -> PGD:
    """FGSM: one step of size eps from x (Goodfellow et al. 2015)."""
    return PGD(eps=eps, steps=1, step_size=eps, norm=norm, random_start=False, name="FGSM")


def l2_norms(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm of a batch, shaped (n, 1, 1, 1) to scale it. A sum of squares, not `Tensor.norm`:
    on CPU torch's float32 norm kernel drifts by ~1e-4 relative over a 224 x 224 x 3 image (the sum's cascade
    stays within ~1e-7), which would put a projected L2 example outside the ball the evaluation checks."""
    return (t * t).flatten(1).sum(1).sqrt().view(-1, *([1] * (t.dim() - 1)))


def l2_radius(eps: float, x: torch.Tensor) -> float:
    """The radius an L2 projection aims at so that the stored x + d lies in the eps-ball however it rounds:
    each pixel of x + d in [0, 1] moves by at most half a unit in the last place (finfo.eps / 4 below 1), so
    by sqrt(n) of those together (about 1e-5 for a 224 x 224 x 3 float32 image; at most eps / 2)."""
    return eps - min(math.sqrt(x[0].numel()) * torch.finfo(x.dtype).eps / 4, eps / 2)


def _random_start(x: torch.Tensor, cfg: PGD, generator: torch.Generator | None) -> torch.Tensor:
    if cfg.norm == "l1":
        return l1_random_start(x, cfg.eps, generator, NORMAL_START_STD if cfg.start == "normal" else None)
    if cfg.start == "normal":
        delta = NORMAL_START_STD * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        if cfg.norm == "linf":
            delta = delta.clamp(-cfg.eps, cfg.eps)
        else:
            radius = l2_radius(cfg.eps, x)
            delta = delta * (radius / l2_norms(delta).clamp_min(radius))
    elif cfg.norm == "linf":
        u = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        delta = (2 * u - 1) * cfg.eps
    else:  # uniform direction, radius with the ball's volume distribution
        g = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        direction = g / l2_norms(g).clamp_min(1e-12)
        r = torch.rand(x.shape[0], device=x.device, dtype=x.dtype, generator=generator)
        delta = direction * (l2_radius(cfg.eps, x) * r.pow(1.0 / x[0].numel())).view(-1, 1, 1, 1)
    return (x + delta).clamp(0, 1) - x


def _step(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, cfg: PGD) -> torch.Tensor:
    """One ascent step, then projection onto the eps-ball and onto the [0, 1] box."""
    if cfg.norm == "l1":
        delta = l1_step(delta, grad, x, cfg.eps, cfg.alpha)
    elif cfg.norm == "linf":
        delta = (delta + cfg.alpha * grad.sign()).clamp(-cfg.eps, cfg.eps)
    else:
        g_norm = l2_norms(grad).clamp_min(1e-12)
        delta = delta + cfg.alpha * grad / g_norm
        radius = l2_radius(cfg.eps, x)
        delta = delta * (radius / l2_norms(delta).clamp_min(radius))
    return (x + delta).clamp(0, 1) - x


def _fp16_autocast() -> bool:
    """Whether an enclosing torch.autocast region computes in float16 (on CPU or CUDA)."""
    for device_type in ("cuda", "cpu"):
        try:  # torch >= 2.4
            on = torch.is_autocast_enabled(device_type)
            dtype = torch.get_autocast_dtype(device_type)
        except TypeError:  # torch 2.3
            on = torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
            dtype = torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()
        if on and dtype == torch.float16:
            return True
    return False


def _input_grad(model, x, delta, y, cfg: PGD, loss_fn, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradient of the summed per-example loss w.r.t. delta (averaged over `cfg.eot` draws), the first
    draw's logits (detached) and the iterate x + delta they were computed on (detached: `keep_best` keeps
    it without adding x and delta again)."""
    grad: torch.Tensor | None = None
    first: torch.Tensor | None = None
    x_in = x
    for _ in range(cfg.eot):
        delta.requires_grad_(True)
        x_in = x + delta
        logits = model(x_in)
        if first is None:
            first = check_logits(logits, x.shape[0]).detach()
        loss = loss_fn(logits, y, cfg.kappa).float()
        (g,) = torch.autograd.grad(loss.sum() * scale, delta)
        grad = g if grad is None else grad + g
    delta.requires_grad_(False)
    assert grad is not None and first is not None  # cfg.eot >= 1
    return grad if cfg.eot == 1 else grad / cfg.eot, first, x_in.detach()


def _hit(logits: torch.Tensor, y: torch.Tensor, cfg: PGD) -> torch.Tensor:
    """Per example, whether the attack succeeded: misclassified, or classified as the target."""
    return logits.argmax(1) == y if cfg.targeted else logits.argmax(1) != y


def _run_once(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PGD, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One PGD run. Returns x_adv and, when the caller needs them, (fooled, final loss) per example."""
    loss_fn = cfg.loss_fn
    delta = _random_start(x, cfg, generator) if cfg.random_start else torch.zeros_like(x)
    track = cfg.keep_best or cfg.restarts > 1
    best = x.clone() if cfg.keep_best else None
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    scale = FP16_GRAD_SCALE if _fp16_autocast() else 1.0
    for _ in range(cfg.steps):
        grad, logits, x_in = _input_grad(model, x, delta, y, cfg, loss_fn, scale)
        delta = delta.detach()
        if cfg.keep_best:
            # Keep the first iterate that fools each example: later steps may undo it.
            newly = _hit(logits, y, cfg) & ~fooled
            assert best is not None  # set when keep_best
            best = torch.where(newly.view(-1, 1, 1, 1), x_in, best)
            fooled |= newly
        delta = _step(delta, grad, x, cfg)
    x_adv = x + delta
    if not track:
        return x_adv, None, None
    with torch.no_grad():  # the last iterate has not been scored yet
        logits = model(x_adv)
        final_loss = loss_fn(logits, y, cfg.kappa)
        final_fooled = _hit(logits, y, cfg)
    if cfg.keep_best:
        assert best is not None
        x_adv = torch.where(fooled.view(-1, 1, 1, 1), best, x_adv)
        final_fooled |= fooled
    return x_adv, final_fooled, final_loss


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: PGD,
    *,
    generator: torch.Generator | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Run the attack `cfg` on `model` and return adversarial examples (a new tensor).

    The model runs in eval mode with frozen parameters (see `attack_mode`); its modes, its
    parameters' `.grad` and `x`, `y` are left as they were. Works inside `torch.no_grad()` and
    `torch.inference_mode()` (gradients are turned on inside; inference tensors are copied), and on
    any memory layout of `x`.

    Args:
        model: maps (N, C, H, W) images in [0, 1] to (N, K) logits.
        x: (N, C, H, W) float images in [0, 1].
        y: (N,) int64 true labels (target labels when `cfg.targeted`).
        cfg: the attack's settings.
        generator: optional torch.Generator (on x's device) for the random start.
        validate: check x and y at the boundary (training turns this off after the data loader
            has already guaranteed it, to save a host sync per batch).

    Returns:
        (N, C, H, W) tensor with ||x_adv - x|| <= eps and values in [0, 1].
    """
    return pgd_tracked(model, x, y, cfg, generator=generator, validate=validate, score=False)[0]


def pgd_tracked(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: PGD,
    *,
    generator: torch.Generator | None = None,
    validate: bool = True,
    score: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`pgd` that also returns, per example, whether x_adv is misclassified (when `score`).

    Evaluation uses this so that scoring costs no extra forward pass: PGD-k costs k forward+backward
    passes plus one forward pass per example.
    """
    if validate:
        check_images(x)
        check_labels(y, x.shape[0])
    # An attack needs autograd whatever the caller's context: a user evaluating under `torch.no_grad()`
    # or `torch.inference_mode()` still gets the attack, not a "does not require grad" error.
    with torch.inference_mode(False), torch.enable_grad():
        x, y = grad_ready(x), grad_ready(y)
        return _pgd_tracked(model, x, y, cfg, generator, score)


def grad_ready(t: torch.Tensor) -> torch.Tensor:
    """`t` detached, as a tensor autograd may use; call it outside inference mode.

    A tensor created under `torch.inference_mode()` can never be saved for backward; a copy made
    outside inference mode is an ordinary tensor (the caller's tensor is left untouched).
    """
    return t.detach().clone() if t.is_inference() else t.detach()


def _pgd_tracked(model, x, y, cfg: PGD, generator, score: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if cfg.steps == 0 or cfg.eps == 0:
        if not score:
            return x.clone(), None
        with attack_mode(model), torch.no_grad():
            logits = check_logits(model(x), x.shape[0])
        return x.clone(), _hit(logits, y, cfg)
    if score and not (cfg.keep_best or cfg.restarts > 1):
        cfg = replace(cfg, keep_best=True)  # scoring needs the final forward pass anyway
    with attack_mode(model):
        x_adv, fooled, loss = _run_once(model, x, y, cfg, generator)
        for _ in range(cfg.restarts - 1):
            assert fooled is not None and loss is not None  # _run_once tracks when restarts > 1
            todo = (~fooled).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            cand, cand_fooled, cand_loss = _run_once(model, x[todo], y[todo], cfg, generator)
            assert cand_fooled is not None and cand_loss is not None
            better = cand_fooled | (cand_loss > loss[todo])
            idx = todo[better]
            x_adv[idx] = cand[better]
            loss[idx] = cand_loss[better]
            fooled[idx] = cand_fooled[better]
        return x_adv.detach(), fooled


def random_targets(y: torch.Tensor, num_classes: int, generator: torch.Generator | None) -> torch.Tensor:
    """A uniformly random class other than the true one, per example (targeted attacks)."""
    offset = torch.randint(1, num_classes, y.shape, device=y.device, generator=generator)
    return (y + offset) % num_classes
