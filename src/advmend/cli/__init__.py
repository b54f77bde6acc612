"""The `advmend` command: train, eval, list, bench, plot, pssr-analysis.

Every error advmend raises on purpose (bad config, data, input or checkpoint) is printed as one line
and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from advmend.errors import AdvmendError


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line ends like every other bad input: one `advmend: error:` line and
    exit code 2 (argparse's default prints the whole usage block first). Subcommand parsers inherit it."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"advmend: error: {message} (see `{self.prog} --help`)\n")


def add_set_flag(p: argparse.ArgumentParser, help_text: str, metavar: str = "KEY=VALUE") -> None:
    """The repeatable `--set KEY=VALUE` of every command that takes config overrides (into `args.overrides`);
    which keys a command accepts is its own rule (`config.parse_overrides(..., sections=)`)."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar=metavar, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    from advmend.cli import bench, evaluate, listing, plot, pssr, study, train

    parser = _Parser(
        prog="advmend",
        description="Adversarial robustness by repair: train, evaluate and benchmark defended classifiers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train, evaluate, listing, bench, plot, pssr, study):
        module.add_parser(sub)
    return parser


def _one_line(error: BaseException) -> str:
    """The error's message on one line (a message quoting another library's error may span several)."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler below, not at exit
        return code
    except AdvmendError as e:
        print(f"advmend: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"advmend: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`advmend list | head`): not an error of ours. Point stdout at devnull so
        # the interpreter's final flush does not raise again, and exit as a process killed by SIGPIPE.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # a stdout without a file descriptor (io.UnsupportedOperation)
            pass
        return 128 + getattr(signal, "SIGPIPE", 13)
    except OSError as e:
        # What the file system refused where no earlier check could see it coming (a disk that filled up,
        # permissions changed during the run): one line naming the path, as for every other bad input.
        from advmend.io import describe_os_error

        print(f"advmend: error: {_one_line(ValueError(describe_os_error(e, 'cannot use')))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("advmend: interrupted; the last complete checkpoint is intact (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
