"""Best-of-N-aware training (aft.bon): the weights against hand-computed cases and exact expectations, the
weighted loss on a tiny model, the CLI modes and on-policy rounds."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from aft.bon import all_wrong, bon_rl_weights, bon_sft_weight, weighted_nll, weighted_rows, weights
from aft.cli import main as cli
from aft.errors import AftError
from aft.train import load_config, run_train, setup_chat_template

from conftest import tiny_llama, write_jsonl

PROMPT = [{"role": "system", "content": "\n"}, {"role": "user", "content": "What is 2 + 3?"}]


# ------------------------------------------------------------------------------------------- the weights
def test_weights_hand_computed():
    # m = 4 samples, the first correct, N = 2
    assert bon_rl_weights([1, 0, 0, 0], 2) == pytest.approx([2.0, -4 / 9, -4 / 9, -4 / 9])
    # (i=0: the 3 others all wrong: W = 2 * C(3,1)/C(3,1) = 2, b = 0; i>0: W = 2 * C(2,1)/C(3,1) = 4/3, b = 1/3)
    assert weights([1, 0, 0, 0], "bon-sft", 2) == pytest.approx([6 / 7, 0, 0, 0])  # 2 * .25 * .75 / (1 - .75^2)
    assert weights([1, 0, 0, 0], "rft", 2) == [1.0, 0.0, 0.0, 0.0]
    assert bon_rl_weights([1, 0, 0, 0], 1) == pytest.approx([1, -1 / 3, -1 / 3, -1 / 3])  # N = 1: RLOO
    assert weights([1, 1, 0], "bon-sft", 1) == pytest.approx([1, 1, 0])  # N = 1: SFT on the correct ones
    for n in (2, 4):  # all right or all wrong: no signal
        assert bon_rl_weights([1, 1, 1], n) == [0.0, 0.0, 0.0]
        assert bon_rl_weights([0, 0, 0], n) == [0.0, 0.0, 0.0]
    # BoN-SFT moves hard prompts (1 of 8 right) more than easy ones (7 of 8 right), and SFT (rft) does not
    assert bon_sft_weight(1, 8, 4) > 0.5 > 0.01 > bon_sft_weight(7, 8, 4)
    with pytest.raises(AftError, match="at least 2 samples"):
        bon_rl_weights([1], 2)


@pytest.mark.parametrize("m,n", [(4, 1), (4, 2), (4, 4), (6, 3)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_bon_rl_gradient_is_unbiased(m, n, p):
    """For a Bernoulli 'policy' d/dp log P(r) = (r - p) / (p (1 - p)): the expected weighted score over every
    outcome of the m samples must be m * dJ/dp = m * N (1-p)^(N-1), exactly (N <= m)."""
    expect = 0.0
    for rs in itertools.product([0, 1], repeat=m):
        prob = math.prod(p if r else 1 - p for r in rs)
        expect += prob * sum(w * (r - p) / (p * (1 - p)) for w, r in zip(bon_rl_weights(list(rs), n), rs))
    assert expect == pytest.approx(m * n * (1 - p) ** (n - 1))


def test_all_wrong_matches_enumeration():
    samples = [0, 1, 0, 0, 1, 0]  # 6 samples, 4 wrong
    for k in range(7):
        subsets = list(itertools.combinations(samples, k))
        assert all_wrong(6, 4, k) == pytest.approx(sum(not any(s) for s in subsets) / len(subsets))


def groups(texts_scores: list[list[tuple[str, float | None]]]) -> list[dict]:
    return [{"id": f"q{i}", "prompt": PROMPT, "file": "c.jsonl", "line": i + 1,
             "candidates": [{"index": j, "text": t, "score": s} for j, (t, s) in enumerate(ts)]}
            for i, ts in enumerate(texts_scores)]


def test_weighted_rows_leave_out_zero_weights_unscored_and_empty():
    g = groups([[("5", 1.0), ("6", 0.0), ("7", None), ("", 0.0)],  # scored: [1, 0, 0] -> N=2 weights
                [("5", 1.0), ("5.", 1.0)]])  # all right: nothing for bon-rl
    rows, stats = weighted_rows(g, "bon-rl", 2)
    assert [r["id"] for r in rows] == ["q0#0", "q0#1"]  # the empty text is left out, unscored ones too
    assert [r["weight"] for r in rows] == pytest.approx(bon_rl_weights([1, 0, 0], 2)[:2])
    assert stats["unscored"] == 1 and stats["empty"] == 1 and stats["prompts_all_correct"] == 1
    assert rows[0]["completion"] == [{"role": "assistant", "content": "5"}] and rows[0]["prompt"] == PROMPT
    with pytest.raises(AftError, match="no candidate has a non-zero weight"):
        weighted_rows(groups([[("6", 0.0), ("7", 0.0)]]), "rft", 2)


# ---------------------------------------------------------------------------------------------- the loss
@pytest.fixture(scope="module")
def tok(tokenizer):
    t = copy.deepcopy(tokenizer)
    setup_chat_template(t)
    return t


def per_sample_nll(model, tok, eot, row) -> torch.Tensor:
    """Mean NLL of one row's target tokens, from a plain forward of that row alone (full logits)."""
    from aft.train import encode_row

    enc = encode_row(tok, row["prompt"], row["completion"], eot)
    ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor([enc["labels"]])
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    tgt = labels[:, 1:]
    mask = tgt != -100
    return -(logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * mask).sum() / mask.sum()


