"""The propose-and-aggregate loop: a plain function of (engine, config, queries).

Official layer semantics (reference/aft_prompts.json): num_aggregation counts
the final layer, so there are max(1, num_aggregation) aggregation layers.

    layer 0                 K proposals per query       (temperature, top_p)
    layers 1..L-1           K aggregations per query,   (temperature, top_p)
                            each seeing the K outputs of the layer before
    layer L (final)         1 aggregation per query     (final_layer_temperature, final_layer_top_p)

With the defaults K=5, L=2 that is 5 + 5 + 1 = 11 generations per query.

The loop is layer-synchronous: every query of the batch advances one layer in a
single engine call. Reading, writing, resuming and progress live in infer.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .engines.base import Engine, Request, SamplingParams, check_fits, derive_seed
from .errors import AftError
from .prompts import PromptStyle, aggregator_messages, fit_proposals, proposer_messages, shuffled
from .sampling import Sampling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PAConfig:
    n: int = 5
    num_aggregation: int = 2
    sampling: Sampling = Sampling()  # the layers' settings derive from it (see plan)
    seed: int = 2024
    style: PromptStyle = PromptStyle()
    shuffle: bool = False  # seeded shuffle of the proposal order before each aggregation


@dataclass(frozen=True)
class Layer:
    index: int
    role: str  # "propose" | "aggregate" | "final"
    params: SamplingParams  # seed left None: set per query


def plan(cfg: PAConfig) -> list[Layer]:
    """The layers one query goes through, with each layer's sampling parameters."""
    if cfg.n < 1:
        raise AftError(f"n (the width K) must be >= 1, got {cfg.n}")
    if cfg.num_aggregation < 0:
        raise AftError(f"num_aggregation must be >= 0, got {cfg.num_aggregation}")
    wide = cfg.sampling.params(cfg.n)
    final = cfg.sampling.final_params()
    aggregations = max(1, cfg.num_aggregation)
    layers = [Layer(0, "propose", wide)]
    layers += [Layer(i, "aggregate", wide) for i in range(1, aggregations)]
    layers.append(Layer(aggregations, "final", final))
    return layers


def generations_per_query(cfg: PAConfig) -> int:
    return sum(layer.params.n for layer in plan(cfg))


@dataclass
class _State:
    id: str
    query: list[dict]
    outputs: list[str] | None = None  # the previous layer's texts
    trace: list | None = None
    error: str | None = None


def layer_messages(layer: Layer, query: list[dict], previous: list[str] | None, cfg: PAConfig,
                   engine: Engine | None = None, item_seed: int = 0) -> tuple[list[dict], dict]:
    """The messages one query sends at `layer`, and what the trace should record about them."""
    if layer.role == "propose":
        return proposer_messages(query, cfg.style), {}
    info: dict = {}
    proposals = list(previous or [])
    if cfg.shuffle:
        proposals, order = shuffled(proposals, derive_seed(item_seed, layer.index, "shuffle"))
        info["order"] = order
    window = engine.context_window if engine else None
    if engine is not None and window:
        count = engine.count_tokens
        probe = count(aggregator_messages(query, proposals, cfg.style))
        if probe is not None and probe + layer.params.max_tokens > window:
            fit = fit_proposals(query, proposals, count, window - layer.params.max_tokens, cfg.style)
            proposals = fit.proposals
            info["truncated"] = fit.truncated
    return aggregator_messages(query, proposals, cfg.style), info


def propose_and_aggregate(engine: Engine, queries: list[tuple[str, list[dict]]], cfg: PAConfig,
                          on_layer=None) -> list[dict]:
    """Run P&A over `queries` [(id, messages)], all advancing together layer by layer.

    Returns one dict per query, in order: {"id", "response", "trace"} or
    {"id", "error"} for a query that could not be run (e.g. it does not fit the
    context window); the others carry on. `on_layer(layer, seconds, tokens)`
    is called after each layer (for progress).
    """
    states = [_State(qid, q, trace=[]) for qid, q in queries]
    for layer in plan(cfg):
        live, requests = [], []
        for s in states:
            if s.error:
                continue
            item_seed = derive_seed(cfg.seed, s.id)
            try:
                messages, info = layer_messages(layer, s.query, s.outputs, cfg, engine, item_seed)
                if layer.role == "propose":
                    check_fits(engine, messages)
            except AftError as e:
                s.error = f"layer {layer.index}: {e}"
                log.warning("query %s: %s", s.id, s.error)
                continue
            seed = derive_seed(item_seed, layer.index)
            requests.append(Request(messages, _with_seed(layer.params, seed)))
            live.append((s, seed, info))
        if not requests:
            break
        t0 = time.perf_counter()
        results = engine.generate(requests)
        seconds = time.perf_counter() - t0
        tokens = 0
        for (s, seed, info), res in zip(live, results):
            s.outputs = [c.text for c in res.completions]
            tokens += sum(c.tokens for c in res.completions)
            s.trace.append({
                "layer": layer.index,
                "role": layer.role,
                "seed": seed,
                "prompt_tokens": res.prompt_tokens,
                "outputs": [{"text": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason, "seed": sd}
                            for c, sd in zip(res.completions, res.seeds or [None] * len(res.completions))],
                "batch_seconds": round(seconds, 3),
                **info,
            })
        if on_layer:
            on_layer(layer, seconds, tokens)
    out = []
    for s in states:
        if s.error:
            out.append({"id": s.id, "error": s.error, "trace": s.trace})
        else:
            out.append({"id": s.id, "response": s.outputs[0], "trace": s.trace})
    return out


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, seed=seed)
