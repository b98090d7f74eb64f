"""The decode batch: its rows (one per sample), their KV cache and the per-row tensors, as one object.

`Row` is what one sample has produced and whether it is done. `DecodeBatch` holds rows in batch order
with their cache, attention mask, next positions, sampling parameters and uniform streams, and keeps
them aligned when rows draw tokens (`sample`), step (`forward`), leave and join (`rebuild`).

Layout: cache column t holds position t of the batch; every row's last token is at column `length` - 1
(rows are right-aligned, left padding masked out), and each row has its own position ids (its number
of tokens), so a row's attention and RoPE see exactly its own sequence whatever its column offset.
`rebuild` lays the rows out anew: finished rows leave; joining rows (a prefill's `Block`s) are put
right-aligned; the new length is the longest row, so columns no row uses any more are dropped and a
joining prompt longer than the batch shifts the others right.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..base import SamplingParams
from .cache import preallocated_cache
from .sampling import sample, uniform_streams
from .text import RowText, find_stop


@dataclass
class Row:
    """One sample: which call and request it answers, its seed, what it has produced, whether it is done."""

    job: object  # the engine call it belongs to (scheduler.Job)
    request: int  # its request's index in that call
    index: int  # which of the request's n completions
    seed: int | None
    params: SamplingParams
    prompt: list[int]
    max_new: int  # max_tokens, less where the context window leaves less room
    tokens: list[int] = field(default_factory=list)
    text: RowText | None = None  # incremental text, where stop strings or streaming need it
    finish: str = ""  # "" while generating, then "stop" (EOS or a stop string) or "length"
    cut: str | None = None  # the text, when a stop string ended it

    def final_text(self, tokenizer) -> str:
        return self.cut if self.cut is not None else tokenizer.decode(self.tokens, skip_special_tokens=True)


@dataclass
class Block:
    """Sequences prefilled together: each layer's (keys, values), (b, heads, width, dim); `mask` (b, width)
    marks left padding (None: none)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    width: int
    mask: torch.Tensor | None = None


