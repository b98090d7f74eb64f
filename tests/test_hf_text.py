"""A row's text decoded incrementally (src/aft/engines/hf/text.py) against decoding the whole row each step."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("transformers")

from aft.engines.hf.text import RowText, find_stop  # noqa: E402

TEXTS = ["The answer is 42.\n\nFinal answer: 42", "héllo 🐉 wörld, ünïcode — ok?  spaced   out\tand tabs",
         "a dragon 🐉🐉 learns to bake bread"]


def whole_row_reference(tok, tokens, stops):
    """The former check: decode the whole row after each token; the first step whose text holds a stop."""
    for i in range(1, len(tokens) + 1):
        text = tok.decode(tokens[:i], skip_special_tokens=True)
        cut = find_stop(text, stops)
        if cut is not None:
            return i, text[:cut]
    return None


def incremental(tok, tokens, stops):
    rt = RowText(tok, stops)
    for i in range(1, len(tokens) + 1):
        hit = rt.add(tokens[:i])
        whole = tok.decode(tokens[:i], skip_special_tokens=True)
        # equal, except while a character's bytes are incomplete (then the text waits for the rest)
        assert rt.text == whole if not whole.endswith("\ufffd") else whole.startswith(rt.text)
        if hit:
            text = tok.decode(tokens[:i], skip_special_tokens=True)
            cut = find_stop(text, stops)
            if cut is not None:
                return i, text[:cut]
    return None


def test_incremental_text_equals_the_whole_decode_and_finds_stops_split_across_tokens(tokenizer):
    rnd = random.Random(0)
    checked = split = 0
    for text in TEXTS:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces = [tokenizer.decode(tokens[:i]) for i in range(len(tokens) + 1)]
        for _ in range(25):
            a = rnd.randrange(len(text) - 1)
            stop = text[a:a + rnd.randint(1, 6)]
            stops = (stop, "never appears")
            got, ref = incremental(tokenizer, tokens, stops), whole_row_reference(tokenizer, tokens, stops)
            assert got == ref and ref is not None
            checked += 1
            # the stop's first character and its last came from different tokens
            split += next(i for i, p in enumerate(pieces) if len(p) > text.find(stop)) < ref[0]
    assert checked == 75 and split > 20


def test_random_tokens_decode_like_the_whole_row(tokenizer):
    rnd = random.Random(1)
    tokens = [rnd.randrange(len(tokenizer)) for _ in range(60)]
    assert incremental(tokenizer, tokens, ("zzzzzz-not-there",)) is None  # asserts the text at every step
