"""`aft view`: one self-contained HTML page of `aft infer` / `aft eval run` traces (see aft.view)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("view", help="one self-contained HTML page to read P&A traces (infer outputs, eval records)",
                       description="Write one HTML file (no server, no network) showing, per query, the question, "
                                   "each layer's outputs side by side with the spans an aggregation copied from a "
                                   "proposal highlighted in that proposal's colour, token counts, finish reasons, "
                                   "cut proposals and timings; for eval records also correct/wrong badges, "
                                   "filters and a summary table per strategy.")
    p.add_argument("files", nargs="+", metavar="RUN.jsonl",
                   help="`aft infer` output files and/or `aft eval run` record files (<out>/<label>/<task>/*.jsonl)")
    p.add_argument("-o", "--output", help="the HTML file to write (default: the first file with .html)")
    p.set_defaults(handler=main)


def main(args) -> int:
    from ..view import write_view

    out, n = write_view(args.files, args.output)
    print(f"{n} queries -> {out}  (open it in any browser; it needs no server or network)")
    return 0
