"""`aft eval run`: tasks x strategies x seeds on one model, every answer cached.

Layout of the output folder (one folder can hold several models, by label):

    <out>/<label>/run.json                            model, engine, parameters, config
    <out>/cache/<model fingerprint>.jsonl             the sample cache (cache.py), shared by every
                                                      label that runs the same model weights
    <out>/<label>/<task>/<strategy>.seed<S>.jsonl     one record per question (appended)
    <out>/<label>/<task>/<strategy>.seed<S>.meta.json what produced it (checked on resume)
    <out>/report.md, summary.json, *.png              rebuilt by `aft eval report <out>`

A rerun skips the questions already answered; a rerun with settings that change
what is generated (model weights, sampling, task split, strategy) is refused for
that file rather than mixed into it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .. import config as cfglib
from ..engines.args import EngineArgs, ProposerArgs
from ..errors import AftError
from ..io import JsonlAppender, done_ids, output_lock, read_jsonl, write_json
from ..manifest import Manifest, ResumeArgs
from ..models import resolve
from ..prompts import STYLES, PromptStyle
from ..sampling import sampling_args
from .cache import CachedEngine, model_fingerprint
from .strategies import Strategy, parse_strategy, run_strategy
from .tasks import load_task

log = logging.getLogger(__name__)
opt = cfglib.opt

DEFAULT_STRATEGIES = ["greedy", "sample", "pa:k=4,l=1", "best_of_n:n=4,scorer=verifier", "majority:n=4"]


@dataclass
class EvalConfig(EngineArgs, sampling_args("eval"), ProposerArgs, ResumeArgs):
    out: str = opt("runs/eval", "output folder (cache, records, report)", flags=("-o",), run=True)
    label: str | None = opt(None, "name of this model in the report (default: from --model)", run=True)
    tasks: list = opt(["rg:arith1"], "tasks: rg:<reasoning-gym task or preset>, gsm8k:<file.jsonl>, "
                      "ifeval:<file.jsonl>", run=True)
    strategies: list = opt(list(DEFAULT_STRATEGIES), "strategies: greedy, sample, pa:k=K,l=L, "
                           "best_of_n:n=N,scorer=verifier|reward_model, majority:n=N", run=True)
    sweep: bool = opt(False, "also run the width x depth sweep (pa over sweep_k x sweep_l; l=0 = one sample)",
                      run=True)
    sweep_k: list = opt([1, 2, 4, 8], "sweep widths K", run=True)
    sweep_l: list = opt([0, 1, 2, 3], "sweep depths L", run=True)
    seeds: list = opt([0], "run seeds (each question derives its own from each)", run=True)
    limit: int | None = opt(None, "use only the first N questions of each task", ge=1, run=True)
    eval_size: int = opt(100, "reasoning-gym: held-out questions (same as `aft data build --eval_size`)", ge=1)
    pool_size: int = opt(1000, "reasoning-gym: pool size (same as `aft data build --pool_size`)", ge=1)
    split_seed: int = opt(0, "reasoning-gym: split seed (same as `aft data build --split_seed`)")
    style: str = opt("aft", "prompt style", choices=STYLES)
    template_file: str | None = opt(None, "your own aggregator preamble (overrides style)")
    batch_size: int = opt(16, "questions per engine call (and per resumable chunk)", ge=1, run=True)
    reward_model: str | None = opt(None, "reward model (transformers sequence classifier) for "
                                   "best_of_n:scorer=reward_model")
    num_parameters: int | None = opt(None, "model parameters for the FLOPs estimate when the engine cannot tell "
                                     "(remote models)", ge=1, run=True)
    cache: bool = opt(True, "keep every sample in <out>/cache/<model fingerprint>.jsonl and reuse it", run=True)
    report: bool = opt(True, "write the report when the run ends", run=True)
    n_boot: int = opt(2000, "bootstrap replicates for the intervals", ge=1, run=True)

    def prompt_style(self) -> PromptStyle:
        return PromptStyle.get(self.style, self.template_file)

    def check(self) -> None:
        if self.temperature <= 0:
            raise AftError("temperature must be > 0 (greedy is its own strategy)")
        self.prompt_style()
        strategies = self.strategy_list()
        self.seed_list()
        if any(s.kind == "best_of_n" and s.scorer == "reward_model" for s in strategies) and not self.reward_model:
            raise AftError("best_of_n:scorer=reward_model needs --reward_model <folder>")

    def strategy_list(self) -> list[Strategy]:
        out: list[Strategy] = []
        specs = list(self.strategies)
        if self.sweep:
            specs += [f"pa:k={k},l={l}" for k in _ints(self.sweep_k, "sweep_k") for l in _ints(self.sweep_l, "sweep_l")]
        for spec in specs:
            s = parse_strategy(spec)
            if s not in out:
                out.append(s)
        if not out:
            raise AftError("no strategies given")
        return out

    def seed_list(self) -> list[int]:
        seeds = _ints(self.seeds, "seeds")
        if not seeds:
            raise AftError("no seeds given")
        return seeds

    def display_label(self) -> str:
        return self.label or default_label(self.model)


def _ints(values, name) -> list[int]:
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError):
        raise AftError(f"{name}: expected integers, got {values!r}") from None


def default_label(model: str) -> str:
    p = Path(model)
    name = p.name if p.name else model
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def load_config(config_file: str | None, flags: dict) -> EvalConfig:
    return cfglib.from_sources(EvalConfig, config_file, flags)


@dataclass
class Summary:
    out: Path
    label: str
    files: int = 0
    answered: int = 0
    skipped: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    failed: int = 0  # records with an error in the files of this run (retried on a rerun)
    retried: int = 0  # failed in an earlier run, run again now
    accuracy: dict = dataclasses.field(default_factory=dict)  # (task, strategy) -> mean over seeds and questions


def run_eval(cfg: EvalConfig, engine=None, progress=None, proposers=None) -> Summary:
    """Run every (task, strategy, seed) not yet cached. `engine` (and `proposers`, in the order of
    cfg.proposers): already built Engines (tests); `progress(done, total, tokens)` after each chunk. One
    writer per --out folder (a lock beside it)."""
    cfg.check()
    with output_lock(cfg.out):
        return _run_eval_locked(cfg, engine, progress, proposers)


def _run_eval_locked(cfg: EvalConfig, engine, progress, proposers) -> Summary:
    sampling, style = cfg.sampling_settings(), cfg.prompt_style()
    strategies = sorted(cfg.strategy_list(), key=lambda s: -s.width)  # wide first: the cache serves the narrow
    seeds = cfg.seed_list()
    tasks = [load_task(t, cfg.eval_size, cfg.pool_size, cfg.split_seed, cfg.limit) for t in cfg.tasks]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise AftError(f"two tasks share a name ({names}); give reasoning-gym mappings a 'name'")
    for t in tasks:
        if not t.has_answers and any(s.kind == "majority" for s in strategies):
            raise AftError(f"task {t.name}: majority vote needs extractable answers (not {t.kind})")
    label = cfg.display_label()
    root = Path(cfg.out) / label
    summary = Summary(Path(cfg.out), label)
    fp = _fingerprint(cfg, cfg.model) if engine is None else model_fingerprint(cfg.model or engine.model)
    # P&A's proposal models (MoA): each has its own sample cache, and its weights are part of what P&A wrote
    proposer_fps = [_fingerprint(cfg, m) if proposers is None else model_fingerprint(m) for m in cfg.proposers or []]

    jobs = []  # (task, strategy, seed, path, manifest, todo items)
    for task in tasks:
        for seed in seeds:
            for strat in strategies:
                path = root / task.name / f"{strat.name}.seed{seed}.jsonl"
                run = file_manifest(cfg, path, task, strat, seed, label, fp, proposer_fps)
                run.check()
                done = done_ids(path, failed=is_failed if cfg.retry_failed else None)
                todo = [it for it in task.items if it.id not in done]
                summary.skipped += len(task.items) - len(todo)
                jobs.append((task, strat, seed, path, run, todo))
    total = sum(len(j[5]) for j in jobs)
    if total == 0:
        log.info("everything already answered in %s", root)
    else:
        own_engine = engine is None
        if own_engine:
            engine, spec = cfg.open()
        own_proposers = proposers is None and any(s.kind == "pa" for s in strategies)
        if own_proposers:
            try:
                proposers = cfg.open_proposers(engine)
            except BaseException:
                if own_engine:
                    engine.close()
                raise
        params = cfg.num_parameters or engine.num_parameters()
        run_meta = {"label": label, "model": cfg.model, "engine": engine.describe(), "num_parameters": params,
                    "model_fingerprint": fp, "config": cfglib.to_dict(cfg)}
        if proposers:
            run_meta.update(proposers=[e.describe() for e in proposers], proposer_fingerprints=proposer_fps)
        root.mkdir(parents=True, exist_ok=True)
        write_json(root / "run.json", run_meta)
        # one cache per model (a proposer that is --model shares its cache)
        caches = {id(engine): CachedEngine(engine, Path(cfg.out) / "cache" / f"{fp}.jsonl", fp) if cfg.cache else engine}
        for e, pfp in zip(proposers or [], proposer_fps):
            if id(e) not in caches:
                caches[id(e)] = CachedEngine(e, Path(cfg.out) / "cache" / f"{pfp}.jsonl", pfp) if cfg.cache else e
        cached = caches[id(engine)]
        cached_proposers = [caches[id(e)] for e in proposers] if proposers else None
        scorer = _load_scorer(cfg, strategies)
        t0 = time.perf_counter()
        done_count = 0
        try:
            for task, strat, seed, path, run, todo in jobs:
                if not todo:
                    continue
                run.write(num_parameters=params)
                summary.files += 1
                with JsonlAppender(path, failed=is_failed, retry=cfg.retry_failed) as out:
                    summary.retried += out.retried
                    for start in range(0, len(todo), cfg.batch_size):
                        chunk = todo[start:start + cfg.batch_size]
                        records = run_strategy(cached, task, chunk, strat, sampling, seed, scorer, style,
                                               cached_proposers)
                        questions = {it.id: question_text(it) for it in chunk}
                        for rec in records:
                            usage = rec["usage"]
                            row = {"id": rec["id"], "task": task.name, "strategy": strat.name, "seed": seed,
                                   "label": label, "question": questions.get(rec["id"]),
                                   **{k: v for k, v in rec.items() if k != "usage"},
                                   "usage": usage.to_dict(params)}
                            out.write(row)
                            summary.generated_tokens += usage.completion_tokens
                        done_count += len(chunk)
                        summary.answered += len(chunk)
                        summary.seconds = time.perf_counter() - t0
                        if progress:
                            progress(done_count, total, summary.generated_tokens)
                        log.info("%s %s seed %d: %d of %d questions done", task.name, strat.name, seed,
                                 min(start + cfg.batch_size, len(todo)), len(todo))
        finally:
            for c in caches.values():
                if isinstance(c, CachedEngine):
                    summary.cache_hits += c.hits
                    summary.cache_misses += c.misses
                    c.close()
            if scorer is not None:
                scorer.close()
            if own_proposers:
                for e in {id(e): e for e in proposers or []}.values():
                    if e is not engine:
                        e.close()
            if own_engine:
                engine.close()
    for task in tasks:
        for strat in strategies:
            vals = []
            for seed in seeds:
                path = root / task.name / f"{strat.name}.seed{seed}.jsonl"
                ids = {it.id for it in task.items}
                recs = [r for _, r in read_jsonl(path) if r.get("id") in ids] if path.exists() else []
                vals += [bool(r.get("correct")) for r in recs]
                summary.failed += sum(is_failed(r) for r in recs)
            if vals:
                summary.accuracy[(task.name, strat.name)] = sum(vals) / len(vals)
    if cfg.report:
        from .report import write_report

        write_report(cfg.out, n_boot=cfg.n_boot)
    return summary


def question_text(item) -> str:
    """The question as the task states it (without the answer-format line added to the prompt)."""
    if item.meta.get("question"):
        return item.meta["question"]
    users = [m["content"] for m in item.query if m.get("role") == "user"]
    return users[-1] if users else ""


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name.replace(".jsonl", ".meta.json"))


def file_manifest(cfg: EvalConfig, path: Path, task, strat: Strategy, seed: int, label: str, fp: str,
                  proposer_fps: list[str] = ()) -> Manifest:
    """The manifest of one records file: what changes its records (the model's weights, the sampling and
    prompt settings, the task split, the strategy, the seed; for P&A with several proposers, theirs)."""
    settings = {k: v for k, v in cfglib.output_settings(cfg).items() if k not in ("model", "proposers")}
    settings.update(model_fingerprint=fp, seed=seed, task=task.describe()["spec"], strategy=strat.name)
    if strat.kind == "pa" and proposer_fps:
        settings["proposer_fingerprints"] = list(proposer_fps)
    return Manifest(_meta_path(path), path, settings, {"task": task.describe(), "strategy": strat.to_dict(),
                                                        "seed": seed, "label": label, "model": cfg.model,
                                                        "model_fingerprint": fp,
                                                        # rebuilds P&A prompts (aggregate.replay_messages)
                                                        "prompt_style": dataclasses.asdict(cfg.prompt_style())})


def is_failed(record: dict) -> bool:
    return "error" in record


def _fingerprint(cfg: EvalConfig, model: str) -> str:
    """A model's fingerprint: its name and the weight files of the folder it resolves to."""
    spec = resolve(model, None if cfg.engine == "auto" else cfg.engine)
    return model_fingerprint(model, spec.adapter or spec.path)




def _load_scorer(cfg: EvalConfig, strategies: list[Strategy]):
    if not any(s.kind == "best_of_n" and s.scorer == "reward_model" for s in strategies):
        return None
    from ..data.scorers import RewardModelScorer

    return RewardModelScorer.load(cfg.reward_model, dtype=cfg.dtype, device=cfg.device)
