"""A generation cache in front of any engine: every seeded sample is generated once.

Strategies derive their seeds the same way (see strategies.py): one sample, the
N samples of best-of-N and majority vote, and the K proposals of
propose-and-aggregate are the same request (proposer messages, same sampling
parameters, seed derived from the run seed and the question id). Sample j of a
request depends only on its own seed, so the cache is kept per sample:

    key = hash(model fingerprint, messages, temperature, top_p, top_k, max_tokens, stop, sample seed)

Greedy samples (temperature 0) are keyed without a seed. A request is served from
the cache when all of its n samples are there (a request for 4 samples is served
by an earlier one for 8); otherwise the whole request is generated and stored.

Each stored sample keeps its measured wall time: the seconds of the engine call
that produced it, shared among that call's samples in proportion to tokens
processed. A failed request (Result.error) is passed on and not stored. Strategies report that measured time whether a sample was generated
now or earlier, so a rebuilt or shared run reports the same compute.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

from ..engines.base import Completion, Engine, OnText, Request, Result, sample_seeds
from ..io import JsonlAppender

log = logging.getLogger(__name__)


def model_fingerprint(model: str, path: str | None = None) -> str:
    """The model's name plus the sizes and mtimes of its weight files (a retrained folder is a new model)."""
    parts = [model]
    for p in (Path(path) if path else None, Path(model)):
        if p is not None and p.is_dir():
            for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]


class CachedEngine(Engine):
    """Wraps `inner`; samples are stored in `path` (JSONL, appended, safe to resume). Continuous when `inner`
    is: concurrent calls look up and store under a lock, and run their misses on `inner` at once."""

    name = "cached"

    def __init__(self, inner: Engine, path: str | Path, fingerprint: str):
        self.inner = inner
        self.model = inner.model
        self.continuous = inner.continuous
        self._lock = threading.Lock()
        self.context_window = inner.context_window
        self.fingerprint = fingerprint
        self.path = Path(path)
        self.samples: dict[str, dict] = {}
        self.prompts: dict[str, int] = {}
        self.hits = self.misses = 0
        self._out = JsonlAppender(self.path, key="key")
        from ..io import read_jsonl

        if self.path.exists():
            for _, rec in read_jsonl(self.path):
                if rec.get("fp") == fingerprint:
                    self.samples[rec["key"]] = rec
                    self.prompts[rec["prompt_key"]] = rec["prompt_tokens"]

    # keys
    def _prompt_key(self, messages) -> str:
        return _hash([self.fingerprint, messages])

    def _keys(self, req: Request) -> list[str]:
        p = req.params
        base = [self.fingerprint, req.messages, p.temperature, p.top_p, p.top_k, p.max_tokens, list(p.stop)]
        if p.temperature == 0:
            return [_hash(base + ["greedy"])] * p.n
        if p.seed is None:
            return []
        return [_hash(base + [s]) for s in sample_seeds(p)]

    def generate(self, requests: list[Request], on_text: OnText | None = None) -> list[Result]:
        results: list[Result | None] = [None] * len(requests)
        todo = []
        with self._lock:
            for i, req in enumerate(requests):
                keys = self._keys(req)
                if keys and all(k in self.samples for k in keys):
                    recs = [self.samples[k] for k in keys]
                    results[i] = Result(completions=[Completion(r["text"], r["tokens"], r["finish_reason"])
                                                     for r in recs],
                                        prompt_tokens=recs[0]["prompt_tokens"], seeds=sample_seeds(req.params),
                                        seconds=sum(r["seconds"] for r in recs))  # measured when generated
                    self.hits += 1
                else:
                    todo.append(i)
            self.misses += len(todo)
        if on_text is not None:  # a stored sample is one whole delta
            for i, res in enumerate(results):
                for j, c in enumerate(res.completions if res is not None else []):
                    on_text(i, j, c.text)
        if todo:
            t0 = time.perf_counter()
            inner_on_text = None if on_text is None else (lambda k, j, delta: on_text(todo[k], j, delta))
            fresh = self.inner.generate([requests[i] for i in todo], inner_on_text)
            seconds = time.perf_counter() - t0
            processed = sum(r.prompt_tokens + sum(c.tokens for c in r.completions) for r in fresh) or 1
            with self._lock:
                self._store(requests, todo, fresh, seconds, processed)
            for i, res in zip(todo, fresh):
                results[i] = res
        return results  # type: ignore[return-value]

    def _store(self, requests, todo, fresh, seconds, processed) -> None:
        """Keep the new samples (each with its share of the call's seconds), in memory and in the file."""
        for i, res in zip(todo, fresh):
            req = requests[i]
            keys = self._keys(req)
            share = [seconds * ((res.prompt_tokens / len(res.completions)) + c.tokens) / processed
                     for c in res.completions]
            res.seconds = sum(share)
            for j, (c, k) in enumerate(zip(res.completions, keys or [None] * len(res.completions))):
                if k is None or k in self.samples:
                    continue
                rec = {"key": k, "fp": self.fingerprint, "prompt_key": self._prompt_key(req.messages),
                       "prompt_tokens": res.prompt_tokens, "text": c.text, "tokens": c.tokens,
                       "finish_reason": c.finish_reason, "seconds": round(share[j], 6),
                       "seed": res.seeds[j] if res.seeds else None}
                self.samples[k] = rec
                self._out.write(rec)

    def count_tokens(self, messages):
        key = self._prompt_key(messages)
        if key in self.prompts:
            return self.prompts[key]
        return self.inner.count_tokens(messages)

    def num_parameters(self) -> int | None:
        return self.inner.num_parameters()

    def lockstep(self, clients: int):
        return self.inner.lockstep(clients)

    def describe(self) -> dict:
        return {**self.inner.describe(), "cache": str(self.path)}

    def close(self) -> None:
        self._out.close()
