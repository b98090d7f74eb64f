"""`aft serve`: propose-and-aggregate behind an OpenAI-compatible API (the vLLM entrypoint layout).

    config.py     ServeConfig (the `aft serve` options) and Limits; light, for the CLI's parser
    protocol.py   request validation (pydantic), the chat.completion(.chunk) JSON, APIError
    app.py        the Starlette app: routes, checks against caps and context, streaming (SSE)
    dispatch.py   engine calls in threads: one thread per job (continuous engines) or batches
    metrics.py    the Prometheus counters of GET /metrics
    server.py     uvicorn in the foreground (`aft serve`) or in a thread (Server, start_server)

See docs/serve.md. The names below are imported on first use: importing aft.serve.config
does not load the HTTP stack.
"""

import importlib

_EXPORTS = {"ServeConfig": "config", "Limits": "config", "load_config": "config", "APIError": "protocol",
            "ChatService": "app", "Served": "app", "Server": "server", "make_service": "server", "serve": "server",
            "start_server": "server"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
