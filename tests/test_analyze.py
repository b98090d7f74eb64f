"""aft analyze perplexity on a tiny random-init Llama (conftest's tiny_model_dir)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from aft.analyze import PerplexityConfig, paired_rows, run_perplexity, table, target_nll
from aft.errors import AftError

FIX = Path(__file__).parent / "fixtures" / "train" / "data"


def test_batched_nll_equals_one_row_at_a_time(tiny_model_dir):
    from aft.train import encode_row, load_model

    lm, tok, eot, _ = load_model(str(tiny_model_dir))
    enc = [encode_row(tok, a["prompt"], a["completion"], eot) for a, _ in paired_rows(FIX)[:3]]
    batched = target_nll(lm.eval(), enc, batch_size=3)
    single = [target_nll(lm, [e], batch_size=1)[0] for e in enc]
    for (s1, n1), (s2, n2) in zip(batched, single):
        assert n1 == n2 and math.isclose(s1, s2, rel_tol=1e-4)
    # the same quantity the trainer's loss is: mean cross-entropy of the label tokens
    e = enc[0]
    with torch.no_grad():
        loss = lm(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss.item()
    assert math.isclose(single[0][0] / single[0][1], loss, rel_tol=1e-4)


def test_perplexity_table_and_files(tiny_model_dir, tmp_path):
    from aft.cli import main

    out = tmp_path / "ppl"
    assert main(["analyze", "perplexity", "--model", str(tiny_model_dir), "--data", str(FIX), "--output_dir", str(out),
                 "--max_rows", "4"]) == 0
    s = json.loads((out / "perplexity.json").read_text())
    r = s["results"][0]
    assert r["rows"] == 4 and len(r["per_row"]) == 4
    assert math.isfinite(r["aft_ppl"]) and math.isfinite(r["sft_ppl"]) and r["aft_ppl"] > 1
    assert (out / "perplexity.png").stat().st_size > 0
    assert "AFT ppl" in table(s["results"])


def test_paired_rows_need_same_targets(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "aft.jsonl").write_text((FIX / "aft.jsonl").read_text())
    sft = [json.loads(x) for x in (FIX / "sft.jsonl").read_text().splitlines()]
    sft[1]["completion"][0]["content"] = "something else"
    (d / "sft.jsonl").write_text("".join(json.dumps(x) + "\n" for x in sft))
    with pytest.raises(AftError, match=r"aft\.jsonl:2: row 'r1' has a different target"):
        paired_rows(d)
    with pytest.raises(AftError, match="not a folder"):
        run_perplexity(PerplexityConfig(data=str(tmp_path / "nope")))
