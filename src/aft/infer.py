"""`aft infer`: propose-and-aggregate over a JSONL file of queries.

Around the loop (aggregate.py): read and check the whole input first, resume an
earlier run of the same config, run chunks of `batch_size` queries, append each
finished query to the output at once, and record the resolved config next to it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from . import config as cfglib
from .aggregate import PAConfig, plan, propose_and_aggregate
from .engines import check_request_limits, open_engine
from .errors import AftError
from .io import JsonlAppender, output_lock, read_queries, write_json
from .prompts import STYLES, PromptStyle

log = logging.getLogger(__name__)

SAMPLE_QUESTIONS = Path(__file__).parent / "resources" / "sample_questions.jsonl"


@dataclass
class InferConfig:
    model: str = cfglib.opt("smollm2-135m", "embedded short name, model folder, PEFT adapter folder, hub id, "
                            "http://host:port/v1[#name] (OpenAI-compatible) or vllm:<model>", flags=("-m",))
    engine: str = cfglib.opt("auto", "engine; auto picks from --model", choices=("auto", "hf", "openai", "vllm"))
    input_file: str | None = cfglib.opt(None, "input JSONL ({'query': [...]}, {'messages': [...]}, {'prompt': ...} "
                                        "or {'instruction': ...}); default: the bundled sample questions", flags=("-i",))
    output_file: str | None = cfglib.opt(None, "output JSONL (appended, resumable); default: "
                                         "runs/infer/<input>-<config hash>.jsonl", flags=("-o",))
    n: int = cfglib.opt(5, "width K: proposals (and aggregations) per layer", flags=("-k",))
    num_aggregation: int = cfglib.opt(2, "depth L: aggregation layers, the final one included", flags=("-l",))
    temperature: float = cfglib.opt(0.7, "sampling temperature of the proposal and intermediate layers")
    top_p: float = cfglib.opt(0.95, "top-p of the proposal and intermediate layers")
    top_k: int = cfglib.opt(0, "top-k of the proposal and intermediate layers (0 = off)")
    max_tokens: int = cfglib.opt(4096, "max new tokens per generation (all layers)")
    final_layer_temperature: float = cfglib.opt(0.7, "temperature of the final aggregation (0 = greedy)")
    final_layer_top_p: float = cfglib.opt(1.0, "top-p of the final aggregation")
    stop: list = cfglib.opt([], "stop strings")
    seed: int = cfglib.opt(2024, "seed; each query and layer derives its own from it and the query id")
    style: str = cfglib.opt("aft", "prompt style (aft = the released checkpoints' prompts)", choices=STYLES)
    template_file: str | None = cfglib.opt(None, "a file with your own aggregator preamble (overrides style)")
    shuffle: bool = cfglib.opt(False, "shuffle the proposals' order (seeded) before each aggregation")
    batch_size: int = cfglib.opt(8, "queries advanced together through the layers")
    dtype: str = cfglib.opt("auto", "hf engine: auto, float32, bfloat16, float16")
    device: str = cfglib.opt("auto", "hf engine: auto, cpu, cuda, cuda:1 ...")
    max_concurrency: int = cfglib.opt(8, "openai engine: requests in flight")
    timeout: float = cfglib.opt(300.0, "openai engine: seconds to wait for one reply before retrying")
    max_retries: int = cfglib.opt(2, "openai engine: retries of a timed-out, dropped or 429/5xx call")
    api_key: str | None = cfglib.opt(None, "openai engine: API key (default: $OPENAI_API_KEY, else 'EMPTY')", cli=False)
    tensor_parallel_size: int = cfglib.opt(1, "vllm engine: GPUs per model replica")
    context_window: int | None = cfglib.opt(None, "override the model's context window (tokens)")

    def pa(self) -> PAConfig:
        return PAConfig(
            n=self.n, num_aggregation=self.num_aggregation, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, max_tokens=self.max_tokens, final_layer_temperature=self.final_layer_temperature,
            final_layer_top_p=self.final_layer_top_p, stop=tuple(self.stop), seed=self.seed,
            style=PromptStyle.get(self.style, self.template_file), shuffle=self.shuffle,
        )


# Keys of the official AFT config (configs/default.yaml of the released code) -> ours.
OFFICIAL_KEYS = {"model_name": "model", "vllm_seed": "seed"}
GENERATION_PARAMS = {"temperature", "top_p", "top_k", "max_tokens", "n", "final_layer_temperature", "final_layer_top_p",
                     "stop"}
# Only these change what is generated; a resumed run must agree on them.
OUTPUT_KEYS = ("model", "n", "num_aggregation", "temperature", "top_p", "top_k", "max_tokens",
               "final_layer_temperature", "final_layer_top_p", "stop", "seed", "style", "template_file", "shuffle",
               "input_file")


def normalize(raw: dict, source: str) -> dict:
    """Flatten the official layout (generation_params: {...}, model_name, vllm_seed) into our keys."""
    flat = {}
    for key, value in raw.items():
        if key == "generation_params":
            if not isinstance(value, dict):
                raise AftError(f"{source}: 'generation_params' must be a mapping")
            for k, v in value.items():
                if k not in GENERATION_PARAMS:
                    raise AftError(f"{source}: unknown key 'generation_params.{k}'")
                flat[k] = v
        else:
            flat[OFFICIAL_KEYS.get(key, key)] = value
    return flat


def load_config(config_file: str | None, flags: dict) -> InferConfig:
    cfg = cfglib.from_sources(InferConfig, config_file, flags, normalize)
    for name in ("n", "batch_size", "max_tokens", "max_concurrency", "tensor_parallel_size"):
        if getattr(cfg, name) < 1:
            raise AftError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0 < cfg.top_p <= 1 or not 0 < cfg.final_layer_top_p <= 1:
        raise AftError("top_p and final_layer_top_p must be in (0, 1]")
    if cfg.temperature < 0 or cfg.final_layer_temperature < 0:
        raise AftError("temperatures must be >= 0")
    check_request_limits(cfg.timeout, cfg.max_retries)
    plan(cfg.pa())  # checks style / template file and the layers
    return cfg


def default_output(cfg: InferConfig) -> Path:
    stem = Path(cfg.input_file).stem if cfg.input_file else "sample_questions"
    return Path("runs") / "infer" / f"{stem}-{cfglib.fingerprint(_output_view(cfg))}.jsonl"


def _output_view(cfg: InferConfig) -> dict:
    d = cfglib.to_dict(cfg)
    return {k: d[k] for k in OUTPUT_KEYS}


def dry_run(cfg: InferConfig, limit: int = 2) -> list[dict]:
    """The exact messages each layer would send for the first `limit` queries, without a model."""
    from .aggregate import layer_messages

    pa = cfg.pa()
    items = read_queries(cfg.input_file or SAMPLE_QUESTIONS)[:limit]
    shown = []
    for item in items:
        layers = []
        previous = None
        for layer in plan(pa):
            messages, info = layer_messages(layer, item.query, previous, pa)
            layers.append({"layer": layer.index, "role": layer.role, "params": layer.params.to_dict(),
                           "messages": messages, **info})
            previous = [f"<output {j + 1} of layer {layer.index}>" for j in range(layer.params.n)]
        shown.append({"id": item.id, "layers": layers})
    return shown


@dataclass
class Summary:
    output_file: Path
    done: int = 0
    skipped: int = 0  # finished in an earlier run
    errors: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    results: list | None = None


def run_infer(cfg: InferConfig, progress=None) -> Summary:
    """Run P&A over cfg.input_file, appending to the output.

    `progress(done, total, tokens, stage)` is called after every layer of every chunk.
    """
    pa = cfg.pa()
    input_file = cfg.input_file or SAMPLE_QUESTIONS
    items = read_queries(input_file)  # all input checked before any model is loaded
    out_path = Path(cfg.output_file) if cfg.output_file else default_output(cfg)
    meta_path = out_path.with_name(out_path.name + ".config.json")
    with output_lock(out_path):
        _check_resume(cfg, out_path, meta_path)
        return _run_locked(cfg, pa, items, out_path, meta_path, progress)


def _run_locked(cfg: InferConfig, pa: PAConfig, items: list, out_path: Path, meta_path: Path, progress) -> Summary:
    summary = Summary(out_path, results=[])
    with JsonlAppender(out_path) as out:
        todo = [it for it in items if it.id not in out.done]
        summary.skipped = len(items) - len(todo)
        if not todo:
            log.info("all %d queries already done in %s", len(items), out_path)
            return summary
        engine, _ = open_engine(cfg.model, cfg.engine, cfg.context_window, dtype=cfg.dtype, device=cfg.device,
                                max_concurrency=cfg.max_concurrency, api_key=cfg.api_key,
                                timeout=cfg.timeout, max_retries=cfg.max_retries,
                                tensor_parallel_size=cfg.tensor_parallel_size, seed=cfg.seed)
        write_json(meta_path, {"config": cfglib.to_dict(cfg), "engine": engine.describe(),
                               "layers": [dataclasses.asdict(layer) for layer in plan(pa)]})
        t0 = time.perf_counter()
        last_layer = plan(pa)[-1].index

        def on_layer(layer, seconds, tokens):
            summary.generated_tokens += tokens
            if progress:
                progress(summary.done, len(todo), summary.generated_tokens, f"layer {layer.index}/{last_layer}")

        try:
            for start in range(0, len(todo), cfg.batch_size):
                chunk = todo[start:start + cfg.batch_size]
                records = propose_and_aggregate(engine, [(it.id, it.query) for it in chunk], pa, on_layer)
                for it, rec in zip(chunk, records):
                    row = {**it.record, **rec}
                    out.write(row)
                    summary.results.append(row)
                    summary.errors += "error" in rec
                summary.done += len(chunk)
                summary.seconds = time.perf_counter() - t0
                if progress:
                    progress(summary.done, len(todo), summary.generated_tokens)
        finally:
            engine.close()
    return summary


def _check_resume(cfg: InferConfig, out_path: Path, meta_path: Path) -> None:
    if not out_path.exists() or not meta_path.exists():
        return
    try:
        import json

        previous = json.loads(meta_path.read_text())["config"]
    except (ValueError, KeyError, OSError):
        return
    now = _output_view(cfg)
    changed = [k for k in OUTPUT_KEYS if previous.get(k) != now[k]]
    if changed:
        raise AftError(f"{out_path}: was written with a different {', '.join(changed)}; "
                       f"choose another --output_file or delete it to start over")
