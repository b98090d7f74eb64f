"""`aft infer`: propose-and-aggregate over a JSONL file (see aft.infer)."""

from __future__ import annotations

import json

from .. import config as cfglib
from ..infer import InferConfig, dry_run, load_config, run_infer
from . import failed_exit, flags_given, progress_bar, token_progress

SHOW_ANSWERS = 20  # print the answers themselves for runs up to this size


def add_parser(sub) -> None:
    p = sub.add_parser("infer", help="propose-and-aggregate inference over a JSONL file of queries",
                       description="Propose-and-aggregate: K proposals, L aggregation layers, one final answer per "
                                   "query. Flags override --config; the official AFT config keys and flags "
                                   "(--config --input_file --output_file --batch_size) are accepted.")
    p.add_argument("--config", "-c", help="YAML config (official AFT keys accepted)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the exact messages each layer would send (no model is loaded)")
    cfglib.add_arguments(p, InferConfig)
    p.set_defaults(handler=main)


def main(args) -> int:
    flags = flags_given(args, exclude=("command", "handler", "verbose", "quiet", "config", "dry_run"))
    cfg = load_config(args.config, flags)
    if args.dry_run:
        print(json.dumps(dry_run(cfg), indent=2, ensure_ascii=False))
        return 0
    with progress_bar(0, "propose-and-aggregate") as bar:
        summary = run_infer(cfg, token_progress(bar))
    if summary.results and len(summary.results) <= SHOW_ANSWERS:
        for row in summary.results:
            question = row_question(row)
            answer = row.get("response") if "error" not in row else f"ERROR: {row['error']}"
            print(f"[{row['id']}] {question}\n  -> {answer.strip()}\n")
    rate = summary.generated_tokens / summary.seconds if summary.seconds else 0.0
    print(f"{summary.done} queries done, {summary.skipped} already done, {summary.errors} failed"
          f"{f' ({summary.retried} failed before, retried)' if summary.retried else ''}; "
          f"{summary.generated_tokens} tokens generated in {summary.seconds:.1f}s ({rate:.0f} tok/s)")
    print(f"answers and full traces: {summary.output_file}")
    return failed_exit(summary.errors, summary.retried, "queries", "see their 'error' field")


def row_question(row: dict) -> str:
    for key in ("query", "messages"):
        if isinstance(row.get(key), list) and row[key]:
            return str(row[key][-1].get("content", ""))[:200]
    return str(row.get("prompt") or row.get("instruction") or "")[:200]
