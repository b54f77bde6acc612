"""The PSSR training objective: pixel and semantic consistency plus the adversarial R-drop regulariser.

Fu, Zhou, Ma, Zhang, "Invariance-powered Trustworthy Defense via Remove Then Restore", arXiv
2402.00304 (2024): Semantic Regeneration restores the image "with pixel consistency and semantic
consistency", and "a self-augmentation regularizer with adversarial R-drop" balances robustness and
accuracy. R-Drop: Liang et al., "R-Drop: Regularized Dropout for Neural Networks", NeurIPS 2021.
Our reading (docs/pssr.md):

    L = l_pix L_pix(adv) + l_pix_cln L_pix(cln) + l_sem (L_sem(adv) + L_sem(cln)) + l_rd L_rd
    L_pix(v)  = mean | x_hat_v - x |                                   (L1 to the clean image)
    L_sem(v)  = l_ce CE(f(x_hat_v), y) + l_feat_v mean (phi(x_hat_v) - phi(x))^2   (phi: f's penultimate features)
    (l_pix_cln, l_feat_cln: l_pix and l_feat unless set; l_feat_adv = l_feat)
    L_rd      = 1/2 [KL(P_a || P_b) + KL(P_b || P_a)]                   (R-Drop's symmetric KL)

"cross" (default): P_a, P_b are f's predictions on the adversarial and the clean image, each through
its own surgery and its own draw of G's dropout (the clean image's surgery is its self-augmentation).
"literal": the literal R-Drop reading, two dropout draws of the adversarial path; the adversarial
terms are then the mean over the two draws.

Adversarial examples are made on the fly by the one PGD core: against f alone ("graybox", default)
or against the whole pipeline ("adaptive", mask constant in the backward pass). Both images go
through PS and G in one batched pass; only G's parameters receive gradients unless f is fine-tuned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advmend.attacks.pgd import PGD, pgd
from advmend.defenses.insert import FSRModel
from advmend.defenses.pssr.pipeline import PSSRModel
from advmend.errors import ModelContractError
from advmend.types import LossOutput


def classifier_head(model: nn.Module) -> nn.Linear:
    """The final Linear layer of a classifier (its input is the penultimate feature vector).

    Our models name it `fc`; an FSR model's head is its backbone's (the FSR blocks hold auxiliary
    Linear heads of their own, which must not be picked). Otherwise: the last Linear registered.
    """
    root = model.backbone if isinstance(model, FSRModel) else model
    for name in ("fc", "classifier", "head", "linear"):
        if isinstance(getattr(root, name, None), nn.Linear):
            return getattr(root, name)
    linears = [m for m in root.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelContractError(
            "PSSR's feature loss needs the classifier's penultimate features: the classifier has no "
            "nn.Linear head; set pssr.lambda_feat=0 (and pssr.lambda_feat_clean=0 if set)"
        )
    return linears[-1]


@contextlib.contextmanager
def penultimate_features(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the input of `model`'s head on each forward pass (one pass gives logits and phi)."""
    store: list[torch.Tensor] = []
    handle = classifier_head(model).register_forward_hook(lambda _m, inputs, _out: store.append(inputs[0]))
    try:
        yield store
    finally:
        handle.remove()


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """1/2 [KL(P_a || P_b) + KL(P_b || P_a)], averaged over the batch (R-Drop's regulariser)."""
    la, lb = F.log_softmax(logits_a.float(), dim=1), F.log_softmax(logits_b.float(), dim=1)
    kl_ab = (la.exp() * (la - lb)).sum(dim=1)
    kl_ba = (lb.exp() * (lb - la)).sum(dim=1)
    return 0.5 * (kl_ab + kl_ba).mean()


