"""Speculative decoding by prompt lookup (engines/hf/drafts.py, batch.py): the drafts, greedy output equal
to plain greedy, the sampling distribution kept, the statistics recorded."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from aft.engines.base import Request, SamplingParams
from aft.engines.hf import HFEngine
from aft.engines.hf.drafts import NgramIndex
from conftest import tiny_llama


def msgs(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


PROMPTS = ["What is 3 + 4?", "Copy this: the cat sat on the mat, the cat sat on the mat.", "Hi",
           "Summarize: apples are red. Apples are sweet. Apples grow on trees."]


@pytest.fixture(scope="module")
def engines(tokenizer):
    """A plain and a speculative engine over one tiny float32 model."""
    lm = tiny_llama(tokenizer, seed=1)
    return HFEngine(lm, tokenizer, display_name="tiny"), HFEngine(lm, tokenizer, display_name="tiny", spec_tokens=6)


def test_drafts_follow_the_first_occurrence_of_the_longest_suffix():
    idx = NgramIndex([5, 6, 7, 9, 6, 7, 8, 1, 2, 6, 7], max_n=3)
    # (2, 6, 7) never occurred; (6, 7) first occurred at 1-2, followed by 9
    assert idx.draft(3) == [9, 6, 7]
    assert idx.draft(1) == [9] and idx.draft(0) == []
    idx.extend([9, 6])  # ... 6 7 9 6: the 3-gram (7, 9, 6) occurred at 2-4, followed by 7 8 1
    assert idx.draft(3) == [7, 8, 1]
    assert NgramIndex([1, 2, 3], 3).draft(4) == []  # no suffix occurred before
    assert NgramIndex([4, 4, 4], 3).draft(5) == [4]  # in a loop: what follows the first occurrence
    built = NgramIndex([5, 6, 7, 9, 6, 7, 8, 1, 2, 6, 7, 9, 6], 3)
    assert built.follow == idx.follow  # token by token = at once
    copy = idx.copy()
    copy.extend([3])
    assert idx.tokens[-1] == 6 and copy.tokens[-1] == 3  # a copy is its own


def texts(results):
    return [[c.text for c in r.completions] for r in results]


def test_greedy_equals_plain_greedy(engines):
    plain, spec = engines
    sp = SamplingParams(n=1, temperature=0.0, max_tokens=40)
    reqs = [Request(msgs(q), sp) for q in PROMPTS]
    a, b = plain.generate(reqs), spec.generate(reqs)
    assert texts(a) == texts(b)
    assert [[c.tokens for c in r.completions] for r in a] == [[c.tokens for c in r.completions] for r in b]
    assert all(r.speculation is None for r in a)
    for r in b:  # greedy random models fall into loops: drafts get accepted
        s = r.speculation
        assert s.drafted > 0 and 0 < s.accepted <= s.drafted
        assert s.forwards < sum(c.tokens for c in r.completions)  # fewer forward passes than tokens


def test_high_acceptance_when_the_prompt_holds_the_text(engines, tokenizer):
    """The model's own greedy text put in the prompt, then asked for again: the drafts are the text."""
    plain, spec = engines
    sp = SamplingParams(n=1, temperature=0.0, max_tokens=48)
    first = plain.generate([Request(msgs("Tell me about the sea."), sp)])[0].completions[0].text
    # a two-turn chat whose answer was `first`; the same question again gets (mostly) the same answer
    conv = msgs("Tell me about the sea.") + [{"role": "assistant", "content": first}] + msgs("Tell me about the sea.")
    a = plain.generate([Request(conv, sp)])[0]
    b = spec.generate([Request(conv, sp)])[0]
    assert a.completions[0].text == b.completions[0].text
    s, tokens = b.speculation, b.completions[0].tokens
    assert s.accepted / s.drafted > 0.5 and tokens / s.forwards > 2


def test_stops_eos_and_max_tokens_hold_within_a_verified_block(engines):
    plain, spec = engines
    reqs = [Request(msgs(q), SamplingParams(n=2, temperature=0.0, max_tokens=m, stop=stop))
            for q, m, stop in [(PROMPTS[1], 7, ()), (PROMPTS[0], 30, ("the",)), (PROMPTS[3], 25, ("a", "e"))]]
    a, b = plain.generate(reqs), spec.generate(reqs)
    assert texts(a) == texts(b)
    assert [[(c.tokens, c.finish_reason) for c in r.completions] for r in a] == \
           [[(c.tokens, c.finish_reason) for c in r.completions] for r in b]
    assert all(c.tokens <= 7 for c in b[0].completions)


def test_rows_accepting_different_counts_share_a_batch(engines):
    """A row that loops (accepts most drafts) beside rows that sample (accept few): each row's text equals
    its text decoded in a batch without speculation."""
    plain, spec = engines
    reqs = [Request(msgs(PROMPTS[1]), SamplingParams(n=1, temperature=0.0, max_tokens=40)),
            Request(msgs(PROMPTS[0]), SamplingParams(n=3, temperature=1.0, max_tokens=40, seed=7)),
            Request(msgs(PROMPTS[3]), SamplingParams(n=2, temperature=0.0, max_tokens=12))]
    a, b = plain.generate(reqs), spec.generate(reqs)
    assert texts(a) == texts(b)


