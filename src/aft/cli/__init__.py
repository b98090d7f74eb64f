"""The `aft` command: parse arguments, call one function per command.

Each stage's sub-command lives in its own module here (infer.py, data.py, ...)
with `add_parser(subparsers)`; its handler returns an exit code. User errors
(AftError) become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ..errors import AftError

# sub-command -> module in aft.cli; each module has add_parser(subparsers)
COMMANDS = ["infer", "data", "train", "analyze", "eval", "view"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="aft", description="Aggregation Fine-Tuning: data, training, "
                                     "propose-and-aggregate inference, evaluation.")
    parser.add_argument("--version", action="version", version=f"aft {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (debug level)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            continue  # stage not built yet
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.handler(args) or 0)
    except AftError as e:
        print(f"aft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`aft infer --dry-run | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 141  # 128 + SIGPIPE
    except KeyboardInterrupt:
        print(f"aft {args.command}: interrupted; results written so far are kept (rerun to resume)",
              file=sys.stderr)
        return 130


def flags_given(args: argparse.Namespace, exclude=("command", "handler", "verbose", "quiet", "config")) -> dict:
    """The config flags the user typed (parsers use default=SUPPRESS, so absent flags are absent)."""
    return {k: v for k, v in vars(args).items() if k not in exclude}


def progress_bar(total: int, desc: str, unit: str = "query"):
    """A tqdm bar on stderr (or a no-op when stderr is not a terminal and tqdm is quiet)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
                disable=None if not os.environ.get("AFT_PROGRESS") else False)


def token_progress(bar):
    """A progress callback for long commands: (items done, items in all, tokens generated, stage)."""

    def update(done: int, total: int | None = None, tokens: int = 0, stage: str = "") -> None:
        if total is not None:
            bar.total = total
        bar.update(done - bar.n)
        elapsed = bar.format_dict["elapsed"] or 1e-9
        bar.set_postfix_str(f"{stage + ', ' if stage else ''}{tokens / elapsed:.0f} tok/s")

    return update
