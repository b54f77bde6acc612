"""Contracts of PSSR's parts: pixel surgery, the regenerator, the pipeline, the objective, BPDA."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from advmend.attacks import BPDA, PGD, pgd
from advmend.config import CONFIG_DIR, PSSRConfig, RunConfig, from_dict, load_run_config
from advmend.data import ArrayDataset
from advmend.defenses import insert_fsr
from advmend.defenses.pssr import (
    PSSRModel,
    PSSRPreprocess,
    Regenerator,
    apply_surgery,
    auto_depth,
    check_pssr_config,
    salient_mask,
    score_map,
)  # fmt: skip
from advmend.defenses.pssr.objective import PSSRObjective, classifier_head, penultimate_features, symmetric_kl
from advmend.errors import ConfigError, InputError
from advmend.evaluation.pssr import GRAYBOX, IDENTITY, MASK, evaluate_pssr
from advmend.models import create_model


def _classifier(channels: int = 3, classes: int = 10):
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=classes, in_channels=channels, width=8)


def _pipeline(dropout: float = 0.1, size: int = 32, channels: int = 3, **kw) -> PSSRModel:
    f = _classifier(channels)
    torch.manual_seed(1)
    g = Regenerator(channels, (size, size), width=8, dropout=dropout)
    return PSSRModel(f, g, **kw)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(3)
    return torch.rand(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g)


def _modes(model):
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


# --------------------------------------------------------------------------- pixel surgery


def test_score_map_shape_detached_and_scorer_untouched(data):
    x, _ = data
    f = _classifier()
    f.train()
    before, x0 = _modes(f), x.clone()
    s = score_map(f, x)
    assert s.shape == (6, 1, 32, 32) and not s.requires_grad and (s >= 0).all() and s.sum() > 0
    assert _modes(f) == before and torch.equal(x, x0)
    assert all(p.grad is None for p in f.parameters())


def test_score_map_is_per_example_and_matches_autograd(data):
    x, _ = data
    f = _classifier().eval()
    s = score_map(f, x)
    x1 = x[2:3].clone().requires_grad_(True)
    p = torch.softmax(f(x1), 1).max()
    (g,) = torch.autograd.grad(p, x1)
    torch.testing.assert_close(s[2:3], g.abs().amax(1, keepdim=True))


def test_alpha_mask_is_mean_threshold_per_image():
    s = torch.rand(4, 1, 8, 8)
    s[1] *= 100  # a different scale per image must not matter
    for alpha in (0.5, 1.0, 2.0):
        m = salient_mask(s, mask="alpha", alpha=alpha)
        ref = (s >= alpha * s.mean(dim=(1, 2, 3), keepdim=True)).float()
        assert m.shape == s.shape and torch.equal(m, ref)
        assert set(m.unique().tolist()) <= {0.0, 1.0}
    # larger alpha removes fewer pixels
    assert salient_mask(s, alpha=2.0).sum() < salient_mask(s, alpha=0.5).sum()


def test_alpha_mask_removes_nothing_without_gradient_information():
    assert salient_mask(torch.zeros(2, 1, 4, 4), mask="alpha").sum() == 0


@pytest.mark.parametrize("rho", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_ratio_mask_removes_exactly_rho(rho):
    s = torch.rand(5, 1, 28, 28)
    m = salient_mask(s, mask="ratio", rho=rho)
    k = round(rho * 28 * 28)
    assert torch.equal(m.flatten(1).sum(1), torch.full((5,), float(k)))
    if 0 < k < 28 * 28:  # the removed pixels are the highest-scoring ones
        flat, mf = s.flatten(1), m.flatten(1).bool()
        assert (flat[mf].view(5, k).min(1).values >= flat[~mf].view(5, -1).max(1).values).all()


def test_unknown_mask_rule_is_a_config_error():
    with pytest.raises(ConfigError, match="pssr.mask"):
        salient_mask(torch.rand(1, 1, 4, 4), mask="top")


def test_surgery_fills_masked_pixels_and_keeps_the_rest(data):
    x, _ = data
    m = salient_mask(torch.rand(6, 1, 32, 32), mask="ratio", rho=0.3)
    xs = apply_surgery(x, m, fill=0.5)
    keep = m.expand_as(x) == 0
    assert torch.equal(xs[keep], x[keep]) and (xs[~keep] == 0.5).all()


def test_masks_are_detached_but_gradients_flow_through_the_kept_pixels(data):
    x, _ = data
    model = _pipeline().eval()
    xg = x.clone().requires_grad_(True)
    score, m, xs = model.surgery(xg)
    assert not score.requires_grad and not m.requires_grad and xs.requires_grad
    (g,) = torch.autograd.grad(xs.sum(), xg)
    assert torch.equal(g, (1 - m).expand_as(x))  # d x_s / d x = 1 - M: the mask is a constant


def test_surgery_off_is_the_identity(data):
    x, _ = data
    model = _pipeline(surgery=False)
    score, m, xs = model.surgery(x)
    assert xs is x and m.sum() == 0 and m.shape == (6, 1, 32, 32)


# --------------------------------------------------------------------------- regenerator


def test_regenerator_depth_output_range_and_shape():
    assert auto_depth(32, 32) == 3 and auto_depth(28, 28) == 2 and auto_depth(64, 48) == 3
    with pytest.raises(ConfigError, match="divisible"):
        auto_depth(30, 30)
    for size, ch, depth in ((32, 3, 3), (28, 1, 2)):
        g = Regenerator(ch, (size, size), width=4)
        assert g.depth == depth
        out = g(torch.rand(3, ch, size, size) * 50 - 25, torch.ones(3, 1, size, size))  # extreme inputs
        assert out.shape == (3, ch, size, size) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(InputError, match="regenerator"):
        Regenerator(3, (32, 32), width=4)(torch.rand(2, 1, 32, 32), torch.zeros(2, 1, 32, 32))


# --------------------------------------------------------------------------- pipeline


def test_pipeline_returns_logits_and_leaves_inputs_and_modes_alone(data):
    x, _ = data
    model = _pipeline()
    for train in (True, False):
        model.train(train)
        before, x0 = _modes(model), x.clone()
        out = model(x)
        assert out.shape == (6, 10) and torch.equal(x, x0) and _modes(model) == before
    assert not model.classifier.training  # train() reaches G only
    assert all(not p.requires_grad for p in model.classifier.parameters())


def test_pipeline_is_deterministic_in_eval_mode_and_random_in_train_mode(data):
    x, _ = data
    model = _pipeline(dropout=0.5).eval()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert torch.equal(a, model(x))
    model.train()
    assert not torch.equal(model.preprocess(x), model.preprocess(x))  # decoder dropout is active


def test_forward_with_intermediates_is_consistent_and_checks_input(data):
    x, _ = data
    model = _pipeline().eval()
    out = model.forward_with_intermediates(x)
    assert out.score.shape == out.mask.shape == (6, 1, 32, 32)
    assert out.surgical.shape == out.regenerated.shape == x.shape
    assert torch.equal(out.logits, model(x))
    assert torch.equal(out.surgical, apply_surgery(x, out.mask, 0.0))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        model.forward_with_intermediates(x * 2)


def test_hole_mode_keeps_unmasked_pixels_exactly(data):
    x, _ = data
    model = _pipeline(mode="hole", mask="ratio", rho=0.3).eval()
    out = model.forward_with_intermediates(x)
    keep = out.mask.expand_as(x) == 0
    assert torch.equal(out.regenerated[keep], x[keep])
    assert not torch.equal(out.regenerated[~keep], out.surgical[~keep])


def test_pipeline_works_with_an_fsr_classifier(data):
    x, y = data
    torch.manual_seed(0)
    f = insert_fsr(create_model("small_cnn", num_classes=10, width=8), at=["stage3"], num_classes=10,
                   input_shape=(3, 32, 32), hidden=8)  # fmt: skip
    model = PSSRModel(f, Regenerator(3, (32, 32), width=4))
    assert classifier_head(f) is f.backbone.fc  # not an FSR auxiliary head
    assert model.eval()(x).shape == (6, 10)
    model.train()
    out = PSSRObjective(PGD(eps=8 / 255, steps=1, keep_best=False))(model, x, y)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.regenerator.parameters())


# --------------------------------------------------------------------------- objective


def test_gradients_reach_every_regenerator_parameter_and_not_the_classifier(data):
    x, y = data
    model = _pipeline().train()
    out = PSSRObjective(PGD(eps=8 / 255, steps=2, keep_best=False))(model, x, y)
    assert out.logits.shape == (6, 10) and all(not v.requires_grad for v in out.metrics.values())
    out.loss.backward()
    for name, p in model.regenerator.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.classifier.parameters())


def test_objective_with_only_pixel_weight_is_the_l1_reconstruction(data):
    x, y = data
    model = _pipeline(dropout=0.0).train()
    attack = PGD(eps=8 / 255, steps=3, random_start=False, keep_best=False)
    out = PSSRObjective(attack, lambda_pix=1.0, lambda_sem=0.0, lambda_rd=0.0)(model, x, y)
    x_adv = pgd(model.classifier, x, y, attack)
    ref = (model.preprocess(x_adv) - x).abs().mean() + (model.preprocess(x) - x).abs().mean()
    torch.testing.assert_close(out.loss, ref)


def test_lambda_pix_clean_weighs_the_clean_path_alone(data):
    x, y = data
    model = _pipeline(dropout=0.0).train()
    attack = PGD(eps=8 / 255, steps=3, random_start=False, keep_best=False)
    out = PSSRObjective(attack, lambda_pix=0.0, lambda_pix_clean=3.0, lambda_sem=0.0, lambda_rd=0.0)(model, x, y)
    torch.testing.assert_close(out.loss, 3.0 * (model.preprocess(x) - x).abs().mean())
    x_adv = pgd(model.classifier, x, y, attack)
    out = PSSRObjective(attack, lambda_pix=2.0, lambda_pix_clean=0.0, lambda_sem=0.0, lambda_rd=0.0)(model, x, y)
    torch.testing.assert_close(out.loss, 2.0 * (model.preprocess(x_adv) - x).abs().mean())


def test_objective_with_only_ce_is_the_cross_entropy_of_both_paths(data):
    x, y = data
    model = _pipeline(dropout=0.0).train()
    out = PSSRObjective(None, lambda_pix=0.0, lambda_sem=1.0, lambda_feat=0.0, lambda_rd=0.0)(model, x, y)
    torch.testing.assert_close(out.loss, 2 * F.cross_entropy(model(x), y))


def test_lambda_ce_weighs_only_the_cross_entropy_and_zero_leaves_the_feature_loss(data):
    x, y = data
    model = _pipeline(dropout=0.0).train()
    out = PSSRObjective(None, lambda_pix=0.0, lambda_sem=1.0, lambda_ce=2.5, lambda_feat=0.0, lambda_rd=0.0)(
        model, x, y
    )
    torch.testing.assert_close(out.loss, 2 * 2.5 * F.cross_entropy(model(x), y))
    # HGD's feature-guided loss alone: the mean squared distance of f's penultimate features
    out = PSSRObjective(None, lambda_pix=0.0, lambda_sem=1.0, lambda_ce=0.0, lambda_feat=1.0, lambda_rd=0.0)(
        model, x, y
    )
    x_hat = model.preprocess(x)  # outside the hook: the surgery's score map runs f too
    with penultimate_features(model.classifier) as store:
        model.classifier(x_hat)
        model.classifier(x)
    ref = (store[0].flatten(1) - store[1].flatten(1)).pow(2).mean()
    torch.testing.assert_close(out.loss, 2 * ref)
    assert out.metrics["ce_adv"] > 0  # still reported, but carries no weight


def test_lambda_feat_clean_weighs_the_clean_path_feature_loss_alone(data):
    x, y = data
    model = _pipeline(dropout=0.0).train()
    attack = PGD(eps=8 / 255, steps=3, random_start=False, keep_best=False)
    x_adv = pgd(model.classifier, x, y, attack)

    def feature_loss(v):
        x_hat = model.preprocess(v)  # outside the hook: the surgery's score map runs f too
        with penultimate_features(model.classifier) as store:
            model.classifier(x_hat)
            model.classifier(x)
        return (store[0].flatten(1) - store[1].flatten(1)).pow(2).mean()

    zero = {"lambda_pix": 0.0, "lambda_sem": 1.0, "lambda_ce": 0.0, "lambda_rd": 0.0}
    out = PSSRObjective(attack, lambda_feat=0.0, lambda_feat_clean=3.0, **zero)(model, x, y)
    torch.testing.assert_close(out.loss, 3.0 * feature_loss(x))
    out = PSSRObjective(attack, lambda_feat=2.0, lambda_feat_clean=0.0, **zero)(model, x, y)
    torch.testing.assert_close(out.loss, 2.0 * feature_loss(x_adv))
    a, b = feature_loss(x_adv), feature_loss(x)
    assert (a - b).abs() > 0.01 * b  # the two paths differ, so each weight is seen on its own path


def test_rdrop_is_zero_when_both_paths_coincide_and_positive_otherwise(data):
    x, y = data
    a, b = torch.randn(5, 10), torch.randn(5, 10)
    assert symmetric_kl(a, a) == 0
    assert symmetric_kl(a, b) > 0 and torch.isclose(symmetric_kl(a, b), symmetric_kl(b, a))
    model = _pipeline(dropout=0.0).train()  # no attack, no dropout: adversarial path == clean path
    out = PSSRObjective(None, lambda_pix=0.0, lambda_sem=0.0, lambda_rd=1.0)(model, x, y)
    assert out.loss == 0
    for rdrop in ("cross", "literal"):  # with dropout the two draws differ
        model = _pipeline(dropout=0.5).train()
        out = PSSRObjective(None, lambda_pix=0.0, lambda_sem=0.0, lambda_rd=1.0, rdrop=rdrop)(model, x, y)
        assert out.loss > 0
        out.loss.backward()


def test_adaptive_training_examples_attack_the_pipeline(data):
    x, y = data
    model = _pipeline().train()
    before = _modes(model)
    obj = PSSRObjective(PGD(eps=8 / 255, steps=2, keep_best=False), threat="adaptive")
    x_adv = obj.craft(model, x, y)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and _modes(model) == before
    obj(model, x, y).loss.backward()


# --------------------------------------------------------------------------- attacks and evaluation


def test_bpda_wrappers_give_nonzero_gradients_end_to_end(data):
    x, y = data
    model = _pipeline().eval()
    for attacked in (model, BPDA(PSSRPreprocess(model), model.classifier)):
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(attacked(xg), y), xg)
        assert torch.isfinite(g).all() and (g.flatten(1).abs().sum(1) > 0).all()
    identity = BPDA(PSSRPreprocess(model), model.classifier)
    # same forward values up to float rounding (BPDA computes x + (G(PS(x)) - x)), different backward
    torch.testing.assert_close(identity(x), model(x))


def test_pgd_on_the_pipeline_stays_in_the_ball_and_leaves_modes(data):
    x, y = data
    model = _pipeline().train()
    before = _modes(model)
    x_adv = pgd(model, x, y, PGD(eps=8 / 255, steps=3))
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert _modes(model) == before


def test_evaluate_pssr_labels_threat_models_and_headline_is_the_worst(data):
    x, y = data
    ds = ArrayDataset((x * 255).round().to(torch.uint8), y, tuple(str(i) for i in range(10)))
    model = _pipeline().eval()
    ev = evaluate_pssr(model, ds, [PGD(eps=8 / 255, steps=2, name="PGD-2")], surrogate=_classifier(), batch_size=4)
    names = [a.name for a in ev.result.attacks]
    assert names == ["whitebox-bpda-mask/PGD-2", "whitebox-bpda-identity/PGD-2", "graybox/PGD-2", "transfer/PGD-2"]
    worst = min(ev.threat_accuracy(t) for t in ev.threat_models)
    assert ev.result.worst_accuracy <= worst and ev.threat_accuracy(ev.headline_threat) == worst
    assert {GRAYBOX, MASK, IDENTITY} <= set(ev.threat_models)


# --------------------------------------------------------------------------- config


def test_pssr_config_values_are_checked_with_dotted_keys():
    check_pssr_config(PSSRConfig())
    for key, value in (("mask", "top"), ("mode", "inpaint"), ("rdrop", "x"), ("threat", "white"), ("alpha", 0.0),
                       ("rho", 1.5), ("dropout", 1.0), ("lambda_rd", -1.0), ("epochs", 0), ("lr", 0.0)):  # fmt: skip
        with pytest.raises(ConfigError, match=f"pssr.{key}"):
            check_pssr_config(from_dict(PSSRConfig, {key: value}))
    with pytest.raises(ConfigError, match="pssr.tau"):
        from_dict(RunConfig, {"pssr": {"tau": 1}})
    assert from_dict(RunConfig, {"pssr": {"attack": {"eps": "8/255"}}}).pssr.attack.eps == pytest.approx(8 / 255)


def test_the_restore_recipe_is_the_study_row_it_names():
    """configs/pssr/cifar10_small_cnn_cpu_restore.yaml must train what the study's row measured."""
    from advmend.study.spec import load_study, resolve_runs

    path = CONFIG_DIR / "study" / "cifar10_cpu_pssr.yaml"
    (row,) = [s for s in resolve_runs(path, load_study(path)) if s.row.name == "pssr_standard_alpha3_long_featclean25"]
    recipe = load_run_config("pssr/cifar10_small_cnn_cpu_restore", ["train.progress=false"])
    row_cfg = dataclasses.replace(row.cfg, name=recipe.name,
                                  pssr=dataclasses.replace(row.cfg.pssr, classifier=None, surrogate=None))  # fmt: skip
    assert row_cfg == recipe


