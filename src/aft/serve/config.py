"""The `aft serve` options: the same engine, sampling and P&A options as `aft infer` (EngineArgs,
sampling_args, PAArgs: the same types), plus the server's own (Limits). Light to import: the CLI
builds its parser from it without loading the HTTP stack."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import from_sources, opt
from ..engines.args import EngineArgs
from ..infer import PAArgs
from ..sampling import sampling_args


@dataclass(frozen=True)
class Limits:
    """The server's caps and timings (ServeConfig's fields of the same names)."""

    max_tokens: int = 4096  # default and cap of a request's max_tokens (every P&A layer)
    max_n: int = 8  # answers per request
    max_k: int = 16  # P&A width a request may ask for
    max_num_aggregation: int = 4  # P&A depth a request may ask for
    max_queue: int = 64  # requests in the server at once (running and waiting); more -> 429
    max_batch: int = 64  # requests one call into a non-continuous engine takes (those waiting for it)
    request_timeout: float = 600.0  # seconds from request to last byte; then 504 / an error event
    keepalive: float = 5.0  # seconds between SSE keep-alive comments
    shutdown_grace: float = 30.0  # seconds in-flight requests get to finish after SIGINT / SIGTERM


GROUP = "server"
API_KEY_ENV = "AFT_API_KEY"


@dataclass
class ServeConfig(EngineArgs, sampling_args("aft"), PAArgs):
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0: every interface)", group=GROUP, run=True)
    port: int = opt(8000, "port (0: a free one)", ge=0, le=65535, group=GROUP, run=True)
    served_model_name: str | None = opt(None, "name of the P&A model in the API (default: the model's name); the "
                                        "plain single-pass model is NAME-plain", group=GROUP, run=True)
    server_api_key: str | None = opt(None, f"API key clients must send (default: ${API_KEY_ENV}; none: no check)",
                                     flags=("--api_key", "--api-key"), group=GROUP, run=True, secret=True)
    max_n: int = opt(Limits.max_n, "cap on a request's n (answers)", ge=1, group=GROUP, run=True)
    max_k: int = opt(Limits.max_k, "cap on a request's k (P&A width)", ge=1, group=GROUP, run=True)
    max_num_aggregation: int = opt(Limits.max_num_aggregation, "cap on a request's num_aggregation (P&A depth)",
                                   ge=0, group=GROUP, run=True)
    max_queue: int = opt(Limits.max_queue, "requests in the server at once (running and waiting); more get 429",
                         ge=1, group=GROUP, run=True)
    max_batch: int = opt(Limits.max_batch, "requests one call of a non-continuous engine takes together (the "
                         "requests waiting for it); 1: one at a time", ge=1, group=GROUP, run=True)
    request_timeout: float = opt(Limits.request_timeout, "seconds a request may take (then 504, or an error event "
                                 "in a stream)", gt=0, group=GROUP, run=True)
    keepalive: float = opt(Limits.keepalive, "seconds between SSE keep-alive comments while a stream waits for text",
                           gt=0, group=GROUP, run=True)
    shutdown_grace: float = opt(Limits.shutdown_grace, "seconds in-flight requests get to finish on SIGINT/SIGTERM",
                                ge=0, group=GROUP, run=True)

    def limits(self) -> Limits:
        return Limits(max_tokens=self.max_tokens, max_n=self.max_n, max_k=max(self.max_k, self.n),
                      max_num_aggregation=max(self.max_num_aggregation, self.num_aggregation),
                      max_queue=self.max_queue, max_batch=self.max_batch, request_timeout=self.request_timeout,
                      keepalive=self.keepalive, shutdown_grace=self.shutdown_grace)


def load_config(config_file: str | None, flags: dict) -> ServeConfig:
    return from_sources(ServeConfig, config_file, flags)
