"""`advmend pssr-analysis CHECKPOINT` (a PSSR config trains through `advmend train` like any other).

`pssr-analysis` tests the finding of Fu et al. ("Invariance-powered Trustworthy Defense via Remove
Then Restore", arXiv 2402.00304, 2024) that an adversarial perturbation delta splits into a salient
part, which carries the attack, and a trivial part. With delta from PGD on the classifier f and the
salient mask M_s from the score map of x + delta, it measures f's accuracy on

    x, x + delta, x + (1 - M_s) delta (salient part removed), x + M_s delta (salient part only),
    x + (1 - M_r) delta and x + M_r delta for a random mask M_r removing the same number of pixels,

plus f on the surgical image PS(x + delta) ("PS only") and, for a PSSR checkpoint, the whole
pipeline on x + delta (gray-box). If random masks do as well as the salient mask, the table says so.
It writes finding.json, finding.md, finding.png (bar chart) and grid.png (x, x_adv, delta, mask,
surgical, regenerated for a few examples; none with --grid 0). finding.json is a record the results page
renders (`advmend.study.finding`, schema advmend.pssr.finding/1): per-example correctness of every row as
0/1 strings, both paired tests and verdicts, the command, the checkpoint's SHA-256, timings, hardware,
versions and commit; it is written last, so a folder holding one is complete.
"""

from __future__ import annotations

import argparse

from advmend.cli import add_set_flag


def add_parser(sub) -> None:
    p = sub.add_parser(
        "pssr-analysis", help="PSSR's finding (salient vs trivial perturbation) as a table, a plot and an image grid"
    )
    p.add_argument("checkpoint", help="a classifier or PSSR checkpoint written by advmend train")
    p.add_argument("--n-examples", type=int, default=500, help="seeded subset of the test set (default 500)")
    p.add_argument("--steps", type=int, default=20, help="PGD steps for delta (default 20, step 2.5 eps / steps)")
    p.add_argument("--mask", choices=("alpha", "ratio"), help="mask rule (default: the checkpoint's, else alpha)")
    p.add_argument("--alpha", type=float, help="alpha of the mean-threshold mask")
    p.add_argument("--rho", type=float, help="removal ratio of the ratio mask")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=int, default=8, help="examples in the image grid (0: no grid.png)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add_set_flag(p, "override a data setting, e.g. --set data.root=DIR (repeatable)")
    p.add_argument("--out", help="output folder (default: next to the checkpoint, pssr-analysis)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from advmend.config import parse_overrides
    from advmend.errors import ConfigError
    from advmend.io import check_output_path
    from advmend.study.pssr_analysis import FindingSettings, run_finding

    parse_overrides(args.overrides, sections=("data",))  # the run's data only, checked before anything loads
    for key, value, ok in (("--n-examples", args.n_examples, args.n_examples >= 1), ("--steps", args.steps, args.steps >= 1),
                           ("--batch-size", args.batch_size, args.batch_size >= 1), ("--grid", args.grid, args.grid >= 0),
                           ("--alpha", args.alpha, args.alpha is None or args.alpha > 0),
                           ("--rho", args.rho, args.rho is None or 0 <= args.rho <= 1)):  # fmt: skip
        if not ok:
            raise ConfigError(f"{key}: invalid value {value!r}")
    if args.out:  # the default is a folder beside the checkpoint, where advmend train wrote it
        check_output_path(args.out, "--out", folder=True)
    lines, out, grid = run_finding(FindingSettings.of(args))
    print("\n".join(lines[2:]))
    print(f"wrote {out / 'finding.md'}, finding.json, finding.png" + (", grid.png" if grid else ""))
    return 0