def test_bundled_pssr_configs_load_and_ablations_change_one_thing():
    names = sorted(p.stem for p in (CONFIG_DIR / "pssr").glob("*.yaml"))
    for required in ("mnist_small_cnn", "cifar10_resnet18", "cifar10_small_cnn", "cifar100_resnet18",
                     "cifar100_small_cnn", "ablation_no_surgery", "ablation_no_sem", "ablation_no_rdrop",
                     "ablation_alpha_0.5", "ablation_alpha_1", "ablation_alpha_2", "ablation_rho_0.1",
                     "ablation_rho_0.2", "ablation_rho_0.3", "ablation_hole_filling"):  # fmt: skip
        assert required in names
    base = load_run_config("pssr/cifar10_small_cnn")
    for name in names:
        cfg = load_run_config(f"pssr/{name}")
        assert cfg.pssr.enabled
        check_pssr_config(cfg.pssr)
        if name.startswith("ablation_"):
            assert cfg.data == base.data and cfg.model == base.model and cfg.train == base.train
    assert load_run_config("pssr/ablation_no_surgery").pssr.surgery is False
    assert load_run_config("pssr/ablation_hole_filling").pssr.mode == "hole"
    assert load_run_config("pssr/ablation_rho_0.3").pssr.mask == "ratio"
    assert load_run_config("pssr/mnist_small_cnn").pssr.attack.steps == 40