@dataclass(frozen=True)
class PSSRObjective:
    """`(pipeline, x, y) -> LossOutput` for training the regenerator of a `PSSRModel`.

    Args:
        attack: PGD settings for the on-the-fly adversarial examples; None trains on clean images
            only (the adversarial path is then the clean image).
        threat: "graybox" (PGD on f alone) or "adaptive" (PGD on the whole pipeline).
        lambda_pix, lambda_pix_clean, lambda_sem, lambda_ce, lambda_feat, lambda_rd: the weights of the
            objective above; lambda_pix_clean (None: lambda_pix) weighs the clean path's pixel loss on its
            own, so that G can be held to leave clean images intact while it learns to denoise adversarial ones;
            lambda_feat_clean (None: lambda_feat) likewise weighs the clean path's feature loss, which holds
            f's view of regenerated clean images to that of the clean images, the term clean accuracy rests on;
            lambda_ce = 0 leaves the feature loss alone in L_sem, the high-level representation guided
            denoiser of Liao et al., CVPR 2018 (HGD), which does not push G towards any class.
        rdrop: "cross" (adversarial vs clean path) or "literal" (two dropout draws of the adversarial path).
    """

    attack: PGD | None = None
    threat: str = "graybox"
    lambda_pix: float = 1.0
    lambda_pix_clean: float | None = None
    lambda_sem: float = 1.0
    lambda_ce: float = 1.0
    lambda_feat: float = 1.0
    lambda_feat_clean: float | None = None
    lambda_rd: float = 1.0
    rdrop: str = "cross"

    def craft(self, model: PSSRModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.attack is None or self.attack.steps == 0:
            return x
        target = model.classifier if self.threat == "graybox" else model
        return pgd(target, x, y, self.attack.for_training(), validate=False)

    def __call__(self, model: PSSRModel, x: torch.Tensor, y: torch.Tensor) -> LossOutput:
        if not isinstance(model, PSSRModel):
            raise ModelContractError(f"the PSSR objective trains a PSSRModel, got {type(model).__name__}")
        b = x.shape[0]
        x_adv = self.craft(model, x, y)
        # One surgery for both images; the surgery is deterministic (f in eval mode), so the literal
        # reading reuses the adversarial one for its second dropout draw.
        _, m, xs = model.surgery(torch.cat([x_adv, x]))
        inputs = torch.cat([x_adv, x])
        n_adv = 2 if self.rdrop == "literal" else 1
        if n_adv == 2:
            xs, m, inputs = (torch.cat([t[:b], t]) for t in (xs, m, inputs))
        clean = x.repeat(n_adv + 1, 1, 1, 1)
        x_hat = model.regenerate(xs, m, inputs)
        lambda_feat_cln = self.lambda_feat if self.lambda_feat_clean is None else self.lambda_feat_clean
        need_feat = self.lambda_sem > 0 and (self.lambda_feat > 0 or lambda_feat_cln > 0)
        feats: contextlib.AbstractContextManager[Any] = (
            penultimate_features(model.classifier) if need_feat else contextlib.nullcontext([])
        )
        with feats as store:
            logits = model.classifier(x_hat)
            if need_feat:
                with torch.no_grad():
                    model.classifier(x)
        labels = y.repeat(n_adv + 1)

        pix = (x_hat - clean).abs().flatten(1).mean(dim=1).view(n_adv + 1, b).mean(dim=1)
        ce = F.cross_entropy(logits.float(), labels, reduction="none").view(n_adv + 1, b).mean(dim=1)
        pix_adv, pix_cln = pix[:n_adv].mean(), pix[-1]
        ce_adv, ce_cln = ce[:n_adv].mean(), ce[-1]
        zero = x_hat.new_zeros(())
        feat_adv = feat_cln = zero
        if need_feat:
            phi, phi_clean = store[0].flatten(1), store[1].flatten(1).detach()
            feat = (phi - phi_clean.repeat(n_adv + 1, 1)).pow(2).mean(dim=1).view(n_adv + 1, b).mean(dim=1)
            feat_adv, feat_cln = feat[:n_adv].mean(), feat[-1]
        rd = zero
        if self.lambda_rd > 0:
            other = logits[b : 2 * b]  # literal: the second adversarial draw; cross: the clean path
            rd = symmetric_kl(logits[:b], other)
        loss = (
            self.lambda_pix * pix_adv
            + (self.lambda_pix if self.lambda_pix_clean is None else self.lambda_pix_clean) * pix_cln
            + self.lambda_sem
            * (self.lambda_ce * (ce_adv + ce_cln) + self.lambda_feat * feat_adv + lambda_feat_cln * feat_cln)
            + self.lambda_rd * rd
        )
        metrics = {
            "pix_adv": pix_adv, "pix_cln": pix_cln, "ce_adv": ce_adv, "ce_cln": ce_cln,
            "feat_adv": feat_adv, "feat_cln": feat_cln, "rdrop": rd,
            "removed": m[:b].mean(),  # fraction of pixel locations the surgery removed (adversarial images)
        }  # fmt: skip
        return LossOutput(loss, logits[:b], {k: v.detach().float() for k, v in metrics.items()})
