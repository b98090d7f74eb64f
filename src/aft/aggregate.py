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

import dataclasses
import logging
import time
from dataclasses import dataclass

from .engines.base import Engine, Request, SamplingParams, check_fits, derive_seed, share_seconds
from .errors import AftError
from .prompts import Cut, PromptStyle, aggregator_messages, apply_cuts, fit_proposals, proposer_messages, shuffled
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
class Output:
    """One generation of a layer."""

    text: str
    tokens: int
    finish_reason: str
    seed: int | None = None


@dataclass
class LayerTrace:
    """What one layer did for one query. With the query and the prompt style it rebuilds the exact
    messages the layer sent (`replay_messages`): the proposals are the previous layer's outputs,
    put in `order` (when shuffled) and shortened by `truncated` (when they did not fit)."""

    layer: int
    role: str  # "propose" | "aggregate" | "final"
    seed: int  # the request's seed; each output has its own
    prompt_tokens: int
    outputs: list[Output]
    batch_seconds: float  # wall time of the engine call that ran the whole batch's layer
    order: list[int] | None = None  # shuffled: the previous layer's index of each position
    truncated: list[Cut] | None = None  # proposals cut to fit the context window

    def to_dict(self) -> dict:
        d = {"layer": self.layer, "role": self.role, "seed": self.seed, "prompt_tokens": self.prompt_tokens,
             "outputs": [dataclasses.asdict(o) for o in self.outputs], "batch_seconds": self.batch_seconds}
        if self.order is not None:
            d["order"] = list(self.order)
        if self.truncated is not None:
            d["truncated"] = [c.to_dict() for c in self.truncated]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerTrace":
        """A layer of a trace as `aft infer` and `aft eval run` write it."""
        return cls(layer=d["layer"], role=d["role"], seed=d["seed"], prompt_tokens=d["prompt_tokens"],
                   outputs=[Output(o["text"], o["tokens"], o["finish_reason"], o.get("seed")) for o in d["outputs"]],
                   batch_seconds=d["batch_seconds"], order=d.get("order"),
                   truncated=None if d.get("truncated") is None else [Cut(**c) for c in d["truncated"]])


@dataclass
class QueryResult:
    """The outcome of P&A for one query: the final response, or the error that stopped it."""

    id: str
    trace: list[LayerTrace]
    response: str | None = None
    error: str | None = None  # then `trace` holds the layers that ran before it
    seconds: float = 0.0  # wall time spent on this query's requests (measured, or shared by tokens)

    def to_dict(self) -> dict:
        head = {"error": self.error} if self.error is not None else {"response": self.response}
        return {"id": self.id, **head, "trace": [t.to_dict() for t in self.trace]}


def layer_messages(layer: Layer, query: list[dict], previous: list[str] | None, cfg: PAConfig,
                   engine: Engine | None = None, item_seed: int = 0
                   ) -> tuple[list[dict], list[int] | None, list[Cut] | None]:
    """The messages one query sends at `layer`, the order of its proposals (when shuffled) and their cuts
    (when they did not fit the engine's context window)."""
    if layer.role == "propose":
        return proposer_messages(query, cfg.style), None, None
    order = truncated = None
    proposals = list(previous or [])
    if cfg.shuffle:
        proposals, order = shuffled(proposals, derive_seed(item_seed, layer.index, "shuffle"))
    window = engine.context_window if engine else None
    if engine is not None and window:
        count = engine.count_tokens
        probe = count(aggregator_messages(query, proposals, cfg.style))
        if probe is not None and probe + layer.params.max_tokens > window:
            fit = fit_proposals(query, proposals, count, window - layer.params.max_tokens, cfg.style)
            proposals = fit.proposals
            truncated = fit.truncated
    return aggregator_messages(query, proposals, cfg.style), order, truncated


def replay_messages(query: list[dict], trace: list[LayerTrace], style: PromptStyle) -> list[list[dict]]:
    """The exact messages each layer of `trace` sent, rebuilt from the query and the prompt style
    (`aft infer` records the style in <output>.config.json, `aft eval run` in each .meta.json)."""
    out, previous = [], None
    for t in trace:
        if t.role == "propose":
            out.append(proposer_messages(query, style))
        else:
            proposals = [o.text for o in previous.outputs]
            if t.order is not None:
                proposals = [proposals[i] for i in t.order]
            out.append(aggregator_messages(query, apply_cuts(proposals, t.truncated or []), style))
        previous = t
    return out


@dataclass
class _State:
    id: str
    query: list[dict]
    result: QueryResult
    outputs: list[str] | None = None  # the previous layer's texts


def propose_and_aggregate(engine: Engine, queries: list[tuple[str, list[dict]]], cfg: PAConfig,
                          on_layer=None) -> list[QueryResult]:
    """Run P&A over `queries` [(id, messages)], all advancing together layer by layer.

    Returns one QueryResult per query, in order. A query that cannot go on (its
    prompt does not fit the context window, the engine failed its request) gets
    `error` and stops; the others carry on. `on_layer(layer, seconds, tokens)`
    is called after each layer (for progress).
    """
    states = [_State(qid, q, QueryResult(qid, [])) for qid, q in queries]
    for layer in plan(cfg):
        live, requests = [], []
        for s in states:
            if s.result.error:
                continue
            item_seed = derive_seed(cfg.seed, s.id)
            try:
                messages, order, truncated = layer_messages(layer, s.query, s.outputs, cfg, engine, item_seed)
                if layer.role == "propose":
                    check_fits(engine, messages)
            except AftError as e:
                _fail(s, layer, str(e))
                continue
            seed = derive_seed(item_seed, layer.index)
            requests.append(Request(messages, _with_seed(layer.params, seed)))
            live.append((s, seed, order, truncated))
        if not requests:
            break
        t0 = time.perf_counter()
        results = engine.generate(requests)
        seconds = time.perf_counter() - t0
        share_seconds(results, seconds)
        tokens = 0
        for (s, seed, order, truncated), res in zip(live, results):
            s.result.seconds += res.seconds
            if res.error is not None:
                _fail(s, layer, res.error)
                continue
            s.outputs = [c.text for c in res.completions]
            tokens += sum(c.tokens for c in res.completions)
            s.result.trace.append(LayerTrace(
                layer=layer.index, role=layer.role, seed=seed, prompt_tokens=res.prompt_tokens,
                outputs=[Output(c.text, c.tokens, c.finish_reason, sd)
                         for c, sd in zip(res.completions, res.seeds or [None] * len(res.completions))],
                batch_seconds=round(seconds, 3), order=order, truncated=truncated))
        if on_layer:
            on_layer(layer, seconds, tokens)
    for s in states:
        if not s.result.error:
            s.result.response = s.outputs[0]
    return [s.result for s in states]


def _fail(s: _State, layer: Layer, reason: str) -> None:
    s.result.error = f"layer {layer.index}: {reason}"
    log.warning("query %s: %s", s.id, s.result.error)


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return dataclasses.replace(params, seed=seed)
