"""Local transformers engine (CPU or CUDA).

Why our own decode loop rather than `model.generate`:
  * the n samples of one prompt share a single prefill (the KV cache is
    expanded n times afterwards; `generate(num_return_sequences=n)` prefills n
    copies);
  * finished rows leave the batch, so a long answer does not keep 31 finished
    ones decoding padding;
  * each sample draws from its own seeded random stream, so a sample's text
    depends on its seed, not on what else shares the batch.
Greedy output equals `generate`'s (tests/test_hf_engine.py), and
benchmarks/bench_infer.py measures the gain.
"""

from __future__ import annotations

import logging
import time

import torch

from ..errors import AftError
from .base import Completion, Engine, Request, Result, SamplingParams, sample_seeds

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise AftError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16") from None


class HFEngine(Engine):
    name = "hf"

    def __init__(self, model, tokenizer, max_batch_rows: int = 64, display_name: str = ""):
        self.lm = model.eval()
        self.tok = tokenizer
        if self.tok.chat_template is None:
            log.warning("tokenizer has no chat template; using ChatML")
            self.tok.chat_template = CHATML_TEMPLATE
        self.device = next(model.parameters()).device
        self.max_batch_rows = max_batch_rows
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
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = pick_dtype(dtype, device)
        t = time.time()
        tok = AutoTokenizer.from_pretrained(adapter or path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        log.info("loaded %s (%s, %s) in %.1fs", display_name or path, torch_dtype, device, time.time() - t)
        return cls(model, tok, display_name=display_name or path, **kw)

    # ----------------------------------------------------------------- prompts
    def render(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, messages: list[dict]) -> list[int]:
        return self.tok(self.render(messages), add_special_tokens=False)["input_ids"]

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.encode(messages))

    # -------------------------------------------------------------- generation
    def generate(self, requests: list[Request]) -> list[Result]:
        prompts = [self.encode(r.messages) for r in requests]
        results: list[Result | None] = [None] * len(requests)
        # Similar lengths together (less padding); chunks of at most max_batch_rows sampled rows.
        order = sorted(range(len(requests)), key=lambda i: len(prompts[i]))
        chunk: list[int] = []
        rows = 0
        for i in order + [None]:
            n = requests[i].params.n if i is not None else 0
            if chunk and (i is None or rows + n > self.max_batch_rows):
                outs = self._generate_chunk([prompts[j] for j in chunk], [requests[j].params for j in chunk])
                for j, res in zip(chunk, outs):
                    results[j] = res
                chunk, rows = [], 0
            if i is not None:
                chunk.append(i)
                rows += n
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_chunk(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Result]:
        dev = self.device
        B, L = len(prompts), max(len(p) for p in prompts)
        if self.context_window:
            for p, sp in zip(prompts, params):
                if len(p) >= self.context_window:
                    raise AftError(f"a prompt of {len(p)} tokens does not fit the context window ({self.context_window})")
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding
            ids[b, L - len(p):] = torch.tensor(p)
            mask[b, L - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)

        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        out = self.lm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                      use_cache=True, logits_to_keep=1)

        # One row per sample: row r belongs to prompt src[r] and is its sample j.
        src = [b for b, sp in enumerate(params) for _ in range(sp.n)]
        seeds = [s for sp in params for s in sample_seeds(sp)]
        index = torch.tensor(src, device=dev)
        cache.batch_select_indices(index)
        logits = out.logits[index, -1, :]
        mask = mask[index]
        next_pos = pos[index, -1] + 1
        R = len(src)

        rp = [params[b] for b in src]
        max_new = torch.tensor([self._max_new(sp, len(prompts[b])) for sp, b in zip(rp, src)], device=dev)
        temp = torch.tensor([sp.temperature for sp in rp], device=dev, dtype=torch.float32)
        top_p = torch.tensor([sp.top_p for sp in rp], device=dev, dtype=torch.float32)
        top_k = torch.tensor([sp.top_k for sp in rp], device=dev)
        uniforms = _uniform_streams(seeds, int(max_new.max()), dev)
        stops = [sp.stop for sp in rp]
        any_stop = any(stops)
        eos = torch.tensor(self.eos_ids, device=dev)

        tokens: list[list[int]] = [[] for _ in range(R)]
        finish = [""] * R
        texts: list[str | None] = [None] * R
        alive = torch.arange(R, device=dev)  # global row id of each live batch row
        step = 0
        while True:
            nxt = _sample(logits.float(), temp[alive], top_p[alive], top_k[alive], uniforms[alive, step])
            step += 1
            done = torch.isin(nxt, eos) | (step >= max_new[alive])
            nxt_list, done_list, rows = nxt.tolist(), done.tolist(), alive.tolist()
            for k, r in enumerate(rows):
                if nxt_list[k] in self.eos_ids:
                    finish[r] = "stop"
                    continue
                tokens[r].append(nxt_list[k])
                if any_stop and stops[r]:
                    text = self.tok.decode(tokens[r], skip_special_tokens=True)
                    cut = _find_stop(text, stops[r])
                    if cut is not None:
                        texts[r], finish[r] = text[:cut], "stop"
                        done_list[k] = True
                        continue
                if done_list[k]:
                    finish[r] = "length"
            keep = [k for k, d in enumerate(done_list) if not d]
            if not keep:
                break
            if len(keep) < len(rows):
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                alive, mask, next_pos, nxt = alive[sel], mask[sel], next_pos[sel], nxt[sel]
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
            out = self.lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                          past_key_values=cache, use_cache=True)
            next_pos = next_pos + 1
            logits = out.logits[:, -1, :]

        results = [Result(completions=[], prompt_tokens=len(p)) for p in prompts]
        for r, b in enumerate(src):
            text = texts[r] if texts[r] is not None else self.tok.decode(tokens[r], skip_special_tokens=True)
            results[b].completions.append(Completion(text=text, tokens=len(tokens[r]), finish_reason=finish[r]))
            results[b].seeds.append(seeds[r])
        return results

    def _max_new(self, sp: SamplingParams, prompt_len: int) -> int:
        room = (self.context_window - prompt_len) if self.context_window else sp.max_tokens
        return max(1, min(sp.max_tokens, room))


