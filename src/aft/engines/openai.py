"""Engine for any OpenAI-compatible chat endpoint (vLLM, SGLang, llama.cpp, `aft serve`, OpenAI).

One request of the batch = one `chat.completions.create` call with `n` (the
server batches the n samples and shares the prompt), run on a thread pool of at
most `max_concurrency` calls in flight. Results come back in request order.

Servers that ignore `n`: some return one choice whatever n is. The first call
that asks for n > 1 and gets fewer choices marks the server as such (remembered
for later calls, logged once) and the missing samples are fetched with
separate n=1 calls, each with its own seed: sample 0 uses the request's seed
(exactly what the server did with the first call) and sample j >= 1 uses
`sample_seeds(params)[j]`, so the same request gives the same texts before and
after the detection.

Retries: the openai client itself retries connection errors, timeouts, 408,
409, 429 and 5xx with exponential back-off (0.5 s doubling, capped at 8 s, with
jitter; `Retry-After` honoured) up to `max_retries` times. What is left after
that, and the errors not worth retrying (400, 401, 403, 404), become an
`AftError` naming the URL and the model.

Token counts: `usage` gives the prompt tokens, and the completion tokens of all
n choices together. With a `tokenizer` each choice is counted exactly;
without one the total is split across the choices in proportion to their text
lengths (the sum is exact, each share is an estimate; exact when n == 1).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import openai

from ..errors import AftError
from .base import Completion, Engine, Request, Result, SamplingParams, sample_seeds

log = logging.getLogger(__name__)


class OpenAIEngine(Engine):
    name = "openai"

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 max_concurrency: int = 8, timeout: float = 600.0, max_retries: int = 4,
                 tokenizer=None, context_window: int | None = None):
        """base_url like "http://host:8000/v1"; model "" or None = the server's first model.

        api_key: default $OPENAI_API_KEY, else "EMPTY" (what local servers expect).
        tokenizer: a transformers tokenizer or its folder / hub id, used for
        `count_tokens` and exact per-choice token counts; None = unknown.
        """
        self.base_url = base_url.rstrip("/")
        self.max_concurrency = max(1, int(max_concurrency))
        self.timeout, self.max_retries = timeout, max_retries
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                                    timeout=timeout, max_retries=max_retries)
        self.model = model or ""
        self.context_window = context_window
        self.tokenizer = _load_tokenizer(tokenizer)
        self.honours_n: bool | None = None  # unknown until a call with n > 1 returns
        if not self.model:
            self.model = self._first_model()

    # ----------------------------------------------------------------- public
    def generate(self, requests: list[Request]) -> list[Result]:
        if not requests:
            return []
        # Slots to fill: results[i].completions[j] is sample j of request i.
        results = [Result(completions=[None] * r.params.n, seeds=[None] * r.params.n) for r in requests]  # type: ignore[list-item]
        with ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="aft-openai") as pool:
            # Round 1: one call per request with n, or per sample once the server is known to ignore n.
            calls = []
            for i, r in enumerate(requests):
                if r.params.n > 1 and self.honours_n is False:
                    calls += [(i, [j], seed) for j, seed in enumerate(_fallback_seeds(r.params))]
                else:
                    calls.append((i, list(range(r.params.n)), r.params.seed))
            self._run(pool, requests, results, calls)
            # Round 2: samples a server left out (it ignored n), one n=1 call each with its own seed.
            missing = [(i, [j], _fallback_seeds(requests[i].params)[j])
                       for i, res in enumerate(results) for j, c in enumerate(res.completions) if c is None]
            if missing:
                self._run(pool, requests, results, missing)
        if any(c is None for res in results for c in res.completions):
            raise AftError(f"{self.base_url} (model {self.model!r}): the server returned no choices for a request")
        return results

    def count_tokens(self, messages: list[dict]) -> int | None:
        if self.tokenizer is None:
            return None
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def describe(self) -> dict:
        return {**super().describe(), "base_url": self.base_url, "honours_n": self.honours_n}

    def close(self) -> None:
        self.client.close()

    # -------------------------------------------------------------- internals
    def _run(self, pool, requests: list[Request], results: list[Result], calls: list[tuple]) -> None:
        """Run calls (request index, sample slots, seed) on the pool and put the choices in their slots."""
        futures = [pool.submit(self._call, requests[i].messages, requests[i].params, len(slots), seed)
                   for i, slots, seed in calls]
        try:
            for (i, slots, seed), fut in zip(calls, futures):
                completions, prompt_tokens = fut.result()
                res = results[i]
                res.prompt_tokens = prompt_tokens
                for j, c in zip(slots, completions):
                    res.completions[j] = c
                    # The seed the sample was drawn with, when we know it: a call with n > 1
                    # lets the server derive each choice's seed from the request's.
                    res.seeds[j] = seed if len(slots) == 1 or len(completions) == 1 else None
                if len(slots) > 1:
                    self._note_n(len(slots), len(completions))
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def _note_n(self, asked: int, got: int) -> None:
        if got < asked and self.honours_n is not False:
            log.warning("%s (model %s) returned %d choice(s) for n=%d; asking for each sample separately from now on",
                        self.base_url, self.model, got, asked)
            self.honours_n = False
        elif got >= asked and self.honours_n is None:
            self.honours_n = True

    def _call(self, messages: list[dict], p: SamplingParams, n: int, seed: int | None) -> tuple[list[Completion], int]:
        """One chat.completions call -> (completions, prompt tokens)."""
        kw: dict = dict(model=self.model, messages=messages, n=n, temperature=p.temperature, top_p=p.top_p,
                        max_tokens=p.max_tokens)
        if p.stop:
            kw["stop"] = list(p.stop)
        if seed is not None:
            kw["seed"] = seed
        if p.top_k > 0:
            kw["extra_body"] = {"top_k": p.top_k}  # not in the OpenAI API; vLLM and SGLang accept it
        try:
            resp = self.client.chat.completions.create(**kw)
        except openai.OpenAIError as e:
            raise self._error(e) from e
        choices = sorted(resp.choices, key=lambda c: c.index)[:n]
        texts = [c.message.content or "" for c in choices]
        usage = resp.usage
        if self.tokenizer is not None:
            tokens = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        elif usage is not None and usage.completion_tokens is not None:
            tokens = split_total(usage.completion_tokens, texts)
        else:
            tokens = [0] * len(texts)  # the server reports no usage and we have no tokenizer: unknown
        completions = [Completion(text=t, tokens=k, finish_reason="length" if c.finish_reason == "length" else "stop")
                       for t, k, c in zip(texts, tokens, choices)]
        prompt_tokens = usage.prompt_tokens if usage is not None and usage.prompt_tokens is not None else 0
        return completions, prompt_tokens

    def _first_model(self) -> str:
        try:
            ids = [m.id for m in self.client.models.list()]
        except openai.OpenAIError as e:
            raise self._error(e) from e
        if not ids:
            raise AftError(f"{self.base_url}: the server lists no models; name one as {self.base_url}#MODEL")
        log.info("%s: using the server's first model, %s", self.base_url, ids[0])
        return ids[0]

    def _error(self, e: openai.OpenAIError) -> AftError:
        """A client exception (after the client's retries) -> one clear line naming the URL and model."""
        where = f"{self.base_url} (model {self.model!r})" if self.model else self.base_url
        tries = f"{self.max_retries + 1} attempt{'s' if self.max_retries else ''}"
        if isinstance(e, openai.APITimeoutError):
            return AftError(f"{where}: no answer within {self.timeout:g} s ({tries})")
        if isinstance(e, openai.APIConnectionError):
            cause = _one_line(e.__cause__ or e)
            return AftError(f"cannot reach {where} ({tries}): {cause}")
        if isinstance(e, openai.APIStatusError):
            body = e.body if isinstance(e.body, dict) else {}
            detail = _one_line(body.get("message") or e.message).rstrip(".")
            if isinstance(e, openai.AuthenticationError):
                return AftError(f"{where}: authentication failed (401): {detail}; set OPENAI_API_KEY or api_key")
            if isinstance(e, openai.NotFoundError):
                return AftError(f"{where}: not found (404): {detail}{self._served_models_hint()}")
            return AftError(f"{where}: request failed ({e.status_code}): {detail}")
        return AftError(f"{where}: {type(e).__name__}: {_one_line(e)}")

    def _served_models_hint(self) -> str:
        try:
            ids = [m.id for m in self.client.with_options(max_retries=0).models.list()]
        except openai.OpenAIError:
            return ""
        return f"; the server serves: {', '.join(ids[:10])}" if ids else ""


def split_total(total: int, texts: list[str]) -> list[int]:
    """Split a total token count over the texts in proportion to their lengths (largest remainder).

    The server reports only the total of n choices; this is an estimate per
    choice whose sum is exact. Texts all empty: an even split.
    """
    if not texts:
        return []
    weights = [len(t) for t in texts]
    if sum(weights) == 0:
        weights = [1] * len(texts)
    shares = [total * w / sum(weights) for w in weights]
    out = [int(s) for s in shares]
    by_remainder = sorted(range(len(texts)), key=lambda k: shares[k] - out[k], reverse=True)
    for k in by_remainder[: total - sum(out)]:
        out[k] += 1
    return out


def _fallback_seeds(p: SamplingParams) -> list[int | None]:
    """Seeds of the n separate calls: the request's own seed for sample 0, sample_seeds for the rest."""
    seeds = sample_seeds(p)
    seeds[0] = p.seed
    return seeds


def _load_tokenizer(tokenizer):
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    except (OSError, ValueError) as e:
        raise AftError(f"cannot load the tokenizer {str(tokenizer)!r}: {_one_line(e)}") from e


def _one_line(x) -> str:
    s = str(x).strip()
    return s.splitlines()[0][:300] if s else type(x).__name__
