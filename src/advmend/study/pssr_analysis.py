"""PSSR's finding on a checkpoint (`advmend pssr-analysis`): is an adversarial perturbation's attack
carried by its salient part?

With delta from PGD on the classifier f and the salient mask M_s from the score map of x + delta,
`run_finding` measures f's accuracy on x, x + delta, x + (1 - M_s) delta, x + M_s delta, the same for
a random mask M_r removing as many pixels, f on the surgical image PS(x + delta), and for a PSSR
checkpoint the whole pipeline; it writes finding.json (a record the results page renders,
`study.finding`), finding.md, finding.png and grid.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch


@dataclass(frozen=True)
class FindingSettings:
    """The options of `advmend pssr-analysis` (see its --help); `overrides` are data.* "key=value" items."""

    checkpoint: str
    n_examples: int = 500
    steps: int = 20
    mask: str | None = None
    alpha: float | None = None
    rho: float | None = None
    batch_size: int = 128
    seed: int = 0
    grid: int = 8
    device: str = "auto"
    overrides: tuple = ()
    out: str | None = None

    @classmethod
    def of(cls, namespace) -> FindingSettings:
        """The settings an argparse namespace (or any object with these attributes) holds."""
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls)})


def random_mask_like(mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random {0,1} mask with, per image, exactly as many ones as `mask` (batched)."""
    flat = mask.flatten(1)
    k = flat.sum(dim=1, keepdim=True)
    r = torch.rand(flat.shape, device=flat.device, generator=generator)
    ranks = r.argsort(dim=1).argsort(dim=1)
    return (ranks < k).to(mask.dtype).view_as(mask)


def paired_difference(a, b, *, seed: int = 0) -> dict:
    """`advmend.study.finding.paired_difference`: a - b in points with its 95 % paired bootstrap interval."""
    from advmend.study.finding import paired_difference as impl

    return impl(a, b, seed=seed)


def finding_verdict(salient_removed, random_removed, *, seed: int = 0) -> tuple[str, dict]:
    """`advmend.study.finding.finding_verdict`: the paired verdict salient removed - random removed."""
    from advmend.study.finding import finding_verdict as impl

    return impl(salient_removed, random_removed, seed=seed)


def command_line(args: FindingSettings, out: Path) -> str:
    """The command that reproduces this finding (every option that changes a number)."""
    import shlex

    parts = ["advmend", "pssr-analysis", str(args.checkpoint), "--n-examples", str(args.n_examples), "--steps",
             str(args.steps), "--seed", str(args.seed), "--batch-size", str(args.batch_size)]  # fmt: skip
    for flag, value in (("--mask", args.mask), ("--alpha", args.alpha), ("--rho", args.rho)):
        if value is not None:
            parts += [flag, str(value)]
    for item in args.overrides:
        parts += ["--set", item]
    parts += ["--grid", str(args.grid), "--out", str(out)]
    return shlex.join(parts)


