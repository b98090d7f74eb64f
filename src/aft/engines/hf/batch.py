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

Speculative decoding (a row's `spec_tokens` > 0): each step feeds every row its last token followed
by up to `spec_tokens` draft tokens (prompt lookup, drafts.py) and verifies them all in that one
forward pass. A row's token j is drawn as without speculation, from the model's distribution given
the tokens before it and with the row's uniform number j, at each position where the drafts so far
were accepted; a draft token is accepted when it equals the token drawn there. For greedy rows that
is the argmax; for sampled rows it is exactly speculative sampling's rule for a draft that is a
point mass: the draft d is accepted with probability p(d), and on rejection the token drawn is
distributed as p with d removed, renormalised (inverse-CDF sampling with one uniform does both).
So the output follows the model's distribution, and a seed gives the same text with and without
speculation, as far as the logits of the wider verification pass equal a one-token step's (they
can differ in the last bits, see the engine's promise). Each step emits the accepted drafts plus
one token (the correction, or the next token after a fully accepted draft).

Rows accept different numbers of drafts, but share the batch's columns: a step appends `width`
columns for every row (1 + the most drafts any row has); after verification a row's rejected
columns are masked out ("holes": their keys stay in the cache, never attended), and each row's
position ids count only its accepted tokens, so attention and RoPE see exactly the row's sequence.
Holes cost columns (memory and attention time, not correctness); `rebuild` drops them (each row's
attended columns are gathered, right-aligned, before the usual layout), and they are kept few by
drafting only where a suffix of the row occurred before, and by a per-row draft length that grows
by 2 after a fully accepted draft and shrinks by 1 after a rejection (transformers' heuristic for
assisted generation), between 1 and `spec_tokens`. The mask and cache grow when holes fill them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..base import SamplingParams
from .cache import preallocated_cache
from .drafts import NgramIndex
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
    drafts: NgramIndex | None = None  # prompt + tokens, for prompt-lookup drafts (speculative decoding)
    spec_tokens: int = 0  # most drafts a step (0: no speculation)
    draft_len: int = 0  # drafts to propose next step (adapted to the row's acceptance)
    forwards: int = 0  # forward passes that gave this row tokens (its prompt's prefill included)
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # of which accepted

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
        self.drafts = torch.zeros((len(rows), 0), dtype=torch.long, device=dev)  # fed after `tokens`; -1: none
        self.holes = False  # whether rejected drafts left masked columns (see the module's docstring)
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
        """Draw each row's next tokens from `logits`, verifying the drafts fed with them (see the module's
        docstring); the live rows record them (EOS, stop strings, length)."""
        logits = self.logits if self.logits.dim() == 3 else self.logits[:, None]
        R, width, _ = logits.shape
        steps = torch.arange(width, device=logits.device)
        verified = (self.drafts >= 0).sum(-1)  # drafts fed per row
        at = steps[None, :] <= verified[:, None]  # positions whose tokens may be used
        cols = (self.drawn[:, None] + steps).clamp(max=self.uniforms.shape[1] - 1)
        drawn = torch.full((R, width), -1, dtype=torch.long, device=logits.device)
        drawn[at] = sample(logits[at].float(), *(x[:, None].expand(R, width)[at] for x in (self.temp, self.top_p,
                           self.top_k)), self.uniforms.gather(1, cols)[at])
        # drafts accepted: the leading positions where the token drawn equals the draft fed
        accepted = (drawn[:, :-1] == self.drafts).long().cumprod(-1).sum(-1)
        if width > 1:  # the rejected drafts' columns become holes
            holes = steps[None, :] > accepted[:, None]
            self.mask[:, self.length - width:self.length][holes] = 0
            self.holes = True
        self.drawn += accepted + 1
        self.next_pos = self.next_pos + accepted
        self.tokens = drawn.gather(1, accepted[:, None]).squeeze(1)
        for row, toks, n, tried in zip(self.rows, drawn.tolist(), accepted.tolist(), verified.tolist()):
            if row.finish:
                continue
            row.forwards += 1
            if tried:
                row.drafted, row.accepted = row.drafted + tried, row.accepted + n
                row.draft_len = min(row.spec_tokens, row.draft_len + 2) if n == tried else max(1, row.draft_len - 1)
            for tok in toks[:n + 1]:
                self._record(row, tok)
                if row.finish:
                    break

    def _record(self, row: Row, tok: int) -> None:
        """Append one drawn token to a live row, or finish it (EOS, a stop string, its length)."""
        if tok in self.eos_set:
            row.finish = "stop"
            return
        row.tokens.append(tok)
        if row.drafts is not None:
            row.drafts.extend([tok])
        if row.text is not None and row.text.add(row.tokens) and row.params.stop:
            text = self.tok.decode(row.tokens, skip_special_tokens=True)
            cut = find_stop(text, row.params.stop)
            if cut is not None:
                row.cut, row.finish = text[:cut], "stop"
                return
        if len(row.tokens) >= row.max_new:
            row.finish = "length"

    def _squeeze(self) -> None:
        """Drop the holes: each row's attended columns, right-aligned, in the first `length` columns (a copy)."""
        valid = self.mask[:, :self.length] > 0
        index = torch.argsort(valid.to(torch.int8), dim=-1, stable=True)  # masked columns first, order kept
        self.mask[:, :self.length] = valid.gather(1, index).to(self.mask.dtype)
        for layer in self.cache.layers:
            layer.reorder_columns(index)
        self.holes = False

    def rebuild(self, joining: DecodeBatch | None = None, keep: list[int] | None = None) -> None:
        """Rows `keep` (default: the live ones) stay, the live rows of `joining` join; the cache is laid out
        anew (a copy of it: worth it once a quarter of the rows are done, or to let rows join)."""
        keep = [k for k, r in enumerate(self.rows) if not r.finish] if keep is None else keep
        if self.holes:
            self._squeeze()
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
        self.drafts = self.drafts.new_zeros((len(rows), 0))
        for name in ("next_pos", "temp", "top_p", "top_k", "max_new", "drawn", "tokens"):
            mine = getattr(self, name)[kt]
            setattr(self, name, torch.cat([mine, getattr(joining, name)[jt]]) if joining else mine)
        mine = list(self.uniforms[kt]) + (list(joining.uniforms[jt]) if joining else [])
        self.uniforms = _stack_padded(mine, self.mask.device)

    def forward(self, model, cache_kw: str) -> None:
        """One decode step: every row's last token in, with its drafts where it has some; the next-token
        logits of each position out."""
        drafts = [row.drafts.draft(min(row.draft_len, row.max_new - len(row.tokens) - 1))
                  if row.drafts is not None and not row.finish else [] for row in self.rows]
        width = 1 + max(map(len, drafts))
        self.drafts = torch.tensor([d + [-1] * (width - 1 - len(d)) for d in drafts], dtype=torch.long,
                                   device=self.mask.device).view(len(drafts), width - 1)
        ids = torch.cat([self.tokens[:, None], self.drafts.clamp(min=0)], 1)  # where no draft: a token, a hole
        if self.length + width > self.mask.shape[1]:  # holes filled the columns: grow (the cache grows itself)
            self.mask = torch.cat([self.mask, torch.zeros_like(self.mask)], 1)
        self.mask[:, self.length:self.length + width] = 1
        positions = self.next_pos[:, None] + torch.arange(width, device=self.mask.device)
        try:
            out = model(input_ids=ids, attention_mask=self.mask[:, :self.length + width], position_ids=positions,
                        **{cache_kw: self.cache}, use_cache=True)
        except BaseException:
            self.mask[:, self.length:self.length + width] = 0  # the step did not happen (see rebuild)
            raise
        self.length += width
        self.next_pos = self.next_pos + 1
        self.logits = out.logits


def _stack_padded(rows: list[torch.Tensor], device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=1)
    out = torch.zeros((len(rows), width), dtype=torch.float64, device=device)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out
