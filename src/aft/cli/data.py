"""`aft data`: build AFT training data (see aft.data.build)."""

from __future__ import annotations

from .. import config as cfglib
from . import failed_exit, flags_given, progress_bar, token_progress


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="build AFT training data (+ the matching SFT set and a data card)",
                       description="Build TRL-ready AFT training data: off-policy (a preference dataset) or "
                                   "on-policy (sampled from the model) proposals, a scorer, a teacher.")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    b = dsub.add_parser("build", help="build <out>/aft.jsonl, sft.jsonl and the data card",
                        description="Flags override --config (a YAML of the same keys). Rerunning resumes.")
    b.add_argument("--config", "-c", help="YAML config (keys = the flags below)")
    cfglib.add_arguments(b, _data_config())
    b.set_defaults(handler=build_main)
    m = dsub.add_parser("merge", help="concatenate <out>/shards/*-of-n into <out> and write the data card")
    m.add_argument("out", help="the --out folder of the sharded build")
    m.set_defaults(handler=merge_main)
    c = dsub.add_parser("card", help="rewrite the data card of a built folder")
    c.add_argument("out", help="a folder holding aft.jsonl")
    c.set_defaults(handler=card_main)
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])


def _data_config():
    from ..data.build import DataConfig

    return DataConfig


def build_main(args) -> int:
    from ..data.build import load_config, run_build

    flags = flags_given(args, exclude=("command", "data_command", "handler", "verbose", "quiet", "config"))
    cfg = load_config(args.config, flags)
    with progress_bar(0, "aft data build", unit="prompt") as bar:
        s = run_build(cfg, progress=token_progress(bar))
    print(f"{s.rows} rows written, {s.resumed} already done, {s.skipped} skipped while building "
          f"({s.failed} failed{f', {s.retried} retried' if s.retried else ''}), {s.input_errors} bad input rows; "
          f"{s.generated_tokens} tokens generated in {s.seconds:.1f}s")
    _headline(s.card)
    print(f"files: {s.out}/aft.jsonl, sft.jsonl, data_card.md")
    return failed_exit(s.failed, s.retried, "prompts", f"see {s.out}/skipped.jsonl")


def _headline(card: dict | None) -> None:
    if not card:
        return
    c, tv = card["counts"], card["target_vs_best_proposal"]
    line = f"data card: {c['rows']} rows"
    v = card["scores"].get("verifier")
    if v:
        s = v["sampled"]
        line += (f"; verifier over {s['prompts']} prompts sampled: candidate accuracy {s['candidate_accuracy']}, "
                 f"prompts with a correct candidate {s['prompts_with_a_correct_candidate']}; over the "
                 f"{v['prompts_kept']} rows kept: prompts with a correct proposal "
                 f"{v['prompts_with_a_correct_proposal']}, target accuracy {v['target_accuracy']}")
    others = [src for src in card["scores"].get("by_source", {}) if src != "verifier"]
    if others:
        line += f"; also scored on other scales: {', '.join(others)} (see data_card.md)"
    if tv["compared"]:
        line += f"; target beats best proposal {tv['beats']}/{tv['compared']}"
    print(line)


def merge_main(args) -> int:
    from ..data.build import merge_shards

    card = merge_shards(args.out)
    print(f"merged into {args.out}: {card['counts']['rows']} rows")
    _headline(card)
    return 0


def card_main(args) -> int:
    from ..data.card import write_card

    card = write_card(args.out)
    _headline(card)
    print(f"wrote {args.out}/data_card.md, data_card.json, data_card.png")
    return 0
