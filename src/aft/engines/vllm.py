"""Engine on vLLM's offline `LLM` class (GPU machines).

Written against vLLM's documented API (`LLM(...)`, `LLM.chat(conversations,
sampling_params=[...])`, `SamplingParams`, `RequestOutput` / `CompletionOutput`)
and NOT run on the machines this project was developed on: vLLM cannot be
installed there. The pure parts (our request -> SamplingParams keyword
arguments, vLLM outputs -> our Result) are plain functions tested without vLLM
(tests/test_vllm_mapping.py).

`generate` makes ONE batched `LLM.chat` call for the whole batch, with one
`SamplingParams(n=..., seed=...)` per request; vLLM schedules everything with
continuous batching, and prefix caching (on by default here) shares the prompt
of the n samples and the common prefixes of aggregator prompts.

Seeds: the request's seed goes to vLLM as is. vLLM (V1 engine) runs the n
samples of a request as child requests, child j seeded with seed + j
(vllm/v1/engine/parallel_sampling.py); `Result.seeds` reports those.

Chat template: a model whose tokenizer has none (a base model) gets ChatML,
as in the transformers engine (LLM.chat would refuse it).

Memory: vLLM takes `gpu_memory_utilization` of the whole GPU (default 0.9)
for weights and KV cache. Two engines in one process (aft data build with a
vLLM proposer and a vLLM teacher) must share it: data build gives each its
share. `close()` shuts the engine core down (its process holds the memory) and
runs vLLM's own clean-up, so a later engine can have the memory.

Data parallelism: the offline `LLM` class runs one data-parallel rank per
process, so `data_parallel_size > 1` is refused here; for several GPUs with a
model that fits on one, run `vllm serve MODEL --data-parallel-size N` and use
the openai engine (`--model http://host:8000/v1`).
"""

from __future__ import annotations

import logging

from ..errors import AftError
from .base import CANCELLED, CHATML_TEMPLATE, Completion, Engine, OnText, Request, Result, SamplingParams, context_error, emit_whole

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'aft[vllm]' (needs a CUDA machine)"


def sampling_kwargs(p: SamplingParams) -> dict:
    """Keyword arguments of vllm.SamplingParams for one of our requests.

    top_k: ours uses 0 for off; vLLM's documented "off" is -1 (recent versions
    also take 0, older ones reject it: vllm-project/vllm#17553), so off is
    sent as -1. Stop strings are
    excluded from the output, as in the hf engine (vLLM's default).
    """
    return {
        "n": p.n,
        "temperature": p.temperature,  # 0 = greedy in vLLM too
        "top_p": p.top_p,
        "top_k": p.top_k if p.top_k > 0 else -1,
        "max_tokens": p.max_tokens,
        "stop": list(p.stop) or None,
        "seed": p.seed,
    }


def to_result(output, params: SamplingParams) -> Result:
    """One vLLM RequestOutput (prompt_token_ids, outputs[i].index/.text/.token_ids/.finish_reason) -> Result."""
    outs = sorted(output.outputs, key=lambda o: o.index)
    completions = [Completion(text=o.text, tokens=len(o.token_ids), finish_reason=finish_reason(o.finish_reason))
                   for o in outs]
    seeds = [params.seed + o.index if params.seed is not None else None for o in outs]
    return Result(completions=completions, prompt_tokens=len(output.prompt_token_ids or []), seeds=seeds)


