"""The fair experiment's pieces: its configs agree with each other, and the report groups training seeds."""

import json
from pathlib import Path

import yaml

from aft.data.build import load_config as data_config
from aft.data.reasoning_gym import split_prompts
from aft.evaluate.report import arms, summarize, load_records, write_report
from aft.evaluate.run import load_config as eval_config
from aft.evaluate.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]


def test_training_proposals_are_sampled_as_evaluation_samples_them():
    data = data_config(str(ROOT / "examples/repro/data.yaml"), {})
    ev = eval_config(str(ROOT / "configs/eval_fair.yaml"), {})
    assert data.sampling == ev.sampling == "configs/sampling_fair.yaml"  # one setting, read by both
    d, e = data.sampling_settings(), ev.sampling_settings()
    assert d.params(4) == e.params(4)  # the training proposals are drawn as P&A's proposals
    assert (e.temperature, e.top_p, e.top_k, e.max_tokens, e.final_layer_temperature) == (0.7, 0.95, 50, 96, 0.0)
    assert data.select == "all" and data.m == data.k == 4  # unfiltered, as P&A's K=4 proposals
    assert data.target == "teacher" and data.teacher == "program" and data.pseudo_aggregation
    task = yaml.safe_load((ROOT / "configs/eval_fair.yaml").read_text())["tasks"][0]
    assert task["config"] == data.task_config and task["rg"] == data.task
    assert (ev.eval_size, ev.pool_size, ev.split_seed) == (data.eval_size, data.pool_size, data.split_seed)


def test_the_split_holds_400_train_and_200_held_out_distinct_questions():
    data = data_config(str(ROOT / "examples/repro/data.yaml"), {})
    train, held = split_prompts(data.task, data.n_prompts, data.eval_size, data.task_config, data.split_seed,
                                data.pool_size)
    assert len(train) == 400 and len(held) == 200
    assert not {t.meta["question"] for t in train} & {h.meta["question"] for h in held}
    spec = yaml.safe_load((ROOT / "configs/eval_fair.yaml").read_text())["tasks"][0]
    assert [it.id for it in load_task(spec, 200).items] == [h.id for h in held]


def _write(out: Path, label: str, strategy: str, correct: list[int]):
    d = out / label / "t"
    d.mkdir(parents=True, exist_ok=True)
    (out / label / "run.json").write_text(json.dumps({"label": label, "model": label, "num_parameters": 10}))
    (d / f"{strategy}.seed0.meta.json").write_text(json.dumps({
        "task": {"kind": "rg", "spec": "rg:x"}, "strategy": {"kind": strategy.split("-")[0], "label": strategy}}))
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "generations": 1, "seconds": 0.1}
    (d / f"{strategy}.seed0.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "correct": bool(c), "extracted": "1", "usage": usage}) + "\n"
        for i, c in enumerate(correct)))


def test_report_groups_training_seeds_and_pairs_arms_with_sft_greedy(tmp_path):
    q = 20
    _write(tmp_path, "base", "greedy", [1] * 5 + [0] * 15)
    _write(tmp_path, "sft-s1", "greedy", [1] * 10 + [0] * 10)
    _write(tmp_path, "sft-s2", "greedy", [1] * 8 + [0] * 12)
    _write(tmp_path, "aft-s1", "greedy", [1] * 12 + [0] * 8)
    _write(tmp_path, "aft-s2", "greedy", [1] * 14 + [0] * 6)
    rows = summarize(load_records(tmp_path), n_boot=200)
    groups = arms(rows)
    assert sorted(groups) == [("aft", "greedy"), ("base", "greedy"), ("sft", "greedy")]
    assert len(groups[("aft", "greedy")]) == 2
    write_report(tmp_path, n_boot=200)
    text = (tmp_path / "report.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("| aft | greedy | 1, 2 |"))
    assert f"{(12 + 14) / (2 * q):.3f}" in line  # mean over both training seeds
    assert f"{(12 + 14 - 10 - 8) / (2 * q):+.3f}" in line  # paired with SFT greedy
    base = next(ln for ln in text.splitlines() if ln.startswith("| base | greedy | - |"))
    assert f"{5 / q - 18 / (2 * q):+.3f}" in base
    # --reference naming an arm: every arm paired with that arm's same strategy
    write_report(tmp_path, n_boot=200, reference="aft")
    text = (tmp_path / "report.md").read_text()
    assert "minus aft, same strategy" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| sft | greedy | 1, 2 |"))
    assert f"{(10 + 8 - 12 - 14) / (2 * q):+.3f}" in line
