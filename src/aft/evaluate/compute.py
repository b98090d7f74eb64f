"""Compute accounting: measured tokens per query -> FLOPs and wall time.

Tokens are the ones the engine reported: a request's prompt is processed once
(its n samples share one prefill, as in the hf engine, vLLM with prefix caching
and OpenAI's `n`), and every generated token is decoded once. FLOPs follow the
usual estimate of 2 x parameters per processed token (attention's own
quadratic term left out: small for prompts of a few hundred tokens):

    prefill_flops = 2 * P * prompt_tokens      decode_flops = 2 * P * generated_tokens

P is the engine's parameter count when the model is local
(`Engine.num_parameters`: every parameter, embeddings included, tied ones
once), else the config's `num_parameters`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..aggregate import LayerTrace
from ..engines.base import Result


@dataclass
class Usage:
    """What answering one query cost."""

    prompt_tokens: int = 0  # processed in prefill, summed over requests
    completion_tokens: int = 0  # generated, summed over samples
    generations: int = 0  # samples generated
    requests: int = 0
    seconds: float = 0.0  # measured (see cache.py for how a batch's time is shared)

    def add_result(self, res: Result) -> None:
        self.requests += 1
        self.prompt_tokens += res.prompt_tokens
        self.completion_tokens += sum(c.tokens for c in res.completions)
        self.generations += len(res.completions)
        self.seconds += res.seconds or 0.0

    def add_trace(self, trace: list[LayerTrace]) -> None:
        """The usage recorded in a propose-and-aggregate trace (one request per layer)."""
        for layer in trace:
            self.requests += 1
            self.prompt_tokens += layer.prompt_tokens
            self.completion_tokens += sum(o.tokens for o in layer.outputs)
            self.generations += len(layer.outputs)

    def to_dict(self, params: int | None) -> dict:
        d = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
             "total_tokens": self.prompt_tokens + self.completion_tokens, "generations": self.generations,
             "requests": self.requests, "seconds": round(self.seconds, 4)}
        d.update(flops(self.prompt_tokens, self.completion_tokens, params))
        return d


def flops(prompt_tokens: int, completion_tokens: int, params: int | None) -> dict:
    if not params:
        return {"prefill_flops": None, "decode_flops": None, "flops": None}
    pre, dec = 2.0 * params * prompt_tokens, 2.0 * params * completion_tokens
    return {"prefill_flops": pre, "decode_flops": dec, "flops": pre + dec}
