"""The ASGI application: routes, checks, and the answer of a chat request, streamed or whole.

    POST /v1/chat/completions   P&A (the served model) or one plain pass (NAME-plain)
    GET  /v1/models             both models
    GET  /health                200 while serving (503 once shutting down)
    GET  /metrics               Prometheus text (metrics.py)

A request is checked whole (protocol.py, then the server's caps, then the
prompt against the context window) before any work starts or any byte of a
stream is sent, so a bad request always gets a 4xx JSON error. A stream sends
a first chunk with the role at once, then the final layer's text as the engine
produces it (`on_text` from the engine's thread into an asyncio.Queue), an SSE
comment `: keep-alive` every `keepalive` seconds while nothing else is sent
(the proposals are being written), and `data: [DONE]`; an error after the
headers ends the stream with `data: {"error": {...}}` and no [DONE].
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..aggregate import PAConfig
from ..engines.base import Engine, Request, Result, SamplingParams, context_error
from ..errors import AftError
from ..prompts import PromptStyle, aggregator_messages, proposer_messages
from .config import Limits
from .dispatch import Dispatcher, Job
from .metrics import Metrics
from .protocol import APIError, ChatCompletionRequest, bad, chunk, completion, delta, new_id, parse_request, usage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """A model the server lists: P&A with `pa` (the served model), or one plain pass (pa None)."""

    name: str
    pa: PAConfig | None


@dataclass
class Call:
    """A checked request, ready to run."""

    served: Served
    engine: Engine
    request: Request
    pa: PAConfig | None
    stream: bool
    include_usage: bool
    return_trace: bool


class ChatService:
    """What the routes call: the engine, the served models, the caps, the metrics, the dispatcher."""

    def __init__(self, engine: Engine, models: list[Served], limits: Limits = Limits(), api_key: str | None = None,
                 pa_engine=None):
        self.engine = engine
        self.models = {m.name: m for m in models}
        self.default = models[0].name
        self.limits = limits
        self.api_key = api_key
        self.pa_engine = pa_engine  # (inner engine, PAConfig) -> an Engine that answers with P&A
        self._pa_engines: dict[PAConfig, Engine] = {}
        self.metrics = Metrics()
        self.dispatcher = Dispatcher(self.metrics.move, limits.max_batch)
        self.in_server = 0  # chat requests admitted and not finished
        self.shutdown_at: float | None = None  # monotonic time of SIGINT / SIGTERM
        self._waiting: dict[asyncio.Queue, asyncio.AbstractEventLoop] = {}  # the event queues of requests in flight

    # ------------------------------------------------------------- checks
    def check_key(self, http: HTTPRequest) -> None:
        if self.api_key is None:
            return
        auth = http.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def prepare(self, req: ChatCompletionRequest) -> Call:
        """A validated request -> what to run, checked against the caps and the context window (APIError)."""
        served = self.models.get(req.model or self.default)
        if served is None:
            raise APIError(404, f"The model `{req.model}` does not exist; this server has "
                           f"{', '.join(self.models)}", "model", code="model_not_found")
        lim = self.limits
        max_tokens = req.max_completion_tokens or req.max_tokens
        _cap("n", req.n, lim.max_n)
        _cap("max_tokens", max_tokens, lim.max_tokens)
        pa = None
        if served.pa is None:
            for name in ("k", "num_aggregation", "style"):
                if getattr(req, name) is not None:
                    pa_models = ", ".join(m.name for m in self.models.values() if m.pa)
                    raise bad(f"{name} applies to the P&A model ({pa_models}), not to {served.name}", name)
            engine, base = self.engine, _plain_defaults(self)
        else:
            _cap("k", req.k, lim.max_k)
            _cap("num_aggregation", req.num_aggregation, lim.max_num_aggregation)
            pa = dataclasses.replace(
                served.pa, n=req.k or served.pa.n,
                num_aggregation=served.pa.num_aggregation if req.num_aggregation is None else req.num_aggregation,
                style=PromptStyle.get(req.style) if req.style else served.pa.style)
            engine = self._pa_engine_for(pa)
            base = engine.default_params()  # the final layer's: the request's sampling is the answer's
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        params = dataclasses.replace(
            base, n=req.n, seed=req.seed,  # no seed: the engine draws one
            temperature=base.temperature if req.temperature is None else req.temperature,
            top_p=base.top_p if req.top_p is None else req.top_p,
            top_k=base.top_k if req.top_k is None else max(req.top_k, 0),
            max_tokens=max_tokens or base.max_tokens, stop=stop if req.stop is not None else base.stop)
        messages = [m.to_dict() for m in req.messages]
        self._check_prompt(messages, pa, params.max_tokens)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Call(served, engine, Request(messages, params), pa, req.stream, include_usage, req.return_trace)

    def _check_prompt(self, messages: list[dict], pa: PAConfig | None, max_tokens: int) -> None:
        """400 when the prompt cannot run in the context window: the prompt itself for one pass; for P&A the
        proposers' prompt, and the aggregator's with K empty proposals plus the layer's max_tokens (the budget
        aft infer's aggregation layers cut proposals to: the final layer's is the request's, the others' the
        config's)."""
        window = self.engine.context_window
        if not window:
            return
        if pa is None:
            error = context_error(self.engine.count_tokens(messages) or 0, window)
        else:
            if pa.num_aggregation > 1:
                max_tokens = max(max_tokens, pa.sampling.max_tokens)
            error = context_error(self.engine.count_tokens(proposer_messages(messages, pa.style)) or 0, window)
            floor = self.engine.count_tokens(aggregator_messages(messages, [""] * pa.n, pa.style)) or 0
            if not error and floor + max_tokens > window:
                error = (f"the aggregator prompt of {pa.n} proposals needs at least {floor} tokens, and max_tokens "
                         f"is {max_tokens}: more than the context window ({window})")
        if error:
            raise bad(error, "messages")

    def _pa_engine_for(self, pa: PAConfig) -> Engine:
        """One P&A engine per settings, so that requests with the same settings batch together."""
        engine = self._pa_engines.get(pa)
        if engine is None:
            if len(self._pa_engines) > 256:
                self._pa_engines.clear()
            engine = self._pa_engines[pa] = self.pa_engine(self.engine, pa)
        return engine

    def admit(self) -> None:
        if self.shutdown_at is not None:
            raise APIError(503, "the server is shutting down", type="server_error")
        if self.in_server >= self.limits.max_queue:
            raise APIError(429, f"the server is full ({self.limits.max_queue} requests in progress); retry later",
                           type="rate_limit_error", headers={"Retry-After": "1"})
        self.in_server += 1

    # ------------------------------------------------------------- running
    def start(self, call: Call) -> asyncio.Queue:
        """Run `call` in the engine's thread; returns the queue of its events: ("text", j, delta), then
        ("done", Result) or ("error", exception)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the loop is closed: the server has stopped
                pass

        def done(result: Result | None, error: BaseException | None) -> None:
            put(("error", error) if error is not None else ("done", result))

        job = Job(call.engine, self.engine, call.request, lambda j, d: put(("text", j, d)), done)
        events.job = job  # type: ignore[attr-defined]  (cancelled when the client leaves)
        self._waiting[events] = loop
        self.dispatcher.submit(job)
        return events

    def begin_shutdown(self) -> None:
        """From any thread: refuse new requests, give those in flight `shutdown_grace` seconds (their waits
        are woken to see the new deadline)."""
        if self.shutdown_at is not None:
            return
        self.shutdown_at = time.monotonic()
        log.info("shutting down: %d request(s) in flight get %g s to finish", self.in_server,
                 self.limits.shutdown_grace)
        for events, loop in list(self._waiting.items()):
            with contextlib.suppress(RuntimeError):  # a closed loop
                loop.call_soon_threadsafe(events.put_nowait, ("tick",))

    def finish(self, events: asyncio.Queue) -> None:
        """A request is over (answered, failed, or its client left: then its work stops)."""
        events.job.cancel()
        self._waiting.pop(events, None)
        self.in_server -= 1

    def deadline(self, t0: float) -> float:
        end = t0 + self.limits.request_timeout
        if self.shutdown_at is not None:
            end = min(end, self.shutdown_at + self.limits.shutdown_grace)
        return end


def _cap(name: str, value: int | None, cap: int) -> None:
    if value is not None and value > cap:
        raise bad(f"{name} must be <= {cap} (this server's cap), got {value}", name)


def _plain_defaults(service: ChatService) -> SamplingParams:
    """The plain model's defaults: the P&A model's final-layer settings (one answer, as P&A's last layer)."""
    pa = next((m.pa for m in service.models.values() if m.pa), None)
    if pa is not None:
        return pa.sampling.final_params()
    return SamplingParams(temperature=1.0, top_p=1.0, max_tokens=service.limits.max_tokens)  # OpenAI's defaults


# ----------------------------------------------------------------- answers
def aft_extra(call: Call, result: Result) -> dict | None:
    """The `aft` field of a P&A answer: per answer, a summary of each layer (and the full trace if asked)."""
    if call.pa is None or not result.traces:
        return None
    answers = []
    for i, trace in enumerate(result.traces):
        a = {"index": i, "layers": [{"layer": t.layer, "role": t.role, "prompt_tokens": t.prompt_tokens,
                                     "completion_tokens": sum(o.tokens for o in t.outputs), "outputs": len(t.outputs)}
                                    for t in trace]}
        if call.return_trace:
            a["trace"] = [t.to_dict() for t in trace]
        answers.append(a)
    return {"aft": {"k": call.pa.n, "num_aggregation": call.pa.num_aggregation, "answers": answers}}


def build_app(service: ChatService) -> Starlette:
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def http_error(http: HTTPRequest, e: HTTPException):
        return JSONResponse(APIError(e.status_code, f"{e.detail}: {http.method} {http.url.path}").body(),
                            status_code=e.status_code)

    async def bug(http: HTTPRequest, e: Exception):
        log.exception("error while answering %s", http.url.path)
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}", type="internal_error").body(),
                            status_code=500)

    async def health(_):
        if service.shutdown_at is not None:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(_):
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(http: HTTPRequest):
        service.check_key(http)
        cards = []
        for m in service.models.values():
            card = {"id": m.name, "object": "model", "created": 0, "owned_by": "aft",
                    "aft": {"propose_and_aggregate": m.pa is not None,
                            **({"k": m.pa.n, "num_aggregation": m.pa.num_aggregation} if m.pa else {})}}
            if service.engine.context_window:
                card["max_model_len"] = service.engine.context_window
            cards.append(card)
        return JSONResponse({"object": "list", "data": cards})

    async def chat(http: HTTPRequest):
        t0 = time.monotonic()
        name = ""
        try:
            service.check_key(http)
            req = parse_request(await http.body())
            name = req.model or service.default
            call = service.prepare(req)
            service.admit()
        except APIError as e:
            service.metrics.finished(name, e.status, time.monotonic() - t0)
            raise
        events = service.start(call)
        if call.stream:  # (Starlette cancels the stream when the client disconnects)
            return StreamingResponse(_stream(service, call, events, t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watch = asyncio.create_task(_watch_disconnect(http, events))
        try:
            return await _whole(service, call, events, t0)
        finally:
            watch.cancel()

    routes = [Route("/health", health), Route("/metrics", metrics), Route("/v1/models", models),
              Route("/v1/chat/completions", chat, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={APIError: api_error, HTTPException: http_error,
                                                        Exception: bug})


async def _watch_disconnect(http: HTTPRequest, events: asyncio.Queue) -> None:
    """A whole answer sends nothing until it is done, so only the connection tells that its client left:
    then the request's work stops at once, and its wait ends."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    events.job.cancel()
    events.put_nowait(("gone",))


async def _next(service: ChatService, events: asyncio.Queue, t0: float, wait: float):
    """The next event, ("tick",) after `wait` seconds of none, or ("timeout",) past the request's deadline."""
    left = service.deadline(t0) - time.monotonic()
    if left <= 0:
        return ("timeout",)
    try:
        return await asyncio.wait_for(events.get(), timeout=min(wait, left))
    except asyncio.TimeoutError:
        return ("tick",)


def _failure(service: ChatService, item, result: Result | None = None) -> APIError:
    if item[0] == "timeout":
        reason = "the server is shutting down" if service.shutdown_at is not None else \
            f"no answer within {service.limits.request_timeout:g} s (the server's request timeout)"
        return APIError(503 if service.shutdown_at is not None else 504, reason, type="server_error",
                        code="timeout")
    if result is not None:  # the engine could not answer this request (its prompt, an upstream's 400)
        return bad(result.error)
    e = item[1]
    if isinstance(e, AftError):
        return APIError(502, f"the engine failed: {e}", type="server_error")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="internal_error")


async def _whole(service: ChatService, call: Call, events: asyncio.Queue, t0: float) -> Response:
    name, first = call.served.name, False
    try:
        while True:
            item = await _next(service, events, t0, wait=3600)
            if item[0] == "text" and not first:
                first = True
                service.metrics.first_token(name, time.monotonic() - t0)
            elif item[0] not in ("text", "tick"):
                break
        if item[0] == "gone":  # no one to answer
            service.metrics.finished(name, 499, time.monotonic() - t0)
            return Response(status_code=499)
        result = item[1] if item[0] == "done" else None
        if result is None or result.error is not None:
            raise _failure(service, item, result)
        prompt_tokens, generated = result.usage()
        body = completion(new_id(), name, [c.text for c in result.completions],
                          [c.finish_reason for c in result.completions], usage(prompt_tokens, generated),
                          aft_extra(call, result))
        service.metrics.finished(name, 200, time.monotonic() - t0, prompt_tokens, generated)
        return JSONResponse(body)
    except APIError as e:
        service.metrics.finished(name, e.status, time.monotonic() - t0)
        return JSONResponse(e.body(), status_code=e.status)
    finally:
        service.finish(events)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(service: ChatService, call: Call, events: asyncio.Queue, t0: float):
    name, n = call.served.name, call.request.params.n
    cid, created = new_id(), int(time.time())
    iu = call.include_usage
    status = 499  # the client went away (nginx's code), unless the stream ends otherwise
    try:
        yield _sse(chunk(cid, name, created, [delta(j, "", role="assistant") for j in range(n)], include_usage=iu))
        first = False
        while True:
            item = await _next(service, events, t0, wait=service.limits.keepalive)
            kind = item[0]
            if kind == "tick":
                yield ": keep-alive\n\n"
            elif kind == "text":
                if not first:
                    first = True
                    service.metrics.first_token(name, time.monotonic() - t0)
                if item[2]:
                    yield _sse(chunk(cid, name, created, [delta(item[1], item[2])], include_usage=iu))
            else:
                break
        result = item[1] if kind == "done" else None
        if result is None or result.error is not None:
            e = _failure(service, item, result)
            status = e.status
            yield _sse(e.body())
            return
        finals = [delta(j, finish_reason=c.finish_reason) for j, c in enumerate(result.completions)]
        prompt_tokens, generated = result.usage()
        yield _sse(chunk(cid, name, created, finals, include_usage=iu, extra=aft_extra(call, result)))
        if iu:
            yield _sse(chunk(cid, name, created, [], usage(prompt_tokens, generated), include_usage=True))
        yield "data: [DONE]\n\n"
        status = 200
        service.metrics.finished(name, 200, time.monotonic() - t0, prompt_tokens, generated)
    finally:
        service.finish(events)
        if status != 200:
            service.metrics.finished(name, status, time.monotonic() - t0)
