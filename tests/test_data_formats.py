"""aft data without models: verifier, sources, selection, output format, golden prompt, resume, shards,
bad input, data card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aft.aggregate import Layer, PAConfig, layer_messages
from aft.data.build import DataConfig, merge_shards, run_build
from aft.data.card import compute_card, diversity
from aft.data.reasoning_gym import split_prompts
from aft.data.sources import Proposal, read_items, select
from aft.data.verify import extract_answer, is_correct, parse_number
from aft.engines.base import SamplingParams
from aft.errors import AftError
from aft.io import read_jsonl
from aft.prompts import PromptStyle, aggregator_messages, proposer_messages

FIX = Path(__file__).parent / "fixtures" / "data"
UF = FIX / "ultrafeedback_sample.jsonl"
GENERIC = FIX / "generic_sample.jsonl"


def rows(path) -> list[dict]:
    return [r for _, r in read_jsonl(path)]


def build(tmp_path, name="out", **kw):
    cfg = DataConfig(out=str(tmp_path / name), **kw)
    return run_build(cfg), Path(cfg.out)


# ----------------------------------------------------------------- verifier
@pytest.mark.parametrize("text,answer", [
    ("The answer is 5.", "5"), ("Answer: -17", "-17"), ("so 1,234 apples", "1,234"), ("x = 3/4", "3/4"),
    ("Answer: **42**.", "42"), ("Answer: The result is 3.5 units", "3.5"), ("5 - 3 = 2", "2"),
    ("Answer: -4\nthen 7 more", "-4"), ("It is −3.", "-3"), ("no number here", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_is_correct_numeric_and_reasoning_gym():
    assert parse_number("1,234.50") == parse_number("1234.5")
    assert is_correct("Answer: 1,234", "1234") and is_correct("that is 0.75", "3/4")
    assert not is_correct("Answer: 7", "5") and not is_correct("", "5")
    assert is_correct("so the total is -4", "-4", task="chain_sum")
    assert not is_correct("Answer: 41", "4", task="basic_arithmetic")  # rg's partial credit (0.5) is not enough


def test_reasoning_gym_split_is_disjoint_by_question_text():
    train, evals = split_prompts("arith1", 60, 40)
    assert len(train) == 60 and len(evals) == 40
    assert not {i.meta["question"] for i in train} & {i.meta["question"] for i in evals}
    train2, evals2 = split_prompts("arith1", 10, 40)  # eval does not depend on n_train; train is a prefix
    assert [i.id for i in evals2] == [i.id for i in evals] and [i.id for i in train2] == [i.id for i in train[:10]]
    it = train[0]
    assert it.query[0]["content"].startswith(it.meta["question"]) and it.answer and it.meta["task"]
    with pytest.raises(AftError, match="distinct questions"):
        split_prompts("products1", 100, 50)  # only 100 distinct 1-digit products


# ------------------------------------------------------------------ sources
def test_ultrafeedback_schema_and_fine_grained_scores():
    items = list(read_items(str(UF)))
    assert len(items) == 3 and items[0].query == [{"role": "user", "content": "What is 12 + 30?"}]
    assert [p.score for p in items[0].responses] == [9.0, 3.0, 7.5, 8.0]
    assert items[0].responses[0].model == "model-a" and items[0].answer == "42"
    fine = list(read_items(str(UF), score_field="fine_grained"))
    assert fine[0].responses[1].score == pytest.approx((2 + 4 + 4 + 1) / 4)


def test_generic_schema_messages_and_dict_responses():
    items = list(read_items(str(GENERIC)))
    assert [i.id for i in items] == ["g1", "g2", "g3"]
    assert items[1].query == [{"role": "user", "content": "What is 9 - 4?"}]
    assert [p.text for p in items[1].responses][0] == "9 - 4 = 5" and items[1].responses[2].model == "m3"


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{**r, "responses": [x if isinstance(x, str) else x["text"] for x in r["responses"]]}
            for r in rows(GENERIC)]
    recs = [{"id": r["id"], "prompt": r.get("prompt", "What is 9 - 4?"), "responses": r["responses"],
             "scores": r["scores"], "answer": r.get("answer")} for r in recs]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "g.parquet")
    s, out = build(tmp_path, input_file=str(tmp_path / "g.parquet"), k=2, target="best", scorer="none")
    assert s.rows == 3
    assert [r["id"] for r in rows(out / "aft.jsonl")] == ["g1", "g2", "g3"]
    assert rows(out / "aft.jsonl")[0]["meta"]["source_line"] == 1


def test_selection_modes():
    props = [Proposal(f"t{i}", f"r{i}", s) for i, s in enumerate([0.2, 0.9, None, 0.9, 0.5])]
    assert select(props, 2, "top", 0) == [1, 3]  # ties: the earlier first; kept in original order
    assert select(props, 3, "top", 0) == [1, 3, 4]
    assert select(props, 5, "all", 0) == [0, 1, 2, 3, 4]
    r = select(props, 3, "random", 7)
    assert r == select(props, 3, "random", 7) and len(set(r)) == 3 and r == sorted(r)
    assert any(select(props, 3, "random", s) != r for s in range(1, 6))
    with pytest.raises(AftError, match="fewer than k=6"):
        select(props, 6, "top", 0)


# ------------------------------------------------------ output format + golden
def test_rows_are_trl_prompt_completion_and_sft_matches(tmp_path):
    s, out = build(tmp_path, input_file=str(UF), k=2, target="best", scorer="none")
    aft, sft = rows(out / "aft.jsonl"), rows(out / "sft.jsonl")
    assert s.rows == 3 and [r["id"] for r in aft] == [r["id"] for r in sft]
    first = aft[0]
    # top-2 by overall_score (9.0, 8.0), original order, best as target
    assert first["prompt"] == aggregator_messages([{"role": "user", "content": "What is 12 + 30?"}],
                                                  ["12 + 30 = 42.\nAnswer: 42",
                                                   "Adding twelve and thirty gives forty-two (42)."])
    assert first["completion"] == [{"role": "assistant", "content": "12 + 30 = 42.\nAnswer: 42"}]
    assert first["meta"]["proposals"] == ["r0", "r3"] and first["meta"]["proposal_scores"] == [9.0, 8.0]
    assert first["meta"]["target"]["source_id"] == "r0" and first["meta"]["config_hash"]
    for a, b in zip(aft, sft):
        assert b["prompt"] == proposer_messages(a["prompt"][1:]) and b["completion"] == a["completion"]
    # loadable by datasets as TRL reads it
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(out / "aft.jsonl"), split="train")
    assert ds[0]["prompt"][0]["role"] == "system" and ds[0]["completion"][0]["role"] == "assistant"
    for name in ("config.json", "data_card.md", "data_card.json", "data_card.png"):
        assert (out / name).exists()


@pytest.mark.parametrize("style", ["aft", "moa"])
def test_golden_training_prompt_equals_inference_prompt(tmp_path, style, reference_prompts):
    """The aggregator prompt in aft.jsonl is byte-identical to what inference sends for the same proposals."""
    ex = reference_prompts["example"]
    rec = {"id": "golden", "messages": ex["query"], "responses": ex["proposals"], "scores": [3, 2, 1]}
    (tmp_path / "in.jsonl").write_text(json.dumps(rec) + "\n")
    s, out = build(tmp_path, input_file=str(tmp_path / "in.jsonl"), k=3, select="all", target="best",
                   scorer="none", style=style, no_proposals=True)
    row = rows(out / "aft.jsonl")[0]
    pa = PAConfig(n=3, style=PromptStyle.get(style))
    sent, _, _ = layer_messages(Layer(1, "final", SamplingParams()), ex["query"], ex["proposals"], pa)
    line = (out / "aft.jsonl").read_text().splitlines()[0]
    assert json.loads(line)["prompt"] == sent
    assert json.dumps(row["prompt"], ensure_ascii=False) == json.dumps(sent, ensure_ascii=False)
    if style == "aft":
        assert row["prompt"] == ex["aggregator_messages"]  # the released checkpoints' bytes
        assert rows(out / "sft.jsonl")[0]["prompt"] == ex["proposer_messages"]
    noprop = rows(out / "aft_noprop.jsonl")[0]
    assert noprop["prompt"] == proposer_messages(ex["query"], PromptStyle.get(style))
    assert noprop["completion"] == row["completion"] and noprop["meta"]["variant"] == "no_proposals"


def test_reference_target_and_random_selection(tmp_path):
    s, out = build(tmp_path, input_file=str(GENERIC), k=2, select="random", target="reference", scorer="verifier")
    got = rows(out / "aft.jsonl")
    assert [r["completion"][0]["content"] for r in got] == ["7 * 6 = 42.\nAnswer: 42", "Answer: 5",
                                                            "Hello, it is nice to meet you."]
    assert all(r["meta"]["seeds"]["select"] is not None and len(r["meta"]["proposals"]) == 2 for r in got)
    s2, out2 = build(tmp_path, "again", input_file=str(GENERIC), k=2, select="random", target="reference",
                     scorer="verifier")
    assert [r["meta"]["proposals"] for r in rows(out2 / "aft.jsonl")] == [r["meta"]["proposals"] for r in got]


# ---------------------------------------------------------------- bad input
BAD_ROWS = [
    {"id": "ok1", "prompt": "What is 1 + 1?", "responses": ["2", "3"], "scores": [1, 0]},
    {"id": "noprompt", "responses": ["a", "b"], "scores": [1, 0]},
    {"id": "few", "prompt": "Q?", "responses": ["only one"], "scores": [1]},
    {"id": "nan", "prompt": "Q2?", "responses": ["a", "b"], "scores": ["high", 0]},
    {"id": "ok2", "prompt": "What is 2 + 2?", "responses": ["4", "5"], "scores": [1, 0]},
    {"weird": True},
]


def test_on_error_skip_counts_and_stop_names_file_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in BAD_ROWS))
    s, out = build(tmp_path, input_file=str(bad), k=2, target="best", scorer="none", on_error="skip")
    assert s.rows == 2 and s.input_errors == 4
    card = json.loads((out / "data_card.json").read_text())
    assert card["counts"]["input_errors"] == 4 and card["counts"]["prompts_seen"] == 6
    kinds = card["counts"]["input_error_kinds"]
    assert kinds == {"unknown schema": 1, "fewer than k": 1, "non-numeric score": 1, "no prompt": 1}
    errs = json.loads((out / "input_errors.json").read_text())
    assert errs[0]["where"] == f"{bad}:2" and "query" in errs[0]["message"]
    with pytest.raises(AftError, match=rf"{bad}:2: no usable query"):
        build(tmp_path, "stop", input_file=str(bad), k=2, target="best", scorer="none", on_error="stop")
    with pytest.raises(AftError, match="bad_without_1.jsonl:3: fewer than k=2 responses"):
        build(tmp_path, "stop3", input_file=str(_without(bad, tmp_path, 1)), k=2, target="best", scorer="none",
              on_error="stop")
    with pytest.raises(AftError, match=r":4: field \"scores\[0\]\": 'high' is not a number"):
        build(tmp_path, "stop4", input_file=str(_without(bad, tmp_path, 1, 2)), k=2, target="best", scorer="none",
              on_error="stop")


def _without(path: Path, tmp_path: Path, *drop: int) -> Path:
    """The file with the given 0-based rows blanked (blank lines keep the line numbers)."""
    lines = path.read_text().splitlines()
    out = tmp_path / f"bad_without_{'_'.join(map(str, drop))}.jsonl"
    out.write_text("".join(("" if i in drop else line) + "\n" for i, line in enumerate(lines)))
    return out


def test_unknown_config_key_and_missing_teacher(tmp_path):
    from aft.data.build import load_config

    (tmp_path / "c.yaml").write_text("input_file: x.jsonl\nkk: 3\n")
    with pytest.raises(AftError, match="unknown key 'kk'"):
        load_config(str(tmp_path / "c.yaml"), {})
    with pytest.raises(AftError, match="needs --teacher"):
        load_config(None, {"input_file": "x.jsonl"})


# ------------------------------------------------------------ resume, shards
def test_resume_after_partial_file_with_torn_line(tmp_path):
    kw = dict(input_file=str(UF), k=2, target="best", scorer="none")
    full_s, full = build(tmp_path, "full", **kw)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    lines = (full / "aft.jsonl").read_text().splitlines(keepends=True)
    (part / "aft.jsonl").write_text(lines[0] + lines[1][:40])  # one row done, the second torn by a crash
    s = run_build(DataConfig(out=str(part), **kw))
    assert s.resumed == 1 and s.rows == 2
    assert (part / "aft.jsonl").read_text() == (full / "aft.jsonl").read_text()
    assert (part / "sft.jsonl").read_text() == (full / "sft.jsonl").read_text()  # no duplicate sft rows
    s = run_build(DataConfig(out=str(part), **kw))
    assert s.rows == 0 and s.resumed == 3
    with pytest.raises(AftError, match="different k"):
        run_build(DataConfig(out=str(part), **{**kw, "k": 3}))


def test_shards_concatenate_to_the_unsharded_output(tmp_path):
    kw = dict(input_file=str(GENERIC), k=2, target="best", scorer="verifier", no_proposals=True)
    _, full = build(tmp_path, "full", **kw)
    for i in range(3):
        run_build(DataConfig(out=str(tmp_path / "sharded"), shard=f"{i}/3", **kw))
    with pytest.raises(AftError, match="no shard folders"):
        merge_shards(tmp_path / "nothing")
    card = merge_shards(tmp_path / "sharded")
    for name in ("aft.jsonl", "sft.jsonl", "aft_noprop.jsonl"):
        assert (tmp_path / "sharded" / name).read_text() == (full / name).read_text()
    assert card["counts"] == json.loads((full / "data_card.json").read_text())["counts"]


@pytest.mark.slow  # two aft processes
def test_two_processes_build_shards_then_merge_equals_one_process(tmp_path, capsys):
    """`aft data build --shard i/2` as two processes at once into one --out, then `aft data merge`: the rows of
    the unsharded build (the one data-build test that starts real processes)."""
    import os
    import subprocess
    import sys

    from aft.cli import main

    flags = ["--input_file", str(GENERIC), "--k", "2", "--target", "best", "--scorer", "verifier", "--no_proposals"]
    env = {**os.environ, "AFT_PROGRESS": ""}
    procs = [subprocess.Popen([sys.executable, "-m", "aft", "data", "build", *flags, "--out", str(tmp_path / "sharded"),
                               "--shard", f"{i}/2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    assert sorted(out.split(" rows written")[0].split()[-1] for _, out, _ in results) == ["1", "2"]  # 3 rows split
    assert main(["data", "merge", str(tmp_path / "sharded")]) == 0
    assert "merged into" in capsys.readouterr().out
    assert main(["data", "build", *flags, "--out", str(tmp_path / "one")]) == 0
    for name in ("aft.jsonl", "sft.jsonl", "aft_noprop.jsonl"):
        merged = (tmp_path / "sharded" / name).read_text().splitlines()
        assert len(merged) == 3 and sorted(merged) == sorted((tmp_path / "one" / name).read_text().splitlines())
    card = json.loads((tmp_path / "sharded" / "data_card.json").read_text())
    assert card["counts"] == json.loads((tmp_path / "one" / "data_card.json").read_text())["counts"]


# ------------------------------------------------------------------ card
def test_data_card_numbers_on_a_hand_made_case(tmp_path):
    """Two prompts, verifier scorer, reference targets: every number checked by hand."""
    recs = [
        {"id": "a", "prompt": "What is 2 + 3?", "responses": ["so 5", "it is 6", "6 maybe"], "answer": "5",
         "reference": "2 + 3 = 5"},
        {"id": "b", "prompt": "What is 4 - 6?", "responses": ["-2 it is", "2", "minus 3"], "answer": "-2",
         "reference": "Answer: 2"},
        {"id": "c", "prompt": "What is 1 + 1?", "responses": ["2"], "answer": "2"},  # fewer than k: bad row
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    s, out = build(tmp_path, input_file=str(tmp_path / "in.jsonl"), k=2, select="top", target="reference",
                   scorer="verifier")
    card = json.loads((out / "data_card.json").read_text())
    c = card["counts"]
    assert (c["rows"], c["input_errors"], c["skipped_while_building"], c["prompts_seen"]) == (2, 1, 0, 3)
    # candidates: a -> [1,0,0], b -> [1,0,0]; top-2 keeps indices [0,1] in both
    assert card["scores"]["candidate"]["mean"] == pytest.approx(2 / 6, abs=1e-4)
    assert card["scores"]["proposal"]["mean"] == 0.5 and card["scores"]["best_proposal"]["mean"] == 1.0
    # targets: "2 + 3 = 5" is right (last number 5), "Answer: 2" is wrong (-2)
    assert card["scores"]["target"]["mean"] == 0.5
    tv = card["target_vs_best_proposal"]
    assert (tv["compared"], tv["beats"], tv["ties"], tv["worse"]) == (2, 0, 1, 1)
    # lengths: proposals "so 5"(2) "it is 6"(3) | "-2 it is"(3) "2"(1) -> mean 9/4; targets 5 and 2 words
    assert card["lengths"]["proposal_words"]["mean"] == 2.25 and card["lengths"]["proposal_words"]["max"] == 3
    assert card["lengths"]["target_words"]["mean"] == 3.5
    # diversity: disjoint bigram sets in both rows -> 1.0
    assert card["diversity"]["mean"] == 1.0
    assert card["scores"]["verifier"]["prompts_with_a_correct_candidate"] == 1.0
    md = (out / "data_card.md").read_text()
    assert "| rows written | 2 |" in md and "beats the best proposal in 0" in md
    assert diversity(["a b c", "a b c"]) == 0.0 and diversity(["a b c", "a b d"]) == pytest.approx(1 - 1 / 3)
    assert compute_card([], [], [])["counts"]["rows"] == 0


def test_reasoning_gym_source_rows_keep_question_answer_task(tmp_path):
    from aft.data.build import load_items

    items = load_items(DataConfig(task="arith1", n_prompts=5, eval_size=20, target="reference"))
    evals = load_items(DataConfig(task="arith1", n_prompts=20, eval_size=20, split="eval", target="reference"))
    assert len(items) == 5 and not {i.id for i in items} & {i.id for i in evals}
    assert all(i.meta["question"] and i.answer is not None and i.meta["task"] == "basic_arithmetic" for i in items)


def test_min_target_score_keeps_only_verified_targets(tmp_path):
    s, out = build(tmp_path, input_file=str(GENERIC), k=2, target="reference", scorer="verifier", min_target_score=1.0)
    # g1 and g2 references are right; g3 has no answer (score None) -> dropped
    assert s.rows == 2 and s.skipped == 1
    assert "below min_target_score" in rows(out / "skipped.jsonl")[0]["reason"]
