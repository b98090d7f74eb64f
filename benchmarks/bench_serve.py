"""`aft serve` under load (issue 11's benchmark): N concurrent streaming clients, against the same requests
served one at a time and against `aft infer` on the same requests offline, in one run.

    python benchmarks/bench_serve.py [--clients 32] [--max_tokens 32] [--model smollm2-135m] [-k 4] [-l 1]
                                     [--plain] [--no-offline] [--out runs/bench_serve.json]
                                     [-- extra aft serve / aft infer flags]

The defaults are the issue's spec: 32 clients, P&A K=4 L=1 on the embedded model. The N requests are
the engine benchmark's questions (bench_infer.QUESTIONS, in turn), query i with id q<i> and seed
derive_seed(2024, "q<i>"): the seed `aft infer` (default --seed 2024) gives query q<i>, so the three
sides run the same queries with the same seeds (the same texts, up to batching's rounding).

  offline      `python -m aft infer` on those N queries (a JSONL file), in a second process; its
               tok/s is the one it prints (generated tokens / seconds of P&A, model load excluded)
  concurrent   `python -m aft serve` in a second process (a free port of 127.0.0.1), all N requests
               at once (the official openai client, async, streamed with stream_options.include_usage)
  sequential   the same server, the same requests one after the other

For the server sides: wall seconds, generated tokens (usage.completion_tokens: every P&A layer),
tokens/s = generated tokens / wall, time to first token (first content delta) and latency (request ->
[DONE]) as p50 / p95. Then the ratios concurrent / offline (the issue's target: >= 0.8) and concurrent
/ sequential. `--plain` asks for the single-pass model (NAME-plain), with no offline side (`aft infer`
always aggregates); `--no-offline` skips `aft infer`. The sides run one after the other on one machine,
so other load on it weighs on each; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_infer import QUESTIONS  # noqa: E402  (the engine benchmark's 8 prompts)

from aft.engines.base import derive_seed  # noqa: E402

INFER_SEED = 2024  # aft infer's default --seed: query q<i> gets derive_seed(INFER_SEED, "q<i>")


def queries(n: int) -> list[dict]:
    """The N queries of every side: id, messages, the seed aft infer gives that id."""
    return [{"id": f"q{i}", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
             "seed": derive_seed(INFER_SEED, f"q{i}")} for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "aft", "serve", "--model", args.model, "-k", str(args.k), "-l", str(args.l),
           "--max_tokens", str(args.max_tokens), "--port", str(port), "--served_model_name", "bench",
           "--max_queue", str(max(64, args.clients)), *args.server_args]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"aft serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("aft serve did not start within 600 s")


def offline(args) -> dict:
    """`aft infer` on the same queries in a second process: its own report (tokens, seconds, tok/s)."""
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "queries.jsonl"
        inp.write_text("".join(json.dumps({"id": q["id"], "messages": q["messages"]}) + "\n"
                               for q in queries(args.clients)))
        cmd = [sys.executable, "-m", "aft", "infer", "--model", args.model, "-k", str(args.k), "-l", str(args.l),
               "--max_tokens", str(args.max_tokens), "--seed", str(INFER_SEED), "--batch_size", str(args.clients),
               "--input_file", str(inp), "--output_file", str(Path(tmp) / "out.jsonl"), *args.server_args]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    m = re.search(r"(\d+) tokens generated in ([\d.]+)s", done.stdout)
    if done.returncode or not m:
        raise SystemExit(f"aft infer failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    tokens, seconds = int(m[1]), float(m[2])
    return {"side": "offline", "requests": args.clients, "wall_s": round(seconds, 2), "generated_tokens": tokens,
            "tok_per_s": round(tokens / seconds, 1) if seconds else 0.0, "process_wall_s": round(wall, 1)}


async def one(client, model: str, q: dict, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, messages=q["messages"], seed=q["seed"], max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True})
    async for ch in stream:
        if first is None and ch.choices and ch.choices[0].delta.content:
            first = time.perf_counter() - t0
        if ch.usage is not None:
            tokens = ch.usage.completion_tokens
    return {"ttft": first if first is not None else time.perf_counter() - t0, "latency": time.perf_counter() - t0,
            "tokens": tokens}


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summary(name: str, runs: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in runs)
    ttft, lat = [r["ttft"] for r in runs], [r["latency"] for r in runs]
    return {"side": name, "requests": len(runs), "wall_s": round(wall, 2), "generated_tokens": tokens,
            "tok_per_s": round(tokens / wall, 1), "ttft_p50_s": round(pct(ttft, 50), 2),
            "ttft_p95_s": round(pct(ttft, 95), 2), "latency_p50_s": round(pct(lat, 50), 2),
            "latency_p95_s": round(pct(lat, 95), 2)}


async def measure(base_url: str, model: str, clients: int, max_tokens: int) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600)
    qs = queries(clients)
    await one(client, model, qs[0], 4)  # warm-up: the first call pays for lazy set-up
    t0 = time.perf_counter()
    concurrent = await asyncio.gather(*(one(client, model, q, max_tokens) for q in qs))
    together = summary("concurrent", concurrent, time.perf_counter() - t0)
    t0 = time.perf_counter()
    sequential = [await one(client, model, q, max_tokens) for q in qs]
    alone = summary("sequential", sequential, time.perf_counter() - t0)
    await client.close()
    return [together, alone]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("-k", type=int, default=4)
    p.add_argument("-l", type=int, default=1)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--plain", action="store_true", help="the single-pass model (bench-plain) instead of P&A")
    p.add_argument("--no-offline", dest="offline", action="store_false", help="skip the `aft infer` side")
    p.add_argument("--out", default="runs/bench_serve.json")
    p.add_argument("server_args", nargs="*", help="more flags for both `aft serve` and `aft infer` (engine "
                   "options), after --")
    args = p.parse_args()
    alone = offline(args) if args.offline and not args.plain else None
    port = free_port()
    proc = start_server(args, port)
    try:
        model = "bench-plain" if args.plain else "bench"
        sides = asyncio.run(measure(f"http://127.0.0.1:{port}/v1", model, args.clients, args.max_tokens))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    def ratio(a: dict | None, b: dict | None) -> float | None:
        return round(a["tok_per_s"] / b["tok_per_s"], 2) if a and b and b["tok_per_s"] else None

    report = {"model": args.model, "served": model, "k": args.k, "l": args.l, "clients": args.clients,
              "max_tokens": args.max_tokens, "sides": sides + ([alone] if alone else []),
              "concurrent_over_sequential": ratio(sides[0], sides[1]),
              "concurrent_over_offline": ratio(sides[0], alone),
              "threads": os.environ.get("OMP_NUM_THREADS"), "server_exit_code": proc.returncode}
    keys = list(sides[0])
    print(" | ".join(keys))
    for s in report["sides"]:
        print(" | ".join(str(s.get(k, "")) for k in keys))
    print(f"throughput concurrent / sequential: {report['concurrent_over_sequential']}x")
    if alone:
        print(f"throughput concurrent / offline (aft infer): {report['concurrent_over_offline']}x (target >= 0.8)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
