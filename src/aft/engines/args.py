"""Engine options: every option of every engine declared once (the vLLM `EngineArgs` convention).

A command's config inherits `EngineArgs`, so each option is a YAML key and a
flag of every command that opens an engine (infer, data build, eval run /
export / judge, and the server), with one help text, one default and one
check. `EngineArgs.open()` resolves the model and opens its engine; each engine
gets only the options it reads (the `engines` of each field).
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass

from ..config import opt

GROUP = "engine options"
KINDS = ("hf", "openai", "vllm")


def _opt(default, help: str, engines: tuple[str, ...] = KINDS, **kw):
    f = opt(default, f"{'/'.join(engines)} engine: {help}" if engines != KINDS else help, group=GROUP, run=True, **kw)
    f.metadata = types.MappingProxyType({**f.metadata, "engines": engines})
    return f


@dataclass
class EngineArgs:
    model: str = opt("smollm2-135m", "embedded short name, model folder, PEFT adapter folder, hub id, "
                     "http://host:port/v1[#name] (OpenAI-compatible) or vllm:<model>", flags=("-m",), group=GROUP)
    engine: str = _opt("auto", "engine; auto picks from --model", choices=("auto",) + KINDS)
    context_window: int | None = _opt(None, "override the model's context window (tokens)", ge=1)
    dtype: str = _opt("auto", "weights dtype; auto: bf16 on GPUs, on CPU the faster of bf16 and fp32 "
                      "for this model, measured once per machine (hf)", ("hf", "vllm"), choices=("auto", "float32", "bfloat16", "float16"))
    device: str = _opt("auto", "auto, cpu, cuda, cuda:1 ...", ("hf",))
    max_batch_rows: int = _opt(64, "most sequences decoded together", ("hf",), ge=1)
    spec_tokens: int = _opt(0, "speculative decoding: draft tokens (prompt lookup) verified per forward pass; "
                            "0 = off. Output unchanged: greedy the same, sampling the same distribution",
                            ("hf",), ge=0)
    api_key: str | None = _opt(None, "API key (default: $OPENAI_API_KEY, else 'EMPTY'); YAML or the "
                               "environment only, never written to disk", ("openai",), cli=False, secret=True)
    max_concurrency: int = _opt(8, "requests in flight", ("openai",), ge=1)
    timeout: float = _opt(300.0, "seconds to wait for one reply before retrying", ("openai",), gt=0)
    max_retries: int = _opt(2, "retries of a timed-out, dropped or 429/5xx call", ("openai",), ge=0)
    tokenizer: str | None = _opt(None, "tokenizer folder or hub id, to count tokens exactly", ("openai",))
    tensor_parallel_size: int = _opt(1, "GPUs per model replica", ("vllm",), ge=1)
    data_parallel_size: int = _opt(1, "model replicas", ("vllm",), ge=1)
    gpu_memory_utilization: float = _opt(0.9, "share of GPU memory vLLM may take", ("vllm",), gt=0, le=1)
    max_model_len: int | None = _opt(None, "longest sequence (prompt + output)", ("vllm",), ge=1)
    enable_prefix_caching: bool = _opt(True, "share the KV cache of common prompt prefixes", ("vllm",))
    chat_template: str | None = _opt(None, "a chat template to use instead of the tokenizer's", ("vllm",))

    def engine_args(self) -> "EngineArgs":
        """Just the engine options of this config (which may be any config inheriting EngineArgs)."""
        return EngineArgs(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EngineArgs)})

    def options(self, kind: str) -> dict:
        """The options engine `kind` reads, None ones left out (the engine's default)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(EngineArgs)
                if kind in f.metadata.get("engines", ()) and f.name not in ("engine", "context_window")
                and getattr(self, f.name) is not None}

    def open(self, model: str | None = None, engine: str | None = None, seed: int | None = None):
        """Resolve `model` (default: this config's) and open its engine with these options.
        `engine` overrides the engine kind (auto: picked from the model); `seed` seeds vLLM.
        Returns (engine, resolved ModelSpec)."""
        from ..models import resolve
        from . import load_engine

        kind = engine or self.engine
        spec = resolve(model or self.model, None if kind == "auto" else kind)
        opts = self.options(spec.kind)
        if spec.kind == "vllm" and seed is not None:
            opts["seed"] = seed
        return self.configure(load_engine(spec, **opts)), spec

    def configure(self, engine):
        """Apply the options that act on any opened engine (the context window override)."""
        if self.context_window:
            engine.context_window = self.context_window
        return engine


@dataclass
class ProposerArgs:
    """Several proposer models (MoA) for a command that runs P&A (infer, eval run, serve): a config that
    inherits this and EngineArgs opens them with the same engine options as --model."""

    proposers: list | None = opt(None, "P&A: models that write the proposals (each any --model value, local or "
                                 "remote); --model then writes every aggregation. K proposals are spread over "
                                 "them as evenly as K allows, the first ones writing one more")

    def resolve_proposers(self) -> None:
        """Look each proposer up (AftError naming it when it cannot be found), before any model is loaded."""
        from ..models import resolve

        kind = self.engine  # type: ignore[attr-defined]
        for m in self.proposers or []:
            resolve(m, None if kind == "auto" else kind)

    def open_proposers(self, aggregator, seed: int | None = None) -> list | None:
        """The proposer engines, None when not given; a model named twice, or the same as --model (whose
        engine is `aggregator`), is opened once. Engines opened here are closed if a later one fails."""
        if not self.proposers:
            return None
        opened = {self.model: aggregator}  # type: ignore[attr-defined]
        try:
            for m in self.proposers:
                if m not in opened:
                    opened[m] = self.open(m, seed=seed)[0]  # type: ignore[attr-defined]
        except BaseException:
            for m, e in opened.items():
                if e is not aggregator:
                    e.close()
            raise
        return [opened[m] for m in self.proposers]
