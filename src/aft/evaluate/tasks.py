"""Evaluation tasks: the questions, and how an answer is checked.

A task spec (a string in the config's `tasks` list) is one of

    rg:<preset or reasoning-gym name>   held-out split of a reasoning-gym task (the
                                        same split `aft data build` trains on the
                                        other side of: same eval_size, pool_size,
                                        split_seed)
    gsm8k:<file.jsonl>                  GSM8K format: {"question", "answer": "... #### 1,234"}
    ifeval:<file.jsonl>                 IFEval format: {"key", "prompt", "instruction_id_list",
                                        "kwargs"}, checked by lm-evaluation-harness's own
                                        instruction checkers (needs `pip install lm-eval`)

or a mapping {"rg": name, "config": {...}} for a reasoning-gym task with its own config.
Every task yields `Item`s (aft.data.sources) so the data stage's scorers apply as they are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from ..data.reasoning_gym import ANSWER_SUFFIX, resolve_task, rg_entry, rg_query, split_prompts
from ..data.sources import Item
from ..data.verify import extract_answer, is_correct, parse_number
from ..errors import AftError, where
from ..io import read_jsonl, record_id

TASK_KINDS = ("rg", "gsm8k", "ifeval")


@dataclass
class Task:
    name: str  # short, file-name safe: "arith1", "gsm8k-test", "ifeval-sample"
    kind: str  # "rg" | "gsm8k" | "ifeval" | "open" (AlpacaEval / MT-Bench: no checker)
    spec: str  # as written in the config
    items: list[Item] = field(default_factory=list)

    @property
    def has_answers(self) -> bool:
        """Whether responses have a short extractable answer (majority vote applies)."""
        return self.kind in ("rg", "gsm8k")

    def check(self, item: Item, response: str | None) -> bool | None:
        """Whether `response` is correct for `item` (verifier; IFEval: all instructions followed, strict);
        None for open-ended questions (kind "open": judged, not checked)."""
        if self.kind == "open":
            return None
        if self.kind == "ifeval":
            from .ifeval import follows_all

            return follows_all(item.meta["ifeval"], response or "")
        task = item.meta.get("task")
        entry = rg_entry(item.meta) if task else None
        return is_correct(response, item.answer, task, entry, item.meta.get("task_config"),
                          question=item.meta.get("question"))

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "spec": self.spec, "questions": len(self.items)}


def answer_key(response: str | None, question: str | None = None) -> str | None:
    """The vote of one response: its extracted answer, numbers canonicalised ("1,000" = "1000.0" = "1000")."""
    ans = extract_answer(response, question)
    if ans is None:
        return None
    num = parse_number(ans)
    if num is not None:
        return str(num)  # Fraction: "1000", "3/4", "-7/2"
    key = " ".join(ans.lower().split()).strip(" .")
    return key or None


# ------------------------------------------------------------------------ loaders
def load_task(spec, eval_size: int = 100, pool_size: int = 1000, split_seed: int = 0,
              limit: int | None = None) -> Task:
    """Build a Task from its spec (see the module docstring); `limit` keeps the first N questions."""
    if isinstance(spec, dict):
        if "rg" not in spec:
            raise AftError(f"task {spec!r}: a mapping needs the key 'rg' (and optionally 'config', 'name')")
        unknown = set(spec) - {"rg", "config", "name"}
        if unknown:
            raise AftError(f"task {spec!r}: unknown key(s) {sorted(unknown)}")
        task = _rg_task(spec["rg"], spec.get("config") or {}, eval_size, pool_size, split_seed,
                        name=spec.get("name"))
    else:
        spec = str(spec)
        kind, sep, arg = spec.partition(":")
        if not sep or kind not in TASK_KINDS or not arg:
            raise AftError(f"task {spec!r}: expected rg:<task>, gsm8k:<file.jsonl> or ifeval:<file.jsonl>")
        if kind == "rg":
            task = _rg_task(arg, {}, eval_size, pool_size, split_seed)
        elif kind == "gsm8k":
            task = Task(_file_name("gsm8k", arg), "gsm8k", spec, load_gsm8k(arg))
        else:
            from .ifeval import load_ifeval

            task = Task(_file_name("ifeval", arg), "ifeval", spec, load_ifeval(arg))
    if limit is not None:
        task.items = task.items[:limit]
    if not task.items:
        raise AftError(f"task {task.spec}: no questions")
    return task


def task_of_meta(meta: dict, cache: dict | None = None) -> tuple[Task, dict]:
    """The task an eval record file was answered on, from its .meta.json (spec and split settings), and its
    items by id; `cache` (a dict) shares the tasks already built between files."""
    settings = meta.get("settings", {})
    spec = meta["task"]["spec"]
    key = (spec, settings.get("eval_size", 100), settings.get("pool_size", 1000), settings.get("split_seed", 0))
    cache = {} if cache is None else cache
    if key not in cache:
        # a reasoning-gym mapping is stored as JSON; any other spec as the config gave it
        task = load_task(json.loads(spec) if spec.startswith("{") else spec, *key[1:])
        cache[key] = (task, {it.id: it for it in task.items})
    return cache[key]


def _file_name(kind: str, path: str) -> str:
    return f"{kind}-{_safe(Path(path).stem)}"


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "task"


def _rg_task(task: str, config: dict, eval_size, pool_size, split_seed, name: str | None = None) -> Task:
    _, eval_items = split_prompts(task, n_train=0, n_eval=eval_size, task_config=config or None, seed=split_seed,
                                  pool_size=pool_size)
    rg_name, cfg = resolve_task(task, config or None)
    display = name or (task if not config else f"{rg_name}-{_safe(json.dumps(cfg, sort_keys=True))[:40]}")
    spec = f"rg:{task}" if not config else json.dumps({"rg": task, "config": config}, sort_keys=True)
    return Task(_safe(display), "rg", spec, eval_items)


_GSM_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def gsm8k_answer(text: str) -> str | None:
    """The final number of a GSM8K answer ("... #### 1,234" -> "1234"), or None."""
    m = _GSM_ANSWER.search(text or "")
    if not m:
        return None
    num = parse_number(m.group(1).strip())
    if num is None:
        return None
    return str(num.numerator) if num.denominator == 1 else _decimal(num)


def _decimal(x: Fraction) -> str:
    return str(x.numerator / x.denominator) if x.denominator in (2, 4, 5, 8, 10, 20, 25, 50, 100) else str(x)


def load_gsm8k(path: str | Path) -> list[Item]:
    """GSM8K-format JSONL: {"question": str, "answer": str ending in "#### <number>"} (extra fields kept)."""
    items, seen = [], set()
    for line, rec in read_jsonl(path):
        loc = where(path, line)
        question = rec.get("question")
        if not isinstance(question, str) or not question.strip():
            raise AftError(f'{loc}field "question": missing or empty')
        raw = rec.get("answer")
        if not isinstance(raw, str):
            raise AftError(f'{loc}field "answer": missing (expected text ending in "#### <number>")')
        if "####" not in raw:
            raise AftError(f'{loc}field "answer": no "#### <number>" final answer')
        answer = gsm8k_answer(raw)
        if answer is None:
            raise AftError(f'{loc}field "answer": the text after "####" is not a number: '
                           f'{raw.rsplit("####", 1)[1].strip()[:40]!r}')
        qid = record_id(rec.get("id"), loc) or f"{Path(path).stem}-{line}"
        if qid in seen:
            raise AftError(f'{loc}field "id": duplicate id {qid!r}')
        seen.add(qid)
        items.append(Item(id=qid, query=rg_query(question), answer=answer, reference=raw,
                          meta={"source": f"{path}:{line}", "question": question}))
    if not items:
        raise AftError(f"{path}: no records")
    return items


__all__ = ["ANSWER_SUFFIX", "Task", "answer_key", "gsm8k_answer", "load_gsm8k", "load_task"]