def _uniform_streams(seeds: list[int | None], length: int, device) -> torch.Tensor:
    """One row of uniforms per sample, from its own seed (unseeded rows use torch's global RNG)."""
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(s) if s is not None else None
        rows.append(torch.rand(length, generator=g, dtype=torch.float64))
    return torch.stack(rows).to(device)


def _sample(logits: torch.Tensor, temp, top_p, top_k, u) -> torch.Tensor:
    """Next token per row: greedy where temp == 0, else top-k/top-p sampling by inverse CDF on `u`."""
    greedy = logits.argmax(-1)
    sampled_rows = temp > 0
    if not bool(sampled_rows.any()):
        return greedy
    lg = logits[sampled_rows] / temp[sampled_rows, None]
    probs = torch.softmax(lg, dim=-1)
    sp, si = probs.sort(dim=-1, descending=True)
    cum = sp.cumsum(-1)
    # top-p: keep the smallest prefix whose mass reaches p (always the first token)
    drop = (cum - sp) >= top_p[sampled_rows, None]
    k = top_k[sampled_rows]
    ranks = torch.arange(sp.shape[-1], device=sp.device)[None, :]
    drop |= (k[:, None] > 0) & (ranks >= k[:, None])
    sp = sp.masked_fill(drop, 0.0)
    cdf = sp.double().cumsum(-1)
    target = (u[sampled_rows] * cdf[:, -1])[:, None]
    pick = torch.searchsorted(cdf, target).clamp(max=sp.shape[-1] - 1)
    out = greedy.clone()
    out[sampled_rows] = si.gather(-1, pick).squeeze(-1)
    return out


def _find_stop(text: str, stops) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
