"""Running the ASGI app under uvicorn: `aft serve` in the foreground, or a Server in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path

import uvicorn

from ..aggregate import PAConfig
from ..engines.base import Engine
from ..errors import AftError
from .app import ChatService, Served, build_app
from .config import API_KEY_ENV, Limits, ServeConfig

log = logging.getLogger(__name__)

def make_service(engine: Engine, pa: PAConfig | None = None, name: str | None = None, limits: Limits = Limits(),
                 api_key: str | None = None, proposers: list[Engine] | None = None) -> ChatService:
    """The service of one engine: with `pa`, the P&A model NAME (`proposers`, if given, write its proposals)
    and the plain NAME-plain; without, the plain model alone, named NAME (the engine's model by default)."""
    name = name or Path(engine.model).name or engine.name
    if pa is None:
        return ChatService(engine, [Served(name, None)], limits, api_key)
    from ..aggregate import PAEngine

    return ChatService(engine, [Served(name, pa), Served(f"{name}-plain", None)], limits, api_key,
                       pa_engine=lambda aggregator, cfg: PAEngine(aggregator, cfg, proposers))


class Server:
    """uvicorn serving a ChatService from a background thread (tests, notebooks, the benchmark).

        with Server(make_service(engine)) as srv:   # port 0: a free one
            client = openai.OpenAI(base_url=srv.base_url, api_key="x")
    """

    def __init__(self, service: ChatService, host: str = "127.0.0.1", port: int = 0):
        self.service = service
        config = uvicorn.Config(build_app(service), host=host, port=port, log_level="warning",
                                timeout_graceful_shutdown=service.limits.shutdown_grace + 1, lifespan="off")
        self.uvicorn = _Uvicorn(config, service)
        self.thread = threading.Thread(target=self.uvicorn.run, name="aft-serve", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise AftError(f"the server did not start on {host}:{port}")
            time.sleep(0.01)
        sock = self.uvicorn.servers[0].sockets[0]
        self.host, self.port = sock.getsockname()[:2]

    @property
    def metrics(self):
        return self.service.metrics

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def close(self) -> None:
        self.uvicorn.handle_exit(None, None)
        self.thread.join(timeout=self.service.limits.shutdown_grace + 5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Uvicorn(uvicorn.Server):
    """uvicorn.Server that tells the service when a shutdown begins: new requests get 503, requests in
    flight get `shutdown_grace` seconds to finish, then an error (a stream: an error event), so none hangs."""

    def __init__(self, config: uvicorn.Config, service: ChatService):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        self.service.begin_shutdown()
        super().handle_exit(sig, frame)
        if self._exit_event is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already (a second close)
                self._exit_loop.call_soon_threadsafe(self._exit_event.set)

    # uvicorn checks for an exit every 0.1 s and then waits a fixed 0.1 s for open connections to see the
    # shutdown, so a Server in a thread took 0.2 s to close with nothing in flight (the test suite starts ~50).
    # The two methods below skip those waits where nothing needs them; with requests in flight, uvicorn's own.
    _exit_event: asyncio.Event | None = None

    async def main_loop(self) -> None:
        """uvicorn's loop (a tick every 0.1 s), woken at once by handle_exit."""
        self._exit_loop, self._exit_event = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._exit_event.wait(), 0.1)
            counter = (counter + 1) % 864000

    async def shutdown(self, sockets=None) -> None:
        if self.server_state.connections or self.server_state.tasks:
            await super().shutdown(sockets)
            return
        for server in self.servers:  # no connection open: stop listening, no wait for connections to close
            server.close()
        for sock in sockets or []:
            sock.close()
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn's, less the signal raised again after the shutdown: a stopped `aft serve` exits with 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def start_server(engine: Engine, **opts) -> tuple[Server, str]:
    """Serve `engine` (one plain model) from a background thread on 127.0.0.1, a free port.
    Returns (server, base_url); stop it with server.close(). `opts` go to make_service."""
    server = Server(make_service(engine, **opts))
    return server, server.base_url


def serve(cfg: ServeConfig) -> int:
    """`aft serve`: open the model (and the proposers), serve until SIGINT / SIGTERM, close them.

    Returns the number of engine calls still running when it stopped (their clients were answered or had
    left, which cancels their work; an engine that cannot be interrupted, vLLM's offline one, may still be
    in one): the caller exits without waiting for them."""
    from ..models import resolve

    api_key = cfg.server_api_key or os.environ.get(API_KEY_ENV) or None
    name = cfg.served_model_name or resolve(cfg.model, None if cfg.engine == "auto" else cfg.engine).name
    pa = cfg.open_pa()  # the aggregator (--model) and the proposers (--proposers), opened once
    try:
        service = make_service(pa.aggregator, pa.cfg, name, cfg.limits(), api_key,
                               pa.proposers if cfg.proposers else None)
        config = uvicorn.Config(build_app(service), host=cfg.host, port=cfg.port, log_level="warning",
                                timeout_graceful_shutdown=cfg.shutdown_grace + 1, lifespan="off")
        server = _Uvicorn(config, service)
        log.info("serving %s (P&A K=%d L=%d%s) at http://%s:%d/v1%s", ", ".join(service.models), pa.cfg.n,
                 pa.cfg.num_aggregation, f", proposers {', '.join(cfg.proposers)}" if cfg.proposers else "",
                 cfg.host, cfg.port, " (API key required)" if api_key else "")
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind
            pass
        if not server.started:
            raise AftError(f"cannot listen on {cfg.host}:{cfg.port} (in use, or not an address of this machine?)")
        deadline = time.monotonic() + cfg.shutdown_grace  # engine calls whose clients left may still run
        while service.metrics.running and time.monotonic() < deadline:
            time.sleep(0.05)
        if service.metrics.running:
            log.warning("stopped with %d engine call(s) still running (not waited for)", service.metrics.running)
            return service.metrics.running
        log.info("stopped")
    finally:
        pa.close()
    return 0
