"""Engines: one interface (base.py), three back-ends, one factory.

    hf      transformers on this machine (CPU or CUDA)   engines/hf.py
    openai  any OpenAI-compatible HTTP endpoint           engines/openai.py
    vllm    vLLM's offline LLM class (GPU)                engines/vllm.py

Each back-end is imported only when asked for, so `import aft.engines` needs
neither torch, an HTTP client nor vLLM.
"""

from __future__ import annotations

import logging

from ..models import ModelSpec
from .base import Completion, Engine, Request, Result, SamplingParams, derive_seed, sample_seeds

log = logging.getLogger(__name__)

# The options each engine understands (besides what the ModelSpec gives).
ENGINE_OPTIONS = {
    "hf": {"dtype", "device", "max_batch_rows"},
    "openai": {"api_key", "max_concurrency", "timeout", "max_retries", "tokenizer", "context_window"},
    "vllm": {"dtype", "tensor_parallel_size", "data_parallel_size", "gpu_memory_utilization", "max_model_len",
             "seed", "enable_prefix_caching", "chat_template"},
}


def check_request_limits(timeout: float, max_retries: int) -> None:
    """The --timeout and --max_retries of remote engines: a positive time, a count >= 0."""
    from ..errors import AftError

    if not timeout > 0:
        raise AftError(f"timeout must be > 0 seconds, got {timeout}")
    if max_retries < 0:
        raise AftError(f"max_retries must be >= 0, got {max_retries}")


def load_engine(spec: ModelSpec, **opts) -> Engine:
    """Build the engine for a resolved model (see models.resolve).

    `opts` may hold options for any engine (e.g. every CLI flag): each engine
    gets only those it understands; None means "the engine's default". An
    option no engine knows is a bug (TypeError).
    """
    unknown = set(opts) - set().union(*ENGINE_OPTIONS.values())
    if unknown:
        raise TypeError(f"load_engine: unknown option(s) {sorted(unknown)}")
    if spec.kind not in ENGINE_OPTIONS:
        raise ValueError(f"unknown engine kind {spec.kind!r}")
    kw = {k: v for k, v in opts.items() if v is not None and k in ENGINE_OPTIONS[spec.kind]}
    ignored = sorted(k for k, v in opts.items() if v is not None and k not in kw)
    if ignored:
        log.debug("%s engine ignores %s", spec.kind, ", ".join(ignored))
    if spec.kind == "hf":
        from .hf import HFEngine

        return HFEngine.load(spec.path, adapter=spec.adapter, display_name=spec.name, **kw)
    if spec.kind == "openai":
        from .openai import OpenAIEngine

        return OpenAIEngine(spec.path, model=spec.name or None, **kw)
    from .vllm import VLLMEngine

    return VLLMEngine(spec.path, display_name=spec.name, **kw)


def open_engine(model: str, engine: str = "auto", context_window: int | None = None,
                **opts) -> tuple[Engine, ModelSpec]:
    """Resolve a --model value (engine "auto" picks from it), load its engine, apply a
    --context_window override. Returns the engine and the resolved spec."""
    from ..models import resolve

    spec = resolve(model, None if engine == "auto" else engine)
    eng = load_engine(spec, **opts)
    if context_window:
        eng.context_window = context_window
    return eng, spec


__all__ = ["Completion", "Engine", "Request", "Result", "SamplingParams", "check_request_limits", "derive_seed",
           "load_engine", "open_engine", "sample_seeds"]