def _chi2_sf(x: float, k: int) -> float:
    """Upper tail of the chi-square distribution (Wilson-Hilferty normal approximation)."""
    z = ((x / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _homogeneity_p(a: Counter, b: Counter) -> float:
    """Chi-square two-sample test over the categories seen at least 10 times in all (the rest pooled)."""
    total = a + b
    common = [c for c, n in total.items() if n >= 10]
    cats = [(a[c], b[c]) for c in common]
    rest = (sum(a.values()) - sum(x for x, _ in cats), sum(b.values()) - sum(y for _, y in cats))
    if sum(rest) >= 10:
        cats.append(rest)
    na, nb = sum(a.values()), sum(b.values())
    stat = sum((x - (x + y) * na / (na + nb)) ** 2 / ((x + y) * na / (na + nb))
               + (y - (x + y) * nb / (na + nb)) ** 2 / ((x + y) * nb / (na + nb)) for x, y in cats)
    return _chi2_sf(stat, len(cats) - 1)


@pytest.fixture(scope="module")
def peaked(small_tokenizer):
    """A tiny model whose next-token distributions are peaked (its final norm scaled up: it then repeats
    one token), and a prompt whose first "\n" is followed by what it writes after one, so that sampled
    drafts are often accepted and often rejected. Over the small tokenizer's 1024 tokens: each of the 900
    draws below then costs a 50th of a draw over the embedded model's 49152 (the test took 5.8 s)."""
    lm = tiny_llama(small_tokenizer, seed=2)
    with torch.no_grad():
        lm.model.norm.weight.mul_(10.0)
    return (HFEngine(lm, small_tokenizer, display_name="peaked"),
            HFEngine(lm, small_tokenizer, display_name="peaked", spec_tokens=4))


PEAKED_PROMPT = [{"role": "system", "content": "\n" * 8}, {"role": "user", "content": "Go on."}]


def _prefixes(engine, seed: int, samples: int, temperature: float = 1.0) -> tuple[Counter, object]:
    sp = SamplingParams(n=samples, temperature=temperature, top_p=0.9, max_tokens=4, seed=seed)
    res = engine.generate([Request(PEAKED_PROMPT, sp)])[0]
    return Counter(c.text for c in res.completions), res.speculation


def test_sampling_keeps_the_model_distribution(peaked):
    """The first 4 tokens of many samples, speculative against plain (other seeds): the same distribution."""
    plain, spec = peaked
    a, _ = _prefixes(plain, 1, 300)
    b, s = _prefixes(spec, 2, 300)
    assert 0 < s.accepted < s.drafted  # both the accept and the reject path ran, many times
    assert s.accepted > 50 and s.drafted - s.accepted > 50
    assert _homogeneity_p(a, b) > 1e-3
    # the test can tell distributions apart: plain sampling at another temperature fails it
    c, _ = _prefixes(plain, 3, 300, temperature=0.6)
    assert _homogeneity_p(a, c) < 1e-3


@pytest.mark.slow  # the embedded model in float32
def test_embedded_model_greedy_equals_plain_on_an_aggregation_prompt(embedded_dir):
    from aft.prompts import aggregator_messages

    plain = HFEngine.load(str(embedded_dir), dtype="float32", device="cpu")
    spec = HFEngine(plain.lm, plain.tok, display_name="spec", spec_tokens=8)
    query = msgs("Why is the sky blue?")
    proposals = ["The sky is blue because air scatters blue light more than red light (Rayleigh scattering).",
                 "Sunlight hits the air; short blue wavelengths scatter the most, so we see blue everywhere.",
                 "Because of Rayleigh scattering: the molecules in the air scatter blue light more strongly."]
    sp = SamplingParams(n=1, temperature=0.0, max_tokens=64)
    a = plain.generate([Request(aggregator_messages(query, proposals), sp)])[0]
    b = spec.generate([Request(aggregator_messages(query, proposals), sp)])[0]
    assert a.completions[0].text == b.completions[0].text
    assert b.speculation.accepted > 0


def test_infer_records_speculation_in_each_layer_of_the_trace(tmp_path, tiny_model_dir, capsys):
    import json

    from aft.cli import main

    (tmp_path / "q.jsonl").write_text('{"id": "a", "prompt": "Copy: one two three one two three"}\n')
    out = tmp_path / "out.jsonl"
    rc = main(["infer", "-i", str(tmp_path / "q.jsonl"), "-o", str(out), "--model", str(tiny_model_dir), "-k", "2",
               "-l", "1", "--max-tokens", "12", "--spec_tokens", "4", "--dtype", "float32"])
    assert rc == 0, capsys.readouterr().err
    record = json.loads(out.read_text())
    for layer in record["trace"]:
        s = layer["speculation"]
        assert 0 < s["forwards"] <= sum(o["tokens"] for o in layer["outputs"]) + len(layer["outputs"])
        assert 0 <= s["accepted"] <= s["drafted"]
    assert json.loads((tmp_path / "out.jsonl.config.json").read_text())["engine"]["spec_tokens"] == 4
