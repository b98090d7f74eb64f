"""Scorers: a number per (prompt, response), for top-K selection and for reports.

    VerifierScorer       1.0 / 0.0 against the item's reference answer (numeric
                         exact match; reasoning-gym's own scorer for its tasks)
    RewardModelScorer    any transformers sequence-classification reward model,
                         each (query, response) rendered in the reward model's
                         own chat template, batched
    JudgeScorer          any engine asked for a 1-10 rating (greedy, seeded)

All share `score(items, texts) -> scores`, where texts[i] are the responses of
items[i] and a score may be None (could not be scored). `score_safely` calls a
scorer so that one that raises fails only the items it raises on.
"""

from __future__ import annotations

import logging
import re

from ..engines.base import Engine, Request, SamplingParams, derive_seed
from ..errors import AftError
from .sources import Item
from .verify import is_correct

log = logging.getLogger(__name__)

SCORERS = ("none", "verifier", "reward_model", "judge")


class Scorer:
    name = "scorer"

    def score(self, items: list[Item], texts: list[list[str]]) -> list[list[float | None]]:
        raise NotImplementedError  # abstract

    def count_tokens(self, query: list[dict], response: str) -> int | None:
        """Tokens the scorer reads to score `response` (for compute accounting); None if not a model."""
        return None

    def describe(self) -> dict:
        return {"scorer": self.name}

    def close(self) -> None:
        pass


def failure(what: str, e: Exception) -> str:
    """One line saying that `what` raised `e` (for the record of the query it failed)."""
    text = str(e).strip().splitlines()
    return f"{what} failed: {type(e).__name__}" + (f": {text[0][:300]}" if text else "")


def score_safely(scorer: Scorer, items: list[Item], texts: list[list[str]]
                 ) -> tuple[list[list[float | None]], list[str | None]]:
    """`scorer.score(items, texts)`, and per item why it could not be scored (None: it was).

    When the batch raises, each item is scored alone: the items whose scoring raises get the
    reason (and None scores), the others their scores.
    """
    try:
        return scorer.score(items, texts), [None] * len(items)
    except Exception as e:  # a scorer's failure on some input must not stop the run
        if len(items) == 1:
            log.warning("scorer %s failed on %s", scorer.name, items[0].id, exc_info=True)
            return [[None] * len(texts[0])], [failure(f"scorer {scorer.name}", e)]
    scores, errors = [], []
    for item, ts in zip(items, texts):
        sc, err = score_safely(scorer, [item], [ts])
        scores += sc
        errors += err
    return scores, errors


class VerifierScorer(Scorer):
    name = "verifier"

    def score(self, items, texts):
        out = []
        for item, ts in zip(items, texts):
            if item.answer is None:
                out.append([None] * len(ts))
                continue
            task = item.meta.get("task")
            entry = None
            if task:
                from .reasoning_gym import rg_entry

                entry = rg_entry(item.meta)
            cfg = item.meta.get("task_config")
            q = item.meta.get("question")
            out.append([1.0 if is_correct(t, item.answer, task, entry, cfg, question=q) else 0.0 for t in ts])
        return out


class RewardModelScorer(Scorer):
    """A sequence-classification reward model; score = logit of label 0 (num_labels 1) or of the last label."""

    name = "reward_model"

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 4096, display_name: str = ""):
        self.model = model.eval()
        self.tok = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.display_name = display_name or getattr(model.config, "_name_or_path", "")
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tok.pad_token_id

    @classmethod
    def load(cls, path: str, dtype: str = "auto", device: str = "auto", **kw) -> "RewardModelScorer":
        from ..loading import load_pretrained
        from ..models import resolve

        spec = resolve(path)
        if spec.kind != "hf":
            raise AftError(f"reward model {path!r}: needs a local transformers model (got a {spec.kind} model)")
        model, tok = load_pretrained(spec.path, dtype=dtype, device=device, task="sequence-classification",
                                     what="reward model")
        return cls(model, tok, display_name=path, **kw)

    def render(self, query: list[dict], response: str) -> str:
        messages = query + [{"role": "assistant", "content": response}]
        if self.tok.chat_template:
            return self.tok.apply_chat_template(messages, tokenize=False)
        return "\n\n".join(m["content"] for m in messages)

    def count_tokens(self, query: list[dict], response: str) -> int:
        return len(self.tok(self.render(query, response))["input_ids"])

    def score(self, items, texts):
        import torch

        flat = [(i, self.render(item.query, t)) for i, (item, ts) in enumerate(zip(items, texts)) for t in ts]
        values: list[float] = []
        dev = next(self.model.parameters()).device
        for s in range(0, len(flat), self.batch_size):
            batch = [text for _, text in flat[s:s + self.batch_size]]
            enc = self.tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length,
                           add_special_tokens=not bool(self.tok.chat_template))
            with torch.inference_mode():
                logits = self.model(**{k: v.to(dev) for k, v in enc.items()}).logits.float()
            col = 0 if logits.shape[-1] == 1 else -1
            values.extend(logits[:, col].tolist())
        out, it = [], iter(values)
        for ts in texts:
            out.append([next(it) for _ in ts])
        return out

    def describe(self):
        return {"scorer": self.name, "model": self.display_name}


JUDGE_SYSTEM = "You are a careful, impartial judge of answer quality."
JUDGE_PROMPT = (
    "Rate how well the response answers the question, considering correctness first, then helpfulness and "
    "clarity. Reply with one short sentence of reasoning and then the rating as an integer from 1 (useless) "
    "to 10 (perfect) in double brackets, like this: Rating: [[7]]\n\n"
    "[Question]\n{question}\n\n[Response]\n{response}\n\n[End of response]"
)
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_LOOSE = re.compile(r"rating\s*:?\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_rating(text: str) -> float | None:
    """The 1-10 rating in a judge's reply: "[[7]]", else "Rating: 7"; None if absent or out of range."""
    for pattern in (_RATING, _LOOSE):
        found = pattern.findall(text or "")
        if found:
            x = float(found[-1])
            return x if 1 <= x <= 10 else None
    return None


class JudgeScorer(Scorer):
    """An LLM judge behind any engine: greedy, one rating per response."""

    name = "judge"

    def __init__(self, engine: Engine, max_tokens: int = 256, seed: int = 0):
        self.engine = engine
        self.max_tokens = max_tokens
        self.seed = seed

    def messages(self, query: list[dict], response: str) -> list[dict]:
        question = "\n\n".join(f"{m['role']}: {m['content']}" if len(query) > 1 else m["content"]
                               for m in query if m["role"] != "system")
        return [{"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": JUDGE_PROMPT.format(question=question, response=response)}]

    def score(self, items, texts):
        reqs = []
        for item, ts in zip(items, texts):
            for j, t in enumerate(ts):
                params = SamplingParams(n=1, temperature=0.0, max_tokens=self.max_tokens,
                                        seed=derive_seed(self.seed, item.id, "judge", t))
                reqs.append(Request(self.messages(item.query, t), params))
        results = self.engine.generate(reqs) if reqs else []
        ratings = [None if r.error is not None else parse_rating(r.completions[0].text) for r in results]
        unparsed = sum(r is None for r in ratings)
        if unparsed:
            log.info("judge: %d of %d replies had no rating", unparsed, len(ratings))
        out, it = [], iter(ratings)
        for ts in texts:
            out.append([next(it) for _ in ts])
        return out

    def describe(self):
        return {"scorer": self.name, **self.engine.describe()}
