"""reasoning-gym tasks as offline prompt sources with reference answers.

Train and evaluation prompts must not overlap. Seeds alone do not ensure it:
the small 1-digit pools hold a few hundred distinct questions, and configs with
the same seed draw the same operands. So `split_prompts` draws one pool of
`pool_size` entries (seeded), keeps each DISTINCT QUESTION TEXT once, orders the
distinct questions by a seeded hash of their text, and gives the first `n_eval`
to evaluation and the next `n_train` to training. The eval set does not depend
on n_train, the train set is a prefix-stable list, and the two never share a
question. The evaluation stage imports `split_prompts` with the same task,
config, seed, pool_size and n_eval.
"""

from __future__ import annotations

import hashlib
import json

from ..engines.base import derive_seed
from ..errors import AftError
from .sources import Item

# Appended to each question; the verifier reads "Answer:" or the last number (the 135M model rarely writes it).
ANSWER_SUFFIX = "\nEnd with a final line 'Answer: <answer>'."

# Short names for configs the embedded 135M model scores above zero on (greedy, 40 questions each: arith1 0.63,
# products1 0.65, arith2 0.23, chain_sum2 0.20).
PRESETS = {
    "arith1": ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
                                    "operators": ["+", "-"]}),
    "products1": ("products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    "arith2": ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2,
                                    "operators": ["+", "-"]}),
    "chain_sum2": ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}),
    "gsm_symbolic": ("gsm_symbolic", {}),
}


def resolve_task(task: str, task_config: dict | None = None) -> tuple[str, dict]:
    """(reasoning-gym name, config): a preset name, or a task name with its config."""
    if task in PRESETS and not task_config:
        name, cfg = PRESETS[task]
        return name, dict(cfg)
    return task, dict(task_config or {})


def rg_query(question: str) -> list[dict]:
    return [{"role": "user", "content": question + ANSWER_SUFFIX}]


def _make(task: str, cfg: dict, size: int, seed: int):
    try:
        import reasoning_gym
    except ImportError:
        raise AftError("reasoning-gym tasks need the package: pip install reasoning-gym") from None
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    try:
        return reasoning_gym.create_dataset(task, size=size, seed=seed, **kwargs)
    except Exception as e:
        raise AftError(f"reasoning-gym task {task!r} with config {cfg}: {e}") from None


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


def distinct_pool(task: str, task_config: dict | None = None, seed: int = 0, pool_size: int = 1000) -> list[dict]:
    """The distinct questions (first entry of each) among `pool_size` entries drawn with `seed`."""
    name, cfg = resolve_task(task, task_config)
    ds = _make(name, cfg, pool_size, seed)
    seen, out = set(), []
    for entry in ds:
        q = entry["question"]
        if q not in seen:
            seen.add(q)
            out.append(entry)
    return out


def split_prompts(task: str, n_train: int, n_eval: int, task_config: dict | None = None, seed: int = 0,
                  pool_size: int = 1000) -> tuple[list[Item], list[Item]]:
    """Disjoint (train, eval) prompts of a reasoning-gym task, split by distinct question text."""
    name, cfg = resolve_task(task, task_config)
    pool = distinct_pool(task, task_config, seed, pool_size)
    if n_train + n_eval > len(pool):
        raise AftError(f"reasoning-gym {name} {cfg} has {len(pool)} distinct questions in a pool of {pool_size} "
                       f"(seed {seed}); {n_eval} eval + {n_train} train asked: ask for fewer or raise pool_size")
    pool.sort(key=lambda e: (derive_seed("split", seed, e["question"]), e["question"]))
    eval_entries, train_entries = pool[:n_eval], pool[n_eval:n_eval + n_train]
    return ([_item(name, cfg, e, "train") for e in train_entries], [_item(name, cfg, e, "eval") for e in eval_entries])


def _item(task: str, cfg: dict, entry: dict, split: str) -> Item:
    question = entry["question"]
    answer = str(entry["answer"])
    meta = entry.get("metadata") or {}
    cot = meta.get("answer_cot")
    qid = f"{task}-{hashlib.sha1(question.encode()).hexdigest()[:10]}"
    return Item(
        id=qid,
        query=rg_query(question),
        responses=None,
        answer=answer,
        # the task's own worked solution where it has one (gsm_symbolic), else the bare answer line
        reference=cot if isinstance(cot, str) and cot.strip() else f"Answer: {answer}",
        meta={"source": f"reasoning_gym:{task}", "source_line": None, "task": task, "task_config": _jsonable(cfg),
              "split": split, "question": question, "answer": answer,
              "rg_metadata": json.dumps(_jsonable(meta), sort_keys=True)},
    )


def rg_entry(meta: dict) -> dict:
    """The reasoning-gym entry of a row's meta (for score_answer)."""
    return {"question": meta.get("question"), "answer": meta.get("answer"),
            "metadata": json.loads(meta["rg_metadata"]) if meta.get("rg_metadata") else {}}
