"""`aft data build`: turn preference data or plain prompts into an AFT training set.

Per prompt: K proposals (off-policy from the dataset, or on-policy: M >= K
samples from the model to be trained, top K kept by a scorer), then a target
(teacher aggregation, best proposal, or reference), then one row in each of

    <out>/aft.jsonl          prompt = aggregator_messages(query, proposals)  -> target
    <out>/sft.jsonl          prompt = proposer_messages(query)               -> same target
    <out>/candidates.jsonl   every candidate of every prompt sampled (kept or skipped): text,
                             score, finish reason, sample index, under the proposer prompt;
                             what SFT on all correct samples and BoN-aware training read (bon.py)
    <out>/aft_noprop.jsonl   (--no_proposals) the "no proposals" ablation: query -> the
                             aggregation; same rows as sft.jsonl, marked as the ablation
    <out>/aft_pseudo.jsonl   (--pseudo_aggregation) the paper's pseudo-aggregation ablation:
                             the aft.jsonl prompt -> the teacher's solution written WITHOUT the
                             proposals (the program teacher's solve(); a teacher model answers
                             the query alone); sft.jsonl then gets that solution too, since an
                             SFT model never sees proposals to review

all TRL conversational prompt-completion rows ({"id", "prompt", "completion", "meta"}).
Around that: the whole input is read and checked first (bad rows skipped or the
run stopped, --on_error), finished rows are appended at once (a crash loses the
chunk in flight; a rerun skips done ids, refusing a different config), --shard
i/n writes <out>/shards/i-of-n/ and `aft data merge` concatenates the shards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import config as cfglib
from ..engines.args import EngineArgs
from ..engines.base import Engine, Request, SamplingParams, check_fits, derive_seed
from ..engines.vllm import memory_shares
from ..errors import AftError
from ..io import JsonlAppender, done_ids, output_lock, read_jsonl, repair_torn_tail, rewrite_jsonl, write_json
from ..manifest import Manifest, ResumeArgs
from ..prompts import STYLES, PromptStyle, proposer_messages
from ..sampling import KEYS as SAMPLING_KEYS, sampling_args
from . import card as cardlib
from .onpolicy import clean_proposal, load_demonstrations, load_model_engine, proposal_messages
from .scorers import SCORERS, JudgeScorer, RewardModelScorer, Scorer, VerifierScorer, score_safely
from .sources import SCHEMAS, SELECT, Item, Proposal, RowError, read_items, select, shard_slice
from .targets import PROGRAM, TARGETS, ProgramTeacher, best_index, teacher_requests, training_prompt

log = logging.getLogger(__name__)

opt = cfglib.opt
# The on-policy proposals are one sampled layer: the P&A final-layer keys do not apply.
PROPOSAL_KEYS = tuple(k for k in SAMPLING_KEYS if not k.startswith("final_layer"))


@dataclass
class DataConfig(EngineArgs, sampling_args("on_policy", PROPOSAL_KEYS), ResumeArgs):
    """`model` (EngineArgs) is the model to be trained: it samples the on-policy proposals with the sampling
    settings; the teacher and the judge are opened with the same engine options."""

    out: str = opt("runs/data", "output folder (aft.jsonl, sft.jsonl, data card, config.json)", flags=("-o",),
                   run=True)
    # --- prompts and off-policy proposals
    input_file: str | None = opt(None, "preference or prompts file (.jsonl, .parquet) or a hub dataset name",
                                 flags=("-i",))
    schema: str = opt("auto", "input schema (auto: detected per row)", choices=SCHEMAS)
    score_field: str = opt("auto", "score of a response: ultrafeedback overall_score (auto) or fine_grained "
                           "(mean of the aspect ratings); generic: the scores field name")
    hub_split: str = opt("train", "split of a hub dataset")
    task: str | None = opt(None, "reasoning-gym task (or preset: arith1, products1, arith2, chain_sum2, "
                           "gsm_symbolic) as the prompt source, with reference answers")
    task_config: dict = opt({}, "reasoning-gym task config (YAML only)", cli=False)
    n_prompts: int | None = opt(None, "prompts to use (reasoning-gym: how many; a file: its first N rows)",
                                flags=("-n",), ge=1)
    split: str = opt("train", "reasoning-gym split: train or eval (disjoint by question text)",
                     choices=("train", "eval"))
    eval_size: int = opt(100, "reasoning-gym: questions reserved for evaluation (the eval stage uses the same)",
                         ge=0)
    pool_size: int = opt(1000, "reasoning-gym: entries drawn to find distinct questions", ge=1)
    split_seed: int = opt(0, "reasoning-gym: seed of the pool and of the train/eval split")
    # --- proposals
    proposals: str = opt("auto", "off_policy: the dataset's responses; on_policy: sampled from --model; "
                         "auto: off_policy when rows carry responses", choices=("auto", "off_policy", "on_policy"))
    k: int = opt(4, "proposals per prompt (K)", flags=("-k",), ge=1)
    m: int = opt(8, "on-policy candidates sampled per prompt (M >= K)", ge=1)
    select: str = opt("top", "which K: top by score, random (seeded) or all", choices=SELECT)
    proposal_prompt: str = opt("auto", "on-policy prompt: chat (the model's template), demonstrations "
                               "(in-context, for base models), auto (demonstrations iff no chat template)",
                               choices=("auto", "chat", "demonstrations"))
    demonstrations_file: str | None = opt(None, "JSONL of {query, response} (default: the bundled set)")
    # --- scorer
    scorer: str = opt("auto", "scores proposals (top-K) and targets (report); auto: verifier when prompts "
                      "have reference answers, else none", choices=("auto",) + SCORERS)
    reward_model: str | None = opt(None, "reward model (transformers sequence classifier) for scorer reward_model")
    judge_model: str | None = opt(None, "judge model (any --model value) for scorer judge")
    judge_engine: str = opt("auto", "engine of the judge", choices=("auto", "hf", "openai", "vllm"))
    judge_max_tokens: int = opt(256, "judge: max new tokens", ge=1)
    # --- target
    target: str = opt("teacher", "teacher aggregation, best proposal, or reference (pseudo-aggregation)",
                      choices=TARGETS)
    teacher: str | None = opt(None, "teacher model (any --model value; e.g. http://host:8000/v1#Llama-70B), or "
                              "'program': a correct worked solution that reviews the proposals (reasoning-gym)")
    teacher_review: str = opt("first", "--teacher program: its review of the proposals before the worked solution "
                              "(first) or after it, before the final answer (last)", choices=ProgramTeacher.REVIEW_AT)
    teacher_engine: str = opt("auto", "engine of the teacher", choices=("auto", "hf", "openai", "vllm"))
    teacher_temperature: float = opt(0.0, "teacher temperature (0 = greedy)", ge=0)
    teacher_top_p: float = opt(1.0, "teacher top-p", gt=0, le=1)
    teacher_max_tokens: int = opt(1024, "teacher max new tokens", ge=1)
    min_target_score: float | None = opt(None, "drop rows whose target scores below this (e.g. 1 with the verifier: "
                                         "keep only verified-correct targets; counted in skipped.jsonl)")
    no_proposals: bool = opt(False, "also write aft_noprop.jsonl (the no-proposals ablation: query -> aggregation)")
    pseudo_aggregation: bool = opt(False, "also write aft_pseudo.jsonl (the same prompts -> the teacher's solution "
                                   "written without the proposals); sft.jsonl gets that solution too")
    # --- prompts, seeds, run
    style: str = opt("aft", "prompt style (aft = the released checkpoints' prompts)", choices=STYLES)
    template_file: str | None = opt(None, "a file with your own aggregator preamble (overrides style)")
    seed: int = opt(2024, "seed; every prompt derives its own from it and its id")
    batch_size: int = opt(8, "prompts per engine call", ge=1, run=True)
    shard: str = opt("0/1", "i/n: build the i-th of n contiguous parts (into <out>/shards/i-of-n)", run=True)
    on_error: str = opt("skip", "a bad input row: skip it (counted in the data card) or stop", choices=("skip", "stop"),
                        run=True)

    def prompt_style(self) -> PromptStyle:
        return PromptStyle.get(self.style, self.template_file)

    def check(self) -> None:
        """What the field declarations cannot say: how keys go together."""
        if (self.input_file is None) == (self.task is None):
            raise AftError("give exactly one prompt source: --input_file (a file or hub dataset) or --task "
                           "(reasoning-gym)")
        if self.task is not None and self.n_prompts is None:
            raise AftError("--task needs --n_prompts (how many reasoning-gym prompts)")
        if self.proposals == "on_policy" and self.m < self.k and self.select != "all":
            raise AftError(f"on-policy sampling needs m >= k (m={self.m}, k={self.k})")
        if self.scorer == "reward_model" and not self.reward_model:
            raise AftError("scorer reward_model needs --reward_model (a sequence-classification model folder)")
        if self.scorer == "judge" and not self.judge_model:
            raise AftError("scorer judge needs --judge_model")
        if self.pseudo_aggregation and self.target != "teacher":
            raise AftError("--pseudo_aggregation needs --target teacher (the teacher writes the solution)")
        if self.target == "teacher" and not self.teacher:
            raise AftError("target teacher needs --teacher (any model: folder, smollm2-135m, "
                           "http://host:port/v1#name, vllm:...); or use --target best (verifiable tasks) or reference")
        shard_slice([], self.shard)
        self.prompt_style()


def config_hash(cfg: DataConfig) -> str:
    """A short hash of the settings that change what a row contains (shards of one build share it)."""
    return cfglib.fingerprint(cfglib.output_settings(cfg))


def load_config(config_file: str | None, flags: dict) -> DataConfig:
    return cfglib.from_sources(DataConfig, config_file, flags)


# ----------------------------------------------------------------------- input
def load_items(cfg: DataConfig) -> list[Item | RowError]:
    """Every prompt of the source, in order, with bad rows as RowErrors (or an AftError at the first, on_error=stop)."""
    if cfg.task is not None:
        from .reasoning_gym import split_prompts

        n = cfg.n_prompts or 0
        train, evals = split_prompts(cfg.task, n if cfg.split == "train" else 0,
                                     cfg.eval_size if cfg.split == "train" else n, cfg.task_config or None,
                                     cfg.split_seed, cfg.pool_size)
        rows: list = train if cfg.split == "train" else evals[:n]
    else:
        rows = list(read_items(cfg.input_file, cfg.schema, cfg.score_field, cfg.hub_split, cfg.n_prompts))
    off = _off_policy(cfg, rows)
    checked = []
    for r in rows:
        if isinstance(r, Item) and off:
            if not r.responses:
                where = f"{r.meta.get('source')}:{r.meta.get('source_line')}: "
                r = RowError(where, "no responses (off-policy proposals need a responses field)", "no responses")
            elif cfg.select != "all" and len(r.responses) < cfg.k:
                where = f"{r.meta.get('source')}:{r.meta.get('source_line')}: "
                r = RowError(where, f"fewer than k={cfg.k} responses ({len(r.responses)})", "fewer than k")
        if isinstance(r, RowError):
            if cfg.on_error == "stop":
                raise AftError(f"{r} (use --on_error skip to skip such rows)")
            log.warning("skipped: %s", r)
        checked.append(r)
    if not any(isinstance(r, Item) for r in checked):
        raise AftError(f"{cfg.input_file or cfg.task}: no usable rows")
    return checked


def _off_policy(cfg: DataConfig, rows: list) -> bool:
    if cfg.proposals != "auto":
        return cfg.proposals == "off_policy"
    return any(isinstance(r, Item) and r.responses for r in rows) or any(
        isinstance(r, RowError) and r.kind in ("fewer than k", "non-numeric score") for r in rows)


# ---------------------------------------------------------------------- engines
@dataclass
class Resources:
    """What a build uses; pass ready objects (tests, notebooks) or let `run_build` load them from cfg."""

    proposer: Engine | None = None
    teacher: Engine | None = None
    scorer: Scorer | None = None
    owned: list = field(default_factory=list)  # loaded here, closed at the end


def _scorer_name(cfg: DataConfig, items: list[Item]) -> str:
    if cfg.scorer != "auto":
        return cfg.scorer
    return "verifier" if any(it.answer is not None for it in items) else "none"


def vllm_models(cfg: DataConfig, on_policy: bool, scorer_name: str) -> set[str]:
    """The distinct vLLM models this build holds at once (proposer, teacher, judge): they share the GPU."""
    wanted = [(cfg.model, cfg.engine)] if on_policy else []
    if cfg.target == "teacher":
        wanted.append((cfg.teacher, cfg.teacher_engine))
    if scorer_name == "judge":
        wanted.append((cfg.judge_model, cfg.judge_engine))
    return {m.removeprefix("vllm:") for m, e in wanted if m and (e == "vllm" or m.startswith("vllm:"))}


def _prepare(cfg: DataConfig, res: Resources, on_policy: bool, scorer_name: str) -> Resources:
    cache: dict = {}
    # vLLM takes gpu_memory_utilization of the GPU: two vLLM models in this process get an equal share each.
    shared = len(vllm_models(cfg, on_policy, scorer_name))
    args = cfg.engine_args()
    if shared > 1:
        args = dataclasses.replace(args, gpu_memory_utilization=memory_shares(shared, args.gpu_memory_utilization))

    def engine_for(model: str, engine: str):
        key = (model, engine)
        if key not in cache:
            cache[key] = load_model_engine(args, model, engine, seed=cfg.seed)
            res.owned.append(cache[key])
        return cache[key]

    if on_policy and res.proposer is None:
        res.proposer = engine_for(cfg.model, cfg.engine)
    if res.proposer is not None:
        cache[(cfg.model, cfg.engine)] = res.proposer
    if cfg.target == "teacher" and res.teacher is None and cfg.teacher == PROGRAM:
        res.teacher = ProgramTeacher(cfg.teacher_review)
    if cfg.target == "teacher" and res.teacher is None:
        same = cfg.teacher_engine == cfg.engine or cfg.teacher_engine == "auto"
        res.teacher = cache.get((cfg.teacher, cfg.engine)) if same else None
        res.teacher = res.teacher or engine_for(cfg.teacher, cfg.teacher_engine)
    if res.scorer is None and scorer_name != "none":
        if scorer_name == "verifier":
            res.scorer = VerifierScorer()
        elif scorer_name == "reward_model":
            res.scorer = RewardModelScorer.load(cfg.reward_model, dtype=cfg.dtype, device=cfg.device)
            res.owned.append(res.scorer)
        elif scorer_name == "judge":
            res.scorer = JudgeScorer(engine_for(cfg.judge_model, cfg.judge_engine), cfg.judge_max_tokens, cfg.seed)
    return res


# ------------------------------------------------------------------------ build
@dataclass
class Summary:
    out: Path
    rows: int = 0  # written now
    resumed: int = 0  # done in an earlier run
    skipped: int = 0  # dropped while building (see skipped.jsonl), failed ones included
    failed: int = 0  # prompts that failed (in skipped.jsonl with "failed": true)
    retried: int = 0  # failed in an earlier run, run again now
    input_errors: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    card: dict | None = None


OUTPUTS = ("aft.jsonl", "sft.jsonl", "aft_noprop.jsonl", "aft_pseudo.jsonl", "skipped.jsonl", "candidates.jsonl")


def out_dir(cfg: DataConfig) -> Path:
    _, i, n = shard_slice([], cfg.shard)
    return Path(cfg.out) / "shards" / f"{i}-of-{n}" if n > 1 else Path(cfg.out)


def run_build(cfg: DataConfig, resources: Resources | None = None, progress=None) -> Summary:
    """Build the data set of `cfg`. `progress(done, total, tokens)` after each chunk."""
    cfg.check()
    res = resources or Resources()
    style = cfg.prompt_style()
    rows = load_items(cfg)
    rows, _, _ = shard_slice(rows, cfg.shard)
    items = [r for r in rows if isinstance(r, Item)]
    errors = [r for r in rows if isinstance(r, RowError)]
    out = out_dir(cfg)
    with output_lock(out):
        return _build_locked(cfg, res, style, rows, items, errors, out, progress)


def _build_locked(cfg: DataConfig, res: Resources, style: PromptStyle, rows: list, items: list, errors: list,
                  out: Path, progress) -> Summary:
    chash = config_hash(cfg)
    run = Manifest(out / "config.json", out, cfglib.output_settings(cfg), {"config": cfglib.to_dict(cfg)})
    run.check(inputs=[cfg.input_file], records=[out / name for name in OUTPUTS])
    _trim_partial(out, cfg.no_proposals)

    off = _off_policy(cfg, rows)
    scorer_name = _scorer_name(cfg, items)
    summary = Summary(out, input_errors=len(errors))
    write_json(out / "input_errors.json", [{"where": e.loc.rstrip(": "), "kind": e.kind, "message": e.message}
                                           for e in errors])
    aft = JsonlAppender(out / "aft.jsonl")
    sft = JsonlAppender(out / "sft.jsonl")
    noprop = JsonlAppender(out / "aft_noprop.jsonl") if cfg.no_proposals else None
    pseudo = JsonlAppender(out / "aft_pseudo.jsonl") if cfg.pseudo_aggregation else None
    skipped = JsonlAppender(out / "skipped.jsonl", failed=is_failed, retry=cfg.retry_failed)
    candidates = JsonlAppender(out / "candidates.jsonl")
    summary.retried, summary.failed = skipped.retried, skipped.failed_before
    try:
        done = aft.done | skipped.done
        todo = [it for it in items if it.id not in done]
        summary.resumed = len(items) - len(todo)
        if todo:
            _prepare(cfg, res, not off, scorer_name)
        run.write(config_hash=chash, proposals="off_policy" if off else "on_policy", scorer=scorer_name,
                  proposer=res.proposer.describe() if res.proposer else None,
                  teacher=res.teacher.describe() if res.teacher else None,
                  scorer_info=res.scorer.describe() if res.scorer else None)
        builder = _Builder(cfg, res, style, off, chash)
        t0 = time.perf_counter()
        for s in range(0, len(todo), cfg.batch_size):
            chunk = todo[s:s + cfg.batch_size]
            for item, rec in zip(chunk, builder.run(chunk)):
                if rec.get("candidates") is not None and item.id not in candidates.done:
                    candidates.write(rec["candidates"])  # before aft/skipped, which decide what is done
                if "skip" in rec:
                    skipped.write({"id": item.id, "reason": rec["skip"], "source": item.meta.get("source"),
                                   "source_line": item.meta.get("source_line"), "scores": rec.get("scores"),
                                   **({"failed": True} if rec.get("failed") else {})})
                    summary.skipped += 1
                    summary.failed += is_failed(rec)
                    continue
                sft.write(rec["sft"])
                if noprop is not None:
                    noprop.write(rec["noprop"])
                if pseudo is not None:
                    pseudo.write(rec["pseudo"])
                aft.write(rec["aft"])  # last: aft.jsonl decides what is done
                summary.rows += 1
            summary.generated_tokens = builder.tokens
            summary.seconds = time.perf_counter() - t0
            if progress:
                progress(summary.resumed + s + len(chunk), len(items), builder.tokens)
    finally:
        for f in (aft, sft, noprop, pseudo, skipped, candidates):
            if f is not None:
                f.close()
        for obj in res.owned:
            obj.close()
    summary.card = cardlib.write_card(out)
    return summary


def is_failed(record: dict) -> bool:
    """A prompt that failed (an error, e.g. a prompt longer than the context window), not one left out by
    design (a target below min_target_score): retried on a rerun."""
    return bool(record.get("failed"))


def _trim_partial(out: Path, no_proposals: bool) -> None:
    """After a crash sft/noprop/candidates may hold a row of a prompt that aft.jsonl (or, for candidates,
    skipped.jsonl) does not: drop it (it is rebuilt)."""
    done = done_ids(out / "aft.jsonl")
    # a failed prompt (retried on a rerun) has no candidates; one left out by design keeps them
    sampled = done | done_ids(out / "skipped.jsonl", failed=is_failed)
    for name in ("sft.jsonl", "aft_noprop.jsonl", "aft_pseudo.jsonl", "candidates.jsonl"):
        p = out / name
        if not p.exists():
            continue
        repair_torn_tail(p)
        recs = [r for _, r in read_jsonl(p)]
        keep = [r for r in recs if str(r.get("id")) in (sampled if name == "candidates.jsonl" else done)]
        if len(keep) != len(recs):
            rewrite_jsonl(p, keep)


class _Builder:
    """One chunk of prompts -> rows: proposals, scores, selection, targets. No I/O."""

    def __init__(self, cfg: DataConfig, res: Resources, style: PromptStyle, off_policy: bool, chash: str):
        self.cfg, self.res, self.style, self.off, self.chash = cfg, res, style, off_policy, chash
        self.tokens = 0
        self.demos = None
        if not off_policy:
            mode = cfg.proposal_prompt
            if mode == "auto":
                # (no proposer when everything is already built: nothing is sampled)
                mode = "demonstrations" if res.proposer and not res.proposer.has_chat_template else "chat"
            if mode == "demonstrations":
                self.demos = load_demonstrations(cfg.demonstrations_file)
            self.prompt_mode = mode
        params = cfg.sampling_settings().params(cfg.m)
        self.params = dataclasses.replace(params, stop=params.stop + (("# Query:",) if self.demos else ()))

    # --- proposals
    def candidates(self, chunk: list[Item]) -> list[list[Proposal] | str]:
        if self.off:
            return [[dataclasses.replace(p) for p in it.responses] for it in chunk]
        eng = self.res.proposer
        out: list = [None] * len(chunk)
        reqs, where = [], []
        for i, it in enumerate(chunk):
            messages = proposal_messages(it.query, self.style, self.demos)
            try:
                check_fits(eng, messages)
            except AftError as e:
                out[i] = f"proposal prompt: {e}"
                continue
            seed = derive_seed(self.cfg.seed, it.id, "propose")
            reqs.append(Request(messages, dataclasses.replace(self.params, seed=seed)))
            where.append(i)
        results = eng.generate(reqs) if reqs else []
        for i, r in zip(where, results):
            if r.error is not None:
                out[i] = f"proposals failed: {r.error}"
                continue
            seeds = r.seeds or [None] * len(r.completions)
            self.tokens += sum(c.tokens for c in r.completions)
            out[i] = [Proposal(clean_proposal(c.text, self.demos), f"s{j}", None, eng.model or None, c.tokens,
                               c.finish_reason, sd) for j, (c, sd) in enumerate(zip(r.completions, seeds))]
        return out

    def run(self, chunk: list[Item]) -> list[dict]:
        cfg = self.cfg
        cands = self.candidates(chunk)
        live = [i for i, c in enumerate(cands) if not isinstance(c, str)]
        recs: list[dict] = [{"skip": c, "failed": True} if isinstance(c, str) else {} for c in cands]
        # scores: the scorer's when there is one (dataset scores kept in meta), else the dataset's
        dataset_scores = {i: [p.score for p in cands[i]] for i in live}
        # which scale a prompt's scores are on: the scorer's, the dataset's, or none (the card keeps them apart)
        self.source = {i: "dataset" if any(_num(s) for s in dataset_scores[i]) else None for i in live}
        if self.res.scorer is not None and live:
            scores, errors = score_safely(self.res.scorer, [chunk[i] for i in live],
                                          [[p.text for p in cands[i]] for i in live])
            for i, sc, err in zip(live, scores, errors):
                if err is not None:
                    recs[i] = {"skip": err}
                    continue
                if all(s is None for s in sc):
                    continue  # the scorer cannot score this prompt (e.g. no reference answer): dataset scores stay
                self.source[i] = self.res.scorer.name
                for p, s in zip(cands[i], sc):
                    p.score = s
        chosen: dict[int, list[int]] = {}
        for i in live:
            if "skip" in recs[i]:
                continue
            try:
                chosen[i] = select(cands[i], cfg.k, cfg.select, derive_seed(cfg.seed, chunk[i].id, "select"))
            except AftError as e:
                recs[i] = {"skip": str(e)}
        # targets
        targets: dict[int, dict] = {}
        prompts: dict[int, tuple] = {}
        teacher = self.res.teacher if cfg.target == "teacher" and isinstance(self.res.teacher, Engine) else None
        for i, idx in chosen.items():
            props = [cands[i][j] for j in idx]
            prompts[i] = training_prompt(chunk[i].query, [p.text for p in props], self.style, teacher,
                                         cfg.teacher_max_tokens)
            if cfg.target == "best":
                b = best_index(props, derive_seed(cfg.seed, chunk[i].id, "best"))
                if b is None:
                    recs[i] = {"skip": "target best needs a scored proposal not cut at max_tokens"}
                    continue
                targets[i] = {"text": props[b].text, "source_id": props[b].id, "score": props[b].score,
                              "tokens": props[b].tokens, "finish_reason": props[b].finish_reason, "seed": props[b].seed}
            elif cfg.target == "reference":
                if not chunk[i].reference:
                    recs[i] = {"skip": "target reference needs a reference answer"}
                    continue
                targets[i] = {"text": chunk[i].reference, "source_id": "reference", "score": None, "tokens": None,
                              "finish_reason": None, "seed": None}
        if cfg.target == "teacher":
            self._teach(chunk, chosen, prompts, targets, recs)
        # score targets that are not a proposal (for the card's "target beats best")
        if self.res.scorer is not None and cfg.target != "best":
            ids = [i for i in targets if recs[i].get("skip") is None]
            if ids:
                sc, errors = score_safely(self.res.scorer, [chunk[i] for i in ids], [[targets[i]["text"]] for i in ids])
                for i, s, err in zip(ids, sc, errors):
                    if err is not None:
                        recs[i] = {"skip": f"target: {err}"}
                    targets[i]["score"] = s[0]
        for i, t in targets.items():
            if "skip" in recs[i]:
                continue
            if not t["text"].strip():
                recs[i] = {"skip": "empty target", "scores": self._scores(i, cands[i], t["score"])}
                continue
            if cfg.min_target_score is not None and not (_num(t["score"]) and t["score"] >= cfg.min_target_score):
                recs[i] = {"skip": f"target score below min_target_score {cfg.min_target_score}",
                           "scores": self._scores(i, cands[i], t["score"])}
                continue
            recs[i] = self._rows(chunk[i], cands[i], chosen[i], dataset_scores[i], prompts[i], t, self.source[i])
        for i in live:  # every prompt sampled keeps all its candidates, whether its row was kept or not
            recs[i]["candidates"] = self._candidates(chunk[i], cands[i], self.source[i])
        return recs

    def _candidates(self, item: Item, cands: list[Proposal], score_source: str | None) -> dict:
        """One candidates.jsonl row: the prompt the model answers at inference (proposer messages) and every
        candidate in sample order, with its verifier / reward score (None: unscored) and finish reason."""
        return {
            "id": item.id,
            "prompt": proposer_messages(item.query, self.style),
            "candidates": [{"index": j, "id": p.id, "text": p.text, "score": p.score, "finish_reason": p.finish_reason,
                            "tokens": p.tokens, "seed": p.seed} for j, p in enumerate(cands)],
            "meta": {"proposal_source": "off_policy" if self.off else "on_policy",
                     "proposal_prompt": None if self.off else self.prompt_mode,
                     "score_source": score_source, "scorer": self.res.scorer.name if self.res.scorer else None,
                     "task": item.meta.get("task"), "question": item.meta.get("question"), "answer": item.answer,
                     "config_hash": self.chash},
        }

    def _scores(self, i: int, cands: list[Proposal], target_score) -> dict:
        """A skipped prompt's scores, so that the data card counts every prompt sampled, not only those kept."""
        return {"source": self.source[i], "candidates": [p.score for p in cands], "target": target_score}

    def _teach(self, chunk, chosen, prompts, targets, recs) -> None:
        """The teacher's aggregation of each row (and, for --pseudo_aggregation, its solution without the
        proposals, in targets[i]["solution"]); a teacher model's finish reason is kept in the row's meta."""
        cfg, eng = self.cfg, self.res.teacher
        ids = [i for i in chosen if "skip" not in recs[i]]
        if not ids:
            return
        if isinstance(eng, ProgramTeacher):
            for i in ids:
                if chunk[i].answer is None:
                    recs[i] = {"skip": "the program teacher needs a reference answer"}
                    continue
                texts = prompts[i][1]
                targets[i] = {"text": eng.aggregate(chunk[i], texts), "source_id": PROGRAM, "score": None,
                              "tokens": None, "finish_reason": None, "seed": None,
                              "solution": eng.solve(chunk[i]) if cfg.pseudo_aggregation else None}
            return
        params = SamplingParams(n=1, temperature=cfg.teacher_temperature, top_p=cfg.teacher_top_p,
                                max_tokens=cfg.teacher_max_tokens)
        seeds = [derive_seed(cfg.seed, chunk[i].id, "teacher") for i in ids]
        prompts_ = [prompts[i][0] for i in ids]
        if cfg.pseudo_aggregation:  # the same teacher, asked the query alone
            prompts_ += [proposer_messages(chunk[i].query, self.style) for i in ids]
        results = eng.generate(teacher_requests(prompts_, params, seeds + seeds))
        solutions = results[len(ids):]
        for n, (i, sd, r) in enumerate(zip(ids, seeds, results)):
            failed = r.error or (solutions[n].error if solutions else None)
            if failed is not None:
                recs[i] = {"skip": f"teacher failed: {failed}"}
                continue
            c = r.completions[0]
            self.tokens += c.tokens
            sol = solutions[n].completions[0] if solutions else None
            if sol is not None:
                self.tokens += sol.tokens
            targets[i] = {"text": c.text.strip(), "source_id": "teacher", "score": None, "tokens": c.tokens,
                          "finish_reason": c.finish_reason, "seed": sd,
                          "solution": sol.text.strip() if sol is not None else None}

    def _rows(self, item: Item, cands: list[Proposal], idx: list[int], dataset_scores: list, prompt: tuple,
              target: dict, score_source: str | None) -> dict:
        cfg = self.cfg
        messages, texts, truncated = prompt
        props = [cands[j] for j in idx]
        best = max((p.score for p in props if _num(p.score)), default=None)
        meta = {
            "source": item.meta.get("source"),
            "source_line": item.meta.get("source_line"),
            "proposal_source": "off_policy" if self.off else "on_policy",
            "proposal_prompt": None if self.off else self.prompt_mode,
            "select": cfg.select,
            "k": len(props),
            "candidates": [{"id": p.id, "score": p.score, "dataset_score": ds, "model": p.model,
                            "chars": len(p.text), "words": len(p.text.split()), "tokens": p.tokens,
                            "finish_reason": p.finish_reason, "seed": p.seed}
                           for p, ds in zip(cands, dataset_scores)],
            "proposals": [p.id for p in props],
            "proposal_scores": [p.score for p in props],
            "truncated": [c.to_dict() for c in truncated],
            "diversity": cardlib.diversity(texts),
            "target": {"mode": cfg.target, "source_id": target["source_id"], "score": target["score"],
                       "best_proposal_score": best, "chars": len(target["text"]),
                       "words": len(target["text"].split()), "tokens": target["tokens"],
                       "finish_reason": target["finish_reason"], "seed": target["seed"]},
            "teacher": self.res.teacher.model if cfg.target == "teacher" and self.res.teacher else None,
            "scorer": self.res.scorer.name if self.res.scorer else None,
            "score_source": score_source,  # the scale of "score": the scorer's name, "dataset" or None
            "seeds": {"base": cfg.seed, "proposals": None if self.off else derive_seed(cfg.seed, item.id, "propose"),
                      "select": derive_seed(cfg.seed, item.id, "select") if cfg.select == "random" else None,
                      "teacher": target["seed"] if cfg.target == "teacher" else None},
            "task": item.meta.get("task"),
            "question": item.meta.get("question"),
            "answer": item.answer,
            "rg_metadata": item.meta.get("rg_metadata"),
            "style": self.style.name,
            "config_hash": self.chash,
        }
        completion = [{"role": "assistant", "content": target["text"]}]
        solution = target.get("solution")
        sft_completion = [{"role": "assistant", "content": solution}] if solution else completion
        query_prompt = proposer_messages(item.query, self.style)
        return {
            "aft": {"id": item.id, "prompt": messages, "completion": completion, "meta": {**meta, "variant": "aft"}},
            "sft": {"id": item.id, "prompt": query_prompt, "completion": sft_completion,
                    "meta": {**meta, "variant": "sft"}},
            "noprop": {"id": item.id, "prompt": query_prompt, "completion": completion,
                       "meta": {**meta, "variant": "no_proposals"}},
            "pseudo": {"id": item.id, "prompt": messages, "completion": sft_completion,
                       "meta": {**meta, "variant": "pseudo_aggregation"}},
        }


