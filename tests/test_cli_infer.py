"""`aft infer` as a user runs it: through `aft.cli.main`, real files, real models; one real process (kill -9)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import tiny_llama, write_jsonl

QUESTIONS = [{"id": "add", "query": [{"role": "user", "content": "What is 3 + 4?"}]},
             {"id": "sky", "prompt": "What color is the sky?"}]


def aft(capsys, *args):
    """`aft ARGS` in this process: (exit code, stdout, stderr)."""
    from aft.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_embedded_model_end_to_end_and_resume(tmp_path, embedded_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inp = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "out.jsonl"
    rc, stdout, stderr = aft(capsys, "infer", "--input_file", inp, "--output_file", out, "-k", 2, "-l", 2,
                             "--max-tokens", 24)
    assert rc == 0, stderr
    assert f"answers and full traces: {out}" in stdout
    got = rows(out)
    assert [g["id"] for g in got] == ["add", "sky"]
    for g in got:
        assert g["response"].strip()
        assert [t["role"] for t in g["trace"]] == ["propose", "aggregate", "final"]
        assert [len(t["outputs"]) for t in g["trace"]] == [2, 2, 1]
        assert all(0 < o["tokens"] <= 24 for t in g["trace"] for o in t["outputs"])
        assert g["response"] == g["trace"][-1]["outputs"][0]["text"]
    assert got[0]["query"] == QUESTIONS[0]["query"]  # the input record is kept
    meta = json.loads((tmp_path / "out.jsonl.config.json").read_text())
    assert meta["config"]["n"] == 2 and meta["engine"]["engine"] == "hf"
    # the same command again: nothing to do, nothing lost
    rc, stdout, _ = aft(capsys, "infer", "--input_file", inp, "--output_file", out, "-k", 2, "-l", 2,
                        "--max-tokens", 24)
    assert rc == 0 and "0 queries done, 2 already done" in stdout
    assert rows(out) == got
    # a different generation config on the same output is refused, the file kept
    rc, _, stderr = aft(capsys, "infer", "--input_file", inp, "--output_file", out, "-k", 3)
    assert rc == 2 and "n (2 -> 3)" in stderr and stderr.count("\n") == 1
    assert rows(out) == got


@pytest.mark.slow  # loads a model three times (tests/test_hf_engine.py checks seeds on the engine itself)
def test_same_seed_same_answers(tmp_path, tiny_model_dir, capsys):
    inp = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    outs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        rc, _, stderr = aft(capsys, "infer", "-i", inp, "-o", tmp_path / f"{name}.jsonl", "--model", tiny_model_dir,
                            "-k", 2, "-l", 1, "--max-tokens", 8, "--seed", seed)
        assert rc == 0, stderr
        outs.append([g["response"] for g in rows(tmp_path / f"{name}.jsonl")])
    assert outs[0] == outs[1] and outs[0] != outs[2]


@pytest.mark.slow  # a second Python process loading torch and a model
def test_kill_9_loses_only_queries_in_flight(tmp_path, tiny_model_dir, capsys):
    """The one test that runs `aft infer` as its own process: it has to be killed."""
    qs = [{"id": f"q{i}", "prompt": f"Question number {i}?"} for i in range(8)]
    inp = write_jsonl(tmp_path / "q.jsonl", qs)
    out = tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "aft", "infer", "-i", inp, "-o", out, "--model", tiny_model_dir, "-k", 2, "-l", 1,
            "--max-tokens", 16, "--batch_size", 1]
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "AFT_PROGRESS": ""})
    deadline = time.time() + 300  # a loaded machine: starting Python, torch and the model takes a while
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = rows(out) if out.read_text().endswith("\n") else rows(out)[:-1]
    assert 2 <= len(first) < len(qs), "the kill should land mid-run"
    with open(out, "a") as f:
        f.write('{"id": "q9", "resp')  # and a torn line, as a kill during a write leaves
    rc, _, stderr = aft(capsys, "infer", *args[4:])
    assert rc == 0, stderr
    final = rows(out)
    assert sorted(g["id"] for g in final) == sorted(q["id"] for q in qs)  # each exactly once
    assert final[:len(first)] == first  # what was written before the kill is kept as it was


@pytest.fixture(scope="module")
def other_tiny_model_dir(tmp_path_factory, small_tokenizer):
    """A second tiny model (other random weights), as a folder, with the small tokenizer as tiny_model_dir."""
    out = tmp_path_factory.mktemp("tiny-model-b")
    tiny_llama(small_tokenizer, seed=1).save_pretrained(out)
    small_tokenizer.save_pretrained(out)
    return out


def test_several_proposer_models(tmp_path, tiny_model_dir, other_tiny_model_dir, capsys):
    """--proposers A B with K=3: A writes two proposals, B one, recorded per proposal; --model aggregates."""
    a, b = str(tiny_model_dir), str(other_tiny_model_dir)
    inp = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "out.jsonl"
    rc, stdout, stderr = aft(capsys, "infer", "-i", inp, "-o", out, "--model", a, "--proposers", a, b, "-k", 3,
                             "-l", 2, "--max-tokens", 6)
    assert rc == 0, stderr
    for g in rows(out):
        assert [o.get("proposer") for o in g["trace"][0]["outputs"]] == [a, a, b]
        assert all("proposer" not in o for t in g["trace"][1:] for o in t["outputs"])
        assert [len(t["outputs"]) for t in g["trace"]] == [3, 3, 1]
    meta = json.loads((tmp_path / "out.jsonl.config.json").read_text())
    assert meta["settings"]["proposers"] == [a, b] and [e["model"] for e in meta["proposers"]] == [a, b]
    # other proposers are other settings: this output is not resumed with them
    rc, _, stderr = aft(capsys, "infer", "-i", inp, "-o", out, "--model", a, "--proposers", b, "-k", 3, "-l", 2,
                        "--max-tokens", 6)
    assert rc == 2 and "proposers" in stderr


@pytest.mark.parametrize("lines, flags, msg", [
    (['{"prompt": "ok"}', '{"prompt": "bad"'], [], "q.jsonl:2: malformed JSON"),
    (['{"query": [{"role": "wizard", "content": "x"}]}'], [], "q.jsonl:1: field \"query\": message 0 has unknown role"),
    (['{"text": "x"}'], [], "q.jsonl:1: no usable query"),
    (['{"prompt": "ok"}'], ["--model", "no/such-model-here"], "model 'no/such-model-here' not found; tried"),
    (['{"prompt": "ok"}'], ["--model", "./missing-folder"], "not found; tried"),
    (['{"prompt": "ok"}'], ["--proposers", "./missing-proposer"], "model './missing-proposer' not found; tried"),
    (['{"prompt": "ok"}'], ["--config", "CFG"], "unknown key 'beam_width'"),
    (['{"prompt": "ok"}'], ["--style", "fancy"], "invalid choice"),
])
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, lines, flags, msg, capsys):
    inp = write_jsonl(tmp_path / "q.jsonl", lines)
    (tmp_path / "c.yaml").write_text("beam_width: 4\n")
    flags = [str(tmp_path / "c.yaml") if f == "CFG" else f for f in flags]
    rc, _, stderr = aft(capsys, "infer", "-i", inp, "-o", tmp_path / "o.jsonl", *flags)
    assert rc == 2
    assert stderr.splitlines()[-1].startswith("aft infer: error: ") and msg in stderr.splitlines()[-1]
    if msg != "invalid choice":  # (argparse prints its usage first)
        assert stderr.count("\n") == 1
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_text() == ""


def test_dry_run_shows_each_layer_without_a_model(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    rc, stdout, stderr = aft(capsys, "infer", "-i", inp, "--dry-run", "-k", 3, "-l", 2, "--model", "no/model-needed")
    assert rc == 0, stderr
    shown = json.loads(stdout)
    layers = shown[0]["layers"]
    assert [la["role"] for la in layers] == ["propose", "aggregate", "final"]
    assert layers[0]["messages"] == [{"role": "system", "content": "\n"}, QUESTIONS[0]["query"][0]]
    assert layers[1]["messages"][0]["content"].endswith(
        "Responses from models:\n1. <output 1 of layer 0>\n2. <output 2 of layer 0>\n3. <output 3 of layer 0>")
    assert layers[2]["params"]["n"] == 1 and "proposers" not in layers[0]
    rc, stdout, stderr = aft(capsys, "infer", "-i", inp, "--dry-run", "-k", 3, "--proposers", "a", "b")
    assert rc == 0, stderr
    assert json.loads(stdout)[0]["layers"][0]["proposers"] == [{"model": "a", "n": 2}, {"model": "b", "n": 1}]
