"""`aft infer`: propose-and-aggregate over a JSONL file of queries.

Around the loop (aggregate.py): read and check the whole input first, resume an
earlier run of the same settings (manifest.py: <output>.config.json), run chunks
of `batch_size` queries, append each finished query to the output at once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from . import config as cfglib
from .aggregate import PAConfig, PAEngine, plan
from .engines.args import EngineArgs, ProposerArgs
from .errors import AftError
from .io import JsonlAppender, output_lock, read_queries
from .manifest import Manifest, ResumeArgs
from .prompts import STYLES, PromptStyle
from .sampling import sampling_args

log = logging.getLogger(__name__)

SAMPLE_QUESTIONS = Path(__file__).parent / "resources" / "sample_questions.jsonl"


@dataclass
class PAArgs(ProposerArgs):
    """The propose-and-aggregate options of a command that runs P&A (`aft infer`, `aft serve`): YAML keys
    and flags; with the sampling settings (sampling_args) they make the PAConfig, and with the engine
    options (EngineArgs) the PAEngine (`open_pa`)."""

    n: int = cfglib.opt(5, "width K: proposals (and aggregations) per layer", flags=("-k",), ge=1)
    num_aggregation: int = cfglib.opt(2, "depth L: aggregation layers, the final one included", flags=("-l",), ge=0)
    seed: int = cfglib.opt(2024, "seed; each query and layer derives its own from it and the query id")
    style: str = cfglib.opt("aft", "prompt style (aft = the released checkpoints' prompts)", choices=STYLES)
    template_file: str | None = cfglib.opt(None, "a file with your own aggregator preamble (overrides style)")
    shuffle: bool = cfglib.opt(False, "shuffle the proposals' order (seeded) before each aggregation")

    def pa(self) -> PAConfig:
        return PAConfig(n=self.n, num_aggregation=self.num_aggregation, sampling=self.sampling_settings(),
                        seed=self.seed, style=PromptStyle.get(self.style, self.template_file), shuffle=self.shuffle)

    def check(self) -> None:
        plan(self.pa())  # checks style / template file and the layers

    def open_pa(self) -> PAEngine:
        """Open --model (the aggregator) and --proposers, with this config's engine options, as one PAEngine."""
        pa = self.pa()
        self.resolve_proposers()
        engine, _ = self.open(seed=self.seed)  # type: ignore[attr-defined]
        try:
            return PAEngine(engine, pa, self.open_proposers(engine, seed=self.seed))
        except BaseException:
            engine.close()
            raise


@dataclass
class InferConfig(EngineArgs, sampling_args("aft"), PAArgs, ResumeArgs):
    input_file: str | None = cfglib.opt(None, "input JSONL ({'query': [...]}, {'messages': [...]}, {'prompt': ...} "
                                        "or {'instruction': ...}); default: the bundled sample questions",
                                        flags=("-i",))
    output_file: str | None = cfglib.opt(None, "output JSONL (appended, resumable); default: "
                                         "runs/infer/<input>-<config hash>.jsonl", flags=("-o",))
    batch_size: int = cfglib.opt(8, "queries advanced together through the layers (on a continuous engine: "
                                 "queries in flight at once, each its own pipeline)", ge=1, run=True)


# Keys of the official AFT config (configs/default.yaml of the released code) -> ours.
OFFICIAL_KEYS = {"model_name": "model", "vllm_seed": "seed"}
GENERATION_PARAMS = {"temperature", "top_p", "top_k", "max_tokens", "n", "final_layer_temperature", "final_layer_top_p",
                     "stop"}


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
    return cfglib.from_sources(InferConfig, config_file, flags, normalize)


def default_output(cfg: InferConfig) -> Path:
    stem = Path(cfg.input_file).stem if cfg.input_file else "sample_questions"
    return Path("runs") / "infer" / f"{stem}-{cfglib.fingerprint(cfglib.output_settings(cfg))}.jsonl"


def manifest(cfg: InferConfig, out_path: Path) -> Manifest:
    """The output's manifest, <output>.config.json: the settings that change the answers, and the config."""
    return Manifest(out_path.with_name(out_path.name + ".config.json"), out_path, cfglib.output_settings(cfg),
                    {"config": cfglib.to_dict(cfg)})


def dry_run(cfg: InferConfig, limit: int = 2) -> list[dict]:
    """The exact messages each layer would send for the first `limit` queries, without a model."""
    from .aggregate import layer_messages, proposal_counts

    pa = cfg.pa()
    items = read_queries(cfg.input_file or SAMPLE_QUESTIONS)[:limit]
    shown = []
    for item in items:
        layers = []
        previous = None
        for layer in plan(pa):
            messages, order, _ = layer_messages(layer, item.query, previous, pa)
            shares = {}
            if layer.role == "propose" and cfg.proposers:  # who writes how many of the K proposals
                counts = proposal_counts(layer.params.n, len(cfg.proposers))
                shares = {"proposers": [{"model": m, "n": c} for m, c in zip(cfg.proposers, counts)]}
            layers.append({"layer": layer.index, "role": layer.role, "params": layer.params.to_dict(),
                           "messages": messages, **shares, **({"order": order} if order is not None else {})})
            previous = [f"<output {j + 1} of layer {layer.index}>" for j in range(layer.params.n)]
        shown.append({"id": item.id, "layers": layers})
    return shown


@dataclass
class Summary:
    output_file: Path
    done: int = 0
    skipped: int = 0  # finished in an earlier run
    errors: int = 0  # failed queries in the output (this run's and, with --no-retry_failed, earlier ones)
    retried: int = 0  # failed in an earlier run, run again now
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
    run = manifest(cfg, out_path)
    with output_lock(out_path):
        run.check(inputs=[input_file])
        return _run_locked(cfg, pa, items, out_path, run, progress)


def _run_locked(cfg: InferConfig, pa: PAConfig, items: list, out_path: Path, run: Manifest, progress) -> Summary:
    summary = Summary(out_path, results=[])
    with JsonlAppender(out_path, failed=is_failed, retry=cfg.retry_failed) as out:
        todo = [it for it in items if it.id not in out.done]
        summary.skipped = len(items) - len(todo)
        summary.retried, summary.errors = out.retried, out.failed_before
        if not todo:
            log.info("all %d queries already done in %s", len(items), out_path)
            return summary
        engine = cfg.open_pa()
        more = {"proposers": [e.describe() for e in engine.proposers]} if cfg.proposers else {}
        run.write(engine=engine.aggregator.describe(), **more, layers=[dataclasses.asdict(layer) for layer in plan(pa)],
                  prompt_style=dataclasses.asdict(pa.style))  # rebuilds the prompts exactly
        t0 = time.perf_counter()
        last_layer = plan(pa)[-1].index

        def on_layer(layer, seconds, tokens):
            summary.generated_tokens += tokens
            if progress:
                progress(summary.done, len(todo), summary.generated_tokens, f"layer {layer.index}/{last_layer}")

        try:
            for start in range(0, len(todo), cfg.batch_size):
                chunk = todo[start:start + cfg.batch_size]
                records = engine.run([(it.id, it.query) for it in chunk], on_layer)
                for it, rec in zip(chunk, records):
                    row = {**it.record, **rec.to_dict()}
                    out.write(row)
                    summary.results.append(row)
                    summary.errors += rec.error is not None
                summary.done += len(chunk)
                summary.seconds = time.perf_counter() - t0
                if progress:
                    progress(summary.done, len(todo), summary.generated_tokens)
        finally:
            engine.close()
    return summary


def is_failed(record: dict) -> bool:
    return "error" in record
