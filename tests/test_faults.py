"""The fault and bad-input corpus: what a user or a crash throws at each command.

Each case runs the command as the CLI does (`aft.cli.main`, or a subprocess where
a second process is the point: two writers, kill -9, a broken pipe) and asserts
three things: the exit code, the one-line message (no traceback), and that
nothing already written was lost. Servers are real HTTP servers on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from aft.cli import main
from aft.io import read_jsonl
from aft.engines.base import Completion, Engine, Result, emit_whole
from aft.infer import load_config, manifest
from aft.serve import start_server

from conftest import FIXTURES, write_jsonl

UF = FIXTURES / "data" / "ultrafeedback_sample.jsonl"
QUESTIONS = [{"id": f"q{i}", "prompt": f"What is {i} + {i}?"} for i in range(3)]


class Echo(Engine):
    """A deterministic engine: answers "Answer: <len of last message>"; enough for loop and file logic."""

    name, model = "echo", "echo"

    def generate(self, requests, on_text=None):
        return emit_whole([Result([Completion(f"Answer: {len(r.messages[-1]['content'])}", 3, "stop")] * r.params.n, 5)
                           for r in requests], on_text)


@pytest.fixture(scope="module")
def echo_url():
    server, url = start_server(Echo())
    yield url + "#echo"
    server.close()


@pytest.fixture(scope="module")
def silent_url():
    """A server that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held, stop = [], threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    stop.set()
    for c in held:
        c.close()
    sock.close()


