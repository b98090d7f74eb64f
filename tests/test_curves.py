"""aft eval curves: the estimators against brute-force enumeration of k-subsets, and a run on a fake engine."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from aft.evaluate.curves import bon_at_k, majority_at_k, pass_at_k
from aft.evaluate.strategies import best_pick, majority_pick

GSM = Path(__file__).parent / "fixtures" / "eval" / "gsm8k_sample.jsonl"


def subsets(n, k):
    return list(itertools.combinations(range(n), k))


def test_pass_at_k_is_the_mean_over_every_k_subset():
    correct = [False, True, False, False, True, False, False]
    for k in range(1, 8):
        brute = np.mean([any(correct[i] for i in s) for s in subsets(7, k)])
        assert pass_at_k(7, 2, k) == pytest.approx(brute)


def test_bon_at_k_is_best_of_n_over_every_k_subset():
    scores = [0.2, 0.9, None, 0.9, 0.5, 0.1]  # ties and an unscored sample: best_pick's order
    correct = [True, False, True, True, False, True]
    for k in range(1, 7):
        brute = np.mean([correct[s[best_pick([scores[i] for i in s])]] for s in subsets(6, k)])
        assert bon_at_k(scores, correct, k) == pytest.approx(brute)
    oracle = [1.0 if c else 0.0 for c in correct]  # the oracle verifier: BoN@k = pass@k
    assert [bon_at_k(oracle, correct, k) for k in range(1, 7)] == pytest.approx(
        [pass_at_k(6, 4, k) for k in range(1, 7)])


def test_majority_at_k_exact_at_n_and_close_to_enumeration_below():
    votes = ["3", "4", "3", None, "4", "4"]
    correct = [v == "3" for v in votes]
    rng = np.random.default_rng(0)
    assert majority_at_k(votes, correct, 6, 10, rng) == float(correct[majority_pick(votes)]) == 0.0
    brute = np.mean([correct[s[majority_pick([votes[i] for i in s])]] for s in subsets(6, 3)])
    assert majority_at_k(votes, correct, 3, 4000, rng) == pytest.approx(brute, abs=0.03)


def test_eval_run_then_curves_cli(fake_engine, tmp_path, capsys):
    from aft.cli import main
    from aft.evaluate.run import load_config, run_eval

    out = tmp_path / "ev"
    for label in ("a", "b"):
        flags = {"out": str(out), "model": label, "label": label, "tasks": [f"gsm8k:{GSM}"], "limit": 3,
                 "max_tokens": 12, "seeds": [0, 1], "strategies": ["best_of_n:n=8,scorer=verifier"],
                 "n_boot": 50, "num_parameters": 1000, "report": False}
        run_eval(load_config(None, flags), engine=fake_engine)
    assert main(["eval", "curves", str(out), "--ks", "1", "2", "4", "8", "16", "--n_boot", "50"]) == 0
    assert "distinct answers" in capsys.readouterr().out
    got = json.loads((out / "curves.json").read_text())
    assert [(r["label"], r["k"], r["questions"], r["seeds"]) for r in got] == [
        ("a", [1, 2, 4, 8], 3, [0, 1]), ("b", [1, 2, 4, 8], 3, [0, 1])]  # k=16 > the 8 samples: left out
    recs = [json.loads(line) for seed in (0, 1) for line in
            (out / "a" / "gsm8k-gsm8k_sample" / f"bon-n8-oracle.seed{seed}.jsonl").open()]
    # pass@8 = the share of questions x seeds with a correct sample; pass@1 = the share of correct samples
    a = got[0]
    assert a["pass"][3][0] == pytest.approx(np.mean([any(c["score"] == 1.0 for c in r["candidates"]) for r in recs]))
    assert a["pass"][0][0] == pytest.approx(np.mean([c["score"] == 1.0 for r in recs for c in r["candidates"]]))
    assert np.allclose(a["bon"], a["pass"])
    assert 1 <= a["diversity"][0] <= 8
    assert (out / "curves-gsm8k-gsm8k_sample.png").stat().st_size > 1000 and "majority@k" in (
        out / "curves.md").read_text()
    # models <arm>-s<seed> pooled into <arm>: the training seeds are rows of the bootstrap, like run seeds
    for label in ("a", "b"):
        (out / label).rename(out / f"arm-s{ord(label)}")
    assert main(["eval", "curves", str(out), "--ks", "1", "8", "--pool_seeds"]) == 0
    (pooled,) = json.loads((out / "curves-pooled.json").read_text())
    assert pooled["label"] == "arm" and pooled["models"] == ["arm-s97", "arm-s98"] and pooled["seeds"] == [0, 1]
    assert pooled["pass"][1][0] == pytest.approx(a["pass"][3][0])  # a and b drew the same (fake) samples
    # paired differences from a reference: b's (arm-s98's) samples all made wrong, so b - a = -a on every pass@k
    for path in (out / "arm-s98").rglob("bon-n8-oracle.seed*.jsonl"):
        rows = [json.loads(line) for line in path.open()]
        path.write_text("".join(json.dumps({**r, "candidates": [{**c, "score": 0.0} for c in r["candidates"]]})
                                + "\n" for r in rows))
    assert main(["eval", "curves", str(out), "--ks", "1", "8", "--n_boot", "50", "--reference", "arm-s97"]) == 0
    a2, b2 = json.loads((out / "curves.json").read_text())
    assert "vs_reference" not in a2 and b2["vs_reference"]["reference"] == "arm-s97"
    assert [d[0] for d in b2["vs_reference"]["pass"]] == pytest.approx([-a2["pass"][0][0], -a2["pass"][1][0]])
    assert b2["vs_reference"]["diversity"][0] == 0
    assert "Paired differences from **arm-s97**" in (out / "curves.md").read_text()
    assert main(["eval", "curves", str(out), "--reference", "nobody"]) == 2
    assert "--reference nobody: no such model" in capsys.readouterr().err
