"""The propose-and-aggregate loop: a plain function of (engine, config, queries).

Official layer semantics (reference/aft_prompts.json): num_aggregation counts
the final layer, so there are max(1, num_aggregation) aggregation layers.

    layer 0                 K proposals per query       (temperature, top_p)
    layers 1..L-1           K aggregations per query,   (temperature, top_p)
                            each seeing the K outputs of the layer before
    layer L (final)         1 aggregation per query     (final_layer_temperature, final_layer_top_p)

With the defaults K=5, L=2 that is 5 + 5 + 1 = 11 generations per query.

Several proposer models (MoA): `proposers` write the K proposals (spread as
evenly as K allows, `proposal_counts`); the aggregator writes every later layer.

On engines that take concurrent calls (`Engine.continuous`) each query runs as
its own pipeline, with no barrier between layers: its aggregation starts as
soon as its own proposals are done. On the others the loop is
layer-synchronous: every query of the batch advances one layer in a single
engine call. Both give the same texts for the same seeds.

A query may carry a cancel event (`Query.cancel`, from `Request.cancel`):
once it is set the query starts no further layer, and its requests of the
running layer carry the event, so the engine stops them (engines/base.py); the
query ends with the error "layer N: cancelled...".

`PAEngine` puts the loop behind the Engine interface (`aft serve`); `aft infer`
and `aft eval` call `propose_and_aggregate` itself, and put reading, writing,
resuming and progress around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .engines.base import (CANCELLED, Completion, Engine, OnText, Request, Result, SamplingParams, check_fits,
                           derive_seed, share_seconds)
from .errors import AftError
from .prompts import Cut, PromptStyle, aggregator_messages, apply_cuts, fit_proposals, proposer_messages, shuffled
from .sampling import Sampling

log = logging.getLogger(__name__)

MAX_PIPELINES = 64  # queries in flight at once on continuous engines (each one thread, mostly waiting)


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
    proposer: str | None = None  # the model that wrote it, when several proposers share the proposal layer


@dataclass
class LayerTrace:
    """What one layer did for one query. With the query and the prompt style it rebuilds the exact
    messages the layer sent (`replay_messages`): the proposals are the previous layer's outputs,
    put in `order` (when shuffled) and shortened by `truncated` (when they did not fit)."""

    layer: int
    role: str  # "propose" | "aggregate" | "final"
    seed: int  # the layer's seed (its request's); each output has its own
    prompt_tokens: int  # with several proposers, their requests' together
    outputs: list[Output]
    batch_seconds: float  # wall time of the layer's engine call(s): the whole batch's, or this query's (pipelines)
    order: list[int] | None = None  # shuffled: the previous layer's index of each position
    truncated: list[Cut] | None = None  # proposals cut to fit the context window
    # speculative decoding (hf --spec_tokens): {"forwards", "drafted", "accepted"} over the layer's outputs
    speculation: dict | None = None

    def to_dict(self) -> dict:
        d = {"layer": self.layer, "role": self.role, "seed": self.seed, "prompt_tokens": self.prompt_tokens,
             "outputs": [_output_dict(o) for o in self.outputs], "batch_seconds": self.batch_seconds}
        if self.order is not None:
            d["order"] = list(self.order)
        if self.truncated is not None:
            d["truncated"] = [c.to_dict() for c in self.truncated]
        if self.speculation is not None:
            d["speculation"] = dict(self.speculation)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerTrace":
        """A layer of a trace as `aft infer` and `aft eval run` write it."""
        return cls(layer=d["layer"], role=d["role"], seed=d["seed"], prompt_tokens=d["prompt_tokens"],
                   outputs=[Output(o["text"], o["tokens"], o["finish_reason"], o.get("seed"), o.get("proposer"))
                            for o in d["outputs"]],
                   batch_seconds=d["batch_seconds"], order=d.get("order"),
                   truncated=None if d.get("truncated") is None else [Cut(**c) for c in d["truncated"]],
                   speculation=d.get("speculation"))


def _output_dict(o: Output) -> dict:
    d = dataclasses.asdict(o)
    if o.proposer is None:  # one model: the trace as it always was
        del d["proposer"]
    return d


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
class Query:
    """One query of the loop: its id, its messages, and what may differ per query."""

    id: str
    messages: list[dict]
    seed: int | None = None  # None: derive_seed(cfg.seed, id), what `aft infer` and `aft eval` use
    final: SamplingParams | None = None  # the final layer's sampling (n is ignored: one answer); None: the config's
    cancel: threading.Event | None = None  # set: the query stops (the module's docstring)


@dataclass
class _State:
    index: int  # the query's place in the call
    query: Query
    seed: int  # the query's seed, from which each layer derives its own
    result: QueryResult
    outputs: list[str] | None = None  # the previous layer's texts


def proposal_counts(k: int, proposers: int) -> list[int]:
    """How K proposals are spread over the proposers: as evenly as K allows, the first K mod P proposers
    writing one more than the rest (K=3 over 2: [2, 1]; K=1 over 2: [1, 0])."""
    return [k // proposers + (1 if p < k % proposers else 0) for p in range(proposers)]


def propose_and_aggregate(engine: Engine, queries: list, cfg: PAConfig, on_layer=None, *,
                          proposers: list[Engine] | None = None, on_text=None,
                          max_pipelines: int = MAX_PIPELINES) -> list[QueryResult]:
    """Run P&A over `queries`: (id, messages) pairs or Query objects.

    Returns one QueryResult per query, in order. A query that cannot go on (its
    prompt does not fit the context window, the engine failed its request) gets
    `error` and stops; the others carry on.

    `engine` aggregates; `proposers` (default: `engine` alone) write the
    proposals, spread as `proposal_counts` says, each output recording its
    proposer. Proposer p's request has seed derive_seed(layer seed,
    "proposer", p), except proposer 0, which has the layer's seed (what a
    single model gets).

    Two schedules, the same texts, traces and seeds:

    - pipelines, when every engine is `continuous`: each query runs through
      its layers on its own (at most `max_pipelines` queries at once), so its
      aggregation starts as soon as its own proposals are done. A layer's
      `batch_seconds` is then the wall time of that query's own engine
      call(s), which shared the engine with the other queries' calls.
    - layer-synchronous otherwise: every query of the call advances one layer
      in one engine call per engine; `batch_seconds` is that call's wall time.

    `on_layer(layer, seconds, tokens)` is called after each layer's engine
    call(s) (for progress): once per layer, or with pipelines once per query
    and layer, never from two threads at once. `on_text(query_index, delta)`
    streams each query's final answer (see Engine.generate).
    """
    queries = [q if isinstance(q, Query) else Query(*q) for q in queries]
    proposers = list(proposers or [engine])
    layers = plan(cfg)
    states = [_State(i, q, derive_seed(cfg.seed, q.id) if q.seed is None else q.seed, QueryResult(q.id, []))
              for i, q in enumerate(queries)]
    lock = threading.Lock()

    def layer_done(layer, seconds, tokens):
        if on_layer:
            with lock:
                on_layer(layer, seconds, tokens)

    def run(group: list[_State], stop: threading.Event | None = None) -> None:
        for layer in layers:
            if stop is not None and stop.is_set():
                return
            if not _run_layer(layer, group, cfg, engine, proposers, on_text, layer_done):
                return

    if all(e.continuous for e in [engine, *proposers]) and len(states) > 1:
        # one engine: its steps in lockstep with the pipelines, so the texts do not depend on thread timing
        # (several engines cannot: a pipeline waiting in one would hold up the other's steps, and back)
        lockstep = engine.lockstep if all(e is engine for e in proposers) else None
        _in_pipelines(run, states, max_pipelines, lockstep)
    else:
        run(states)
    for s in states:
        if not s.result.error:
            s.result.response = s.outputs[0]
    return [s.result for s in states]


def _in_pipelines(run, states: list[_State], max_pipelines: int, lockstep=None) -> None:
    """Run each query's pipeline: at most `max_pipelines` threads, each taking the next query when its
    last is done, as clients of `lockstep(threads)` where the engine offers it (Engine.lockstep). The
    first exception stops the others (before their next layer) and is raised."""
    stop = threading.Event()
    todo, take = iter(states), threading.Lock()
    errors: list[BaseException] = []
    n = max(1, min(len(states), max_pipelines))
    gate = lockstep(n) if lockstep is not None else None

    def worker() -> None:
        with gate.client() if gate is not None else contextlib.nullcontext():
            while not stop.is_set():
                with take:
                    state = next(todo, None)
                if state is None:
                    return
                try:
                    run([state], stop)
                except BaseException as e:
                    errors.append(e)
                    stop.set()
                    return

    threads = [threading.Thread(target=worker, name=f"aft-pa-{i}", daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException:  # e.g. Ctrl-C: the pipelines stop before their next layer
        stop.set()
        raise
    if errors:
        raise errors[0]


@dataclass
class _Part:
    """One request a query sends at a layer (several at the proposal layer with several proposers)."""

    state: _State
    engine: Engine
    request: Request
    proposer: str | None  # recorded in the outputs (several proposers only)
    result: Result | None = None


def _run_layer(layer: Layer, states: list[_State], cfg: PAConfig, engine: Engine, proposers: list[Engine],
               on_text, layer_done) -> bool:
    """Advance the live `states` by one layer: one engine call per engine. False when none was live."""
    live = []  # (state, layer seed, order, truncated, parts)
    for s in states:
        if s.result.error:
            continue
        if s.query.cancel is not None and s.query.cancel.is_set():
            _fail(s, layer, CANCELLED)
            continue
        params = layer.params
        if layer.role == "final" and s.query.final is not None:
            params = dataclasses.replace(s.query.final, n=1)
        try:
            messages, order, truncated = layer_messages(layer, s.query.messages, s.outputs, cfg, engine, s.seed)
            seed = derive_seed(s.seed, layer.index)
            if layer.role == "propose":
                parts = []
                named = len(proposers) > 1
                for p, (proposer, n) in enumerate(zip(proposers, proposal_counts(params.n, len(proposers)))):
                    if n:
                        check_fits(proposer, messages)
                        sp = dataclasses.replace(params, n=n, seed=seed if p == 0 else derive_seed(seed, "proposer", p))
                        parts.append(_Part(s, proposer, Request(messages, sp, s.query.cancel),
                                           proposer.model if named else None))
            else:
                parts = [_Part(s, engine, Request(messages, dataclasses.replace(params, seed=seed), s.query.cancel),
                               None)]
        except AftError as e:
            _fail(s, layer, str(e))
            continue
        live.append((s, seed, order, truncated, parts))
    if not live:
        return False
    t0 = time.perf_counter()
    _generate([p for *_, parts in live for p in parts], on_text if layer.role == "final" else None)
    seconds = time.perf_counter() - t0
    tokens = 0
    for s, seed, order, truncated, parts in live:
        failed = next((p for p in parts if p.result.error is not None), None)
        s.result.seconds += sum(p.result.seconds for p in parts)
        if failed is not None:
            _fail(s, layer, (f"proposer {failed.proposer}: " if failed.proposer else "") + failed.result.error)
            continue
        outputs = [Output(c.text, c.tokens, c.finish_reason, sd, p.proposer)
                   for p in parts for c, sd in zip(p.result.completions,
                                                   p.result.seeds or [None] * len(p.result.completions))]
        s.outputs = [o.text for o in outputs]
        tokens += sum(o.tokens for o in outputs)
        specs = [p.result.speculation for p in parts if p.result.speculation is not None]
        s.result.trace.append(LayerTrace(
            layer=layer.index, role=layer.role, seed=seed, prompt_tokens=sum(p.result.prompt_tokens for p in parts),
            outputs=outputs, batch_seconds=round(seconds, 3), order=order, truncated=truncated,
            speculation={k: sum(getattr(x, k) for x in specs) for k in ("forwards", "drafted", "accepted")}
            if specs else None))
    layer_done(layer, seconds, tokens)
    return True


def _generate(parts: list[_Part], on_text) -> None:
    """Each engine's requests in one call (calls to different engines run at once when all of them are
    continuous); sets each part's result and its share of its call's time. `on_text(query_index, delta)`."""
    by_engine: dict[int, list[_Part]] = {}
    for p in parts:
        by_engine.setdefault(id(p.engine), []).append(p)
    groups = list(by_engine.values())

    def call(group: list[_Part]) -> None:
        relay = None
        if on_text is not None:
            def relay(k, j, delta):
                on_text(group[k].state.index, delta)
        t0 = time.perf_counter()
        results = group[0].engine.generate([p.request for p in group], relay)
        share_seconds(results, time.perf_counter() - t0)
        for p, res in zip(group, results):
            p.result = res

    if len(groups) > 1 and all(g[0].engine.continuous for g in groups):
        with ThreadPoolExecutor(len(groups), thread_name_prefix="aft-pa-engines") as pool:
            for f in [pool.submit(call, g) for g in groups]:
                f.result()
    else:
        for g in groups:
            call(g)


class PAEngine(Engine):
    """Propose-and-aggregate behind the Engine interface: each request is answered with P&A over its messages.

    A request's sampling parameters describe the answers it gets back:

    - n: n independent P&A runs, completion j the final answer of run j;
    - seed: run j's seed (from which its layers derive theirs, as `aft infer`
      derives them from a query's seed) is `seed` for j = 0 and
      derive_seed(seed, j) after; None: a fresh random seed per run (each
      recorded in `Result.seeds`, so the answer can be reproduced);
    - temperature, top_p, top_k, max_tokens, stop: the final layer's sampling.
      The proposals and intermediate aggregations keep the config's
      (cfg.sampling); `default_params()` gives the config's own final layer.

    The Result: completions[j] and seeds[j] of run j; traces[j] its trace (a
    list of LayerTrace, the `aft infer` schema); prompt_tokens the proposal
    layer's prompt of run 0 (several proposers: their requests' together);
    usage() every layer of every run; error: the first failed run's (the
    traces of all runs are kept; then no completions). on_text streams the
    final layer only, possibly from several threads at once (pipelines).
    A request's `cancel` event stops its runs (no further layer; the running
    layer's inner requests carry the event): its Result's error ends with CANCELLED.

    `aggregator` writes the aggregations; `proposers` (default: the
    aggregator) the proposals. The engine is continuous when they all are.
    `close` closes each of them once.
    """

    name = "pa"

    def __init__(self, aggregator: Engine, cfg: PAConfig, proposers: list[Engine] | None = None):
        plan(cfg)  # checks the config
        self.aggregator, self.cfg = aggregator, cfg
        self.proposers = list(proposers or [aggregator])
        self.model = aggregator.model
        self.context_window = aggregator.context_window
        self.has_chat_template = aggregator.has_chat_template
        self.continuous = all(e.continuous for e in [aggregator, *self.proposers])

    def default_params(self, n: int = 1, seed: int | None = None) -> SamplingParams:
        """The config's final-layer sampling, for a request of n answers."""
        return dataclasses.replace(plan(self.cfg)[-1].params, n=n, seed=seed)

    def run(self, queries: list, on_layer=None, on_text=None) -> list[QueryResult]:
        """`propose_and_aggregate` with this engine's models and config (what `aft infer` and `aft eval` call)."""
        return propose_and_aggregate(self.aggregator, queries, self.cfg, on_layer, proposers=self.proposers,
                                     on_text=on_text)

    def generate(self, requests: list[Request], on_text: OnText | None = None) -> list[Result]:
        runs = []  # (request index, answer index, query)
        for i, r in enumerate(requests):
            p = r.params
            for j in range(p.n):
                seed = secrets.randbelow(2**31) if p.seed is None else p.seed if j == 0 else derive_seed(p.seed, j)
                runs.append((i, j, Query(f"request {i} answer {j}", r.messages, seed, p, r.cancel)))
        relay = None
        if on_text is not None:
            def relay(k, delta):
                on_text(runs[k][0], runs[k][1], delta)
        out = self.run([q for *_, q in runs], on_text=relay)
        results = []
        for i, r in enumerate(requests):
            mine = [(q, qr) for (ri, _, q), qr in zip(runs, out) if ri == i]
            traces = [qr.trace for _, qr in mine]
            layers = [t for trace in traces for t in trace]
            error = next((qr.error for _, qr in mine if qr.error is not None), None)
            results.append(Result(
                completions=[] if error else [_answer(qr) for _, qr in mine],
                prompt_tokens=traces[0][0].prompt_tokens if traces and traces[0] else 0,
                seeds=[] if error else [q.seed for q, _ in mine], seconds=sum(qr.seconds for _, qr in mine),
                error=error, usage_prompt_tokens=sum(t.prompt_tokens for t in layers),
                usage_completion_tokens=sum(o.tokens for t in layers for o in t.outputs), traces=traces))
        return results

    def count_tokens(self, messages: list[dict]) -> int | None:
        return self.aggregator.count_tokens(messages)

    def num_parameters(self) -> int | None:
        return self.aggregator.num_parameters()

    def describe(self) -> dict:
        return {**super().describe(), "aggregator": self.aggregator.describe(),
                "proposers": [e.describe() for e in self.proposers],
                "n": self.cfg.n, "num_aggregation": self.cfg.num_aggregation}

    def close(self) -> None:
        for e in {id(e): e for e in [self.aggregator, *self.proposers]}.values():
            e.close()


def _answer(qr: QueryResult) -> Completion:
    final = qr.trace[-1].outputs[0]
    return Completion(final.text, final.tokens, final.finish_reason)


def _fail(s: _State, layer: Layer, reason: str) -> None:
    s.result.error = f"layer {layer.index}: {reason}"
    log.log(logging.DEBUG if reason.endswith(CANCELLED) else logging.WARNING, "query %s: %s", s.query.id,
            s.result.error)
