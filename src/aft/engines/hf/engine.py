"""HFEngine: prompts in, Results out; prefill, chunking by rows and GPU memory, the decode loop."""

from __future__ import annotations

import inspect
import logging

import torch

from ...errors import AftError
from ...loading import load_pretrained
from ..base import (
    CHATML_TEMPLATE,
    Completion,
    Engine,
    Request,
    Result,
    SamplingParams,
    context_error,
    emit_whole,
    sample_seeds,
)
from .attention import register_attention
from .batch import DecodeBatch, Row
from .cache import preallocated_cache

log = logging.getLogger(__name__)

class HFEngine(Engine):
    name = "hf"

    def __init__(self, model, tokenizer, max_batch_rows: int = 64, display_name: str = "",
                 memory_budget_bytes: int | None = None,
                 fallback_template: str | None = None):
        """`fallback_template`: the chat template used when the tokenizer has none (default ChatML;
        data/onpolicy.py passes one that sends the messages as raw text, for base models)."""
        self.lm = model.eval()
        self.tok = tokenizer
        self.has_chat_template = bool(self.tok.chat_template)
        if not self.has_chat_template:
            if fallback_template is None:
                log.warning("tokenizer has no chat template; using ChatML")
            self.tok.chat_template = fallback_template or CHATML_TEMPLATE
        self.device = next(model.parameters()).device
        if self.device.type == "cpu" and getattr(model.config, "_attn_implementation", None) == "sdpa":
            model.set_attn_implementation(register_attention())  # the engine owns its model from here on
        self.max_batch_rows = max_batch_rows
        # transformers 5.x renamed forward's past_key_values to cache (the old name warns on every call)
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.memory_budget_bytes = memory_budget_bytes  # None: measured on a GPU (memory_budget)
        self.chunk_rows: list[int] = []  # rows of each chunk run so far (for logs and tests)
        self.model = display_name or getattr(model.config, "_name_or_path", "")
        self.context_window = getattr(model.config, "max_position_embeddings", None)
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = sorted(set(eos))
        if not self.eos_ids:
            raise AftError(f"{self.model}: the model defines no EOS token")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    @classmethod
    def load(cls, path: str, adapter: str | None = None, dtype: str = "auto", device: str = "auto",
             display_name: str = "", **kw) -> HFEngine:
        model, tok = load_pretrained(path, adapter=adapter, dtype=dtype, device=device)
        return cls(model, tok, display_name=display_name or path, **kw)

    # ----------------------------------------------------------------- prompts
    def render(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, messages: list[dict]) -> list[int]:
        return self.tok(self.render(messages), add_special_tokens=False)["input_ids"]

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.encode(messages))

    def describe(self) -> dict:
        """As the base, plus the weights' dtype (what `--dtype auto` chose) and the device."""
        return {**super().describe(), "dtype": str(self.lm.dtype).removeprefix("torch."), "device": str(self.device)}

    def num_parameters(self) -> int:
        """Every parameter of the model, tied ones counted once."""
        return sum(p.numel() for p in {id(p): p for p in self.lm.parameters()}.values())

    # -------------------------------------------------------------- generation
    def generate(self, requests: list[Request], on_text=None) -> list[Result]:
        prompts = [self.encode(r.messages) for r in requests]
        results: list[Result | None] = [None] * len(requests)
        for i, p in enumerate(prompts):  # a prompt that does not fit fails alone
            error = context_error(len(p), self.context_window)
            if error:
                results[i] = Result.failed(error, prompt_tokens=len(p))
        # Similar lengths together (less padding); chunks of at most max_batch_rows sampled rows, and on a
        # GPU of what fits its free memory (see chunk_bytes). A chunk that runs out of memory anyway is split.
        budget = self.memory_budget()
        order = sorted((i for i in range(len(requests)) if results[i] is None), key=lambda i: len(prompts[i]))
        chunk: list[int] = []
        rows = positions = 0
        for i in order + [None]:
            if i is not None:
                n, p = requests[i].params.n, len(prompts[i])
                pos = p + self._max_new(requests[i].params, p)
            if chunk and (i is None or rows + n > self.max_batch_rows or (
                    budget is not None and self.chunk_bytes(rows + n, len(chunk) + 1, p, max(positions, pos)) > budget)):
                self._run_chunk(chunk, prompts, requests, results)
                chunk, rows, positions = [], 0, 0
            if i is not None:
                chunk.append(i)
                rows, positions = rows + n, max(positions, pos)
        return emit_whole(results, on_text)  # type: ignore[arg-type]

    def memory_budget(self) -> int | None:
        """Bytes a chunk may use: `memory_budget_bytes` if set, else on a GPU 90% of its free memory
        (the device's free memory plus what torch holds cached but unused); None (no limit) on CPU."""
        if self.memory_budget_bytes is not None:
            return self.memory_budget_bytes
        if self.device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return int(0.9 * (free + cached))

    def chunk_bytes(self, rows: int, prompts: int, prompt_len: int, positions: int) -> int:
        """An upper estimate of the memory a chunk needs: the KV cache of the prompts' prefill and of the
        sampled rows (`positions` = longest prompt + max new tokens each), the float32 logits the sampler
        works on, and one layer's prefill activations per prompt."""
        cfg = self.lm.config.get_text_config()
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        item = next(self.lm.parameters()).element_size()
        kv_per_position = 2 * cfg.num_hidden_layers * kv_heads * head_dim * item
        inter = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
        activations = prompt_len * (4 * cfg.hidden_size + 2 * inter) * item
        return (rows + prompts) * positions * kv_per_position + rows * 3 * cfg.vocab_size * 4 + prompts * activations

    def _run_chunk(self, chunk: list[int], prompts, requests, results) -> None:
        """Generate one chunk into `results`; out of GPU memory, split it in two, down to one request."""
        try:
            outs = self._generate_chunk([prompts[j] for j in chunk], [requests[j].params for j in chunk])
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(chunk) == 1:
                sp, p = requests[chunk[0]].params, len(prompts[chunk[0]])
                raise AftError(f"{self.model}: out of GPU memory on a single request ({sp.n} samples of a {p}-token "
                               f"prompt, max_tokens {sp.max_tokens}); lower n or max_tokens, or use the vllm "
                               "engine") from None
            log.warning("out of GPU memory on a chunk of %d requests (%d rows); splitting it in two", len(chunk),
                        sum(requests[j].params.n for j in chunk))
            half = len(chunk) // 2
            self._run_chunk(chunk[:half], prompts, requests, results)
            self._run_chunk(chunk[half:], prompts, requests, results)
            return
        self.chunk_rows.append(sum(requests[j].params.n for j in chunk))
        for j, res in zip(chunk, outs):
            results[j] = res

    @torch.inference_mode()
    def _generate_chunk(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Result]:
        dev = self.device
        B, L = len(prompts), max(len(p) for p in prompts)
        # One row per sample: row r answers prompt rows[r].request, with its seed.
        rows = [Row(b, seed, sp, self._max_new(sp, len(prompts[b])))
                for b, sp in enumerate(params) for seed in sample_seeds(sp)]
        capacity = L + max(r.max_new for r in rows)
        mask = torch.zeros((B, capacity), dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):  # left padding
            mask[b, L - len(p):L] = 1
        cache, last_logits = self._prefill(prompts, capacity)
        src = [r.request for r in rows]
        index = torch.tensor(src, device=dev)
        if len(rows) != B or src != list(range(B)):
            cache.batch_select_indices(index)  # n rows per prompt, one shared prefill
        next_pos = torch.tensor([len(prompts[b]) for b in src], device=dev)
        batch = DecodeBatch(rows, cache, mask[index], L, next_pos, last_logits[index], self.eos_ids, self.tok)
        while True:
            batch.sample()
            live = batch.live
            if live == 0:
                break
            if 4 * (len(batch.rows) - live) >= len(batch.rows):  # the copy pays off once a quarter is done
                batch.compact()
            batch.forward(self.lm, self.cache_kw)

        results = [Result(completions=[], prompt_tokens=len(p)) for p in prompts]
        for r in rows:
            results[r.request].completions.append(Completion(text=r.final_text(self.tok), tokens=len(r.tokens),
                                                             finish_reason=r.finish))
            results[r.request].seeds.append(r.seed)
        return results

    def _prefill(self, prompts: list[list[int]], capacity: int):
        """Left-padded KV cache of `capacity` positions for the prompts, and each prompt's next-token logits.

        On CPU, prompts of one length are prefilled together, without padding or mask (SDPA's causal
        fast path); their keys and values are then copied into the padded batch cache.
        """
        from transformers import DynamicCache

        B, L = len(prompts), max(len(p) for p in prompts)
        cache = preallocated_cache(self.lm.config, capacity)
        # One padded batch on GPUs (SDPA handles the mask well there, and one big batch keeps the device
        # busy), and for caches with other kinds of layers (e.g. sliding-window ones).
        if self.device.type != "cpu" or not all(hasattr(layer, "put_rows") for layer in cache.layers):
            return cache, self._prefill_padded(prompts, cache)
        logits = [None] * B
        groups: dict[int, list[int]] = {}
        for b, p in enumerate(prompts):
            groups.setdefault(len(p), []).append(b)
        for n, rows in groups.items():
            part = DynamicCache(config=self.lm.config)
            ids = torch.tensor([prompts[b] for b in rows], device=self.device)
            out = self.lm(input_ids=ids, **{self.cache_kw: part}, use_cache=True, logits_to_keep=1)
            for layer, src in zip(cache.layers, part.layers):
                layer.put_rows(rows, L - n, src.keys, src.values, batch=B)
            for k, b in enumerate(rows):
                logits[b] = out.logits[k, -1]
        for layer in cache.layers:
            layer.set_length(L)
        return cache, torch.stack(logits)

    def _prefill_padded(self, prompts: list[list[int]], cache) -> torch.Tensor:
        """One left-padded, masked forward over all prompts; returns the next-token logits."""
        L = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompts), L), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, L - len(p):] = torch.tensor(p)
            attn[b, L - len(p):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        out = self.lm(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                      position_ids=pos.to(self.device), **{self.cache_kw: cache}, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _max_new(self, sp: SamplingParams, prompt_len: int) -> int:
        room = (self.context_window - prompt_len) if self.context_window else sp.max_tokens
        return max(1, min(sp.max_tokens, room))

