"""The decode batch: its rows (one per sample), their KV cache and the per-row tensors, as one object.

`Row` is what one sample has produced and whether it is done; `DecodeBatch` holds the rows in batch
order with their cache, attention mask, next positions, sampling parameters and uniform streams,
and keeps them aligned when rows are sampled, stepped and compacted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..base import SamplingParams
from .sampling import sample, uniform_streams
from .text import RowText, find_stop


@dataclass
class Row:
    """One sample: which request it answers, its seed, what it has produced, whether it is done."""

    request: int
    seed: int | None
    params: SamplingParams
    max_new: int  # max_tokens, less where the context window leaves less room
    tokens: list[int] = field(default_factory=list)
    text: RowText | None = None  # incremental text, kept only where stop strings need it
    finish: str = ""  # "" while generating, then "stop" (EOS or a stop string) or "length"
    cut: str | None = None  # the text, when a stop string ended it

    def final_text(self, tokenizer) -> str:
        return self.cut if self.cut is not None else tokenizer.decode(self.tokens, skip_special_tokens=True)


class DecodeBatch:
    """Rows decoding together. Column t of `mask` is cache position t (left padding: 0); the cache holds
    `length` positions and every row's next token goes to column `length`."""

    def __init__(self, rows: list[Row], cache, mask: torch.Tensor, length: int, next_pos: torch.Tensor,
                 logits: torch.Tensor, eos_ids: list[int], tokenizer):
        dev = mask.device
        self.rows, self.cache, self.mask, self.length = rows, cache, mask, length
        self.next_pos, self.logits = next_pos, logits  # logits: each row's next-token logits
        self.tok = tokenizer
        self.eos = torch.tensor(eos_ids, device=dev)
        self.eos_set = set(eos_ids)
        self.temp = torch.tensor([r.params.temperature for r in rows], device=dev, dtype=torch.float32)
        self.top_p = torch.tensor([r.params.top_p for r in rows], device=dev, dtype=torch.float32)
        self.top_k = torch.tensor([r.params.top_k for r in rows], device=dev)
        self.max_new = torch.tensor([r.max_new for r in rows], device=dev)
        self.uniforms = uniform_streams([r.seed for r in rows], max(r.max_new for r in rows), dev)
        self.drawn = torch.zeros(len(rows), dtype=torch.long, device=dev)  # tokens each row has drawn
        self.tokens = torch.zeros(len(rows), dtype=torch.long, device=dev)  # the last tokens drawn
        for r in rows:
            if r.params.stop:
                r.text = RowText(tokenizer, r.params.stop)

    @property
    def live(self) -> int:
        return sum(not r.finish for r in self.rows)

    def sample(self) -> None:
        """Draw each row's next token from `logits` and record it in the live rows (EOS, stop strings, length)."""
        u = self.uniforms.gather(1, self.drawn.clamp(max=self.uniforms.shape[1] - 1)[:, None]).squeeze(1)
        nxt = sample(self.logits.float(), self.temp, self.top_p, self.top_k, u)
        self.drawn += 1
        self.tokens = nxt
        done = (torch.isin(nxt, self.eos) | (self.drawn >= self.max_new)).tolist()
        for row, tok, end in zip(self.rows, nxt.tolist(), done):
            if row.finish:
                continue
            if tok in self.eos_set:
                row.finish = "stop"
                continue
            row.tokens.append(tok)
            if row.text is not None and row.text.add(row.tokens):
                text = self.tok.decode(row.tokens, skip_special_tokens=True)
                cut = find_stop(text, row.params.stop)
                if cut is not None:
                    row.cut, row.finish = text[:cut], "stop"
                    continue
            if end:
                row.finish = "length"

    def compact(self) -> None:
        """Drop the finished rows (a copy of the cache: worth it once a quarter of the rows are done)."""
        keep = [k for k, r in enumerate(self.rows) if not r.finish]
        kt = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(kt)
        self.rows = [self.rows[k] for k in keep]
        for name in ("mask", "next_pos", "temp", "top_p", "top_k", "max_new", "uniforms", "drawn", "tokens"):
            setattr(self, name, getattr(self, name)[kt])

    def forward(self, model, cache_kw: str) -> None:
        """One decode step: every row's last token in, its next-token logits out."""
        self.mask[:, self.length] = 1
        self.length += 1
        out = model(input_ids=self.tokens[:, None], attention_mask=self.mask[:, :self.length],
                    position_ids=self.next_pos[:, None], **{cache_kw: self.cache}, use_cache=True)
        self.next_pos = self.next_pos + 1
        self.logits = out.logits[:, -1, :]
