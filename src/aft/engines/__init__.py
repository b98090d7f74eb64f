"""Engines: one interface (base.py), three back-ends, one factory, one options type (args.py).

    hf      transformers on this machine (CPU or CUDA)   engines/hf/
    openai  any OpenAI-compatible HTTP endpoint           engines/openai.py
    vllm    vLLM's offline LLM class (GPU)                engines/vllm.py

Each back-end is imported only when asked for, so `import aft.engines` needs
neither torch, an HTTP client nor vLLM.
"""

from __future__ import annotations

from ..models import ModelSpec
from .base import Completion, Engine, Request, Result, SamplingParams, derive_seed, sample_seeds


def load_engine(spec: ModelSpec, **opts) -> Engine:
    """Build the engine for a resolved model (see models.resolve) with the options it reads
    (EngineArgs.options(kind) gives them; EngineArgs.open() resolves and calls this)."""
    if spec.kind == "hf":
        from .hf import HFEngine

        return HFEngine.load(spec.path, adapter=spec.adapter, display_name=spec.name, **opts)
    if spec.kind == "openai":
        from .openai import OpenAIEngine

        return OpenAIEngine(spec.path, model=spec.name or None, **opts)
    if spec.kind == "vllm":
        from .vllm import VLLMEngine

        return VLLMEngine(spec.path, display_name=spec.name, **opts)
    raise ValueError(f"unknown engine kind {spec.kind!r}")


__all__ = ["Completion", "Engine", "Request", "Result", "SamplingParams", "derive_seed", "load_engine",
           "sample_seeds"]
