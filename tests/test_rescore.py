"""`aft eval rescore` and the report's verifier columns, on records written by a deterministic fake engine.

The fake answers a question by echoing the first line of its prompt ("Calculate 4 + 5."), as an
endpoint that repeats its input would, and answers an aggregation prompt with the right value.
"""

import json
import re

from aft.engines.base import Completion, Engine, Result, emit_whole
from aft.evaluate.report import table_rows, write_report
from aft.evaluate.rescore import rescore
from aft.evaluate.run import load_config, run_eval

TASK = {"rg": "basic_arithmetic", "name": "add", "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                                            "max_digits": 1, "operators": ["+"],
                                                            "allow_negation": False, "allow_parentheses": False}}


class EchoEngine(Engine):
    name = "echo"
    model = "echo"

    def generate(self, requests, on_text=None):
        out = []
        for r in requests:
            text = r.messages[-1]["content"]
            if "aggregator" not in r.messages[0]["content"]:  # the question itself: echo its first line
                reply = text.splitlines()[0]
            else:  # an aggregation prompt: solve the question
                a, b = map(int, re.search(r"Calculate (-?\d+) \+ (-?\d+)\.", text).groups())
                reply = f"{a} + {b} = {a + b}\nAnswer: {a + b}"
            out.append(Result([Completion(reply, 5, "stop") for _ in range(r.params.n)], prompt_tokens=10,
                              seeds=[None] * r.params.n))
        return emit_whole(out, on_text)

    def count_tokens(self, messages):
        return 10


def _run(tmp_path):
    flags = {"out": str(tmp_path / "ev"), "model": "echo", "tasks": [TASK], "limit": 6, "eval_size": 20,
             "strategies": ["greedy", "majority:n=2", "best_of_n:n=2,scorer=verifier", "pa:k=2,l=1"],
             "seeds": [0], "n_boot": 50, "report": False}
    run_eval(load_config(None, flags), engine=EchoEngine())
    return tmp_path / "ev"


def test_report_shows_no_answer_share_and_pa_diagnostics(tmp_path):
    out = _run(tmp_path)
    rows = {r["strategy"]: r for r in table_rows(out, n_boot=50)}
    assert rows["greedy"]["accuracy"] == 0.0 and rows["greedy"]["no_answer"] == 1.0  # echoes are not answers
    assert rows["majority-n2"]["no_answer"] == 1.0
    pa = rows["pa-k2-l1"]
    assert pa["accuracy"] == 1.0 and pa["no_answer"] == 0.0
    assert pa["pa_by_correct"] == {"0": {"questions": 6, "accuracy": 1.0}}  # right although no proposal was
    assert pa["final_in_proposals"] == 0.0 and pa["final_new"] == 6 and pa["final_new_correct"] == 6
    write_report(out, n_boot=50)
    text = (out / "report.md").read_text()
    assert "no answer |" in text and "P&A diagnostics" in text and "| 100% |" in text


def test_rescore_restores_verdicts_without_generating(tmp_path):
    out = _run(tmp_path)
    cache = sorted((out / "cache").glob("*.jsonl"))
    cache_before = [p.read_bytes() for p in cache]
    # pretend an older verifier credited the echoes: every record marked correct with the operand as its answer
    for path in (out / "echo" / "add").glob("*.jsonl"):
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        for r in recs:
            r["correct"], r["extracted"] = True, "5"
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    files = {f["file"].split("/")[-1]: f for f in rescore(out)}
    assert files["greedy.seed0.jsonl"] == {"file": "echo/add/greedy.seed0.jsonl", "records": 6, "changed": 6,
                                           "before": 6, "after": 0}
    assert files["pa-k2-l1.seed0.jsonl"]["after"] == 6
    assert [p.read_bytes() for p in cache] == cache_before  # nothing generated
    rows = {r["strategy"]: r for r in table_rows(out, n_boot=50)}
    assert rows["greedy"]["accuracy"] == 0.0 and rows["bon-n2-oracle"]["accuracy"] == 0.0


def test_rescore_cli(tmp_path, capsys):
    from aft.cli import main

    out = _run(tmp_path)
    assert main(["eval", "rescore", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "greedy.seed0.jsonl: 6 records, 0 verdicts or answers changed, correct 0 -> 0" in printed
    assert (out / "report.md").exists()
    assert main(["eval", "rescore", str(tmp_path / "nothing")]) == 2
