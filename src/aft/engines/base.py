"""The small interface every engine implements.

A batch of requests (chat messages + sampling parameters, n and seed included)
goes in; for each request, n completions (text, generated token count, finish
reason) and the prompt's token count come out. The propose-and-aggregate loop
sees only this, never torch or an HTTP client.

A request that cannot be answered (its prompt does not fit the context window,
the server rejects it with a 400) fails alone: its Result has `error` set and no
completions, and the other requests of the batch are answered. An engine raises
only for what fails every request (a server that cannot be reached, a bad key).

Streaming: `generate(requests, on_text)` calls `on_text(request_index,
completion_index, delta)` with the new text of a completion as it is produced;
a completion's deltas concatenate to exactly its final text (stop strings
already cut). An engine that cannot stream calls it once per completion with
the whole text, when the batch is done (`emit_whole`).

Cancellation: a Request may carry `cancel`, a threading.Event its caller sets
when it no longer wants the answer (`aft serve`: the client went away). The
engine then stops working on that request as soon as it can (the transformers
engine drops its rows before the next decode step; the openai engine closes the
request's streams and sends none of its calls not yet started; P&A starts no
further layer and cancels the running one's inner requests) and answers it with
`Result.failed(CANCELLED)`; the other requests of the call, and of concurrent
calls, go on unaffected. `generate` returns once each of its requests is
answered or cancelled. An engine that cannot interrupt its work (vLLM's offline
`LLM.chat`) skips the requests cancelled before the call starts.

Concurrency: an engine whose `continuous` is True may have `generate` called
from several threads at once, and concurrent calls share its work (independent
HTTP requests; a scheduler that lets rows join a running batch). Otherwise the
caller makes one call at a time, and big batches pay.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..errors import AftError

# The chat template an engine uses for a model whose tokenizer has none (a base model).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int | None = None  # the request's seed; sample j uses derive_seed(seed, j)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


CANCELLED = "cancelled: the caller no longer wants the answer"


@dataclass
class Request:
    messages: list[dict]
    params: SamplingParams
    cancel: threading.Event | None = field(default=None, compare=False, repr=False)  # set: stop (module docstring)

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


@dataclass
class Completion:
    text: str
    tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


@dataclass
class Speculation:
    """How one request's completions were decoded speculatively (summed over its n samples)."""

    forwards: int = 0  # forward passes that gave its samples tokens (each prompt's prefill included)
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # of which accepted

    def add(self, forwards: int, drafted: int, accepted: int) -> None:
        self.forwards, self.drafted, self.accepted = (self.forwards + forwards, self.drafted + drafted,
                                                      self.accepted + accepted)


@dataclass
class Result:
    """The answer to one Request: everything later stages read is declared here."""

    completions: list[Completion]
    prompt_tokens: int = 0
    seeds: list[int | None] = field(default_factory=list)  # seed of each completion (None: unknown)
    seconds: float | None = None  # wall time spent on this request, when the engine measured it
    error: str | None = None  # why this request failed (then `completions` is empty)
    # What the request cost when that is more than its prompt and completions (P&A: every layer's tokens); see usage()
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    traces: list | None = None  # P&A (aggregate.PAEngine): the trace of each completion, a list of LayerTrace
    speculation: Speculation | None = None  # set where the engine decoded speculatively

    @classmethod
    def failed(cls, reason: str, prompt_tokens: int = 0) -> "Result":
        return cls(completions=[], prompt_tokens=prompt_tokens, error=reason)

    def usage(self) -> tuple[int, int]:
        """(prompt tokens, completion tokens) the request cost: every layer's for P&A."""
        prompt = self.prompt_tokens if self.usage_prompt_tokens is None else self.usage_prompt_tokens
        generated = (sum(c.tokens for c in self.completions) if self.usage_completion_tokens is None
                     else self.usage_completion_tokens)
        return prompt, generated


# on_text(request_index, completion_index, delta): new text of one completion (see the module's docstring).
OnText = Callable[[int, int, str], None]


class Engine:
    """Base class: subclasses implement `generate`; the rest is optional."""

    name: str = "engine"
    continuous: bool = False  # True: generate may run in several threads at once, sharing the engine's work
    model: str = ""
    context_window: int | None = None  # tokens, when known
    has_chat_template: bool = True  # False: a base model whose prompts go out as raw text (see data/onpolicy.py)

    def generate(self, requests: list[Request], on_text: OnText | None = None) -> list[Result]:
        raise NotImplementedError  # abstract: each engine implements it

    def count_tokens(self, messages: list[dict]) -> int | None:
        """Prompt tokens of `messages` as this engine would render them; None if unknown."""
        return None

    def num_parameters(self) -> int | None:
        """The model's parameter count when the engine can know it (a local model), else None."""
        return None

    def describe(self) -> dict:
        return {"engine": self.name, "model": self.model, "context_window": self.context_window}

    def lockstep(self, clients: int):
        """For `clients` threads that call `generate` again and again (P&A pipelines): an object whose
        `client()` each of them runs inside, under which the engine steps only when none of them is between
        two calls, so what shares each step follows from the work alone, not from thread timing. None: this
        engine does not need or offer it."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def emit_whole(results: list[Result], on_text: OnText | None) -> list[Result]:
    """Streaming for an engine that cannot stream: each completion's whole text as one delta. Returns `results`."""
    if on_text is not None:
        for i, res in enumerate(results):
            for j, c in enumerate(res.completions):
                on_text(i, j, c.text)
    return results


def share_seconds(results: list[Result], seconds: float) -> None:
    """Give each result with no measured time its share of an engine call's `seconds`, in proportion
    to the tokens it processed (prompt + generated)."""
    todo = [r for r in results if r.seconds is None]
    sizes = [r.prompt_tokens + sum(c.tokens for c in r.completions) for r in todo]
    total = sum(sizes) or 1
    for r, size in zip(todo, sizes):
        r.seconds = seconds * size / total


def derive_seed(*parts) -> int:
    """A stable 31-bit seed from any parts (ints, strings). Independent of PYTHONHASHSEED."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def sample_seeds(params: SamplingParams) -> list[int | None]:
    """The seed of each of the n samples of one request."""
    if params.seed is None:
        return [None] * params.n
    return [derive_seed(params.seed, j) for j in range(params.n)]


def context_error(prompt_tokens: int, window: int | None) -> str | None:
    """Why a prompt of `prompt_tokens` cannot be run in a context window of `window`; None when it fits."""
    if window and prompt_tokens >= window:
        return f"the prompt needs {prompt_tokens} tokens, more than the context window ({window})"
    return None


def check_fits(engine: Engine, messages: list[dict]) -> None:
    """AftError when a prompt alone fills the engine's context window: the one such check before a
    request is sent (P&A's proposal layer, on-policy sampling; an engine applies `context_error` to
    the prompts it is given); the caller fails that query only."""
    window = engine.context_window
    n = engine.count_tokens(messages) if window else None
    error = context_error(n, window) if n is not None else None
    if error:
        raise AftError(error)
