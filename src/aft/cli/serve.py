"""`aft serve`: propose-and-aggregate behind an OpenAI-compatible API (see aft.serve, docs/serve.md)."""

from __future__ import annotations

import logging
import os
import sys

from .. import config as cfglib
from . import flags_given


def add_parser(sub) -> None:
    from ..serve.config import ServeConfig

    p = sub.add_parser("serve", help="an OpenAI-compatible server answering with propose-and-aggregate",
                       description="Serve the model behind /v1/chat/completions (streaming, n, usage), /v1/models, "
                                   "/health and /metrics. The served model NAME answers with P&A at -k/-l (a request "
                                   "may ask for other k, num_aggregation and style); NAME-plain is one plain pass. "
                                   "Takes the model, engine, sampling and P&A options of `aft infer`.")
    p.add_argument("--config", "-c", help="YAML config of these keys")
    cfglib.add_arguments(p, ServeConfig)
    p.set_defaults(handler=main)


def main(args) -> int:
    from ..serve.config import load_config
    from ..serve.server import serve

    if serve(load_config(args.config, flags_given(args))):
        # Engine calls still run in threads: the interpreter's exit would wait on (or abort in) their C++
        # threads. The answers are sent or their clients gone, so leave now.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)
    return 0
