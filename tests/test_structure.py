"""One place for each decision: the sampling settings, the engine options, validation declared with the
fields, the run manifest for resume. CLI errors through `aft.cli.main`: exit code 2 and one line."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES, write_jsonl

from aft import cli
from aft.aggregate import plan
from aft.data.build import DataConfig
from aft.data.build import load_config as load_data_config
from aft.engines.args import EngineArgs
from aft.engines.base import Completion, Engine, Result, emit_whole
from aft.evaluate.run import load_config as load_eval_config
from aft.infer import load_config as load_infer_config
from aft.sampling import PRESETS, Sampling

QUESTIONS = [{"id": "a", "prompt": "What is 3 + 4?"}, {"id": "b", "prompt": "Name a colour."}]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, command: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"aft {command}: error: "), err
    return lines[0]


# ------------------------------------------------------------------ sampling
def test_sampling_defaults_are_the_official_ones():
    official = json.loads((FIXTURES / "aft_prompts.json").read_text())["official_config_keys"]["generation_params"]
    s = Sampling()
    assert {k: getattr(s, k) for k in official if k != "n"} == {k: v for k, v in official.items() if k != "n"}
    assert s.top_k == 0 and PRESETS["aft"] == s


def test_each_command_starts_from_its_preset_and_keys_override_it(tmp_path):
    assert load_infer_config(None, {}).sampling_settings() == PRESETS["aft"]
    assert load_eval_config(None, {}).sampling_settings() == PRESETS["eval"]
    data = load_data_config(None, {"task": "arith1", "n_prompts": 2, "target": "best"}).sampling_settings()
    on_policy = PRESETS["on_policy"]
    assert (data.temperature, data.top_k, data.max_tokens) == (on_policy.temperature, on_policy.top_k,
                                                                on_policy.max_tokens) == (1.0, 50, 512)
    # a named preset, then a key on top
    cfg = load_infer_config(None, {"sampling": "eval", "max_tokens": 32})
    assert cfg.sampling_settings() == PRESETS["eval"].replace(max_tokens=32)


def test_data_build_proposals_sample_exactly_as_eval_pa(tmp_path):
    """One setting shared by both: a sampling file read by `aft eval run` and `aft data build`."""
    shared = tmp_path / "sampling.yaml"
    shared.write_text("sampling: eval\nmax_tokens: 96\ntemperature: 0.8\n")
    ev = load_eval_config(None, {"sampling": str(shared)})
    data = load_data_config(None, {"sampling": str(shared), "task": "arith1", "n_prompts": 2, "target": "best",
                                   "m": 4, "k": 4})
    pa_proposals = plan(__import__("aft.aggregate", fromlist=["PAConfig"]).PAConfig(
        n=4, sampling=ev.sampling_settings()))[0].params
    assert data.sampling_settings().params(data.m) == pa_proposals
    assert (pa_proposals.temperature, pa_proposals.top_k, pa_proposals.max_tokens) == (0.8, 50, 96)


def test_official_config_file_still_loads_with_the_official_values():
    cfg = load_infer_config(str(FIXTURES.parent.parent / "configs" / "official_default.yaml"), {})
    s = cfg.sampling_settings()
    assert (cfg.model, cfg.n, cfg.num_aggregation, cfg.seed) == ("linzw/Llama-AFT-On-Policy", 5, 2, 2024)
    assert (s.temperature, s.top_p, s.max_tokens, s.final_layer_temperature, s.final_layer_top_p) == \
        (0.7, 0.95, 4096, 0.7, 1.0)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("yaml_text, flags, message", [
    ("n: true\n", [], "c.yaml: key 'n' expects int, got True"),
    ("n: 0\n", [], "c.yaml: key 'n' must be >= 1, got 0"),
    ("top_p: 1.5\n", [], "c.yaml: key 'top_p' must be in (0, 1], got 1.5"),
    ("temperature: -1\n", [], "c.yaml: key 'temperature' must be >= 0, got -1.0"),
    ("generation_params:\n  final_layer_top_p: 0\n", [], "c.yaml: key 'final_layer_top_p' must be in (0, 1]"),
    ("sampling: nosuch\n", [], "c.yaml: key 'sampling' must be a preset"),
    ("", ["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    ("", ["--timeout", "0"], "--timeout must be > 0, got 0.0"),
    ("", ["--gpu_memory_utilization", "1.5"], "--gpu_memory_utilization must be in (0, 1], got 1.5"),
])
def test_infer_rejects_bad_values_naming_file_and_key(tmp_path, capsys, yaml_text, flags, message):
    (tmp_path / "c.yaml").write_text(yaml_text)
    inp = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    code, _, err = run_cli(capsys, "infer", "--config", tmp_path / "c.yaml", "-i", inp, "-o", tmp_path / "o.jsonl",
                           *flags)
    line = one_line_error(code, err, "infer")
    assert message in line
    assert not (tmp_path / "o.jsonl").exists()


def test_train_max_steps_0_is_rejected(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", tmp_path, "--max_steps", "0", "-o", tmp_path / "t")
    assert "max_steps must be -1 (train num_train_epochs) or >= 1, got 0" in one_line_error(code, err, "train")
    code, _, err = run_cli(capsys, "train", "--data", tmp_path, "--max_steps", "-2", "-o", tmp_path / "t")
    assert "--max_steps must be >= -1, got -2" in one_line_error(code, err, "train")


def test_perplexity_max_rows_0_is_rejected(tmp_path, capsys):
    code, _, err = run_cli(capsys, "analyze", "perplexity", "--data", tmp_path, "--max_rows", "0")
    assert "--max_rows must be >= 1, got 0" in one_line_error(code, err, "analyze")


def test_data_build_and_eval_ranges_name_the_config_file(tmp_path, capsys):
    (tmp_path / "d.yaml").write_text("task: arith1\nn_prompts: 2\ntarget: best\nk: 0\n")
    code, _, err = run_cli(capsys, "data", "build", "--config", tmp_path / "d.yaml", "-o", tmp_path / "d")
    assert "d.yaml: key 'k' must be >= 1, got 0" in one_line_error(code, err, "data")
    (tmp_path / "e.yaml").write_text("limit: 0\n")
    code, _, err = run_cli(capsys, "eval", "run", "--config", tmp_path / "e.yaml", "-o", tmp_path / "e")
    assert "e.yaml: key 'limit' must be >= 1, got 0" in one_line_error(code, err, "eval")


def test_an_id_that_is_a_json_object_is_rejected_with_file_and_line(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "q.jsonl", [{"id": "ok", "prompt": "x"}, {"id": {"a": 1}, "prompt": "y"}])
    code, _, err = run_cli(capsys, "infer", "-i", inp, "-o", tmp_path / "o.jsonl")
    assert f'{inp}:2: field "id": expected a string or a number' in one_line_error(code, err, "infer")


# ------------------------------------------------------------ engine options
@pytest.mark.parametrize("argv", [["infer"], ["data", "build"], ["eval", "run"], ["eval", "export"],
                                  ["eval", "judge"]])
def test_every_engine_command_takes_the_same_engine_options(argv):
    parser = cli.build_parser()
    sub = parser
    for word in argv:
        sub = next(a for a in sub._actions if a.dest in ("command", "data_command", "eval_command")).choices[word]
    flags = {s for a in sub._actions for s in a.option_strings}
    for name in ("--model", "--engine", "--dtype", "--device", "--context_window", "--max_concurrency", "--timeout",
                 "--max_retries", "--tensor_parallel_size", "--data_parallel_size", "--gpu_memory_utilization",
                 "--max_model_len", "--max_batch_rows", "--config"):
        assert name in flags, (argv, name)


def test_engine_options_from_yaml_reach_each_engine_kind():
    args = EngineArgs(dtype="bfloat16", device="cpu", max_batch_rows=8, max_concurrency=3, timeout=5.0,
                      tensor_parallel_size=2, api_key="k")
    assert args.options("hf") == {"dtype": "bfloat16", "device": "cpu", "max_batch_rows": 8, "spec_tokens": 0}
    openai = args.options("openai")
    assert openai["max_concurrency"] == 3 and openai["timeout"] == 5.0 and openai["api_key"] == "k"
    assert "dtype" not in openai
    assert args.options("vllm")["tensor_parallel_size"] == 2


def test_api_key_is_never_written(tmp_path):
    from aft import config as cfglib

    cfg = DataConfig(api_key="secret", task="arith1", n_prompts=1, target="best")
    assert "api_key" not in cfglib.to_dict(cfg) and "api_key" not in cfglib.output_settings(cfg)


def test_eval_export_and_judge_take_a_config(tmp_path, capsys):
    (tmp_path / "x.yaml").write_text("format: alpaca_eval\noutput: out.json\nstrategy: majority:n=2\n")
    code, _, err = run_cli(capsys, "eval", "export", "--config", tmp_path / "x.yaml")
    assert "majority" in one_line_error(code, err, "eval")  # the config was read: its strategy is refused
    (tmp_path / "j.yaml").write_text("judge_model: smollm2-135m\nmax_tokens: 0\n")
    code, _, err = run_cli(capsys, "eval", "judge", tmp_path / "a.jsonl", "--config", tmp_path / "j.yaml")
    assert "j.yaml: key 'max_tokens' must be >= 1, got 0" in one_line_error(code, err, "eval")


# ------------------------------------------------------------------ manifest
def test_output_equal_to_input_is_refused(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    before = inp.read_text()
    code, _, err = run_cli(capsys, "infer", "-i", inp, "-o", inp)
    assert "is both the input and the output" in one_line_error(code, err, "infer")
    assert inp.read_text() == before


def test_an_output_without_a_manifest_is_refused(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    out = write_jsonl(tmp_path / "o.jsonl", [{"id": "a", "response": "written by hand"}])
    code, _, err = run_cli(capsys, "infer", "-i", inp, "-o", out)
    assert "holds records but no o.jsonl.config.json beside it" in one_line_error(code, err, "infer")
    assert len(out.read_text().splitlines()) == 1
    d = tmp_path / "data"
    d.mkdir()
    (d / "aft.jsonl").write_text('{"id": "x"}\n')
    code, _, err = run_cli(capsys, "data", "build", "--task", "arith1", "-n", "2", "--target", "best", "-o", d)
    assert "holds records but no config.json beside it" in one_line_error(code, err, "data")


def test_failed_queries_exit_1_and_are_retried_on_rerun(tmp_path, capsys, tiny_model_dir):
    """A context window too small for any prompt fails every query (exit 1); the rerun with a larger window
    (a run setting: the same output) retries them, and the output ends with each id once, none failed."""
    inp = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "o.jsonl"
    common = ["infer", "-i", inp, "-o", out, "--model", tiny_model_dir, "-k", "2", "-l", "1", "--max_tokens", "4"]
    code, _, err = run_cli(capsys, *common, "--context_window", "4")
    assert code == 1 and "2 queries failed" in err
    assert all("error" in json.loads(line) for line in out.read_text().splitlines())
    # kept and reported when asked: still a failure
    code, outp, err = run_cli(capsys, *common, "--context_window", "4", "--no-retry_failed")
    assert code == 1 and "0 queries done, 2 already done, 2 failed" in outp
    code, outp, err = run_cli(capsys, *common)
    assert code == 0, err
    assert "2 failed before, retried" in outp
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["a", "b"] and not any("error" in r for r in rows)
    # a setting that changes the answers is refused on this output, naming it
    code, _, err = run_cli(capsys, *common[:-2], "--max_tokens", "5")
    assert "different max_tokens (4 -> 5)" in one_line_error(code, err, "infer")


class WindowedEcho(Engine):
    """A deterministic engine with a context window counted in words: every sample answers 'Answer: 1'."""

    name = model = "echo"

    def __init__(self, window: int | None):
        self.context_window = window

    def count_tokens(self, messages):
        return sum(len(m["content"].split()) for m in messages)

    def generate(self, requests, on_text=None):
        return emit_whole([Result([Completion("Answer: 1", 2, "stop") for _ in range(r.params.n)], prompt_tokens=1)
                           for r in requests], on_text)


def test_data_build_retries_failed_prompts(tmp_path):
    from aft.data.build import Resources, run_build

    kw = dict(out=str(tmp_path / "d"), task="arith1", n_prompts=3, eval_size=10, proposals="on_policy", k=2, m=2,
              target="best", scorer="verifier")
    s = run_build(DataConfig(**kw), Resources(proposer=WindowedEcho(3)))
    assert (s.rows, s.failed) == (0, 3)
    skipped = [json.loads(line) for line in (tmp_path / "d" / "skipped.jsonl").read_text().splitlines()]
    assert all(r["failed"] and "context window" in r["reason"] for r in skipped)
    kept = run_build(DataConfig(**kw, retry_failed=False), Resources(proposer=WindowedEcho(None)))
    assert (kept.rows, kept.failed, kept.resumed) == (0, 3, 3)  # reported, not retried
    again = run_build(DataConfig(**kw), Resources(proposer=WindowedEcho(None)))
    assert (again.rows, again.failed, again.retried) == (3, 0, 3)
    assert (tmp_path / "d" / "skipped.jsonl").read_text() == ""


def test_eval_run_retries_failed_questions(tmp_path):
    from aft.evaluate.run import EvalConfig, run_eval

    cfg = EvalConfig(out=str(tmp_path / "e"), model="echo", tasks=["rg:arith1"], strategies=["pa:k=2,l=1"], limit=2,
                     eval_size=10, cache=False, report=False)
    first = run_eval(cfg, engine=WindowedEcho(3))
    assert (first.answered, first.failed) == (2, 2)
    second = run_eval(cfg, engine=WindowedEcho(None))
    assert (second.answered, second.failed, second.retried) == (2, 0, 2)
    records = (tmp_path / "e" / "echo" / "arith1" / "pa-k2-l1.seed0.jsonl").read_text().splitlines()
    assert len(records) == 2 and not any("error" in json.loads(r) for r in records)


def test_an_object_id_is_rejected_by_every_reader(tmp_path):
    from aft.data.sources import RowError, read_items
    from aft.errors import AftError
    from aft.evaluate.tasks import load_gsm8k
    from aft.train import read_rows

    bad = {"a": 1}
    train = write_jsonl(tmp_path / "aft.jsonl", [{"id": bad, "prompt": [{"role": "user", "content": "q"}],
                                                  "completion": [{"role": "assistant", "content": "a"}]}])
    with pytest.raises(AftError, match=rf'{train}:1: field "id": expected a string or a number'):
        read_rows(train)
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"id": [1], "question": "1+1?", "answer": "2 #### 2"}])
    with pytest.raises(AftError, match=rf'{gsm}:1: field "id": expected a string or a number'):
        load_gsm8k(gsm)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": True, "prompt": "q"}, {"id": 7, "prompt": "r"}])
    rows = list(read_items(str(prompts)))
    assert isinstance(rows[0], RowError) and 'field "id": expected a string or a number, got true' in str(rows[0])
    assert rows[1].id == "7"