def run_finding(settings: FindingSettings) -> tuple[list[str], Path, bool]:
    """Measure the finding and write its files; returns (the lines of finding.md, the output folder,
    whether grid.png was written)."""
    from advmend.attacks.modes import attack_mode
    from advmend.attacks.pgd import PGD, pgd
    from advmend.config import PSSRConfig, RunConfig, apply_overrides, from_dict, to_dict
    from advmend.data import BatchLoader, subset
    from advmend.defenses.pssr.pipeline import pipeline_of
    from advmend.defenses.pssr.surgery import apply_surgery, salient_mask, score_map
    from advmend.evaluation.image_quality import RestorationMeter
    from advmend.evaluation.pssr import restoration_breakdown
    from advmend.evaluation.run import load_trained_model
    from advmend.io import atomic_write_text, file_sha256, versions
    from advmend.plotting import pyplot, save_png
    from advmend.study.finding import FINDING_SCHEMA, ONLY_TEST, PIPELINE_ROWS, REMOVED_TEST, ROWS, only_verdict
    from advmend.study.records import bits, percent
    from advmend.study.runner import git_commit, hardware
    from advmend.training.build import build_data, resolve_device

    plt = pyplot("pssr-analysis")  # before any work: a missing matplotlib is an error up front
    started, at_start = time.perf_counter(), hardware()
    device = resolve_device(settings.device, "--device")
    model, cfg, record = load_trained_model(settings.checkpoint, device)
    cfg = from_dict(RunConfig, apply_overrides(to_dict(cfg), settings.overrides))
    pipeline = pipeline_of(model)
    f = pipeline.classifier if pipeline else model
    base = cfg.pssr if pipeline else PSSRConfig()
    rule = settings.mask or base.mask
    alpha = base.alpha if settings.alpha is None else settings.alpha
    rho = base.rho if settings.rho is None else settings.rho
    test = build_data(cfg.data, need_train=False).test
    assert test is not None  # need_test
    ds = subset(test, settings.n_examples, settings.seed) if settings.n_examples < len(test) else test
    eps = float(record["eps"])
    attack = PGD(eps=eps, steps=settings.steps, keep_best=False, name=f"PGD-{settings.steps}")
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    correct: dict[str, list[torch.Tensor]] = {name: [] for name, _ in ROWS if pipeline or name not in PIPELINE_ROWS}
    grid: list[torch.Tensor | None] | None
    removed, grid, quality = [], None, RestorationMeter()
    loop_started = time.perf_counter()
    for x, y in BatchLoader(ds, settings.batch_size, shuffle=False, device=device):
        x_adv = pgd(f, x, y, attack, generator=gen, validate=False)
        delta = x_adv - x
        m_s = salient_mask(score_map(f, x_adv), mask=rule, alpha=alpha, rho=rho)
        m_r = random_mask_like(m_s, gen)
        removed.append(m_s.flatten(1).mean(1).cpu())
        m_c = salient_mask(score_map(f, x), mask=rule, alpha=alpha, rho=rho)  # the same surgery on clean x
        inputs = finding_inputs(x, x_adv, m_s, m_r, m_c, base.fill)
        x_s = inputs["PS only"]
        with torch.no_grad(), attack_mode(f):
            for name, xi in inputs.items():
                correct[name].append((f(xi).argmax(1) == y).cpu())
        x_hat = None
        if pipeline is not None:
            same_surgery = (rule, alpha, rho) == (
                pipeline.mask_rule,
                pipeline.alpha,
                pipeline.rho,
            ) and pipeline.use_surgery
            with attack_mode(pipeline):  # the pipeline's own surgery when the flags change it
                if same_surgery:
                    m_p, x_sp = m_c, apply_surgery(x, m_c, base.fill)
                else:
                    _, m_p, x_sp = pipeline.surgery(x)
                with torch.no_grad():
                    x_hat = pipeline.regenerate(x_s, m_s, x_adv) if same_surgery else pipeline.preprocess(x_adv)
                    correct["PSSR (gray-box)"].append((pipeline.classifier(x_hat).argmax(1) == y).cpu())
                    x_hat_clean = pipeline.regenerate(x_sp, m_p, x)
                    correct["PSSR (clean)"].append((pipeline.classifier(x_hat_clean).argmax(1) == y).cpu())
                    quality.update(x_hat_clean, x, removed=m_p)
        if grid is None and settings.grid > 0:
            k = min(settings.grid, x.shape[0])
            grid = [t[:k].cpu() for t in (x, x_adv, (0.5 + delta / (2 * eps)).clamp(0, 1), m_s, x_s)]
            grid.append(x_hat[:k].cpu() if x_hat is not None else None)
    loop_seconds = time.perf_counter() - loop_started
    per_example = {name: torch.cat(v) for name, v in correct.items()}
    acc = {name: percent(v) for name, v in per_example.items()}  # exactly as the results page recomputes it
    ratio = 100 * float(torch.cat(removed).mean())
    # The verdicts rest on paired tests over the same examples, never on the raw gap of two accuracies.
    verdict, removed_test = finding_verdict(
        per_example["salient removed"], per_example["random removed"], seed=settings.seed
    )
    verdict_only, only_test = only_verdict(per_example["salient only"], per_example["random only"], seed=settings.seed)
    out = Path(settings.out) if settings.out else Path(settings.checkpoint).parent / "pssr-analysis"
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "schema": FINDING_SCHEMA, "command": command_line(settings, out),
        "checkpoint": str(settings.checkpoint), "checkpoint_sha256": file_sha256(settings.checkpoint),
        "method": cfg.train.method,
        "data": cfg.data.name, "n_examples": len(ds), "subset_seed": settings.seed,
        "subset": "advmend.data.subset(test split, n_examples, subset_seed) (all of it when n_examples >= its size)",
        "attack": attack.describe(), "eps": eps, "mask": rule,
        "alpha": alpha, "rho": rho, "fill": base.fill, "removed_pixel_ratio": ratio,
        "accuracy": {name: {"definition": d, "accuracy": acc[name], "correct": bits(per_example[name])}
                     for name, d in ROWS if name in acc},
        "verdict": verdict, "verdict_only": verdict_only, "bootstrap_seed": settings.seed,
        "paired_tests": {
            REMOVED_TEST: removed_test, ONLY_TEST: only_test,
            "method": "95% bootstrap interval over the same examples (advmend.study.stats.paired_bootstrap)",
        },
        "restoration": None if pipeline is None else dict(quality.compute(), definition=(
            "G(PS(x)) against clean x, the pipeline's own surgery: PSNR and SSIM per image, averaged; psnr_kept and "
            "psnr_removed pooled over the kept and the removed pixels (removed: their fraction)")),
        "device": str(device), "seconds": {"examples": round(loop_seconds, 2)},
        "hardware": {"at_start": at_start}, "versions": versions(), "commit": git_commit(),
    }  # fmt: skip
    lines = [
        f"# PSSR finding: {settings.checkpoint}",
        "",
        "| input to f | definition | accuracy (%) |",
        "|---|---|---:|",
    ]
    lines += [f"| {name} | `{d}` | {acc[name]:.2f} |" for name, d in ROWS if name in acc]
    mask_desc = f"alpha={alpha:g}" if rule == "alpha" else f"rho={rho:g}"
    lines += ["", f"delta: {attack.describe()['name']} (L-inf eps={eps:.4g}, last iterate) on f. Mask: {rule} "
              f"({mask_desc}) from the score map of x + delta; removed pixels: {ratio:.2f}% on average. "
              f"M_r: a uniformly random mask with the same count per image. {len(ds)} test examples (seed {settings.seed}).",
              "", f"Salient only - random only: {only_test['difference']:+.2f} points, 95% CI "
              f"[{only_test['ci95'][0]:+.2f}, {only_test['ci95'][1]:+.2f}] (negative: the salient part alone keeps more of the attack).",
              "", f"Verdict: {verdict}.", "", f"Verdict (salient only): {verdict_only}."]  # fmt: skip
    if payload["restoration"] is not None:
        q = payload["restoration"]
        lines += ["", f"Restoration of the clean images (the pipeline's own surgery): PSNR {q['psnr']:.2f} dB, "
                  f"SSIM {q['ssim']:.4f} (per image, averaged). " + " ".join(restoration_breakdown(q))]  # fmt: skip
    atomic_write_text(out / "finding.md", "\n".join(lines) + "\n")

    names = [n for n, _ in ROWS if n in acc]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.bar(range(len(names)), [acc[n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("accuracy of f (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"salient vs trivial perturbation ({mask_desc}, {ratio:.1f}% removed)", fontsize=9)
    fig.tight_layout()
    save_png(fig, out / "finding.png", dpi=110)

    if grid is not None:
        write_grid(plt, grid, out / "grid.png")
    payload["seconds"]["total"] = round(time.perf_counter() - started, 2)
    payload["hardware"]["at_end"] = hardware()
    # finding.json last: a folder with a finding.json is complete (the results page checks its picture)
    atomic_write_text(out / "finding.json", json.dumps(payload, indent=1) + "\n")
    return lines, out, grid is not None


def finding_inputs(x: torch.Tensor, x_adv: torch.Tensor, m_s: torch.Tensor, m_r: torch.Tensor, m_c: torch.Tensor,
                   fill: float) -> dict[str, torch.Tensor]:  # fmt: skip
    """The images f alone is scored on, one per row of `advmend.study.finding.ROWS` that needs no G:
    masks M_s (salient, from x_adv), M_r (random, same count) and M_c (salient, from clean x)."""
    from advmend.defenses.pssr.regenerator import fill_holes
    from advmend.defenses.pssr.surgery import apply_surgery

    delta = x_adv - x
    return {"clean": x, "adversarial": x_adv, "salient removed": x + (1 - m_s) * delta,
            "salient only": x + m_s * delta, "random removed": x + (1 - m_r) * delta,
            "random only": x + m_r * delta, "PS only": apply_surgery(x_adv, m_s, fill),
            "clean, holes interpolated": fill_holes(apply_surgery(x, m_c, fill), m_c)}  # fmt: skip


def write_grid(plt, grid: list, path: Path) -> None:
    """x, x_adv, delta, mask, surgical (and regenerated) for a few examples, one row each."""
    from advmend.plotting import save_png

    cols = [("x", grid[0]), ("x_adv", grid[1]), ("delta", grid[2]), ("mask", grid[3]), ("surgical", grid[4])]
    if grid[5] is not None:
        cols.append(("regenerated", grid[5]))
    k = grid[0].shape[0]
    fig, axes = plt.subplots(k, len(cols), figsize=(1.3 * len(cols), 1.3 * k), squeeze=False)
    for j, (title, imgs) in enumerate(cols):
        for i in range(k):
            img = imgs[i].permute(1, 2, 0).numpy()
            axes[i][j].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            axes[i][j].axis("off")
        axes[0][j].set_title(title, fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
