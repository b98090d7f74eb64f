"""Draft tokens by prompt lookup: a pure function of a row's token history, knowing nothing of the model.

An aggregation mostly copies spans of its proposals, which are in its prompt. So the next tokens are
guessed by matching the end of the row's history (prompt + generated tokens) against its earlier
text: the longest n-gram (n = max_n down to 1) ending the history that occurred before proposes the
up to k tokens that followed its first occurrence (vLLM's `ngram` speculative method and
transformers' `prompt_lookup_num_tokens` do the same; they search, we keep an index). The first
occurrence, as transformers takes it, has the most text after it: in a loop the latest one would be
followed by the history's last token only.

`NgramIndex` maps every n-gram (n <= max_n) that has a successor to where its first occurrence is
followed, so a lookup is max_n dict probes and each new token adds max_n entries: O(1) per token,
however long the prompt. A prompt's index is built once and copied per sample.
"""

from __future__ import annotations


class NgramIndex:
    def __init__(self, tokens: list[int], max_n: int = 3):
        self.max_n = max_n
        self.tokens: list[int] = []
        self.follow: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its first occurrence
        self.extend(tokens)

    def copy(self) -> "NgramIndex":
        new = NgramIndex.__new__(NgramIndex)
        new.max_n, new.tokens, new.follow = self.max_n, list(self.tokens), dict(self.follow)
        return new

    def extend(self, tokens) -> None:
        """Append tokens: each n-gram that now has a successor for the first time points at it."""
        t, follow = self.tokens, self.follow
        for tok in tokens:
            end = len(t)  # the n-grams ending at end - 1 are followed by the token at `end`
            t.append(tok)
            for n in range(1, min(self.max_n, end) + 1):
                follow.setdefault(tuple(t[end - n:end]), end)

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the first occurrence of the longest n-gram ending the history
        that occurred before; [] when none did (or k is 0)."""
        t = self.tokens
        if k <= 0:
            return []
        for n in range(min(self.max_n, len(t)), 0, -1):
            at = self.follow.get(tuple(t[-n:]))
            if at is not None:
                return t[at:at + k]
        return []