def finish_reason(reason: str | None) -> str:
    """vLLM's "stop" (EOS or stop string) / "length" / "abort" -> ours ("stop" or "length")."""
    if reason == "length":
        return "length"
    if reason != "stop":
        log.warning("vLLM finish reason %r counted as 'stop'", reason)
    return "stop"


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, model: str, tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, dtype: str = "auto",
                 seed: int = 0, enable_prefix_caching: bool = True, chat_template: str | None = None,
                 display_name: str = "", **llm_kwargs):
        """Load `model` (a folder or hub id) into vLLM; extra keyword arguments go to vllm.LLM."""
        try:
            import vllm
        except ImportError as e:
            raise AftError(f"the vllm engine needs vLLM, which is not installed ({e}): {INSTALL_HINT}") from e
        if data_parallel_size > 1:
            raise AftError("data_parallel_size > 1 is not supported by the offline vllm engine; run "
                           f"`vllm serve {model} --data-parallel-size {data_parallel_size}` and use "
                           "--model http://HOST:PORT/v1 (the openai engine)")
        self._vllm = vllm
        kw = dict(model=model, tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                  dtype=dtype, seed=seed, enable_prefix_caching=enable_prefix_caching, **llm_kwargs)
        if max_model_len:
            kw["max_model_len"] = max_model_len
        self.llm = vllm.LLM(**kw)
        self.model = display_name or model
        self.tokenizer = self.llm.get_tokenizer()
        self.chat_template = pick_chat_template(chat_template, getattr(self.tokenizer, "chat_template", None))
        if self.chat_template is CHATML_TEMPLATE:
            log.warning("%s: the tokenizer has no chat template; using ChatML", self.model)
        self.context_window = _max_model_len(self.llm) or max_model_len

    def generate(self, requests: list[Request], on_text: OnText | None = None) -> list[Result]:
        if not requests:
            return []
        # vLLM refuses the whole batch for one prompt longer than max_model_len: that prompt fails alone.
        # A request cancelled before the call is not sent; LLM.chat itself cannot be interrupted.
        results: list[Result | None] = [None] * len(requests)
        for i, r in enumerate(requests):
            if r.cancelled:
                results[i] = Result.failed(CANCELLED)
                continue
            n = self.count_tokens(r.messages)
            error = context_error(n, self.context_window)
            if error:
                results[i] = Result.failed(error, prompt_tokens=n)
        todo = [i for i, res in enumerate(results) if res is None]
        if todo:
            sps = [self._vllm.SamplingParams(**sampling_kwargs(requests[i].params)) for i in todo]
            outputs = self.llm.chat([requests[i].messages for i in todo], sampling_params=sps, use_tqdm=False,
                                    chat_template=self.chat_template)
            for i, o in zip(todo, outputs):
                results[i] = to_result(o, requests[i].params)
        return emit_whole(results, on_text)  # type: ignore[arg-type]  # LLM.chat returns whole texts

    def count_tokens(self, messages: list[dict]) -> int:
        """Prompt tokens as LLM.chat renders them: the chat template, then encode without special tokens."""
        kw = {"chat_template": self.chat_template} if self.chat_template else {}
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def describe(self) -> dict:
        return {**super().describe(), "vllm": getattr(self._vllm, "__version__", "?")}

    def close(self) -> None:
        """Free the GPU: stop the engine core (V1 runs it in its own process, which holds the memory),
        then vLLM's clean-up (distributed state, caches)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        del llm, engine, shutdown
        try:
            from vllm.distributed import cleanup_dist_env_and_memory
        except ImportError:
            import gc

            gc.collect()
        else:
            cleanup_dist_env_and_memory()


def pick_chat_template(given: str | None, tokenizers_own: str | None) -> str | None:
    """The template LLM.chat gets: the one given, else None (the tokenizer's own), else ChatML."""
    if given:
        return given
    return None if tokenizers_own else CHATML_TEMPLATE


def memory_shares(n_engines: int, total: float = 0.9) -> float:
    """gpu_memory_utilization for each of n vLLM engines that live in one process at once."""
    return round(total / max(1, n_engines), 3)


def _max_model_len(llm) -> int | None:
    """max_model_len from the engine's model config (the attribute moved between vLLM versions)."""
    engine = getattr(llm, "llm_engine", None)
    for get in (lambda: engine.model_config, lambda: engine.get_model_config(), lambda: llm.model_config):
        try:
            return int(get().max_model_len)
        except Exception:
            continue
    return None
