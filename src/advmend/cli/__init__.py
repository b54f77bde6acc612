"""The `advmend` command: train, eval, list, bench, plot, pssr-analysis.

Every error advmend raises on purpose (bad config, data, input or checkpoint) is printed as one line
and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys

from advmend.errors import AdvmendError


def build_parser() -> argparse.ArgumentParser:
    from advmend.cli import bench, evaluate, listing, plot, pssr, study, train

    parser = argparse.ArgumentParser(
        prog="advmend", description="Adversarial robustness by repair: train, evaluate and benchmark defended classifiers."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train, evaluate, listing, bench, plot, pssr, study):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AdvmendError as e:
        print(f"advmend: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"advmend: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("advmend: interrupted; the last complete checkpoint is intact (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
