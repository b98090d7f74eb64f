"""The transformers engine's own decode loop (src/aft/engines/hf/).

Most tests use a tiny random-init Llama (2 layers, hidden 64) with the embedded
model's real tokenizer, so they take seconds; `test_embedded_model_*` uses the
real SmolLM2-135M-Instruct and is marked `slow`.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from aft.engines.base import Request, SamplingParams  # noqa: E402
from aft.engines.hf import HFEngine  # noqa: E402
from aft.engines.hf.sampling import sample, sample_truncated, uniform_streams  # noqa: E402

QUESTIONS = ["Hi", "What is the capital of France? Answer in one word.",
             "Write a long story about a dragon who learns to bake bread in a small village."]


@pytest.fixture(scope="module")
def engine(tokenizer):  # `tokenizer`: the embedded model's (tests/conftest.py)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=1024, initializer_range=0.3, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return HFEngine(model, tokenizer)


def msgs(q: str) -> list[dict]:
    return [{"role": "system", "content": "\n"}, {"role": "user", "content": q}]


def texts(results) -> list[list[str]]:
    return [[c.text for c in r.completions] for r in results]


def generate_greedy(engine, questions, max_new):
    """Reference: transformers `generate(do_sample=False)` on one left-padded batch."""
    tok = engine.tok
    tok.padding_side = "left"
    enc = tok([engine.render(msgs(q)) for q in questions], return_tensors="pt", padding=True,
              add_special_tokens=False)
    assert len(set(enc["attention_mask"].sum(-1).tolist())) == len(questions)  # really different lengths
    impl = engine.lm.config._attn_implementation
    engine.lm.set_attn_implementation("sdpa")  # plain transformers, not the engine's decode attention
    try:
        with torch.inference_mode():
            out = engine.lm.generate(**enc, do_sample=False, max_new_tokens=max_new, pad_token_id=engine.pad_id)
    finally:
        engine.lm.set_attn_implementation(impl)
    refs = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in engine.eos_ids), len(row))
        refs.append((tok.decode(row[:cut], skip_special_tokens=True), cut))
    return refs


def test_greedy_equals_generate_on_left_padded_prompts(engine):
    refs = generate_greedy(engine, QUESTIONS, 24)
    res = engine.generate([Request(msgs(q), SamplingParams(temperature=0, max_tokens=24)) for q in QUESTIONS])
    got = [(r.completions[0].text, r.completions[0].tokens) for r in res]
    assert got == refs
    assert all(r.prompt_tokens == engine.count_tokens(msgs(q)) for r, q in zip(res, QUESTIONS))


def test_n_samples_share_one_prefill(engine):
    seen = []
    hook = engine.lm.model.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)),
                                                     with_kwargs=True)
    try:
        res = engine.generate([Request(msgs(q), SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=1))
                               for q in QUESTIONS[:2]])
    finally:
        hook.remove()
    assert [len(r.completions) for r in res] == [3, 3]
    assert len(res[0].seeds) == 3 and len(set(res[0].seeds)) == 3
    prefill = [s for s in seen if s[1] > 1]
    assert len(prefill) == 2 and sum(b for b, _ in prefill) == 2  # one prefill row per prompt, not per sample
    assert all(s[1] == 1 for s in seen[2:])  # then one token per step
    assert seen[2][0] == 6  # the 2 x 3 sample rows decode together
    assert len(set(texts(res)[0])) > 1  # the samples are not copies of one another


def test_same_seed_same_texts_different_seed_different(engine):
    def run(seed):
        sp = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_tokens=12, seed=seed)
        return texts(engine.generate([Request(msgs(q), sp) for q in QUESTIONS]))

    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c


def test_unseeded_sampling_varies(engine):
    sp = SamplingParams(n=4, temperature=1.0, max_tokens=8)
    (res,) = engine.generate([Request(msgs(QUESTIONS[0]), sp)])
    assert len({c.text for c in res.completions}) > 1


def test_a_sample_draws_its_own_random_stream_whatever_shares_its_batch():
    """Batch independence by construction, exactly: a sample's uniforms come from its own seed, and
    the sampler decides each row from that row's logits and uniform alone (no cross-row arithmetic)."""
    streams = uniform_streams([11, 4, None, 7], 6, "cpu")
    assert torch.equal(streams[1], uniform_streams([4], 6, "cpu")[0])
    assert torch.equal(streams[3], uniform_streams([7], 6, "cpu")[0])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 500, generator=g) * 3
    temp = torch.tensor([1.0, 0.8, 0.0, 0.7])
    top_p = torch.tensor([1.0, 0.9, 1.0, 1.0])
    top_k = torch.tensor([0, 0, 0, 5])
    u = streams[:, 0]
    together = sample(logits, temp, top_p, top_k, u)
    alone = [sample(logits[i:i + 1], temp[i:i + 1], top_p[i:i + 1], top_k[i:i + 1], u[i:i + 1]).item()
             for i in range(4)]
    assert together.tolist() == alone
    assert together[2].item() == logits[2].argmax().item()


