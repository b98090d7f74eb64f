"""`aft analyze`: analyses of trained models (see aft.analyze)."""

from __future__ import annotations

from .. import config as cfglib
from . import flags_given


def add_parser(sub) -> None:
    from ..analyze import PerplexityConfig

    p = sub.add_parser("analyze", help="analyses of trained models (perplexity of targets, AFT vs SFT conditioning)")
    what = p.add_subparsers(dest="analysis", metavar="ANALYSIS")
    q = what.add_parser("perplexity", help="target perplexity conditioned on query + proposals vs query only",
                        description="The paper's section 6.1: mean token-level perplexity of the targets under a "
                                    "model, conditioned the AFT way (query + proposals) and the SFT way (query "
                                    "only), over the same rows; a table, perplexity.json and perplexity.png.")
    q.add_argument("--config", "-c", help="YAML config with the keys below")
    cfglib.add_arguments(q, PerplexityConfig)
    q.set_defaults(handler=perplexity)
    p.set_defaults(handler=lambda args: p.print_help() or 2)


def perplexity(args) -> int:
    from ..analyze import load_config, run_perplexity, table

    cfg = load_config(args.config, flags_given(args, exclude=("command", "handler", "verbose", "quiet", "config",
                                                              "analysis")))
    summary = run_perplexity(cfg)
    print(table(summary["results"]))
    print(f"table and per-row values: {summary['output_dir']}/perplexity.json  plot: "
          f"{summary['output_dir']}/perplexity.png")
    return 0
