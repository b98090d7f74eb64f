"""A row's text as its tokens arrive: incremental decoding and stop strings looked for in the new tail.

Decoding a whole row at every step costs O(length) per token. `RowText` decodes a short window
instead: the tokens since the last text it produced, with one token before them as context (a
tokenizer may render a token differently at the start of a text, e.g. SentencePiece drops the
leading space; the new text is the difference between the window with and without the new tokens).
A character whose bytes are not all generated yet decodes to U+FFFD: it waits for its last byte.
A stop string not in the text before must end in the new text, so only the last `len(new text) +
longest stop - 1` characters are searched.

Streaming (`ready`) sends the text except a tail that could be the start of a stop string: that waits
until it is either a stop (then cut) or not; so the deltas concatenate to the final, cut, text.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class RowText:
    def __init__(self, tokenizer, stops):
        self.tok = tokenizer
        self.stops = [s for s in stops if s]
        self.longest = max(map(len, self.stops), default=0)
        self.text = ""  # the decoded text so far (a character whose bytes are incomplete excluded)
        self._prefix = self._read = 0  # the window is tokens[_prefix:]; tokens[_prefix:_read] are context
        self._seen = 0  # characters of the window's text already in `text`
        self.sent = 0  # characters of `text` streamed so far

    def add(self, tokens: list[int]) -> bool:
        """Take the row's tokens (one more than last time, or more); True when the new tail holds a stop string."""
        window = self.tok.decode(tokens[self._prefix:], skip_special_tokens=True)
        complete = window.rstrip("\ufffd")  # U+FFFD at the end: a character whose bytes are still to come
        new = complete[self._seen:]
        if complete == window:  # whole characters: the next window starts after the context
            self._prefix, self._read = self._read, len(tokens)
            self._seen = len(self.tok.decode(tokens[self._prefix:self._read], skip_special_tokens=True))
        else:
            self._seen = max(self._seen, len(complete))
        if not new:
            return False
        start = max(0, len(self.text) - self.longest + 1)
        self.text += new
        return any(s in self.text[start:] for s in self.stops)


    def ready(self) -> str:
        """The text not streamed yet, less a tail that could be the start of a stop string."""
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        end = len(self.text) - hold
        delta = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta

    def rest(self, final: str) -> str:
        """At the row's end: what of its final text (stop strings cut) is not streamed yet."""
        sent = self.text[:self.sent]
        if not final.startswith(sent):  # not expected: the tokenizer decodes a window unlike the whole row
            log.warning("streamed text %r is not a prefix of the final text %r", sent[-40:], final[-40:])
            return ""
        self.sent = len(final)
        return final[len(sent):]


def find_stop(text: str, stops) -> int | None:
    """Where the first stop string starts in `text`; None when none is in it."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