def test_weighted_loss_equals_hand_computed_sum_and_zero_weight_adds_nothing(tok, tmp_path):
    from aft.train import build_trainer, encode_rows

    eot = tok.eos_token_id
    rows = [{"id": str(i), "prompt": PROMPT, "completion": [{"role": "assistant", "content": t}], "weight": w,
             "file": "x", "line": i} for i, (t, w) in enumerate([("5", 0.7), ("It is six.", -0.3),
                                                                  ("2 + 3 = 5, so the answer is 5.", 0.0)])]
    cfg = load_config(None, dict(model="unused", mode="bon-rl", candidates_file="unused", output_dir=str(tmp_path),
                                 per_device_train_batch_size=3, use_peft=False, max_steps=1))
    model = tiny_llama(tok)
    trainer = build_trainer(cfg, model, tok, encode_rows(tok, rows, eot, 512))
    batch = next(iter(trainer.get_train_dataloader()))
    assert sorted(batch["weight"].tolist()) == pytest.approx([-0.3, 0.0, 0.7])
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        hand = sum(r["weight"] * per_sample_nll(model, tok, eot, r) for r in rows) / 3
    assert loss.item() == pytest.approx(hand.item(), rel=1e-4)

    def grads(rows_):
        batch_ = trainer.data_collator(encode_rows(tok, rows_, eot, 512))
        trainer.model.zero_grad()
        trainer.compute_loss(trainer.model, batch_).backward()
        return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])

    # the zero-weight sample contributes nothing: another text in its place leaves loss and gradient alike
    other = [*rows[:2], {**rows[2], "completion": [{"role": "assistant", "content": "no idea at all, sorry"}]}]
    assert torch.allclose(grads(rows), grads(other), atol=1e-6)
    assert weighted_nll(torch.tensor([[-1.0, -3.0]]), torch.tensor([[True, False]]), torch.tensor([2.0])).item() == 2.0


# ------------------------------------------------------------------------------------------------ the CLI
def candidates_file(tmp_path: Path) -> Path:
    rows = [{"id": f"q{i}", "prompt": [{"role": "system", "content": "\n"}, {"role": "user", "content": f"{i} + 1 = ?"}],
             "candidates": [{"index": 0, "text": f"Answer: {i + 1}", "score": 1.0},
                            {"index": 1, "text": f"Answer: {i + 2}", "score": 0.0},
                            {"index": 2, "text": f"{i} plus one is {i + 1}", "score": 1.0 if i % 2 else 0.0},
                            {"index": 3, "text": "I do not know", "score": 0.0}]} for i in range(4)]
    return write_jsonl(tmp_path / "candidates.jsonl", rows)