def test_batched_logits_agree_with_alone_up_to_rounding(engine):
    """What a batch can change is only rounding: the matmul kernels (chosen by shape and CPU) may
    round a row differently alone and batched, so a sampled text is promised equal only for the same
    requests in the same batch (test_same_seed_same_texts...), not alone vs batched."""
    seen = []
    hook = engine.lm.register_forward_hook(lambda m, a, out: seen.append(out.logits[:, -1, :].float().clone()))
    q = Request(msgs(QUESTIONS[1]), SamplingParams(n=1, temperature=0, max_tokens=6))
    others = [Request(msgs(QUESTIONS[0]), SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=11)),
              Request(msgs(QUESTIONS[2]), SamplingParams(n=1, temperature=0, max_tokens=6))]
    try:
        (alone,) = engine.generate([q])
        steps_alone = list(seen)
        seen.clear()
        batched = engine.generate([others[0], q, others[1]])[1]
        steps_batched = list(seen)
    finally:
        hook.remove()
    assert alone.completions[0].tokens == 6 and batched.completions[0].tokens == 6
    # decode steps 1..5: the query's row is the one whose logits track its alone run (rows are
    # reordered by prompt length, so find it rather than assume its index)
    for a, b in zip(steps_alone[-5:], steps_batched[-5:]):
        assert b.shape[0] == 5  # really decoded together with the other 4 rows
        err = (b - a[0]).abs().amax(dim=-1).min().item()
        assert err < 1e-4 * a[0].abs().amax().item(), err  # fp32 rounding (2e-5 of logits ~10, measured)


def test_max_tokens_gives_length_and_exactly_that_many_tokens(engine):
    for sp in (SamplingParams(temperature=0, max_tokens=7), SamplingParams(n=3, temperature=1.0, max_tokens=5, seed=2)):
        (res,) = engine.generate([Request(msgs(QUESTIONS[2]), sp)])
        assert [(c.tokens, c.finish_reason) for c in res.completions] == [(sp.max_tokens, "length")] * sp.n
        for c in res.completions:
            assert len(engine.tok(c.text, add_special_tokens=False)["input_ids"]) <= sp.max_tokens + 1