class DecodeBatch:
    """Rows decoding together (see the module's docstring for the layout). A batch made for a prefill's rows
    (`place`: each row's block and row in it) only samples their first tokens, then joins a running one."""

    def __init__(self, rows: list[Row], device, eos_ids: list[int], tokenizer, config=None,
                 next_pos: list[int] | None = None, logits: torch.Tensor | None = None,
                 blocks: list[Block] | None = None, place: list[tuple[int, int]] | None = None):
        dev = torch.device(device)
        self.rows, self.config, self.tok = rows, config, tokenizer
        self.cache, self.length, self.logits = None, 0, logits
        self.blocks, self.place = blocks or [], place or []
        self.eos = torch.tensor(eos_ids, device=dev)
        self.eos_set = set(eos_ids)
        self.mask = torch.zeros((len(rows), 0), dtype=torch.long, device=dev)
        self.next_pos = torch.tensor(next_pos or [0] * len(rows), dtype=torch.long, device=dev)
        self.temp = torch.tensor([r.params.temperature for r in rows], device=dev, dtype=torch.float32)
        self.top_p = torch.tensor([r.params.top_p for r in rows], device=dev, dtype=torch.float32)
        self.top_k = torch.tensor([r.params.top_k for r in rows], dtype=torch.long, device=dev)
        self.max_new = torch.tensor([r.max_new for r in rows], dtype=torch.long, device=dev)
        self.drawn = torch.tensor([len(r.tokens) for r in rows], dtype=torch.long, device=dev)  # tokens drawn
        self.tokens = torch.zeros(len(rows), dtype=torch.long, device=dev)  # each row's last token drawn
        # a row's stream: its own seed, its own max_new draws, whatever else is in the batch
        streams = [uniform_streams([r.seed], r.max_new, dev)[0] for r in rows]
        self.uniforms = _stack_padded(streams, dev)

    @property
    def live(self) -> int:
        return sum(not r.finish for r in self.rows)

    def live_length(self) -> int:
        """The columns the live rows use: the length a rebuild would keep."""
        live = [k for k, r in enumerate(self.rows) if not r.finish]
        return int(self.mask[live, :self.length].sum(-1).max()) if live else 0

    def sample(self) -> None:
        """Draw each row's next token from `logits`; the live rows record it (EOS, stop strings, length)."""
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
            if row.text is not None and row.text.add(row.tokens) and row.params.stop:
                text = self.tok.decode(row.tokens, skip_special_tokens=True)
                cut = find_stop(text, row.params.stop)
                if cut is not None:
                    row.cut, row.finish = text[:cut], "stop"
                    continue
            if end:
                row.finish = "length"

    def rebuild(self, joining: DecodeBatch | None = None, keep: list[int] | None = None) -> None:
        """Rows `keep` (default: the live ones) stay, the live rows of `joining` join; the cache is laid out
        anew (a copy of it: worth it once a quarter of the rows are done, or to let rows join)."""
        keep = [k for k, r in enumerate(self.rows) if not r.finish] if keep is None else keep
        kt = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        join = [k for k, r in enumerate(joining.rows) if not r.finish] if joining else []
        join.sort(key=lambda k: joining.place[k])  # grouped by block, as the cache puts them
        spans = self.mask[kt, :self.length].sum(-1).tolist() if keep else []
        widths = [joining.blocks[joining.place[k][0]].width for k in join]
        rows = [self.rows[k] for k in keep] + [joining.rows[k] for k in join]
        length = max(spans + widths, default=0)
        width = min(self.length, length)  # the old columns still used by a kept row
        capacity = length + max((r.max_new - len(r.tokens) for r in rows), default=0) + 1
        jt = torch.tensor(join, dtype=torch.long, device=self.mask.device)
        mask = self.mask.new_zeros((len(rows), capacity))
        if keep and width:
            mask[:len(keep), length - width:length] = self.mask[kt, self.length - width:self.length]
        joins_by_block: dict[int, list[int]] = {}
        for k in join:
            b, i = joining.place[k]
            joins_by_block.setdefault(b, []).append(i)
        r = len(keep)
        for b, index in joins_by_block.items():
            block, it = joining.blocks[b], torch.tensor(index, dtype=torch.long, device=self.mask.device)
            mask[r:r + len(index), length - block.width:length] = 1 if block.mask is None else block.mask[it]
            r += len(index)
        if rows:
            if self.cache is None:
                self.cache = preallocated_cache(self.config, capacity)
            for li, layer in enumerate(self.cache.layers):
                joins = [(joining.blocks[b].layers[li][0], joining.blocks[b].layers[li][1],
                          torch.tensor(index, dtype=torch.long, device=self.mask.device))
                         for b, index in joins_by_block.items()]
                layer.rebuild(kt, self.length, width, length, capacity, joins)
        else:
            self.cache = None  # an empty batch holds no memory
        self.rows, self.mask, self.length, self.logits = rows, mask, length, None
        for name in ("next_pos", "temp", "top_p", "top_k", "max_new", "drawn", "tokens"):
            mine = getattr(self, name)[kt]
            setattr(self, name, torch.cat([mine, getattr(joining, name)[jt]]) if joining else mine)
        mine = list(self.uniforms[kt]) + (list(joining.uniforms[jt]) if joining else [])
        self.uniforms = _stack_padded(mine, self.mask.device)

    def forward(self, model, cache_kw: str) -> None:
        """One decode step: every row's last token in, its next-token logits out."""
        self.mask[:, self.length] = 1
        try:
            out = model(input_ids=self.tokens[:, None], attention_mask=self.mask[:, :self.length + 1],
                        position_ids=self.next_pos[:, None], **{cache_kw: self.cache}, use_cache=True)
        except BaseException:
            self.mask[:, self.length] = 0  # the step did not happen (the cache's lengths: see rebuild)
            raise
        self.length += 1
        self.next_pos = self.next_pos + 1
        self.logits = out.logits[:, -1, :]


def _stack_padded(rows: list[torch.Tensor], device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=1)
    out = torch.zeros((len(rows), width), dtype=torch.float64, device=device)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out
