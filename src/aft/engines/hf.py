"""Local transformers engine (CPU or CUDA) with its own decode loop.

Why our own loop rather than `model.generate` (benchmarks/bench_infer.py
measures the two side by side on the propose-and-aggregate workload):
  * the n samples of one prompt share a single prefill (the KV cache is
    expanded to n rows afterwards); `generate(num_return_sequences=n)`
    prefills n copies;
  * the KV cache is preallocated once per batch (`BufferLayer`): a decode
    step writes one position in place, where transformers' `DynamicCache`
    concatenates, copying the whole cache at every step (O(T) per token:
    32 rows x 300 positions took 184 ms a step with DynamicCache, 78 ms
    preallocated, SmolLM2-135M bf16 on 2 cores);
  * finished rows leave the batch, but in bulk (when a quarter of the rows
    are done): compacting the cache copies it, so it is not done per row;
  * sampling sorts the vocabulary only when it must: top-p/top-k take a
    `topk` of the few most likely tokens (widened until it holds the whole
    nucleus), and plain temperature sampling needs no ordering at all.
    Sorting 32 x 49k probabilities took ~45 ms a step, half a forward pass;
  * each sample draws from its own seeded stream of uniforms (inverse-CDF
    sampling), so a sample's random draws depend on its seed alone, not on
    what else shares the batch;
  * on CPU, prompts are prefilled without padding (grouped by length), so
    attention runs SDPA's causal fast path: a padded batch needs an explicit mask, with
    which SDPA's CPU kernel is slow (8 aggregator prompts, 5k tokens: 4.7 s
    padded, 3.3 s grouped);
  * on CPU, a decode step's attention (one query token) runs as two batched
    matmuls over the key/value heads (`aft_sdpa`, registered with
    transformers' AttentionInterface; SDPA for everything else), over keys
    stored transposed (a bf16 CPU matmul reads a slice of the usual layout far
    more slowly, copying it first): 0.37 against
    1.13 ms a layer at 32 rows x 200 positions, 0.34 against 0.46 at 8 x 700
    (benchmarks/probe_attention.py). On GPUs keys keep the usual layout
    (`keys_transposed`): SDPA's fused kernels need a contiguous last dimension;
  * on a GPU a chunk holds what fits 90% of the free memory (`chunk_bytes`
    estimates the KV cache, logits and prefill activations), and a chunk that
    runs out of memory anyway is split in two, down to one request, which then
    fails with a one-line error instead of CUDA's.
What is promised: the same requests in the same batch with the same seeds give
the same texts (same machine and software). A request's logits can differ in
the last bits alone against batched, since the matmul kernels round by shape
and CPU (a 2-core Intel Xeon with AVX-512 flipped a sampled token where an AMD
EPYC did not), so a sampled text is not promised equal alone and batched.
In float32, greedy output equals `generate(do_sample=False)` token for token
(tests/test_hf_engine.py). In bf16 neither is bit-stable: rounding follows the
matmul shapes, and `generate`'s own greedy text changes with its batch.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch

from ..errors import AftError
from ..loading import load_pretrained, pick_dtype  # noqa: F401  (pick_dtype: imported from here by callers)
from .base import CHATML_TEMPLATE, Completion, Engine, Request, Result, SamplingParams, context_error, sample_seeds

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
            model.set_attn_implementation(_register_attention())  # the engine owns its model from here on
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
             display_name: str = "", **kw) -> "HFEngine":
        model, tok = load_pretrained(path, adapter=adapter, dtype=dtype, device=device)
        return cls(model, tok, display_name=display_name or path, **kw)

    # ----------------------------------------------------------------- prompts
    def render(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, messages: list[dict]) -> list[int]:
        return self.tok(self.render(messages), add_special_tokens=False)["input_ids"]

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.encode(messages))

    def num_parameters(self) -> int:
        """Every parameter of the model, tied ones counted once."""
        return sum(p.numel() for p in {id(p): p for p in self.lm.parameters()}.values())

    # -------------------------------------------------------------- generation
    def generate(self, requests: list[Request]) -> list[Result]:
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
        return results  # type: ignore[return-value]

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
        # One row per sample: row r belongs to prompt src[r] and is its sample j.
        src = [b for b, sp in enumerate(params) for _ in range(sp.n)]
        seeds = [s for sp in params for s in sample_seeds(sp)]
        R = len(src)
        rp = [params[b] for b in src]
        max_new_list = [self._max_new(sp, len(prompts[b])) for sp, b in zip(rp, src)]
        steps = max(max_new_list)

        attn = torch.zeros((B, L + steps), dtype=torch.long, device=dev)  # grows in place: column L+t is step t
        for b, p in enumerate(prompts):  # left padding
            attn[b, L - len(p):L] = 1
        cache, last_logits = self._prefill(prompts, L + steps)
        index = torch.tensor(src, device=dev)
        if R != B or src != list(range(B)):
            cache.batch_select_indices(index)  # n rows per prompt, one shared prefill
        logits = last_logits[index]
        attn = attn[index]
        next_pos = torch.tensor([len(prompts[b]) for b in src], device=dev)

        max_new = torch.tensor(max_new_list, device=dev)
        temp = torch.tensor([sp.temperature for sp in rp], device=dev, dtype=torch.float32)
        top_p = torch.tensor([sp.top_p for sp in rp], device=dev, dtype=torch.float32)
        top_k = torch.tensor([sp.top_k for sp in rp], device=dev)
        uniforms = _uniform_streams(seeds, steps, dev)
        stops = [sp.stop for sp in rp]
        eos = torch.tensor(self.eos_ids, device=dev)
        eos_set = set(self.eos_ids)

        tokens: list[list[int]] = [[] for _ in range(R)]
        finish = [""] * R
        texts: list[str | None] = [None] * R
        rows = list(range(R))  # global row id of each batch row
        live = [True] * R  # per batch row: still generating (finished rows stay until the next compaction)
        sel = index.new_tensor(rows)
        step = 0
        while True:
            nxt = _sample(logits.float(), temp[sel], top_p[sel], top_k[sel], uniforms[sel, step])
            step += 1
            done_list = (torch.isin(nxt, eos) | (step >= max_new[sel])).tolist()
            for k, (r, tok) in enumerate(zip(rows, nxt.tolist())):
                if not live[k]:
                    continue
                if tok in eos_set:
                    finish[r], live[k] = "stop", False
                    continue
                tokens[r].append(tok)
                if stops[r]:
                    text = self.tok.decode(tokens[r], skip_special_tokens=True)
                    cut = _find_stop(text, stops[r])
                    if cut is not None:
                        texts[r], finish[r], live[k] = text[:cut], "stop", False
                        continue
                if done_list[k]:
                    finish[r], live[k] = "length", False
            n_live = sum(live)
            if n_live == 0:
                break
            if 4 * (len(rows) - n_live) >= len(rows):  # compact: the copy pays off once a quarter is dead
                keep = [k for k, a in enumerate(live) if a]
                kt = torch.tensor(keep, device=dev)
                cache.batch_select_indices(kt)
                rows, live = [rows[k] for k in keep], [True] * len(keep)
                sel, attn, next_pos, nxt = sel[kt], attn[kt], next_pos[kt], nxt[kt]
            attn[:, L + step - 1] = 1
            out = self.lm(input_ids=nxt[:, None], attention_mask=attn[:, :L + step], position_ids=next_pos[:, None],
                          **{self.cache_kw: cache}, use_cache=True)
            next_pos = next_pos + 1
            logits = out.logits[:, -1, :]

        results = [Result(completions=[], prompt_tokens=len(p)) for p in prompts]
        for r, b in enumerate(src):
            text = texts[r] if texts[r] is not None else self.tok.decode(tokens[r], skip_special_tokens=True)
            results[b].completions.append(Completion(text=text, tokens=len(tokens[r]), finish_reason=finish[r]))
            results[b].seeds.append(seeds[r])
        return results

    def _prefill(self, prompts: list[list[int]], capacity: int):
        """Left-padded KV cache of `capacity` positions for the prompts, and each prompt's next-token logits.

        On CPU, prompts of one length are prefilled together, without padding or mask (SDPA's causal
        fast path); their keys and values are then copied into the padded batch cache.
        """
        from transformers import DynamicCache

        B, L = len(prompts), max(len(p) for p in prompts)
        cache = _preallocated_cache(self.lm.config, capacity)
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


def _preallocated_cache(config, capacity: int):
    """A `DynamicCache` whose plain full-attention layers write into buffers of `capacity` positions."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    layer_cls = _buffer_layer_class()  # defined lazily: importing transformers is slow
    cache.layers = [layer_cls(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def keys_transposed(device) -> bool:
    """Whether the cache stores keys transposed, (b, h, d, capacity): on CPU only.

    On CPU the filled part, transposed, is a matrix per head with unit stride along positions, which a
    bf16 CPU matmul (q @ k^T) reads far faster than a slice of the (b, h, capacity, d) layout. On GPUs
    SDPA's fused kernels (flash, memory-efficient) need keys whose last dimension is contiguous; a
    transposed view sends every layer to the math kernel (fp32 copies, O(L^2) memory on a prefill).
    """
    return torch.device(device).type == "cpu"


@functools.cache
def _buffer_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """A DynamicLayer that preallocates `capacity` positions and returns views of the filled part.

        Same semantics as DynamicLayer, without the per-step `torch.cat` of the whole cache.
        """

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0

        def lazy_initialization(self, key_states, value_states, batch: int | None = None):
            self.dtype, self.device = key_states.dtype, key_states.device
            b, h, _, d = key_states.shape
            self.transposed = keys_transposed(self.device)
            # Zeros, not empty: padding positions are masked, but 0 x NaN would still be NaN.
            kshape = (batch or b, h, d, self.capacity) if self.transposed else (batch or b, h, self.capacity, d)
            self._alloc(key_states.new_zeros(kshape),
                        value_states.new_zeros((batch or b, h, self.capacity, value_states.shape[-1])))
            self.is_initialized = True

        def _alloc(self, kstore, vbuf) -> None:
            self.kstore, self.vbuf = kstore, vbuf
            # (b, h, capacity, d), as DynamicLayer's keys: a view of the transposed store on CPU
            self.kbuf = kstore.transpose(-1, -2) if self.transposed else kstore
            self.set_length(self.length)

        def set_length(self, n: int) -> None:
            self.length = n
            self.keys, self.values = self.kbuf[:, :, :n], self.vbuf[:, :, :n]

        def put_rows(self, rows: list[int], start: int, keys, values, batch: int) -> None:
            """Write keys/values of `len(rows)` sequences at positions start.. of those batch rows."""
            if not self.is_initialized:
                self.lazy_initialization(keys, values, batch)
            idx = torch.tensor(rows, device=keys.device)
            end = start + keys.shape[-2]
            self.kbuf[idx, :, start:end] = keys
            self.vbuf[idx, :, start:end] = values

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = self.length + key_states.shape[-2]
            if n > self.capacity:  # not expected (capacity covers prompt + max_tokens); grow rather than fail
                self.capacity = max(n, 2 * self.capacity)
                self._alloc(_grow(self.kstore, self.capacity, -1 if self.transposed else -2),
                            _grow(self.vbuf, self.capacity, -2))
            self.kbuf[:, :, self.length:n] = key_states
            self.vbuf[:, :, self.length:n] = value_states
            self.set_length(n)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def reset(self) -> None:
            self.length = 0
            super().reset()

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("BufferLayer does not crop")

        def batch_repeat_interleave(self, repeats: int) -> None:
            self.batch_select_indices(torch.arange(self.vbuf.shape[0], device=self.vbuf.device).repeat_interleave(repeats))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self._alloc(self.kstore[indices], self.vbuf[indices])

    return BufferLayer


ATTENTION = "aft_sdpa"


@functools.cache
def _register_attention() -> str:
    """Register `aft_sdpa` with transformers: SDPA, except one-token (decode) steps, done as two matmuls."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if query.shape[2] != 1 or dropout or kwargs.get("position_bias") is not None or kwargs.get("softcap"):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        return _decode_attention(query, key, value, attention_mask, scaling), None

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION


def _decode_attention(query, key, value, mask, scaling):
    """Attention of one query token per row: query (B, H, 1, D), key/value (B, Hkv, T, D) -> (B, 1, H, D).

    The H query heads are grouped by the key/value head they read (grouped-query attention without
    copying the cache), scores and softmax in float32.
    """
    B, H, _, D = query.shape
    Hkv = key.shape[1]
    scale = D ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query.view(B, Hkv, H // Hkv, D), key.transpose(-1, -2)).float() * scale
    if mask is not None:  # (B, 1, 1, T): True = attend (bool), or additive (float)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).view(B, 1, H, D)


def _grow(buf: torch.Tensor, capacity: int, dim: int) -> torch.Tensor:
    shape = list(buf.shape)
    shape[dim] = capacity
    new = buf.new_zeros(shape)
    new.narrow(dim, 0, buf.shape[dim]).copy_(buf)
    return new


def _uniform_streams(seeds: list[int | None], length: int, device) -> torch.Tensor:
    """One row of uniforms per sample, from its own seed (unseeded rows use torch's global RNG)."""
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(s) if s is not None else None
        rows.append(torch.rand(length, generator=g, dtype=torch.float64))
    return torch.stack(rows).to(device)


NUCLEUS_START = 64  # candidates `topk` starts from for top-p; doubled until they hold the nucleus


def _sample(logits: torch.Tensor, temp, top_p, top_k, u) -> torch.Tensor:
    """Next token per row: greedy where temp == 0, else sampling by inverse CDF on the row's uniform `u`.

    Rows without top-p/top-k invert the CDF of the full distribution in vocabulary order
    (no sort). Rows with top-p/top-k invert it over their kept tokens, most likely first.
    """
    sampled = temp > 0
    if not bool(sampled.any()):
        return logits.argmax(-1)
    # argmax only where some row is greedy; row subsets (copies of the logits) only where rows differ
    out = logits.argmax(-1) if not bool(sampled.all()) else torch.empty_like(u, dtype=torch.long)
    truncated = sampled & ((top_p < 1) | (top_k > 0))
    plain = sampled & ~truncated
    for rows, draw in ((plain, _sample_plain), (truncated, _sample_truncated_scaled)):
        if bool(rows.all()):
            return draw(logits, temp, top_p, top_k, u)
        if bool(rows.any()):
            out[rows] = draw(logits[rows], temp[rows], top_p[rows], top_k[rows], u[rows])
    return out


def _sample_plain(logits, temp, top_p, top_k, u) -> torch.Tensor:
    return _invert_cdf(torch.softmax(logits / temp[:, None], dim=-1), u)


def _sample_truncated_scaled(logits, temp, top_p, top_k, u) -> torch.Tensor:
    return _sample_truncated(logits / temp[:, None], top_p, top_k, u)


def _sample_truncated(lg: torch.Tensor, top_p, top_k, u) -> torch.Tensor:
    """Top-k / top-p (nucleus: the smallest most-likely prefix whose mass reaches p) sampling."""
    probs = torch.softmax(lg, dim=-1)
    V = probs.shape[-1]
    # Candidates: top_k of them where set, else enough to hold the nucleus (a few dozen at most, usually).
    need_k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    k = min(V, max(int(top_k.max()), NUCLEUS_START))
    while True:
        sp, si = probs.topk(k, dim=-1)  # sorted, most likely first
        cum = sp.cumsum(-1)
        holds = (need_k <= k) | (cum[:, -1] >= top_p) | (k == V)
        if bool(holds.all()):
            break
        k = min(V, 4 * k)
    drop = (cum - sp) >= top_p[:, None]  # keep the prefix whose mass before each token is < p (the first always)
    ranks = torch.arange(k, device=sp.device)[None, :]
    drop |= ranks >= need_k[:, None]
    sp = sp.masked_fill(drop, 0.0)
    return si.gather(-1, _invert_cdf(sp, u)[:, None]).squeeze(-1)


def _invert_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative weight reaches u x total (u in [0, 1))."""
    cdf = weights.double().cumsum(-1)
    target = (u * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target).squeeze(-1).clamp(max=weights.shape[-1] - 1)


def _find_stop(text: str, stops) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
