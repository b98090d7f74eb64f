"""`aft serve` under load: N concurrent streaming clients, side by side with the same requests one at a time.

    python benchmarks/bench_serve.py [--clients 8] [--max_tokens 32] [--model smollm2-135m] [-k 4] [-l 1]
                                     [--plain] [--out runs/bench_serve.json] [-- extra aft serve flags]

Starts `python -m aft serve` in a second process on a free port of 127.0.0.1 (the
embedded model by default), waits for /health, then sends the same `--clients`
chat requests (distinct questions, seeds 0..N-1, streamed with
stream_options.include_usage) twice:

  concurrent   all at once (the official openai client, async)
  sequential   one after the other

and reports for each: wall seconds, generated tokens (usage.completion_tokens:
every P&A layer), tokens/s = generated tokens / wall, time to first token
(first content delta) and latency (request -> [DONE]) as p50 / p95, and the
ratio of the two throughputs. `--plain` asks for the single-pass model
(NAME-plain) instead of P&A. The two sides run in one process against one
server, so that other load on the machine weighs on both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_infer import QUESTIONS  # noqa: E402  (the engine benchmark's 8 prompts)


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


async def one(client, model: str, i: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], seed=i,
        max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
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
    await one(client, model, 0, 4)  # warm-up: the first call pays for lazy set-up
    t0 = time.perf_counter()
    concurrent = await asyncio.gather(*(one(client, model, i, max_tokens) for i in range(clients)))
    together = summary("concurrent", concurrent, time.perf_counter() - t0)
    t0 = time.perf_counter()
    sequential = [await one(client, model, i, max_tokens) for i in range(clients)]
    alone = summary("sequential", sequential, time.perf_counter() - t0)
    await client.close()
    return [together, alone]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("-k", type=int, default=4)
    p.add_argument("-l", type=int, default=1)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--plain", action="store_true", help="the single-pass model (bench-plain) instead of P&A")
    p.add_argument("--out", default="runs/bench_serve.json")
    p.add_argument("server_args", nargs="*", help="more `aft serve` flags, after --")
    args = p.parse_args()
    port = free_port()
    proc = start_server(args, port)
    try:
        model = "bench-plain" if args.plain else "bench"
        sides = asyncio.run(measure(f"http://127.0.0.1:{port}/v1", model, args.clients, args.max_tokens))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    ratio = sides[0]["tok_per_s"] / sides[1]["tok_per_s"] if sides[1]["tok_per_s"] else float("nan")
    report = {"model": args.model, "served": model, "k": args.k, "l": args.l, "clients": args.clients,
              "max_tokens": args.max_tokens, "sides": sides, "concurrent_over_sequential": round(ratio, 2),
              "threads": os.environ.get("OMP_NUM_THREADS"), "server_exit_code": proc.returncode}
    keys = list(sides[0])
    print(" | ".join(keys))
    for s in sides:
        print(" | ".join(str(s[k]) for k in keys))
    print(f"throughput concurrent / sequential: {report['concurrent_over_sequential']}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
