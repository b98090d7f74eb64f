"""HFEngine: prompts in, Results out, through the continuous-batching scheduler (or, for a model type
the custom loop has not been checked on, transformers' own `generate`)."""

from __future__ import annotations

import inspect
import logging
import threading

import torch

from ...errors import AftError
from ...loading import load_pretrained
from ..base import (
    CANCELLED,
    CHATML_TEMPLATE,
    Engine,
    OnText,
    Request,
    Result,
    SamplingParams,
    context_error,
    emit_whole,
)
from .attention import register_attention
from .batch import Block
from .fallback import generate_plain
from .scheduler import Job, Scheduler

log = logging.getLogger(__name__)

# Model types whose forward the custom loop has been tested on (tests/test_hf_engine.py): rows at their own
# positions, full-attention layers only. Others run transformers' generate.
CHECKED_MODEL_TYPES = ("llama", "qwen2")


class HFEngine(Engine):
    name = "hf"
    continuous = True  # concurrent generate calls share the decode batch (scheduler.py)

    def __init__(self, model, tokenizer, max_batch_rows: int = 64, display_name: str = "",
                 memory_budget_bytes: int | None = None,
                 fallback_template: str | None = None, spec_tokens: int = 0):
        """`fallback_template`: the chat template used when the tokenizer has none (default ChatML;
        data/onpolicy.py passes one that sends the messages as raw text, for base models).
        `spec_tokens`: draft tokens verified per step by speculative decoding with prompt lookup (0: off;
        see batch.py)."""
        self.lm = model.eval()
        self.tok = tokenizer
        self.has_chat_template = bool(self.tok.chat_template)
        if not self.has_chat_template:
            if fallback_template is None:
                log.warning("tokenizer has no chat template; using ChatML")
            self.tok.chat_template = fallback_template or CHATML_TEMPLATE
        self.device = next(model.parameters()).device
        self.custom = _custom_loop_checked(model.config)
        self.group_prefill = self.device.type == "cpu"  # prefill grouped by length, unpadded (see _prefill)
        if not self.custom:
            log.info("%s: model type %r is not checked with the engine's own decode loop; using transformers' "
                     "generate", display_name or model.config.model_type, model.config.model_type)
            self.continuous = False  # one call at a time (see generate)
        elif self.device.type == "cpu" and getattr(model.config, "_attn_implementation", None) == "sdpa":
            model.set_attn_implementation(register_attention())  # the engine owns its model from here on
        self.max_batch_rows = max_batch_rows
        self.spec_tokens = spec_tokens
        # transformers 5.x renamed forward's past_key_values to cache (the old name warns on every call)
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.memory_budget_bytes = memory_budget_bytes  # None: measured on a GPU (memory_budget)
        # None, or a list that gets, per forward pass, {call id: rows} (decode) or {"prefill": rows} (for tests)
        self.step_log: list[dict] | None = None
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
        self.scheduler = Scheduler(self)
        self._plain_lock = threading.Lock()  # the fallback runs one call at a time

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
        """As the base, plus the weights' dtype (what `--dtype auto` chose), the device and speculation."""
        return {**super().describe(), "dtype": str(self.lm.dtype).removeprefix("torch."), "device": str(self.device),
                "spec_tokens": self.spec_tokens}

    def num_parameters(self) -> int:
        """Every parameter of the model, tied ones counted once."""
        return sum(p.numel() for p in {id(p): p for p in self.lm.parameters()}.values())

    # -------------------------------------------------------------- generation
    def lockstep(self, clients: int):
        return self.scheduler.lockstep(clients) if self.custom else None

    def generate(self, requests: list[Request], on_text: OnText | None = None) -> list[Result]:
        """Answer the requests; `on_text(request_index, completion_index, delta)` gets each completion's text
        as it is generated. May be called from several threads at once: their rows decode together. `on_text`
        runs on the thread driving the decode loop (perhaps another caller's): keep it short, and do not
        call `generate` from it."""
        prompts = [self.encode(r.messages) for r in requests]
        results: list[Result | None] = [None] * len(requests)
        for i, p in enumerate(prompts):  # a prompt that does not fit fails alone
            error = CANCELLED if requests[i].cancelled else context_error(len(p), self.context_window)
            if error:
                results[i] = Result.failed(error, prompt_tokens=len(p))
        if not self.custom:
            with self._plain_lock:
                return emit_whole(generate_plain(self, requests, prompts, results), on_text)
        self.scheduler.run(Job(requests, prompts, results, on_text))
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

    def _prefill(self, seqs: list[list[int]]):
        """Prefill the sequences: their `Block`s of keys and values, each sequence's (block, row in it), and
        each sequence's next-token logits.

        On CPU, sequences of one length are prefilled together, without padding or mask (SDPA's causal fast
        path: 8 aggregator prompts of 5k tokens took 4.7 s padded, 3.3 s grouped); on GPUs as one padded
        batch (SDPA handles the mask well there, and one big batch keeps the device busy).
        """
        from transformers import DynamicCache

        if self.group_prefill:
            groups: dict[int, list[int]] = {}
            for s, ids in enumerate(seqs):
                groups.setdefault(len(ids), []).append(s)
            members = list(groups.values())
        else:
            members = [list(range(len(seqs)))]
        blocks, place, logits = [], [None] * len(seqs), [None] * len(seqs)
        for group in members:
            L = max(len(seqs[s]) for s in group)
            ids = torch.full((len(group), L), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(group), L), dtype=torch.long)
            for i, s in enumerate(group):  # left padding
                ids[i, L - len(seqs[s]):] = torch.tensor(seqs[s])
                mask[i, L - len(seqs[s]):] = 1
            padded = not bool(mask.all())
            part = DynamicCache(config=self.lm.config)
            kw = {"attention_mask": mask.to(self.device),
                  "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(self.device)} if padded else {}
            out = self.lm(input_ids=ids.to(self.device), **kw, **{self.cache_kw: part}, use_cache=True,
                          logits_to_keep=1)
            blocks.append(Block([(layer.keys, layer.values) for layer in part.layers], L,
                                mask.to(self.device) if padded else None))
            for i, s in enumerate(group):
                place[s], logits[s] = (len(blocks) - 1, i), out.logits[i, -1]
        return blocks, place, torch.stack(logits)

    def _max_new(self, sp: SamplingParams, prompt_len: int) -> int:
        room = (self.context_window - prompt_len) if self.context_window else sp.max_tokens
        return max(1, min(sp.max_tokens, room))


def _custom_loop_checked(config) -> bool:
    """Whether the custom decode loop runs this model: a checked model type whose cache layers are all plain
    full-attention ones (the loop lays them out itself)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if config.model_type not in CHECKED_MODEL_TYPES:
        return False
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)

