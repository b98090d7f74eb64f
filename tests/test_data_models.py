"""aft data with tiny random-init models: on-policy (chat template and base model), reward model, LLM judge,
teacher targets, no-proposals, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aft.data.build import DataConfig, Resources, run_build
from aft.data.onpolicy import base_engine, demonstration_prompt, load_demonstrations
from aft.data.scorers import JudgeScorer, RewardModelScorer, Scorer, VerifierScorer, parse_rating
from aft.engines.base import Completion, Engine, Request, Result, SamplingParams, derive_seed, emit_whole
from aft.io import read_jsonl
from aft.prompts import aggregator_messages, proposer_messages

from conftest import tiny_llama

FIX = Path(__file__).parent / "fixtures" / "data"
UF = FIX / "ultrafeedback_sample.jsonl"


def rows(path) -> list[dict]:
    return [r for _, r in read_jsonl(path)]


ONPOLICY = dict(task="arith1", n_prompts=2, eval_size=10, proposals="on_policy", m=3, k=2, max_tokens=6,
                teacher_max_tokens=6, batch_size=2)


def test_on_policy_chat_model_verifier_best(tmp_path, tiny_engine):
    # the random model never stops within 6 tokens: every candidate is cut, so none may be the target
    best = run_build(DataConfig(out=str(tmp_path / "b"), target="best", scorer="verifier", **ONPOLICY),
                     Resources(proposer=tiny_engine))
    assert best.rows == 0 and best.skipped == 2
    assert {r["reason"] for r in rows(tmp_path / "b" / "skipped.jsonl")} == {
        "target best needs a scored proposal not cut at max_tokens"}
    cfg = DataConfig(out=str(tmp_path / "o"), target="reference", scorer="verifier", **ONPOLICY)
    s = run_build(cfg, Resources(proposer=tiny_engine))
    got = rows(tmp_path / "o" / "aft.jsonl")
    assert s.rows == 2 and len(got) == 2 and s.generated_tokens > 0
    r = got[0]
    m = r["meta"]
    assert m["proposal_source"] == "on_policy" and m["proposal_prompt"] == "chat" and len(m["candidates"]) == 3
    assert m["task"] == "basic_arithmetic" and m["question"] and m["answer"] is not None
    # the candidates are what the model samples from the inference proposer prompt with the recorded seeds
    query = [{"role": "user", "content": r["prompt"][1]["content"]}]
    seed = derive_seed(cfg.seed, r["id"], "propose")
    assert m["seeds"]["proposals"] == seed
    res = tiny_engine.generate([Request(proposer_messages(query), SamplingParams(
        n=3, temperature=1.0, top_p=0.95, top_k=50, max_tokens=6, seed=seed))])[0]
    texts = [c.text for c in res.completions]
    kept = [texts[int(i[1:])] for i in m["proposals"]]
    assert r["prompt"] == aggregator_messages(query, kept)
    assert r["completion"][0]["content"] == "Answer: " + m["answer"]  # the reference target
    assert [c["seed"] for c in m["candidates"]] == res.seeds
    assert all(c["score"] in (0.0, 1.0) for c in m["candidates"])
    assert json.loads((tmp_path / "o" / "data_card.json").read_text())["scores"]["verifier"]
    # candidates.jsonl keeps all M candidates in sample order, for kept rows and for skipped prompts alike
    cand = {c["id"]: c for c in rows(tmp_path / "o" / "candidates.jsonl")}
    assert list(cand) == [g["id"] for g in got]
    c = cand[r["id"]]
    assert c["prompt"] == proposer_messages(query)
    assert [x["text"] for x in c["candidates"]] == texts and [x["index"] for x in c["candidates"]] == [0, 1, 2]
    assert [x["score"] for x in c["candidates"]] == [x["score"] for x in m["candidates"]]
    assert [x["finish_reason"] for x in c["candidates"]] == [x.finish_reason for x in res.completions]
    assert c["meta"]["answer"] == m["answer"] and c["meta"]["score_source"] == "verifier"
    skipped = rows(tmp_path / "b" / "candidates.jsonl")
    assert len(skipped) == 2 and all(len(x["candidates"]) == 3 for x in skipped)


def test_on_policy_base_model_gets_demonstrations_prompt(tmp_path, small_tokenizer):
    import copy

    tok = copy.deepcopy(small_tokenizer)
    tok.chat_template = None  # a base model
    eng = base_engine(tiny_llama(tok, seed=1), tok, display_name="tiny-base")
    assert not eng.has_chat_template
    demos = load_demonstrations()
    query = [{"role": "user", "content": "Calculate 2 + 2."}]
    text = demonstration_prompt(query, demos)
    assert eng.render([{"role": "user", "content": text}]) == text  # sent as raw text, no chat markup
    assert text.endswith("# Query:\nCalculate 2 + 2.\n\n# Answer:\n") and demos[0]["query"] in text
    s = run_build(DataConfig(out=str(tmp_path / "o"), target="reference", scorer="verifier", **ONPOLICY),
                  Resources(proposer=eng))
    got = rows(tmp_path / "o" / "aft.jsonl")
    assert s.rows == 2 and got[0]["meta"]["proposal_prompt"] == "demonstrations"
    assert not any("# Query:" in p for r in got for p in r["prompt"][0]["content"].split("\n1. ")[1:])
    # a demonstrations file of one's own
    (tmp_path / "demos.jsonl").write_text(json.dumps({"query": "Say hi.", "response": "Hi!"}) + "\n")
    assert "Say hi." in demonstration_prompt(query, load_demonstrations(tmp_path / "demos.jsonl"))


def test_teacher_target_sees_exactly_the_aggregator_messages(tmp_path, tiny_engine):
    cfg = DataConfig(out=str(tmp_path / "o"), input_file=str(UF), n_prompts=2, k=2, target="teacher", teacher="tiny",
                     teacher_max_tokens=8, teacher_temperature=1.0, scorer="none", no_proposals=True)
    s = run_build(cfg, Resources(teacher=tiny_engine))
    aft, noprop = rows(tmp_path / "o" / "aft.jsonl"), rows(tmp_path / "o" / "aft_noprop.jsonl")
    assert s.rows == 2
    for r in aft:
        seed = r["meta"]["seeds"]["teacher"]
        assert seed == derive_seed(cfg.seed, r["id"], "teacher")
        res = tiny_engine.generate([Request(r["prompt"], SamplingParams(n=1, temperature=1.0, max_tokens=8,
                                                                         seed=seed))])[0]
        assert r["completion"][0]["content"] == res.completions[0].text.strip()
        assert r["meta"]["target"]["mode"] == "teacher" and r["meta"]["teacher"] == "tiny"
    assert [n["completion"] for n in noprop] == [r["completion"] for r in aft]
    assert noprop[0]["prompt"] == proposer_messages([{"role": "user", "content": "What is 12 + 30?"}])


def test_teacher_on_policy_scored_target(tmp_path, tiny_engine):
    """On-policy + verifier + teacher (the Show setting, tiny): the target is scored for the card."""
    s = run_build(DataConfig(out=str(tmp_path / "o"), target="teacher", teacher="tiny", scorer="verifier",
                             teacher_temperature=1.0, **ONPOLICY), Resources(proposer=tiny_engine, teacher=tiny_engine))
    card = s.card
    assert card["target_vs_best_proposal"]["compared"] == 2 and card["scores"]["target"]["n"] == 2


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, small_tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(small_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                      pad_token_id=small_tokenizer.pad_token_id)
    out = tmp_path_factory.mktemp("rm")
    LlamaForSequenceClassification(cfg).save_pretrained(out)
    small_tokenizer.save_pretrained(out)
    return out


def test_reward_model_scorer_selects_top_k(tmp_path, reward_model_dir):
    cfg = DataConfig(out=str(tmp_path / "o"), input_file=str(UF), k=2, target="best", scorer="reward_model",
                     reward_model=str(reward_model_dir))
    s = run_build(cfg)  # loaded from the folder, as the CLI does
    rm = RewardModelScorer.load(str(reward_model_dir))
    for r in rows(tmp_path / "o" / "aft.jsonl"):
        src = next(x for _, x in read_jsonl(UF) if x["instruction"] == r["prompt"][1]["content"])
        item_query = [{"role": "user", "content": src["instruction"]}]
        from aft.data.sources import Item

        direct = rm.score([Item("x", item_query)], [[c["response"] for c in src["completions"]]])[0]
        got = [c["score"] for c in r["meta"]["candidates"]]
        assert got == pytest.approx(direct, abs=1e-4)
        top2 = sorted(sorted(range(4), key=lambda i: -direct[i])[:2])
        assert r["meta"]["proposals"] == [f"r{i}" for i in top2]
        assert r["meta"]["candidates"][0]["dataset_score"] is not None  # the dataset's score kept
    assert s.rows == 3
    text = rm.render([{"role": "user", "content": "q"}], "a")
    assert "<|im_start|>assistant\na" in text  # its own chat template


def test_judge_scorer_through_an_engine(tmp_path, tiny_engine):
    assert parse_rating("fine. Rating: [[7]]") == 7.0 and parse_rating("Rating: 4") == 4.0
    assert parse_rating("[[11]]") is None and parse_rating("no idea") is None
    judge = JudgeScorer(tiny_engine, max_tokens=6)
    from aft.data.sources import Item

    scores = judge.score([Item("a", [{"role": "user", "content": "2+2?"}])], [["4", "5"]])
    assert len(scores) == 1 and len(scores[0]) == 2
    msgs = judge.messages([{"role": "user", "content": "2+2?"}], "4")
    assert "[Question]\n2+2?" in msgs[1]["content"] and "[[" in msgs[1]["content"]
    # through the builder: a random model gives no rating, so the dataset's scores stay in charge
    s = run_build(DataConfig(out=str(tmp_path / "o"), input_file=str(UF), n_prompts=1, k=2, target="best",
                             scorer="judge", judge_model="tiny", judge_max_tokens=6), Resources(scorer=judge))
    got = rows(tmp_path / "o" / "aft.jsonl")
    assert s.rows == 1 and got[0]["meta"]["scorer"] == "judge" and got[0]["meta"]["proposals"] == ["r0", "r3"]


class RaisesOn(Scorer):
    """A scorer that raises on one prompt (as a reward model on an input it cannot take)."""

    name = "fragile"

    def score(self, items, texts):
        if any("12 + 30" in it.query[-1]["content"] for it in items):
            raise ValueError("cannot score this one")
        return [[float(len(t)) for t in ts] for ts in texts]


class RejectsColor(Engine):
    """A deterministic teacher that rejects the aggregator prompt about colors (as a server's 400)."""

    model = "teacher"

    def generate(self, requests, on_text=None):
        return emit_whole([Result.failed("rejected (400): no colors") if "color" in str(r.messages) else
                           Result([Completion("An aggregation.", 3, "stop")], prompt_tokens=9) for r in requests],
                          on_text)


def test_a_scorer_or_teacher_failure_fails_only_its_prompt(tmp_path):
    cfg = DataConfig(out=str(tmp_path / "o"), input_file=str(UF), k=2, target="teacher", teacher="t",
                     scorer="judge", judge_model="j")
    s = run_build(cfg, Resources(teacher=RejectsColor(), scorer=RaisesOn()))
    got = rows(tmp_path / "o" / "aft.jsonl")
    skipped = {r["id"]: r["reason"] for r in rows(tmp_path / "o" / "skipped.jsonl")}
    assert s.rows == 1 and s.skipped == 2 and "emails" in got[0]["prompt"][-1]["content"]
    assert got[0]["meta"]["target"]["score"] == len("An aggregation.")
    reasons = sorted(skipped.values())
    assert reasons == ["scorer fragile failed: ValueError: cannot score this one",
                       "teacher failed: rejected (400): no colors"]


def test_verifier_scorer_uses_reasoning_gym_entry():
    from aft.data.reasoning_gym import split_prompts

    train, _ = split_prompts("arith1", 2, 5)
    it = train[0]
    sc = VerifierScorer().score([it], [[f"so it is {it.answer}", "Answer: 99"]])
    assert sc == [[1.0, 0.0]]


def test_cli_build_on_policy_with_teacher(tmp_path, tiny_model_dir, capsys):
    from aft.cli import main

    (tmp_path / "c.yaml").write_text(
        f"task: basic_arithmetic\ntask_config: {{min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1, "
        f"operators: ['+', '-']}}\nn_prompts: 2\neval_size: 10\nproposals: on_policy\nm: 2\nk: 2\n"
        f"max_tokens: 5\nmodel: {tiny_model_dir}\nteacher: {tiny_model_dir}\nteacher_max_tokens: 5\n"
        f"teacher_temperature: 1.0\nscorer: verifier\ndtype: float32\n")
    out = tmp_path / "o"
    assert main(["data", "build", "--config", str(tmp_path / "c.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 rows written" in printed and "data card: 2 rows" in printed
    assert len(rows(out / "aft.jsonl")) == 2 and len(rows(out / "sft.jsonl")) == 2
    conf = json.loads((out / "config.json").read_text())
    assert conf["config"]["k"] == 2 and conf["teacher"]["model"] == str(tiny_model_dir)
    assert main(["data", "build", "--config", str(tmp_path / "c.yaml"), "--out", str(out)]) == 0  # resume: no-op
    assert "0 rows written, 2 already done" in capsys.readouterr().out
    assert main(["data", "build", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--k", "1"]) == 2
    assert "different k" in capsys.readouterr().err


def test_teacher_behind_an_openai_compatible_server(tmp_path, tiny_engine):
    """`teacher: http://host/v1` goes through the OpenAI engine to a real server on 127.0.0.1."""
    from aft.serve import Limits, start_server

    server, url = start_server(tiny_engine, limits=Limits(max_batch=1))  # one at a time, as called directly below
    try:
        cfg = DataConfig(out=str(tmp_path / "o"), input_file=str(UF), n_prompts=2, k=2, target="teacher",
                         teacher=url, teacher_max_tokens=8, teacher_temperature=1.0, scorer="none")
        assert run_build(cfg).rows == 2
    finally:
        server.close()
    for r in rows(tmp_path / "o" / "aft.jsonl"):
        seed = r["meta"]["seeds"]["teacher"]
        direct = tiny_engine.generate([Request(r["prompt"], SamplingParams(n=1, temperature=1.0, max_tokens=8,
                                                                            seed=seed))])[0]
        assert r["completion"][0]["content"] == direct.completions[0].text.strip()
        assert r["meta"]["teacher"] == "tiny"  # the served model's name