def test_stop_string_cuts_the_text(engine):
    (full,) = engine.generate([Request(msgs(QUESTIONS[1]), SamplingParams(temperature=0, max_tokens=20))])
    text = full.completions[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop and text.find(stop) > 0
    (cut,) = engine.generate([Request(msgs(QUESTIONS[1]), SamplingParams(temperature=0, max_tokens=20, stop=(stop,)))])
    c = cut.completions[0]
    assert c.text == text[:text.find(stop)]
    assert c.finish_reason == "stop"
    assert c.tokens < full.completions[0].tokens


def test_eos_ends_a_sample_with_stop(engine):
    """From the 2nd decode step on, EOS is forced: 2 tokens (prefill's, 1st step's) then "stop"."""
    decode_steps = []
    eos = engine.eos_ids[0]

    def force_eos(module, args, kwargs, output):
        decode_steps.append(kwargs["input_ids"].shape[1] == 1)
        if sum(decode_steps) >= 2:
            output.logits[..., eos] = 1e4
        return output

    hook = engine.lm.register_forward_hook(force_eos, with_kwargs=True)
    try:
        res = engine.generate([Request(msgs(q), SamplingParams(n=2, temperature=0.7, max_tokens=9, seed=1))
                               for q in QUESTIONS[:2]])
    finally:
        hook.remove()
    assert [(c.tokens, c.finish_reason) for r in res for c in r.completions] == [(2, "stop")] * 4


def test_a_prompt_that_does_not_fit_fails_alone(engine):
    """A prompt longer than the context window (1024) gets Result.error; the rest of the batch is answered,
    exactly as without it."""
    long = msgs("word " * 1100)
    sp = SamplingParams(n=2, temperature=0.0, max_tokens=4)
    got = engine.generate([Request(msgs(QUESTIONS[0]), sp), Request(long, sp), Request(msgs(QUESTIONS[1]), sp)])
    assert got[1].error and "context window (1024)" in got[1].error and got[1].completions == []
    assert got[1].prompt_tokens == engine.count_tokens(long) > 1024
    assert got[0].error is None and got[2].error is None
    assert texts([got[0], got[2]]) == texts(engine.generate([Request(msgs(q), sp) for q in QUESTIONS[:2]]))


def test_top_k_1_equals_greedy(engine):
    greedy = texts(engine.generate([Request(msgs(q), SamplingParams(temperature=0, max_tokens=12)) for q in QUESTIONS]))
    top1 = texts(engine.generate([Request(msgs(q), SamplingParams(n=2, temperature=0.7, top_k=1, max_tokens=12, seed=9))
                                  for q in QUESTIONS]))
    assert top1 == [g * 2 for g in greedy]


def _reference_truncated(lg, top_p, top_k, u):
    """Full-sort top-k/top-p inverse-CDF sampling (the straightforward version)."""
    probs = torch.softmax(lg, dim=-1)
    sp, si = probs.sort(dim=-1, descending=True)
    drop = (sp.cumsum(-1) - sp) >= top_p[:, None]
    ranks = torch.arange(sp.shape[-1])[None, :]
    drop |= (top_k[:, None] > 0) & (ranks >= top_k[:, None])
    cdf = sp.masked_fill(drop, 0.0).double().cumsum(-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=sp.shape[-1] - 1)
    return si.gather(-1, pick).squeeze(-1)


def test_truncated_sampling_matches_a_full_sort():
    g = torch.Generator().manual_seed(0)
    V = 5000
    # peaked rows (small nucleus) and flat rows (nucleus far beyond the first topk window)
    lg = torch.cat([torch.randn(6, V, generator=g) * 6, torch.randn(6, V, generator=g) * 0.2])
    top_p = torch.tensor([0.5, 0.9, 0.95, 1.0, 0.99, 0.3] * 2)
    top_k = torch.tensor([0, 0, 0, 40, 3, 0, 0, 0, 2000, 0, 10, 0])
    for _ in range(5):
        u = torch.rand(12, generator=g, dtype=torch.float64)
        assert torch.equal(sample_truncated(lg, top_p, top_k, u), _reference_truncated(lg, top_p, top_k, u))


def test_plain_sampling_follows_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 4000
    lg = probs.log().expand(n, 4)
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ones = torch.ones(n)
    picks = sample(lg.clone(), ones, ones, torch.zeros(n, dtype=torch.long), u)
    freq = torch.bincount(picks, minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.03)
    greedy = sample(lg.clone(), torch.zeros(n), ones, torch.zeros(n, dtype=torch.long), u)
    assert bool((greedy == 3).all())


def test_embedded_model_greedy_equals_generate_and_stops_at_eos(embedded_dir):
    eng = HFEngine.load(str(embedded_dir), dtype="float32", device="cpu")
    qs = ["What is 2+2?", "Write a haiku about the sea."]
    refs = generate_greedy(eng, qs, 32)
    res = eng.generate([Request(msgs(q), SamplingParams(temperature=0, max_tokens=32)) for q in qs])
    assert [(r.completions[0].text, r.completions[0].tokens) for r in res] == refs
    reasons = {r.completions[0].finish_reason for r in res}
    assert reasons <= {"stop", "length"} and all(r.completions[0].tokens > 0 for r in res)
    assert any(r.completions[0].finish_reason == "stop" and r.completions[0].tokens < 32 for r in res)


def test_buffer_layer_behaves_like_dynamic_layer_and_grows():
    from transformers.cache_utils import DynamicLayer

    from aft.engines.hf.cache import buffer_layer_class

    g = torch.Generator().manual_seed(0)
    ref, buf = DynamicLayer(), buffer_layer_class()(capacity=5)
    for n in (3, 1, 1, 1, 1):  # the 6th position is past the capacity: the buffer grows
        k, v = torch.randn(2, 2, n, 8, generator=g), torch.randn(2, 2, n, 8, generator=g)
        rk, rv = ref.update(k, v)
        bk, bv = buf.update(k, v)
        assert torch.equal(rk, bk) and torch.equal(rv, bv)
    idx = torch.tensor([1, 1, 0])
    ref.batch_select_indices(idx)
    buf.batch_select_indices(idx)
    assert torch.equal(ref.keys, buf.keys) and torch.equal(ref.values, buf.values)
    assert buf.get_seq_length() == 7


def test_buffer_layer_rebuild_moves_kept_rows_and_right_aligns_joining_ones():
    from aft.engines.hf.cache import buffer_layer_class

    g = torch.Generator().manual_seed(0)
    buf = buffer_layer_class()(capacity=6)
    old_k, old_v = torch.randn(2, 2, 5, 4, generator=g), torch.randn(2, 2, 5, 4, generator=g)
    buf.update(old_k, old_v)
    new_k, new_v = torch.randn(2, 2, 2, 4, generator=g), torch.randn(2, 2, 2, 4, generator=g)
    # keep old row 1's last 3 positions; join new rows 1, 1, 0; every row ends at position 4 of 8
    buf.rebuild(torch.tensor([1]), 5, 3, 4, 8, [(new_k, new_v, torch.tensor([1, 1, 0]))])
    assert buf.keys.shape == (4, 2, 4, 4) and buf.capacity == 8 and buf.get_seq_length() == 4
    assert torch.equal(buf.keys[0, :, 1:], old_k[1, :, 2:]) and torch.equal(buf.values[0, :, 1:], old_v[1, :, 2:])
    assert torch.equal(buf.keys[1:, :, 2:], new_k[[1, 1, 0]]) and torch.equal(buf.values[1:, :, 2:], new_v[[1, 1, 0]])
    assert not buf.keys[0, :, :1].any() and not buf.keys[1:, :, :2].any()  # left padding: zeros (never NaN)
    k, v = torch.randn(4, 2, 1, 4, generator=g), torch.randn(4, 2, 1, 4, generator=g)
    buf.update(k, v)  # the next step writes position 4 in place
    assert torch.equal(buf.keys[:, :, 4:], k) and buf.get_seq_length() == 5
    # the GPU layout (keys not transposed; meta stands in for the device): the same shapes, contiguous keys
    gpu = buffer_layer_class()(capacity=6)
    gpu.update(old_k.to("meta"), old_v.to("meta"))
    gpu.rebuild(torch.tensor([1], device="meta"), 5, 3, 4, 8,
                [(new_k.to("meta"), new_v.to("meta"), torch.tensor([1, 1, 0], device="meta"))])
    assert gpu.keys.shape == (4, 2, 4, 4) and gpu.keys.stride(-1) == 1 and buf.keys.stride(-1) != 1


@pytest.mark.parametrize("Q", [1, 4])  # one token (a decode step), a few with a mask (speculative verification)
def test_decode_attention_equals_sdpa(Q):
    from aft.engines.hf.attention import decode_attention

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D = 3, 6, 2, 9, 8
    q = torch.randn(B, Q, H, D, generator=g).transpose(1, 2)  # as the model gives it: a transposed view
    kstore = torch.randn(B, Hkv, D, T + 4, generator=g)  # the engine's layout: keys transposed, spare capacity
    k = kstore[..., :T].transpose(-1, -2)
    v = torch.randn(B, Hkv, T + 4, D, generator=g)[:, :, :T]
    mask = torch.ones(B, 1, Q, T, dtype=torch.bool).tril(T - Q)  # causal: query i sees keys up to T - Q + i
    mask[0, ..., :4] = False  # a left-padded row
    mask[1, ..., 5] = False  # a hole (a rejected draft's column)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1), attn_mask=mask)
    got = decode_attention(q, k, v, mask, None)
    assert got.shape == (B, Q, H, D)
    assert torch.allclose(got, ref.transpose(1, 2), atol=1e-5)


def test_grouped_prefill_equals_one_padded_batch(engine):
    seqs = [engine.encode(msgs(q)) for q in QUESTIONS + ["Hi"]]  # two prompts of one length
    L = max(map(len, seqs))
    ids = torch.tensor([[engine.pad_id] * (L - len(p)) + p for p in seqs])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in seqs])
    with torch.inference_mode():
        blocks, place, logits = engine._prefill(seqs)
        ref = engine.lm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                        use_cache=True)
    assert len(blocks) == 3 and all(b.mask is None for b in blocks)  # 3 lengths, no padding in any
    assert place[0][0] == place[3][0] != place[1][0]
    assert torch.allclose(logits, ref.logits[:, -1], atol=1e-4)
    for s, p in enumerate(seqs):  # the prompt's own positions hold the same keys
        b, i = place[s]
        assert torch.allclose(blocks[b].layers[0][0][i], ref.past_key_values.layers[0].keys[s, :, L - len(p):],
                              atol=1e-4)