@pytest.mark.slow  # trains (TRL)
@pytest.mark.parametrize("mode,peft", [("bon-sft", True), ("bon-rl", False)])
def test_cli_bon_modes_train_two_steps(mode, peft, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / mode
    rc = cli(["train", "--model", str(tiny_model_dir), "--mode", mode, "--bon_n", "2", "--candidates_file",
              str(candidates_file(tmp_path)), "-o", str(out), "--max_steps", "2", "--logging_steps", "1",
              "--per_device_train_batch_size", "2", "--no-resume", "--use_peft" if peft else "--no-use_peft"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["mode"] == mode and m["steps"] == 2 and m["bon_n"] == 2 and m["method"] == ("lora" if peft else "full")
    assert (out / ("adapter_config.json" if peft else "model.safetensors")).exists()
    assert m["rows_read"]["prompts"] == 4 and m["rows_read"]["rows"] == m["train_rows"]
    assert (m["rows_read"]["negative_weight"] < 0) == (mode == "bon-rl")
    assert f"{mode} training: 2 steps" in capsys.readouterr().out


def test_cli_rounds_need_a_weighted_mode(tmp_path, capsys):
    rc = cli(["train", "--mode", "sft", "--rounds", "2", "--data", str(tmp_path)])
    assert rc == 2 and "--rounds needs a mode that trains on sampled candidates" in capsys.readouterr().err


@pytest.mark.slow  # samples and trains twice, then reruns
def test_rounds_sample_with_the_trained_adapter_and_resume(tiny_model_dir, tmp_path, caplog):
    from aft.data.build import load_config as data_config, run_build

    data = tmp_path / "data"
    run_build(data_config(None, dict(model=str(tiny_model_dir), task="arith1", n_prompts=3, eval_size=10,
                                     proposals="on_policy", m=3, k=2, max_tokens=8, target="reference",
                                     out=str(data))))
    out = tmp_path / "run"
    cfg = load_config(None, dict(model=str(tiny_model_dir), data=str(data), mode="rft", min_score=0.0, rounds=2,
                                 output_dir=str(out), max_steps=1, per_device_train_batch_size=2))
    res = run_train(cfg)
    # round 2 sampled the same 3 prompts with round 1's adapter, then trained that adapter further
    second = [json.loads(line) for line in (out / "round-2" / "data" / "candidates.jsonl").read_text().splitlines()]
    first = [json.loads(line) for line in (data / "candidates.jsonl").read_text().splitlines()]
    assert [r["id"] for r in second] == [r["id"] for r in first] and all(len(r["candidates"]) == 3 for r in second)
    built = json.loads((out / "round-2" / "data" / "config.json").read_text())["config"]
    assert built["model"] == str(out / "round-1") and built["seed"] == 2025
    assert res.output_dir == out and res.metrics["round"] == [2, 2]
    assert json.loads((out / "round-1" / "metrics.json").read_text())["round"] == [1, 2]
    assert (out / "aft_base_model.txt").read_text().strip() == str(tiny_model_dir)
    # a rerun finds both rounds finished and trains nothing
    again = run_train(cfg)
    assert again.finished_before and again.metrics["steps"] == res.metrics["steps"]


def test_runs_written_before_the_weighted_keys_still_resume_and_count_as_finished(tmp_path):
    """A run of another mode, saved before bon_n / min_score / rounds / candidates_file existed, is the same run."""
    import yaml

    from aft.train import WEIGHTED_KEYS, config_dict, finished_run, run_settings

    cfg = load_config(None, dict(model="m", data=str(tmp_path), mode="sft", output_dir=str(tmp_path)))
    assert not set(WEIGHTED_KEYS) & set(run_settings(cfg))
    assert set(WEIGHTED_KEYS) <= set(run_settings(load_config(None, dict(model="m", data=str(tmp_path),
                                                                         mode="bon-rl"))))
    old = {k: v for k, v in config_dict(cfg).items() if k not in WEIGHTED_KEYS}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    (tmp_path / "metrics.json").write_text('{"steps": 3}')
    assert finished_run(tmp_path, cfg) == {"steps": 3}
    assert finished_run(tmp_path, load_config(None, dict(model="m", data=str(tmp_path), mode="sft",
                                                         output_dir=str(tmp_path), bon_n=8))) is None


@pytest.mark.slow  # 5 optimizer steps on a tiny model through the trainer's loss (~20 s of CPU)
@pytest.mark.parametrize("mode", ["rft", "bon-sft"])
def test_bon_sft_moves_hard_prompts_more_than_easy_ones(mode, tok, tmp_path):
    """Hard prompt: 1 of 8 samples right; easy: 7 of 8. SFT on the correct samples (rft) moves the easy prompt's
    right answer more (7 rows of weight 1 against 1); bon-sft (N=4) the hard one's (weights 0.66 against 0.007)."""
    from aft.train import build_trainer, encode_rows

    hard = [{"role": "user", "content": "What is 47 + 38?"}]
    easy = [{"role": "user", "content": "What is 1 + 1?"}]
    cands = ([(hard, "47 + 38 = 85. Answer: 85", 1)] + [(hard, f"47 + 38 = {80 + i}. Answer: {80 + i}", 0)
                                                         for i in range(7)],
             [(easy, f"1 + 1 = 2{'!' * i}. Answer: 2", 1) for i in range(7)] + [(easy, "1 + 1 = 3. Answer: 3", 0)])
    rows = []
    for group in cands:
        for (p, t, _), w in zip(group, weights([r for _, _, r in group], mode, 4)):
            if w:
                rows.append({"id": str(len(rows)), "prompt": p, "completion": [{"role": "assistant", "content": t}],
                             "weight": w, "file": "x", "line": 1})
    cfg = load_config(None, dict(model="unused", mode=mode, candidates_file="unused", output_dir=str(tmp_path),
                                 use_peft=False, max_steps=1))
    eot = tok.eos_token_id
    trainer = build_trainer(cfg, tiny_llama(tok).train(), tok, encode_rows(tok, rows, eot, 512))
    model = trainer.model
    probes = [{"prompt": hard, "completion": [{"role": "assistant", "content": cands[0][0][1]}]},
              {"prompt": easy, "completion": [{"role": "assistant", "content": cands[1][0][1]}]}]
    with torch.no_grad():
        before = [per_sample_nll(model, tok, eot, r).item() for r in probes]
    batch = trainer.data_collator(encode_rows(tok, rows, eot, 512))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        trainer.compute_loss(model, dict(batch)).backward()
        opt.step()
    with torch.no_grad():
        hard_drop, easy_drop = (b - per_sample_nll(model, tok, eot, r).item() for b, r in zip(before, probes))
    assert (hard_drop > easy_drop) == (mode == "bon-sft")
