"""The server's counters, in the Prometheus text format (GET /metrics).

Hand-written (a few counters, two gauges, two histograms) rather than a client
library: the exposition format is plain text. Every metric is labelled with the
served model where it concerns one.

    aft_requests_total{model,status}        finished chat requests by HTTP status (streams: 200 or the error's)
    aft_requests_running / _waiting         requests in the engine now / waiting for it
    aft_prompt_tokens_total{model}          prompt tokens of every layer of every answered request
    aft_generation_tokens_total{model}      generated tokens of every layer
    aft_request_latency_seconds{model}      histogram: request received -> last byte
    aft_time_to_first_token_seconds{model}  histogram: request received -> first text of the answer
"""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class Histogram:
    def __init__(self, buckets=BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # observations <= each bound (cumulative when rendered)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, cumulative = [], 0
        for bound, k in zip(self.buckets, self.counts):
            cumulative += k
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {cumulative}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {self.sum:.6f}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


class Metrics:
    """Thread-safe counters; `render()` gives the /metrics page."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.generation_tokens: dict[str, int] = defaultdict(int)
        self.latency: dict[str, Histogram] = defaultdict(Histogram)
        self.ttft: dict[str, Histogram] = defaultdict(Histogram)
        self.running = 0
        self.waiting = 0

    def finished(self, model: str, status: int, seconds: float, prompt_tokens: int = 0,
                 generation_tokens: int = 0) -> None:
        with self._lock:
            self.requests[(model, status)] += 1
            if status == 200:
                self.prompt_tokens[model] += prompt_tokens
                self.generation_tokens[model] += generation_tokens
                self.latency[model].observe(seconds)

    def first_token(self, model: str, seconds: float) -> None:
        with self._lock:
            self.ttft[model].observe(seconds)

    def count(self, model: str | None = None, status: int | None = None) -> int:
        """Finished requests (of one model, with one status): what tests and the benchmark read."""
        with self._lock:
            return sum(k for (m, s), k in self.requests.items()
                       if (model is None or m == model) and (status is None or s == status))

    def move(self, running: int = 0, waiting: int = 0) -> None:
        with self._lock:
            self.running += running
            self.waiting += waiting

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP aft_requests_total Chat completion requests finished, by HTTP status.",
                     "# TYPE aft_requests_total counter"]
            lines += [f'aft_requests_total{{model="{_esc(m)}",status="{s}"}} {k}'
                      for (m, s), k in sorted(self.requests.items())]
            lines += ["# HELP aft_requests_running Requests in the engine now.", "# TYPE aft_requests_running gauge",
                      f"aft_requests_running {self.running}",
                      "# HELP aft_requests_waiting Requests queued for the engine.",
                      "# TYPE aft_requests_waiting gauge", f"aft_requests_waiting {self.waiting}"]
            for name, table, what in (("aft_prompt_tokens_total", self.prompt_tokens, "Prompt tokens"),
                                      ("aft_generation_tokens_total", self.generation_tokens, "Generated tokens")):
                lines += [f"# HELP {name} {what}, every layer of every answered request.", f"# TYPE {name} counter"]
                lines += [f'{name}{{model="{_esc(m)}"}} {k}' for m, k in sorted(table.items())]
            for name, table, what in (
                    ("aft_request_latency_seconds", self.latency, "Seconds from request to last byte (status 200)."),
                    ("aft_time_to_first_token_seconds", self.ttft, "Seconds from request to the first answer text.")):
                lines += [f"# HELP {name} {what}", f"# TYPE {name} histogram"]
                for m, h in sorted(table.items()):
                    lines += h.lines(name, f'model="{_esc(m)}"')
        return "\n".join(lines) + "\n"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
