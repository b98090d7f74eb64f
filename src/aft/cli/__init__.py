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
import time
import warnings

from ..errors import AftError
from ..loading import is_main_process

# sub-command -> module in aft.cli; each module has add_parser(subparsers)
COMMANDS = ["infer", "data", "train", "analyze", "eval", "view", "serve"]


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
    if not is_main_process():  # one of several processes (accelerate launch, torchrun): rank 0
        level = max(level, logging.WARNING)   # logs and draws progress; the libraries' warnings are the same there
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers reads this one
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        warnings.filterwarnings("ignore")
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


def failed_exit(failed: int, retried: int, what: str, where: str) -> int:
    """Exit code 1 (and a line on stderr) when the output holds failed queries; else 0."""
    if not failed:
        return 0
    print(f"{failed} {what} failed ({where}); rerun to retry them", file=sys.stderr)
    return 1


PROGRESS_EVERY = 30.0  # seconds between progress log lines when stderr is not a terminal


def progress_bar(total: int, desc: str, unit: str = "query"):
    """Progress on stderr: a tqdm bar on a terminal; elsewhere (nohup, batch jobs, CI) a log line every 30 s
    with items done, the stage and tokens/s, as TRL and vLLM log. $AFT_PROGRESS: "bar" forces the bar,
    a number N logs every N seconds instead (0 = no progress output)."""
    choice = os.environ.get("AFT_PROGRESS", "").strip()
    if choice == "bar" or (not choice and sys.stderr.isatty()):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)
    try:
        every = float(choice) if choice else PROGRESS_EVERY
    except ValueError:
        raise AftError(f"AFT_PROGRESS must be 'bar' or a number of seconds, got {choice!r}") from None
    return LogProgress(total, desc, unit, every)


class LogProgress:
    """The part of tqdm's interface the commands use, as periodic log lines (logger aft.progress)."""

    def __init__(self, total: int, desc: str, unit: str, every: float):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n, self.postfix = 0, ""
        self.t0 = self.last = time.monotonic()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        finished = bool(self.total) and self.n >= self.total
        if self.every > 0 and (now - self.last >= self.every or (finished and k)):
            self.last = now
            elapsed = now - self.t0
            units = "queries" if self.unit == "query" else f"{self.unit}s"
            done = f"{self.n}/{self.total} {units} ({self.n / self.total:.0%})" if self.total else f"{self.n} {units}"
            left = f", ~{_duration(elapsed * (self.total - self.n) / self.n)} left" if self.total and self.n else ""
            extra = f", {self.postfix}" if self.postfix else ""
            logging.getLogger("aft.progress").info("%s: %s%s, %s elapsed%s", self.desc, done, extra,
                                                   _duration(elapsed), left)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def token_progress(bar):
    """A progress callback for long commands: (items done, items in all, tokens generated, stage)."""
    t0 = time.monotonic()

    def update(done: int, total: int | None = None, tokens: int = 0, stage: str = "") -> None:
        if total is not None:
            bar.total = total
        rate = tokens / max(time.monotonic() - t0, 1e-9)
        bar.set_postfix_str(f"{stage + ', ' if stage else ''}{rate:.0f} tok/s")
        bar.update(done - bar.n)

    return update
