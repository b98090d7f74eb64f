"""Engine for any OpenAI-compatible chat endpoint (vLLM, SGLang, llama.cpp, `aft serve`, OpenAI).

One request of the batch = one `chat.completions.create` call with `n` (the
server batches the n samples and shares the prompt), run on the engine's thread
pool of at most `max_concurrency` calls in flight. Results come back in request
order. The engine is `continuous`: `generate` may be called from several
threads at once; their calls share the one pool (so `max_concurrency` bounds
the calls in flight over all of them) and what the engine learns about the
server (below) is updated under a lock.

Servers that ignore `n`: some return one choice whatever n is. The first call
that asks for n > 1 and gets fewer choices marks the server as such (remembered
for later calls, logged once) and the missing samples are fetched with
separate n=1 calls, each with its own seed: sample 0 uses the request's seed
(exactly what the server did with the first call) and sample j >= 1 uses
`sample_seeds(params)[j]`, so the same request gives the same texts before and
after the detection.

Servers that refuse `n`: llama.cpp answers n > 1 with an error (HTTP 500
"Only one completion choice is allowed"; 400 in some versions). A 400, 422,
500 or 501 answer to a request with n > 1, before the server has ever honoured
n, marks it the same way (remembered, logged once) and the samples are fetched
with n=1 calls as above. That probe is sent without the client's retries, so a
refusal costs one call, not five.

Parameters a server refuses: hosted OpenAI rejects `top_k` and the other vLLM
extensions with a 400 naming the argument, and reasoning models reject
`max_tokens` (and some `temperature`, `top_p`, `stop`). A 400 that names a
parameter we sent as unsupported or unrecognised drops it (`max_tokens` becomes
`max_completion_tokens`), is remembered for later calls, logged once, and the
call is retried. A dropped `stop` is applied here instead (each text cut at its
first stop string); a dropped `temperature` or `top_p` leaves the server's own
value in force (logged as a warning).

Neutral sampling values: `vllm serve` (and llama.cpp, with its own defaults
top_k 40, min_p 0.05) fills every omitted sampling parameter from the model's
generation_config.json (e.g. top_k 20, repetition_penalty 1.05). So every call
states them: `top_k` (-1 = off, as vLLM, SGLang and llama.cpp read it),
`repetition_penalty` 1.0 and `min_p` 0.0, unless the server refused them.

Timeouts and retries: each attempt of a call may take `timeout` seconds
(default 300: a long generation on a busy server, not a hung one); the openai
client itself retries connection errors, timeouts, 408, 409, 429 and 5xx with
exponential back-off (0.5 s doubling, capped at 8 s, with jitter; `Retry-After`
honoured) up to `max_retries` times (default 2). What is left after that, and
the errors not worth retrying (401, 403, 404), become an `AftError` naming the
URL and the model; so does a reply that is not an OpenAI JSON response. A
request the server rejects on its own (400, 413, 422, once the fallbacks above
are spent: e.g. a prompt longer than the model's context) fails alone: its
Result carries the server's message as `error`, the rest of the batch is
answered.
While calls are unanswered one warning per `min(30 s, timeout / 3)` for the
whole engine (all concurrent `generate` calls together: per-query P&A
pipelines make many) says how many requests wait, the oldest for how long, and
on which server.

Cancellation (`Request.cancel`, base.py): a request that can be cancelled is
always streamed, so that it can be given up mid-way: once its event is set,
its streams are closed at the next chunk (the server sees the connection go,
and `aft serve` and vLLM stop generating), its calls not yet started are not
sent, and `generate` stops waiting for it (it polls the events every 0.1 s)
and answers it CANCELLED. A call already sent without streaming (a server that
refuses `stream`) runs to its end in the pool, its answer unused.

Streaming: with `on_text`, each call is made with `stream=True` (and
`stream_options.include_usage`, for the token counts) and each choice's text
is passed on as it arrives. A server that refuses stop strings gets no stream:
its texts are cut here and passed on whole; so does a server that refuses
`stream` (a 400 naming it, remembered like the parameters above). A stream
that breaks is an error
like any other (the client retries only before the first byte).

Token counts: `usage` gives the prompt tokens, and the completion tokens of all
n choices together. With a `tokenizer` each choice is counted exactly;
without one the total is split across the choices in proportion to their text
lengths (the sum is exact, each share is an estimate; exact when n == 1).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

import openai

from ..errors import AftError
from .args import EngineArgs
from .base import CANCELLED, Completion, Engine, OnText, Request, Result, SamplingParams, sample_seeds

log = logging.getLogger(__name__)

# Defaults declared once, with the options (engines/args.py), for code that builds the engine directly.
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineArgs)}

# Status codes with which a server refuses n > 1 (llama.cpp: 500 "Only one completion choice is allowed").
_REFUSES_N = {400, 422, 500, 501}
# Sampling values that switch off what a server would otherwise fill in from generation_config.json.
_NEUTRAL_EXTRAS = {"repetition_penalty": 1.0, "min_p": 0.0}
# How servers name a parameter they do not take (hosted OpenAI's phrasings; `param` gives it when set).
_UNSUPPORTED = re.compile(r"(?:unrecognized request argument supplied|unsupported parameter|unsupported value)"
                          r"\W+(\w+)", re.IGNORECASE)

REJECTED = (400, 413, 422)  # statuses that concern one request, not the server


class Rejected(AftError):
    """The server refused one request (REJECTED); that request fails, the batch goes on."""


class Cancelled(Rejected):
    """The caller cancelled the request (Request.cancel); it fails alone, as a rejected one."""

    def __init__(self):
        super().__init__(CANCELLED)


CANCEL_POLL = 0.1  # seconds between looks at the cancel events of a call's requests


class OpenAIEngine(Engine):
    name = "openai"
    continuous = True  # independent HTTP requests: concurrent generate calls share the pool

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 max_concurrency: int = _DEFAULTS["max_concurrency"], timeout: float = _DEFAULTS["timeout"],
                 max_retries: int = _DEFAULTS["max_retries"],
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
        self.refused: set[str] = set()  # parameters the server said it does not take (see _drop)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="aft-openai")
        # Calls submitted and not answered, over all generate calls -> when submitted; one warning per period
        self._unanswered: dict[Future, float] = {}
        self._warn_every = min(30.0, timeout / 3)
        self._warned_at = float("-inf")
        if not self.model:
            self.model = self._first_model()

    # ----------------------------------------------------------------- public
    def generate(self, requests: list[Request], on_text: OnText | None = None) -> list[Result]:
        if not requests:
            return []
        # Slots to fill: results[i].completions[j] is sample j of request i.
        results = [Result(completions=[None] * r.params.n, seeds=[None] * r.params.n) for r in requests]  # type: ignore[list-item]
        # Round 1: one call per request with n, or per sample once the server is known to ignore n.
        calls = []
        for i, r in enumerate(requests):
            if r.params.n > 1 and self.honours_n is False:
                calls += [(i, [j], seed) for j, seed in enumerate(_fallback_seeds(r.params))]
            else:
                calls.append((i, list(range(r.params.n)), r.params.seed))
        self._run(requests, results, calls, on_text)
        # Round 2: samples a server left out (it ignored n), one n=1 call each with its own seed.
        missing = [(i, [j], _fallback_seeds(requests[i].params)[j])
                   for i, res in enumerate(results) if res.error is None
                   for j, c in enumerate(res.completions) if c is None]
        if missing:
            self._run(requests, results, missing, on_text)
        if any(c is None for res in results if res.error is None for c in res.completions):
            raise AftError(f"{self.base_url} (model {self.model!r}): the server returned no choices for a request")
        return results

    def count_tokens(self, messages: list[dict]) -> int | None:
        if self.tokenizer is None:
            return None
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def describe(self) -> dict:
        return {**super().describe(), "base_url": self.base_url, "honours_n": self.honours_n,
                "refused_parameters": sorted(self.refused)}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    # -------------------------------------------------------------- internals
    def _run(self, requests: list[Request], results: list[Result], calls: list[tuple], on_text) -> None:
        """Run calls (request index, sample slots, seed) on the pool and put the choices in their slots."""
        def emit(i, slots):  # the call's choice k is completion slots[k] of request i
            return None if on_text is None else lambda k, delta: on_text(i, slots[k], delta)

        futures = [self._pool.submit(self._call, requests[i].messages, requests[i].params, len(slots), seed,
                                     emit(i, slots), requests[i].cancel) for i, slots, seed in calls]
        now = time.monotonic()
        with self._lock:
            self._unanswered.update((f, now) for f in futures)
        for f in futures:
            f.add_done_callback(self._answered)
        try:
            self._wait_saying_so(futures, [requests[i] for i, *_ in calls])
            for (i, slots, seed), fut in zip(calls, futures):
                res = results[i]
                if requests[i].cancelled:  # not waited for (see _wait_saying_so)
                    res.completions, res.seeds, res.error = [], [], CANCELLED
                    continue
                try:
                    completions, prompt_tokens = fut.result()
                except Rejected as e:  # this request alone
                    res.completions, res.seeds, res.error = [], [], str(e)
                    continue
                if res.error is not None:  # another sample of the same request was rejected
                    continue
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

    def _wait_saying_so(self, futures: list[Future], requests: list[Request]) -> None:
        """Wait for the calls (or the first error), but not for those of cancelled requests (the ones not
        started are withdrawn); meanwhile the engine-wide warning about unanswered calls (_say_waiting)."""
        cancellable = any(r.cancel is not None for r in requests)
        while True:
            live = []
            for f, r in zip(futures, requests):
                if r.cancelled:
                    f.cancel()  # (one not started yet is never sent)
                else:
                    live.append(f)
            done, pending = wait(live, timeout=CANCEL_POLL if cancellable else self._warn_every,
                                 return_when=FIRST_EXCEPTION)
            if not pending or any(f.exception() is not None for f in done):
                return
            self._say_waiting()

    def _answered(self, future: Future) -> None:
        with self._lock:
            self._unanswered.pop(future, None)

    def _say_waiting(self) -> None:
        """At most one warning per period for the whole engine, while some call has waited a period."""
        now = time.monotonic()
        with self._lock:
            if now - self._warned_at < self._warn_every or not self._unanswered:
                return
            oldest = now - min(self._unanswered.values())
            if oldest < self._warn_every:
                return
            self._warned_at, waiting = now, len(self._unanswered)
        log.warning("waiting for %s (model %s): %d request%s unanswered, the oldest for %.1f s (timeout %g s per "
                    "attempt, %d attempt%s)", self.base_url, self.model, waiting, "s" if waiting > 1 else "", oldest,
                    self.timeout, self.max_retries + 1, "s" if self.max_retries else "")

    def _note_n(self, asked: int, got: int) -> None:
        with self._lock:
            if got < asked and self.honours_n is not False:
                log.warning("%s (model %s) returned %d choice(s) for n=%d; asking for each sample separately from "
                            "now on", self.base_url, self.model, got, asked)
                self.honours_n = False
            elif got >= asked and self.honours_n is None:
                self.honours_n = True

    def _body(self, messages: list[dict], p: SamplingParams, n: int, seed: int | None, stream: bool = False) -> dict:
        """The keyword arguments of one chat.completions call, less what the server refused."""
        kw: dict = dict(model=self.model, messages=messages, n=n, temperature=p.temperature, top_p=p.top_p,
                        max_tokens=p.max_tokens)
        if stream:
            kw.update(stream=True, stream_options={"include_usage": True})
        if p.stop:
            kw["stop"] = list(p.stop)
        if seed is not None:
            kw["seed"] = seed
        # Not in the OpenAI API: vLLM, SGLang and llama.cpp read them from the body.
        extra = {"top_k": p.top_k if p.top_k > 0 else -1, **_NEUTRAL_EXTRAS}
        with self._lock:  # another thread may be adding to it
            refused = sorted(self.refused)
        for name in refused:
            if name == "max_tokens":
                kw["max_completion_tokens"] = kw.pop("max_tokens")
            kw.pop(name, None)
            extra.pop(name, None)
        if extra:
            kw["extra_body"] = extra
        return kw

    def _call(self, messages: list[dict], p: SamplingParams, n: int, seed: int | None,
              emit=None, cancel=None) -> tuple[list[Completion], int]:
        """One chat.completions call -> (completions, prompt tokens).

        Fewer completions than n come back when the server ignores or refuses n
        (the caller fetches the rest); a refused parameter is dropped and the call retried.
        `emit(k, delta)`: stream choice k's text; `cancel`: an event that gives the call up (Cancelled);
        see the module's docstring.
        """
        probing = n > 1 and self.honours_n is None  # does the server take n? Ask once, without retries
        client = self.client.with_options(max_retries=0) if probing else self.client
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            # Stop strings the server refused are cut here, once the text is whole: those texts are not streamed.
            kw = self._body(messages, p, n, seed, (emit is not None or cancel is not None)
                            and not (p.stop and "stop" in self.refused))
            stream = bool(kw.get("stream"))  # unless the server refused to stream
            try:
                resp = client.chat.completions.create(**kw)
                break
            except openai.OpenAIError as e:
                if isinstance(e, openai.APIStatusError):
                    if self._drop(e, kw):
                        continue
                    if probing and e.status_code in _REFUSES_N and e.param in (None, "n"):
                        self._refuses_n(n, e)
                        return self._call(messages, p, 1, seed, emit, cancel)
                status = getattr(e, "status_code", None)
                if probing and (status is None or status in (408, 409, 429) or status >= 500):
                    probing, client = False, self.client  # busy, flaky or unreachable: ask again, with retries
                    continue
                raise self._error(e) from e
        if stream:
            texts, finish, usage = self._read_stream(resp, n, emit, cancel)
        else:
            if not hasattr(resp, "choices"):  # the client hands back the body as text when it is not JSON
                raise AftError(f"{self.base_url} (model {self.model!r}): the reply is not an OpenAI chat completion "
                               f"(is this an OpenAI-compatible /v1 URL?): {_one_line(resp)[:120]!r}")
            choices = sorted(resp.choices, key=lambda c: c.index)[:n]
            texts = [c.message.content or "" for c in choices]
            finish = ["length" if c.finish_reason == "length" else "stop" for c in choices]
            usage = resp.usage
        if p.stop and "stop" in self.refused:  # the server does not take stop strings: apply them here
            for k, t in enumerate(texts):
                cut = min((t.find(s) for s in p.stop if s in t), default=-1)
                if cut >= 0:
                    texts[k], finish[k] = t[:cut], "stop"
        if emit is not None and not stream:
            for k, t in enumerate(texts):
                emit(k, t)
        if self.tokenizer is not None:
            tokens = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        elif usage is not None and usage.completion_tokens is not None:
            tokens = split_total(usage.completion_tokens, texts)
        else:
            tokens = [0] * len(texts)  # the server reports no usage and we have no tokenizer: unknown
        completions = [Completion(text=t, tokens=k, finish_reason=f) for t, k, f in zip(texts, tokens, finish)]
        prompt_tokens = usage.prompt_tokens if usage is not None and usage.prompt_tokens is not None else 0
        return completions, prompt_tokens

    def _read_stream(self, stream, n: int, emit, cancel=None) -> tuple[list[str], list[str], object]:
        """Read a streamed reply, passing each choice's new text to `emit` (if any) -> (texts, finish reasons,
        usage) of the choices that came, in index order. `cancel` set: the stream is closed (Cancelled)."""
        texts, finish, usage, seen = [""] * n, ["stop"] * n, None, set()
        try:
            for chunk in stream:
                if cancel is not None and cancel.is_set():
                    stream.close()  # the connection goes: the server stops generating
                    raise Cancelled()
                usage = getattr(chunk, "usage", None) or usage  # the last chunk, with include_usage
                for c in chunk.choices or []:
                    if c.index >= n:
                        continue
                    seen.add(c.index)
                    delta = c.delta.content if c.delta is not None else None
                    if delta:
                        texts[c.index] += delta
                        if emit is not None:
                            emit(c.index, delta)
                    if c.finish_reason:
                        finish[c.index] = "length" if c.finish_reason == "length" else "stop"
        except openai.OpenAIError as e:
            raise self._error(e) from e
        except (AttributeError, TypeError, ValueError) as e:
            raise AftError(f"{self.base_url} (model {self.model!r}): the reply is not an OpenAI chat completion "
                           f"stream (is this an OpenAI-compatible /v1 URL?): {_one_line(e)}") from None
        order = sorted(seen)
        return [texts[k] for k in order], [finish[k] for k in order], usage

    def _refuses_n(self, n: int, e: openai.APIStatusError) -> None:
        with self._lock:
            if self.honours_n is not False:
                log.warning("%s (model %s) refused n=%d (%d: %s); asking for each sample separately from now on",
                            self.base_url, self.model, n, e.status_code, _detail(e))
                self.honours_n = False

    def _drop(self, e: openai.APIStatusError, kw: dict) -> bool:
        """A 400 naming a parameter we sent as unsupported: remember to leave it out. True if one was dropped."""
        if e.status_code != 400:
            return False
        detail = _detail(e)
        m = _UNSUPPORTED.search(detail)
        name = m.group(1) if m else None
        if name is None and e.param and re.search(r"unsupported|not supported|unrecognized", detail, re.IGNORECASE):
            name = e.param
        sent = set(kw) | set(kw.get("extra_body", {}))
        if name not in sent or name in ("model", "messages", "n", "max_completion_tokens"):
            return False
        with self._lock:
            if name not in self.refused:
                self.refused.add(name)
                effect = {"max_tokens": "sending max_completion_tokens instead",
                          "stop": "cutting the texts at the stop strings here",
                          "stream": "passing each text on whole when it is done",
                          "temperature": "the server's own temperature applies",
                          "top_p": "the server's own top_p applies"}.get(name, "leaving it out")
                level = logging.WARNING if name in ("temperature", "top_p") else logging.INFO
                log.log(level, "%s (model %s) does not take %r (%s); %s from now on",
                        self.base_url, self.model, name, detail, effect)
        return True

    def _first_model(self) -> str:
        log.info("asking %s which models it serves (timeout %g s)", self.base_url, self.timeout)
        try:
            ids = [m.id for m in self.client.models.list()]
        except openai.OpenAIError as e:
            raise self._error(e) from e
        except (AttributeError, TypeError, ValueError):  # a reply that is not an OpenAI model list
            raise AftError(f"{self.base_url}: /models did not return an OpenAI model list; is this an "
                           f"OpenAI-compatible /v1 URL? (or name the model: {self.base_url}#MODEL)") from None
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
            detail = _detail(e)
            if isinstance(e, openai.AuthenticationError):
                return AftError(f"{where}: authentication failed (401): {detail}; set OPENAI_API_KEY or api_key")
            if isinstance(e, openai.NotFoundError):
                return AftError(f"{where}: not found (404): {detail}{self._served_models_hint()}")
            if e.status_code in REJECTED:
                return Rejected(f"{where}: request rejected ({e.status_code}): {detail}")
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


def _detail(e: openai.APIStatusError) -> str:
    """The server's error message, on one line."""
    body = e.body if isinstance(e.body, dict) else {}
    return _one_line(body.get("message") or e.message).rstrip(".")


def _one_line(x) -> str:
    s = str(x).strip()
    return s.splitlines()[0][:300] if s else type(x).__name__