@pytest.fixture(scope="module")
def html_url():
    """A server that answers 200 with an HTML page (a wrong URL, a proxy's login page)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html><body>Welcome to nginx!</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def one_line_error(capsys, command: str) -> str:
    """The stderr of a failed command: exactly one line 'aft CMD: error: ...', no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if not line.startswith(("20", "0", "1"))]  # drop log lines
    assert len(lines) == 1 and lines[0].startswith(f"aft {command}: error: "), err
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes (to show nothing written was lost or changed)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ 1. two writers
HOLD = """
import sys, time
from aft.io import output_lock
from contextlib import ExitStack
with ExitStack() as stack:
    for p in sys.argv[1:]:
        stack.enter_context(output_lock(p))
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """A second process holding the locks of the given outputs, as a running aft command does."""
    procs = []

    def start(*outputs):
        p = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, outputs)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_second_writer_is_refused_for_infer_build_and_eval(tmp_path, capsys, holder, echo_url):
    inp = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "answers.jsonl"
    assert main(["infer", "-i", str(inp), "-o", str(out), "-m", echo_url, "-k", "2", "-l", "1"]) == 0
    data, ev = tmp_path / "data", tmp_path / "eval"
    before = snapshot(tmp_path)
    p = holder(out, data, ev)
    capsys.readouterr()
    assert main(["infer", "-i", str(inp), "-o", str(out), "-m", echo_url, "-k", "2", "-l", "1"]) == 2
    assert f"being written by another aft process (pid {p.pid})" in one_line_error(capsys, "infer")
    assert main(["data", "build", "-i", str(UF), "--out", str(data), "--target", "best", "--scorer", "none",
                 "-k", "2"]) == 2
    assert f"(pid {p.pid})" in one_line_error(capsys, "data")
    assert main(["eval", "run", "--out", str(ev), "-m", echo_url, "--strategies", "greedy", "--limit", "2"]) == 2
    assert f"(pid {p.pid})" in one_line_error(capsys, "eval")
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not str(k).endswith(".lock")} == before


def test_stale_lock_of_a_killed_writer_is_taken_over(tmp_path, capsys, caplog, holder):
    data = tmp_path / "data"
    p = holder(data)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (tmp_path / "data.lock").read_text().strip() == str(p.pid)  # left behind by kill -9
    assert main(["data", "build", "-i", str(UF), "--out", str(data), "--target", "best", "--scorer", "none",
                 "-k", "2"]) == 0
    assert f"taking over a stale lock left by pid {p.pid}" in caplog.text
    assert not (tmp_path / "data.lock").exists()  # released at the end
    assert len((data / "aft.jsonl").read_text().splitlines()) == 3


# ------------------------------------------------------------------ 5. bytes that are not UTF-8
LATIN1 = '{"id": "x", "prompt": "caf\xe9"}\n'.encode("latin-1")  # é as one byte 0xe9


def test_non_utf8_infer_input_names_file_and_line(tmp_path, capsys):
    inp = tmp_path / "q.jsonl"
    inp.write_bytes(b'{"prompt": "ok"}\n' + LATIN1)
    assert main(["infer", "-i", str(inp), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert f"{inp}:2: not UTF-8 text (byte 0xe9 at column 27)" in one_line_error(capsys, "infer")
    assert not (tmp_path / "o.jsonl").exists()


def test_non_utf8_data_build_row_is_skipped_or_stops(tmp_path, capsys):
    inp = tmp_path / "uf.jsonl"
    inp.write_bytes(UF.read_bytes() + LATIN1)
    base = ["data", "build", "-i", str(inp), "--target", "best", "--scorer", "none", "-k", "2"]
    assert main(base + ["--out", str(tmp_path / "skip")]) == 0
    errors = json.loads((tmp_path / "skip" / "input_errors.json").read_text())
    assert errors == [{"where": f"{inp}:4", "kind": "unreadable line",
                       "message": "not UTF-8 text (byte 0xe9 at column 27); save the file as UTF-8"}]
    assert len((tmp_path / "skip" / "aft.jsonl").read_text().splitlines()) == 3
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "stop"), "--on_error", "stop"]) == 2
    assert f"{inp}:4: not UTF-8 text" in one_line_error(capsys, "data")


def test_non_utf8_train_data_eval_file_and_yaml_config(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "aft.jsonl").write_bytes(LATIN1)
    assert main(["train", "--data", str(data), "--output_dir", str(tmp_path / "t")]) == 2
    assert f"{data / 'aft.jsonl'}:1: not UTF-8 text" in one_line_error(capsys, "train")
    assert not (tmp_path / "t").exists()
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_bytes(b'{"question": "1+1?", "answer": "#### 2"}\n' + LATIN1)
    assert main(["eval", "run", "--out", str(tmp_path / "ev"), "--tasks", f"gsm8k:{gsm}"]) == 2
    assert f"{gsm}:2: not UTF-8 text" in one_line_error(capsys, "eval")
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"n: 2\nstyle: caf\xe9\n")
    assert main(["infer", "--config", str(cfg)]) == 2
    assert f"{cfg}:2: not UTF-8 text (byte 0xe9 at column 11)" in one_line_error(capsys, "infer")


# ------------------------------------------------------------------ 6. eval run after a crash mid-line
def test_eval_run_cuts_a_torn_last_record_and_resumes(tmp_path, capsys, echo_url):
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": f"{i} + 1?", "answer": f"#### {i + 1}"}
                                               for i in range(3)])
    run = ["eval", "run", "--out", str(tmp_path / "ev"), "-m", echo_url, "--tasks", f"gsm8k:{gsm}",
           "--strategies", "greedy", "--no-report"]
    assert main(run) == 0
    records = next((tmp_path / "ev").rglob("greedy.seed0.jsonl"))
    lines = records.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    records.write_bytes(b"".join(lines[:2]) + lines[2][:25])  # killed while writing the third
    assert main(run) == 0
    assert "1 answers written, 2 already cached" in capsys.readouterr().out
    again = records.read_bytes().splitlines(keepends=True)
    assert again[:2] == lines[:2] and [json.loads(x)["id"] for x in again] == [json.loads(x)["id"] for x in lines]


# ------------------------------------------------------------------ 2, 7. servers that hang or answer nonsense
def test_server_that_never_answers_times_out_and_says_what_it_waits_for(tmp_path, capsys, caplog, silent_url):
    inp = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "o.jsonl"
    out.write_text(json.dumps({"id": "q0", "response": "kept"}) + "\n")  # an earlier run of the same settings
    manifest(load_config(None, {"input_file": str(inp), "output_file": str(out), "model": silent_url + "#m",
                                "n": 1, "num_aggregation": 1}), out).write()
    rc = main(["infer", "-i", str(inp), "-o", str(out), "-m", silent_url + "#m", "-k", "1", "-l", "1",
               "--timeout", "0.3", "--max_retries", "0"])
    assert rc == 2
    msg = one_line_error(capsys, "infer")
    assert f"{silent_url} (model 'm'): no answer within 0.3 s (1 attempt)" in msg
    assert re.search(rf"waiting for {re.escape(silent_url)} \(model m\): \d+ requests? unanswered, the oldest for "
                     rf"[\d.]+ s \(timeout 0.3 s per attempt, 1 attempt\)", caplog.text)
    assert out.read_text() == json.dumps({"id": "q0", "response": "kept"}) + "\n"
    assert main(["infer", "-i", str(inp), "-m", silent_url, "--timeout", "0"]) == 2
    assert "--timeout must be > 0, got 0.0" in one_line_error(capsys, "infer")


def test_server_answering_html_is_a_one_line_error(tmp_path, capsys, html_url):
    inp = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    args = ["infer", "-i", str(inp), "-k", "1", "-l", "1", "--max_retries", "0"]
    assert main(args + ["-m", html_url + "#m", "-o", str(tmp_path / "a.jsonl")]) == 2
    msg = one_line_error(capsys, "infer")
    assert "the reply is not an OpenAI chat completion" in msg and "Welcome to nginx" in msg
    assert main(args + ["-m", html_url, "-o", str(tmp_path / "b.jsonl")]) == 2  # the model list is asked first
    assert "/models did not return an OpenAI model list" in one_line_error(capsys, "infer")


# ------------------------------------------------------------------ 7. one line, never a traceback
@pytest.mark.parametrize("case", ["file parent", "unwritable parent", "config folder", "corrupt model config",
                                  "no cuda", "negative depth", "hub id offline"])
def test_infer_setup_faults_are_one_line(tmp_path, capsys, monkeypatch, case):
    import torch

    inp = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    (tmp_path / "afile").write_text("keep me\n")
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{broken" if case == "corrupt model config" else "{}")
    args, want = {
        "file parent": (["-o", str(tmp_path / "afile" / "o.jsonl")], f"{tmp_path / 'afile'} is a file, not a folder"),
        "unwritable parent": (["-o", "/proc/aft-faults/o.jsonl"], "cannot create the folder /proc/aft-faults"),
        "config folder": (["--config", str(tmp_path)], f"{tmp_path}: is a folder, not a config file"),
        "corrupt model config": (["-m", str(model)], "config.json' is not a valid JSON file"),
        "no cuda": (["-m", str(model), "--device", "cuda"], "--device cuda: no CUDA device"),
        "negative depth": (["-l", "-1", "-m", "no-such-model"], "num_aggregation must be >= 0, got -1"),
        "hub id offline": (["-m", "no/such-model-here"], "hub id no/such-model-here ("),
    }[case]
    if case == "no cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert main(["infer", "-i", str(inp), *args]) == 2
    msg = one_line_error(capsys, "infer")
    assert want in msg
    if case == "hub id offline":
        assert msg.endswith(".)")  # the hub's reason to the end of its sentence, not cut mid-word
    assert (tmp_path / "afile").read_text() == "keep me\n" and not list(tmp_path.glob("*.jsonl.config.json"))


def test_dry_run_into_a_closed_pipe_stops_quietly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "aft", "infer", "--dry-run", "-k", "60", "-l", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `| head` that has read enough
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


def test_eval_report_n_boot_zero(tmp_path, capsys):
    assert main(["eval", "report", str(tmp_path), "--n_boot", "0"]) == 2
    assert "--n_boot must be >= 1, got 0" in one_line_error(capsys, "eval")


MT_ANSWER = {"question_id": 81, "model_id": "mine", "choices": [{"index": 0, "turns": ["Hi.", "Bye."]}]}


@pytest.mark.parametrize("bad, want", [
    ({"choices": "oops"}, 'answer 2 (question 82): field "choices": expected a list of {"turns": [...]}'),
    ({"choices": [{"turns": [1]}]}, 'field "choices[0].turns": expected a list of texts'),
    ({"question_id": 4242}, "answer 2 (question 4242): not among the questions"),
])
def test_judge_checks_answers_before_loading_a_judge(tmp_path, capsys, bad, want):
    questions = write_jsonl(tmp_path / "question.jsonl", [{"question_id": q, "category": "writing",
                                                           "turns": ["Say hi.", "Say bye."]} for q in (81, 82)])
    answers = write_jsonl(tmp_path / "mine.jsonl", [MT_ANSWER, {**MT_ANSWER, "question_id": 82, **bad}])
    before = snapshot(tmp_path)
    rc = main(["eval", "judge", str(answers), "--questions", str(questions), "--judge_model", "no-such-judge"])
    assert rc == 2
    assert want in one_line_error(capsys, "eval")  # not "model 'no-such-judge' not found": no judge was loaded
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ 13. judgments beside, not inside, model_answer
def test_judgments_go_beside_the_answers_folder(tmp_path, capsys, echo_url):
    questions = write_jsonl(tmp_path / "question.jsonl", [{"question_id": 81, "category": "writing",
                                                           "turns": ["Say hi.", "Say bye."]}])
    folder = tmp_path / "data" / "mt_bench" / "model_answer"
    folder.mkdir(parents=True)
    answers = write_jsonl(folder / "mine.jsonl", [MT_ANSWER])
    judge = ["--questions", str(questions), "--judge_model", echo_url]
    assert main(["eval", "judge", str(answers), *judge]) == 0
    assert list(folder.iterdir()) == [answers]  # FastChat reads every file here as a model's answers
    out = tmp_path / "data" / "mt_bench" / "model_judgment" / "echo_single.jsonl"  # FastChat's own layout
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["model"], r["turn"]) for r in rows] == [("mine", 1), ("mine", 2)]
    elsewhere = write_jsonl(tmp_path / "answers.jsonl", [MT_ANSWER])
    assert main(["eval", "judge", str(elsewhere), *judge]) == 0
    assert (tmp_path / "mine.judgment.jsonl").exists()  # named after the model it grades


# ------------------------------------------------- 3, 11, 15. train: killed saves, reruns, portable adapters
@pytest.fixture
def tiny_embedded(tmp_path, monkeypatch, tokenizer):
    """A tiny random model standing in for the embedded one (AFT_CACHE points at it), so training takes seconds."""
    from conftest import tiny_llama

    cache = tmp_path / "cache"
    folder = cache / "models" / "SmolLM2-135M-Instruct"
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setenv("AFT_CACHE", str(cache))
    return folder


@pytest.mark.slow  # trains (TRL) three times
def test_train_killed_while_saving_resumes_from_the_last_complete_checkpoint(tmp_path, capsys, caplog,
                                                                             tiny_embedded):
    from aft.models import resolve

    out = tmp_path / "run"
    train = ["train", "--model", "smollm2-135m", "--data", str(FIXTURES / "train" / "data"), "--output_dir",
             str(out), "--save_steps", "1", "--logging_steps", "1", "--per_device_train_batch_size", "2",
             "--lora_r", "4", "--learning_rate", "1e-3"]
    assert main(train + ["--max_steps", "2"]) == 0
    # 15: the adapter names its base by the hub id; this machine still resolves it to the local copy
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (out / "README.md").read_text()
    assert "[HuggingFaceTB/SmolLM2-135M-Instruct]" in card and "[None]" not in card
    assert resolve(str(out)).path == str(tiny_embedded)
    # 11: the same command again keeps the run's measurements and says it is finished
    metrics = (out / "metrics.json").read_bytes()
    capsys.readouterr()
    assert main(train + ["--max_steps", "2"]) == 0
    assert "this run already finished" in capsys.readouterr().out
    assert (out / "metrics.json").read_bytes() == metrics
    # 3: killed while writing checkpoint-3 (weights half written, no trainer_state.json yet)
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    kept = (out / "checkpoint-2" / "adapter_model.safetensors").read_bytes()
    assert main(train + ["--max_steps", "3"]) == 0
    assert "checkpoint-3 is incomplete" in caplog.text and "skipped" in caplog.text
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 3 and m["steps_this_run"] == 1 and m["resumed_from"] == str(out / "checkpoint-2")
    assert (out / "checkpoint-2" / "adapter_model.safetensors").read_bytes() == kept
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3


# ------------------------------------------------- 9, 10. the data card: one scale at a time, all prompts
def test_data_card_keeps_verifier_and_dataset_scales_apart(tmp_path, capsys):
    inp = tmp_path / "mixed.jsonl"
    inp.write_text(UF.read_text() + json.dumps({"id": "v", "prompt": "What is 2 + 3?", "answer": "5",
                                                "responses": ["it is 5", "6", "7"]}) + "\n")
    assert main(["data", "build", "-i", str(inp), "--out", str(tmp_path / "d"), "-k", "2", "--target", "best"]) == 0
    headline = capsys.readouterr().out
    card = json.loads((tmp_path / "d" / "data_card.json").read_text())
    by = card["scores"]["by_source"]
    # the arithmetic prompts (one of UltraFeedback's has an answer) are verified; the other two keep 1-10 ratings
    assert by["verifier"]["rows"] == 2 and by["dataset"]["rows"] == 2
    verified = [c["score"] for _, r in read_jsonl(tmp_path / "d" / "aft.jsonl") for c in r["meta"]["candidates"]
                if r["meta"]["score_source"] == "verifier"]
    assert set(verified) == {0.0, 1.0} and by["dataset"]["candidate"]["max"] > 1
    assert card["scores"]["candidate"] is None  # no mean across the two scales
    v = card["scores"]["verifier"]
    assert v["candidate_accuracy"] == pytest.approx(sum(verified) / len(verified), abs=1e-4)
    assert f"candidate accuracy {v['sampled']['candidate_accuracy']}" in headline
    assert "other scales: dataset" in headline


def test_data_card_counts_every_prompt_sampled_not_only_those_kept(tmp_path, capsys):
    rows = [{"id": f"p{i}", "prompt": f"What is {i} + 1?", "answer": str(i + 1),
             "responses": [f"it is {i + 1}" if i < 2 else "no idea", "maybe 0"]} for i in range(5)]
    inp = write_jsonl(tmp_path / "g.jsonl", rows)
    assert main(["data", "build", "-i", str(inp), "--out", str(tmp_path / "d"), "-k", "2", "--target", "best",
                 "--min_target_score", "1"]) == 0
    card = json.loads((tmp_path / "d" / "data_card.json").read_text())
    v = card["scores"]["verifier"]
    assert card["counts"]["rows"] == 2 and card["counts"]["skipped_while_building"] == 3
    assert v["sampled"] == {"prompts": 5, "candidate_accuracy": 0.2, "prompts_with_a_correct_candidate": 0.4}
    assert v["prompts_with_a_correct_candidate"] == 1.0 and v["prompts_kept"] == 2  # the kept ones, apart
    md = (tmp_path / "d" / "data_card.md").read_text()
    assert "over all 5 prompts it scored: candidate accuracy 0.2, prompts with a correct candidate 0.4" in md


# ------------------------------------------------------------------ 16. progress outside a terminal
def test_progress_is_logged_with_tokens_per_second_when_stderr_is_not_a_terminal(tmp_path, caplog, monkeypatch,
                                                                                 echo_url):
    inp = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    caplog.set_level("INFO", logger="aft.progress")  # the CLI logs at INFO (pytest's root logger is at WARNING)
    monkeypatch.setenv("AFT_PROGRESS", "0.001")  # a line every millisecond (default: every 30 s)
    assert main(["infer", "-i", str(inp), "-o", str(tmp_path / "o.jsonl"), "-m", echo_url, "-k", "2", "-l", "1",
                 "--batch_size", "1"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "aft.progress"]
    # which lines fall due depends on timing (one every millisecond at most); the pattern does not, and the
    # finished line is always written
    assert len(lines) >= 2, lines
    assert all(re.match(r"propose-and-aggregate: [0-3]/3 queries \(\d+%\), (layer \d/1, )?\d+ tok/s, \d+s elapsed"
                        r"(, ~\d+s left)?$", x) for x in lines), lines
    assert re.match(r"propose-and-aggregate: 3/3 queries \(100%\), \d+ tok/s, \d+s elapsed", lines[-1]), lines
    monkeypatch.setenv("AFT_PROGRESS", "0")  # off
    caplog.clear()
    assert main(["infer", "-i", str(inp), "-o", str(tmp_path / "o2.jsonl"), "-m", echo_url, "-k", "2"]) == 0
    assert not [r for r in caplog.records if r.name == "aft.progress"]


def test_our_decode_loop_triggers_no_deprecation_warning(tiny_engine):
    import warnings

    from aft.engines.base import Request, SamplingParams

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_engine.generate([Request([{"role": "user", "content": "Hi"}], SamplingParams(n=2, max_tokens=4, seed=1))])
    assert not [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))], \
        [str(w.message) for w in caught]


# ------------------------------------------------------------------ 17. smaller points
def test_eval_records_report_reference_and_summary(tmp_path, capsys, caplog, echo_url):
    caplog.set_level("INFO", logger="aft.evaluate.run")
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": f"{i} + 1?", "answer": f"#### {i + 1}"} for i in range(2)])
    ev = tmp_path / "ev"
    for label in ("aa-tuned", "zz-base"):
        assert main(["eval", "run", "--out", str(ev), "-m", echo_url, "--label", label, "--tasks", f"gsm8k:{gsm}",
                     "--strategies", "greedy", "--no-report"]) == 0
    assert "greedy seed 0: 2 of 2 questions done" in caplog.text  # was "2/2", read as "all correct"
    rec = json.loads((ev / "zz-base" / "gsm8k-gsm" / "greedy.seed0.jsonl").read_text().splitlines()[0])
    assert rec["question"] == "0 + 1?"  # the question itself, not only its id
    tuned = tmp_path / "tuned"  # an `aft train` output folder
    tuned.mkdir()
    (tuned / "metrics.json").write_text("{}")
    run = json.loads((ev / "aa-tuned" / "run.json").read_text())
    (ev / "aa-tuned" / "run.json").write_text(json.dumps({**run, "model": str(tuned)}))
    capsys.readouterr()
    assert main(["eval", "report", str(ev), "--n_boot", "50"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"gsm8k-gsm\s+aa-tuned\s+greedy\s+accuracy 0\.000 \[0\.000, 0\.000\]", out)  # a summary
    report = (ev / "report.md").read_text()
    assert "compared with **zz-base** (the untrained model" in report
    assert "| aa-tuned greedy | zz-base greedy |" in report  # not against the alphabetically first
    assert main(["eval", "report", str(ev), "--n_boot", "50", "--reference", "aa-tuned"]) == 0
    assert "| zz-base greedy | aa-tuned greedy |" in (ev / "report.md").read_text()
    capsys.readouterr()
    assert main(["eval", "report", str(ev), "--reference", "nope"]) == 2
    assert "no model labelled 'nope' to compare with (labels: " in one_line_error(capsys, "eval")


def test_short_run_warmup_ratio_does_not_spend_step_one_at_learning_rate_zero():
    from aft.train import load_config, sft_config

    cfg = load_config(None, {"data": "unused", "max_steps": 4, "output_dir": "unused"})
    cfg.sft_args = {"warmup_steps": 0.05}
    assert sft_config(cfg).warmup_steps == 0  # transformers would round 0.2 up to one step at learning rate 0
    cfg.max_steps = 100
    assert sft_config(cfg).warmup_steps == 5
