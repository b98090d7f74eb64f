"""A small OpenAI-compatible HTTP server in front of any aft `Engine`.

Standard library only (http.server + json). Endpoints:

    GET  /v1/models             the one served model
    POST /v1/chat/completions   messages, n, temperature, top_p, top_k (vLLM's
                                extension), max_tokens / max_completion_tokens,
                                stop (str or list), seed
    GET  /health                200 when the server is up

Responses have the standard shape (choices with index, message and
finish_reason; usage with prompt/completion/total tokens). Errors are
OpenAI-style JSON: {"error": {"message", "type", "param", "code"}} with 400 for
a bad request, 404 for an unknown path or model, 500 for a bug. No streaming.

HTTP requests are handled on threads, but engines are not thread-safe, so calls
into the engine are serialised with one lock (one request at a time; the n
samples of a request are batched by the engine).

`start_server(engine)` serves in a background thread and returns the server and
its base URL (tests, notebooks); `serve(engine, host, port)` blocks (`aft serve`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .engines.base import Engine, Request, Result, SamplingParams
from .errors import AftError

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered to the client as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------ request parsing
def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def _int(body: dict, key: str, default: int | None, lo: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"{key} must be an integer, got {v!r}", key)
    if lo is not None and v < lo:
        raise _bad(f"{key} must be >= {lo}, got {v}", key)
    return v


def _float(body: dict, key: str, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"{key} must be a number, got {v!r}", key)
    return float(v)


def _message(m, i: int) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise _bad(f"messages[{i}] must be an object with a string 'role'", "messages")
    content = m.get("content")
    if isinstance(content, list):  # content parts: keep the text ones
        try:
            content = "".join(p["text"] for p in content if p.get("type") == "text")
        except (AttributeError, KeyError, TypeError):
            raise _bad(f"messages[{i}].content: parts must be objects like {{'type': 'text', 'text': ...}}",
                       "messages") from None
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise _bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
    return {"role": m["role"], "content": content}


def parse_chat_request(body, honour_n: bool = True) -> Request:
    """A /v1/chat/completions JSON body -> an engine Request; raises APIError(400) on bad input.

    Defaults follow the OpenAI API (temperature 1, top_p 1, n 1); max_tokens
    defaults to aft's SamplingParams default. With honour_n=False, n is ignored
    (one choice), as some OpenAI-compatible servers do.
    """
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    if body.get("stream"):
        raise _bad("stream=true is not supported by this server", "stream")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    msgs = [_message(m, i) for i, m in enumerate(messages)]

    n = _int(body, "n", 1, lo=1)
    temperature = _float(body, "temperature", 1.0)
    if temperature < 0:
        raise _bad(f"temperature must be >= 0, got {temperature}", "temperature")
    top_p = _float(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise _bad(f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = _int(body, "top_k", 0, lo=-1)  # vLLM's extension; -1 and 0 both mean off
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, SamplingParams.max_tokens, lo=1)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _bad("stop must be a string or a list of strings", "stop")
    seed = _int(body, "seed", None)

    params = SamplingParams(n=n if honour_n else 1, temperature=temperature, top_p=top_p, top_k=max(top_k, 0),
                            max_tokens=max_tokens, stop=tuple(s for s in stop if s), seed=seed)
    return Request(messages=msgs, params=params)


def chat_response(result: Result, model: str) -> dict:
    """An engine Result -> the standard chat.completion JSON object."""
    completion_tokens = sum(c.tokens for c in result.completions)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
             "logprobs": None}
            for i, c in enumerate(result.completions)
        ],
        "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": result.prompt_tokens + completion_tokens},
    }


# ------------------------------------------------------------------- server
class ChatServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer holding the engine, its lock, the options and a few counters."""

    daemon_threads = True

    def __init__(self, engine: Engine, host: str, port: int, honour_n: bool = True, model_name: str | None = None):
        super().__init__((host, port), _Handler)
        self.engine = engine
        self.engine_lock = threading.Lock()
        self.honour_n = honour_n
        self.model_name = model_name or engine.model or engine.name
        # requests: chat completions received; max_in_flight: most handled at once (before the engine lock).
        self.stats = {"requests": 0, "in_flight": 0, "max_in_flight": 0}
        self._stats_lock = threading.Lock()

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{host}:{port}/v1"

    def chat(self, body) -> dict:
        request = parse_chat_request(body, self.honour_n)
        model = body.get("model")
        if model and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", "model", code="model_not_found")
        with self._stats_lock:
            self.stats["requests"] += 1
            self.stats["in_flight"] += 1
            self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.stats["in_flight"])
        try:
            with self.engine_lock:
                result = self.engine.generate([request])[0]
        except AftError as e:  # the user's to fix
            raise _bad(str(e)) from e
        finally:
            with self._stats_lock:
                self.stats["in_flight"] -= 1
        if result.error is not None:  # e.g. a prompt longer than the context window
            raise _bad(result.error)
        return chat_response(result, self.model_name)

    def models(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "aft"}
        if self.engine.context_window:
            card["max_model_len"] = self.engine.context_window
        return {"object": "list", "data": [card]}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length
    server: ChatServer

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            self._send(200, self.server.models())
        elif path == "/health":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, APIError(404, f"no route GET {path}").body())

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            if path != "/v1/chat/completions":
                raise APIError(404, f"no route POST {path}")
            try:
                body = json.loads(raw or b"null")
            except ValueError as e:
                raise _bad(f"the request body is not valid JSON: {e}") from None
            self._send(200, self.server.chat(body))
        except APIError as e:
            self._send(e.status, e.body())
        except Exception as e:  # a bug: keep serving, tell the client, log the traceback
            log.exception("error while answering %s", path)
            self._send(500, APIError(500, f"internal error: {type(e).__name__}: {e}", type="internal_error").body())

    def _send(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # http.server writes to stderr; we log
        log.debug("%s - %s", self.address_string(), format % args)


def start_server(engine: Engine, host: str = "127.0.0.1", port: int = 0, **opts) -> tuple[ChatServer, str]:
    """Serve `engine` from a background thread; port 0 picks a free port.

    Returns (server, base_url), base_url like "http://127.0.0.1:PORT/v1".
    Stop it with `server.shutdown(); server.server_close()`.
    Options: honour_n (default True), model_name (default engine.model).
    """
    server = ChatServer(engine, host, port, **opts)
    threading.Thread(target=server.serve_forever, args=(0.05,), name="aft-serve", daemon=True).start()
    return server, server.base_url


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, **opts) -> None:
    """Serve `engine` until interrupted (Ctrl-C)."""
    try:
        server = ChatServer(engine, host, port, **opts)
    except OSError as e:
        raise AftError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    log.info("serving %s at %s", server.model_name, server.base_url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