def _num(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


# ------------------------------------------------------------------------ merge
def merge_shards(out: str | Path) -> dict:
    """Concatenate <out>/shards/i-of-n/* in shard order into <out>/, then write the data card."""
    out = Path(out)
    shard_dirs = sorted((out / "shards").glob("*-of-*"), key=lambda p: int(p.name.split("-of-")[0]))
    if not shard_dirs:
        raise AftError(f"{out}/shards: no shard folders (build with --shard i/n first)")
    n = int(shard_dirs[0].name.split("-of-")[1])
    names = {p.name for p in shard_dirs}
    missing = [f"{i}-of-{n}" for i in range(n) if f"{i}-of-{n}" not in names]
    if missing or len(shard_dirs) != n:
        raise AftError(f"{out}/shards: missing shard(s) {', '.join(missing) or '(mixed n)'}")
    configs = [json.loads((d / "config.json").read_text()) for d in shard_dirs]
    if len({c["config_hash"] for c in configs}) != 1:
        raise AftError(f"{out}/shards: the shards were built with different configs")
    for name in OUTPUTS:
        parts = [d / name for d in shard_dirs if (d / name).exists()]
        if not parts:
            continue
        tmp = out / (name + ".tmp")
        with open(tmp, "wb") as f:
            for p in parts:
                f.write(p.read_bytes())
        tmp.replace(out / name)
    errors = [e for d in shard_dirs for e in json.loads((d / "input_errors.json").read_text())]
    write_json(out / "input_errors.json", errors)
    merged = dict(configs[0])
    merged["config"] = {**merged["config"], "shard": "0/1"}
    merged["merged_from"] = [str(d) for d in shard_dirs]
    write_json(out / "config.json", merged)
    return cardlib.write_card(out)
