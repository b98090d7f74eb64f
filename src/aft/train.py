"""Train an AFT model (or the SFT baseline, or a mix) with TRL's SFTTrainer and PEFT.

Read top to bottom:

  1. `load_config`   our keys (TrainConfig) + any TRL SFTConfig field, from YAML and flags;
  2. `read_rows`     validate every row of the data files (file:line errors) before any model loads;
  3. `select_rows`   the mode: aft rows, sft rows, or aft rows plus a fraction of the sft rows; or, for
                     rft / bon-sft / bon-rl, every sampled candidate weighted (aft.bon);
  4. `load_model`    resolve --model, set up the chat template and the end-of-turn token;
  5. `encode_row`    tokenize one row: the prompt exactly as inference renders it, and labels
                     (loss) on the target text plus the end-of-turn token only;
  6. `run_train`     SFTTrainer (+ LoRA via peft_config), resume, save adapter / merged model,
                     tokenizer + chat template, metrics.json, loss.png, config.yaml;
                     with --rounds R (on-policy): sample with the model trained so far, weight, train, R times.

The dataset handed to SFTTrainer is already tokenized (input_ids + labels), so TRL
trains on exactly the positions `encode_row` chose; tests/test_train.py decodes
them from a real batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path

from . import config as cfglib
from .errors import AftError, where
from .io import make_folder, read_jsonl, read_text, record_id, write_json
from .loading import is_main_process
from .manifest import Manifest
from .models import portable_id
from .prompts import ROLES, validate_messages

log = logging.getLogger(__name__)

MODES = ("aft", "sft", "mix", "rft", "bon-sft", "bon-rl")
WEIGHTED = ("rft", "bon-sft", "bon-rl")  # train on candidates.jsonl with per-sample weights (aft.bon)
BASE_MARKER = "aft_base_model.txt"  # read by aft.models.resolve for adapter folders
# A ChatML template whose end of turn is the tokenizer's own EOS token: for base models that have no chat
# template and no <|im_end|> token, so no new tokens (and no embedding resize) are needed, adapters load on the
# unchanged base, and generation stops where training put the end of turn.
CHATML_EOS_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class TrainConfig:
    """Our keys. Any other key of the YAML must be a TRL `SFTConfig` field; it is passed through.
    The keys not marked run=True say which model is trained on what: a run resumes only from checkpoints
    written with the same ones (manifest.py); the others (steps, learning rate, ...) may change on resume."""

    model: str = cfglib.opt("smollm2-135m", "base model: embedded short name, model folder, adapter folder or hub id",
                            flags=("-m",))
    data: str | None = cfglib.opt(None, "folder written by `aft data build` (aft.jsonl, sft.jsonl)", flags=("-d",))
    aft_file: str | None = cfglib.opt(None, "AFT rows (default: <data>/aft.jsonl)")
    sft_file: str | None = cfglib.opt(None, "SFT rows (default: <data>/sft.jsonl)")
    candidates_file: str | None = cfglib.opt(None, "rft / bon modes: sampled candidates (default: "
                                             "<data>/candidates.jsonl)")
    eval_data: str | None = cfglib.opt(None, "held-out folder or JSONL file evaluated every eval_steps (optional)",
                                       run=True)
    mode: str = cfglib.opt("aft", "aft: aggregation rows; sft: plain baseline; mix: aft rows + a fraction of sft "
                           "rows; rft: every correct candidate; bon-sft / bon-rl: best-of-N-aware weights on the "
                           "candidates (docs/train.md)", choices=MODES)
    bon_n: int = cfglib.opt(4, "bon-sft / bon-rl: N of the best-of-N used at inference", ge=1)
    min_score: float = cfglib.opt(1.0, "rft / bon modes: a candidate scoring >= this is correct (reward 1)")
    rounds: int = cfglib.opt(1, "rft / bon modes: on-policy rounds; each after the first samples the prompts "
                             "again with the model trained so far (the data build's settings), then trains on them",
                             ge=1)
    mix_sft_fraction: float = cfglib.opt(0.5, "mix mode: fraction of the sft rows added to all aft rows", ge=0, le=1)
    max_rows: int | None = cfglib.opt(None, "use only the first N training rows (after mixing)", ge=1, run=True)
    output_dir: str = cfglib.opt("runs/train/aft", "where the adapter / model, checkpoints and metrics go",
                                 flags=("-o",), run=True)
    use_peft: bool = cfglib.opt(True, "LoRA (true) or full fine-tuning (false)")
    lora_r: int = cfglib.opt(16, "LoRA rank", ge=1)
    lora_alpha: int = cfglib.opt(32, "LoRA alpha", ge=1, run=True)
    lora_dropout: float = cfglib.opt(0.05, "LoRA dropout", ge=0, lt=1, run=True)
    lora_target_modules: list = cfglib.opt(["all-linear"], "LoRA target modules (all-linear = every linear "
                                           "layer but the output head)")
    load_in_4bit: bool = cfglib.opt(False, "QLoRA: load the base in 4 bit (needs bitsandbytes and a GPU)", run=True)
    merge: bool = cfglib.opt(False, "also write <output_dir>/merged: base + adapter merged into one model", run=True)
    chat_template: str | None = cfglib.opt(None, "for models without one: chatml (default) or a .jinja file; "
                                           "ignored when the tokenizer has a template", run=True)
    dtype: str = cfglib.opt("auto", "weights dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16",
                            run=True)
    resume: bool = cfglib.opt(True, "continue from the last checkpoint in output_dir if there is one", run=True)
    # The SFTConfig fields most runs touch, as flags; any other SFTConfig field works from the YAML.
    learning_rate: float = cfglib.opt(2e-4, "peak learning rate", gt=0, run=True)
    num_train_epochs: float = cfglib.opt(1.0, "epochs", gt=0, run=True)
    max_steps: int = cfglib.opt(-1, "stop after this many optimizer steps (-1: use num_train_epochs)", ge=-1, run=True)
    per_device_train_batch_size: int = cfglib.opt(4, "rows per device per micro-batch", ge=1, run=True)
    gradient_accumulation_steps: int = cfglib.opt(1, "micro-batches per optimizer step", ge=1, run=True)
    max_length: int = cfglib.opt(1024, "longest tokenized row; longer rows are dropped (and counted)", ge=1, run=True)
    logging_steps: int = cfglib.opt(5, "log the loss every N steps", ge=1, run=True)
    save_steps: int = cfglib.opt(50, "checkpoint every N steps (for resuming)", ge=1, run=True)
    bf16: bool | None = cfglib.opt(None, "bf16 autocast (default: on for GPUs that support it, off on CPU)", run=True)
    gradient_checkpointing: bool = cfglib.opt(False, "trade compute for memory (big models on GPU)", run=True)
    report_to: list = cfglib.opt(["none"], "tensorboard, trackio, wandb or none", run=True)
    seed: int = cfglib.opt(42, "seed (row mixing, LoRA init, data order)", run=True)
    sft_args: dict = cfglib.opt({}, "other SFTConfig fields (from the YAML's top level)", cli=False, run=True)

    def check(self) -> None:
        if self.max_steps == 0:
            raise AftError("max_steps must be -1 (train num_train_epochs) or >= 1, got 0")
        if self.rounds > 1 and self.mode not in WEIGHTED:
            raise AftError(f"--rounds needs a mode that trains on sampled candidates ({', '.join(WEIGHTED)}), "
                           f"not {self.mode}")
        if self.rounds > 1 and not self.data:
            raise AftError("--rounds needs --data (the folder of `aft data build`: its config says how to sample)")
        if not (self.data or self.aft_file or self.sft_file or self.candidates_file):
            raise AftError("no training data: give --data <folder from `aft data build`> (or --aft_file / --sft_file)")


OUR_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
WEIGHTED_KEYS = ("candidates_file", "bon_n", "min_score", "rounds")  # matter in the weighted modes only


def run_settings(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share (manifest.py); the weighted modes' keys only in those modes, so
    that checkpoints of the other modes written before those keys existed still resume."""
    d = cfglib.output_settings(cfg)
    return d if cfg.mode in WEIGHTED else {k: v for k, v in d.items() if k not in WEIGHTED_KEYS}


def sft_config_fields() -> set[str]:
    from trl import SFTConfig

    return {f.name for f in dataclasses.fields(SFTConfig) if f.init}


def load_config(config_file: str | None, flags: dict) -> TrainConfig:
    """YAML (our keys + SFTConfig fields) then flags on top. Unknown keys are errors naming the key."""

    def normalize(raw: dict, source: str) -> dict:
        ours, extra = {}, {}
        sft_fields = None
        for key, value in raw.items():
            if key in OUR_KEYS and key != "sft_args":
                ours[key] = value
                continue
            if key == "sft_args" and isinstance(value, dict):
                items = value.items()
            else:
                items = [(key, value)]
            sft_fields = sft_fields if sft_fields is not None else sft_config_fields()
            for k, v in items:
                if k not in sft_fields or k in ("output_dir",):
                    close = [n for n in sorted(OUR_KEYS | sft_fields) if n.startswith(k[:5])][:3]
                    hint = f" (did you mean {', '.join(close)}?)" if close else ""
                    raise AftError(f"{source}: unknown key {k!r}: not an aft train key nor a TRL SFTConfig "
                                   f"field{hint}")
                extra[k] = v
        if extra:
            ours["sft_args"] = extra
        return ours

    return cfglib.from_sources(TrainConfig, config_file, flags, normalize)


def config_dict(cfg: TrainConfig) -> dict:
    """The config as one flat YAML mapping (the SFTConfig pass-through at top level), loadable with --config."""
    d = cfglib.to_dict(cfg)
    extra = d.pop("sft_args")
    return {**d, **extra}


# ---------------------------------------------------------------------------------------------------- data
def read_rows(path: str | Path) -> list[dict]:
    """Every row of a training file, validated: {"id", "prompt": [...], "completion": [assistant...]}."""
    path = Path(path)
    rows, seen = [], set()
    for lineno, rec in read_jsonl(path):
        loc = where(path, lineno)
        for key in ("prompt", "completion"):
            if key not in rec:
                raise AftError(f'{loc}missing field "{key}" (expected {{"id", "prompt": [messages], '
                               f'"completion": [{{"role": "assistant", "content": ...}}]}})')
        prompt = validate_messages(rec["prompt"], f'{loc}field "prompt": ')
        completion = rec["completion"]
        if not isinstance(completion, list) or not completion:
            raise AftError(f'{loc}field "completion": expected a non-empty list of assistant messages')
        for i, m in enumerate(completion):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise AftError(f'{loc}field "completion": message {i} needs "role" and "content"')
            if m["role"] != "assistant":
                bad = "unknown" if m["role"] not in ROLES else "unexpected"
                raise AftError(f'{loc}field "completion": message {i} has {bad} role {m["role"]!r} '
                               f'(a completion is assistant messages)')
            if not isinstance(m["content"], str) or not m["content"].strip():
                raise AftError(f'{loc}field "completion": message {i} has an empty completion')
        if len(completion) > 1:
            raise AftError(f'{loc}field "completion": expected one assistant message, got {len(completion)}')
        rid = record_id(rec.get("id"), loc) or f"{path.name}:{lineno}"
        if rid in seen:
            raise AftError(f'{loc}field "id": duplicate id {rid!r}')
        seen.add(rid)
        rows.append({"id": rid, "prompt": prompt, "completion": [{"role": "assistant", "content": completion[0]["content"]}],
                     "line": lineno, "file": str(path)})
    if not rows:
        raise AftError(f"{path}: no rows")
    return rows


def data_files(cfg: TrainConfig) -> dict[str, Path]:
    base = Path(cfg.data) if cfg.data else None
    if base is not None and not base.is_dir():
        raise AftError(f"{base}: not a folder (expected the output folder of `aft data build`)")
    files = {}
    for kind, explicit in (("aft", cfg.aft_file), ("sft", cfg.sft_file), ("candidates", cfg.candidates_file)):
        p = Path(explicit) if explicit else (base / f"{kind}.jsonl" if base else None)
        if p is not None:
            files[kind] = p
    needed = {"aft": ["aft"], "sft": ["sft"], "mix": ["aft", "sft"]}.get(cfg.mode, ["candidates"])
    for kind in needed:
        if kind not in files or not files[kind].exists():
            where_ = files.get(kind) or f"--{kind}_file"
            raise AftError(f"mode {cfg.mode} needs {kind} rows: {where_}: no such file")
    return {k: files[k] for k in needed}


def select_rows(cfg: TrainConfig, rows: dict[str, list[dict]]) -> list[dict]:
    """The training rows for the mode. mix = every aft row + a seeded random mix_sft_fraction of the sft rows."""
    if cfg.mode in WEIGHTED:
        out = list(rows["candidates"])
        random.Random(cfg.seed).shuffle(out)  # rows of one prompt apart (max_rows then takes a random subset)
    elif cfg.mode == "aft":
        out = list(rows["aft"])
    elif cfg.mode == "sft":
        out = list(rows["sft"])
    else:
        sft = list(rows["sft"])
        random.Random(cfg.seed).shuffle(sft)
        take = sft[: round(len(sft) * cfg.mix_sft_fraction)]
        out = list(rows["aft"]) + [{**r, "id": f"sft:{r['id']}"} for r in take]
        random.Random(cfg.seed + 1).shuffle(out)
    return out[: cfg.max_rows] if cfg.max_rows else out


def read_eval_rows(path: str | Path, mode: str) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        p = p / ("sft.jsonl" if mode in ("sft",) + WEIGHTED else "aft.jsonl")
    return read_rows(p)


# ---------------------------------------------------------------------------------------- chat template
def setup_chat_template(tok, chat_template: str | None = None) -> int:
    """Give the tokenizer a chat template if it has none; make its EOS the end-of-turn token.

    Returns the end-of-turn token id: the special token the template writes right after an assistant
    message. Training puts loss on it and inference stops on it (the saved tokenizer's eos_token).
    """
    from .engines.hf import CHATML_TEMPLATE

    if tok.chat_template is None or (chat_template and chat_template != "chatml"):
        if chat_template and chat_template != "chatml":
            tok.chat_template = read_text(chat_template, "chat template file")
        elif "<|im_end|>" in tok.get_vocab():
            tok.chat_template = CHATML_TEMPLATE
        else:
            if tok.eos_token is None:
                raise AftError("the tokenizer has no chat template and no EOS token; give --chat_template")
            tok.chat_template = CHATML_EOS_TEMPLATE
        log.info("tokenizer had no chat template; using %s", chat_template or "ChatML")
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\x00AFT\x00"}]
    text = tok.apply_chat_template(probe, tokenize=False)
    if "\x00AFT\x00" not in text:
        raise AftError("the chat template does not render the assistant message's content")
    after = text.split("\x00AFT\x00", 1)[1]
    ids = tok(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    if not ids or ids[0] not in special:
        raise AftError(f"the chat template ends an assistant turn with {after[:20]!r}, not a special token; "
                       "give --chat_template chatml")
    eot = ids[0]
    if tok.eos_token_id != eot:
        log.info("end of turn is %r: using it as EOS (was %r)", tok.convert_ids_to_tokens(eot), tok.eos_token)
        tok.eos_token = tok.convert_ids_to_tokens(eot)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return eot


def encode_row(tok, prompt: list[dict], completion: list[dict], eot_id: int) -> dict:
    """input_ids and labels of one row: the prompt as `HFEngine` renders it for generation, then the
    target; labels are -100 everywhere but on the target tokens and the end-of-turn token."""
    prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise AftError("the chat template renders the prompt differently once the answer follows; "
                       "training and inference would see different prompts")
    p_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    c_ids = tok(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    if eot_id not in c_ids:
        raise AftError("the end-of-turn token is missing after the answer")
    c_ids = c_ids[: c_ids.index(eot_id) + 1]  # drop what the template writes after the end of turn ("\n")
    return {"input_ids": p_ids + c_ids, "labels": [-100] * len(p_ids) + c_ids}


def encode_rows(tok, rows: list[dict], eot_id: int, max_length: int, what: str = "training") -> list[dict]:
    out, dropped = [], 0
    for r in rows:
        try:
            enc = encode_row(tok, r["prompt"], r["completion"], eot_id)
        except AftError as e:
            raise AftError(f"{where(r['file'], r['line'])}{e}") from None
        if len(enc["input_ids"]) > max_length:
            dropped += 1
            continue
        if "weight" in r:
            enc["weight"] = r["weight"]
        out.append(enc)
    if dropped:
        log.warning("%d of %d %s rows are longer than max_length=%d tokens and were dropped", dropped, len(rows),
                    what, max_length)
    if not out:
        raise AftError(f"every {what} row is longer than max_length={max_length}; raise --max_length")
    return out


# ------------------------------------------------------------------------------------------------- model
def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model: str, dtype: str = "auto", load_in_4bit: bool = False, chat_template: str | None = None,
               use_peft: bool = True, merge_adapter: bool = True):
    """(model, tokenizer, end-of-turn id, the base's --model string) for training or scoring.

    An adapter folder's adapter is merged into its base, unless `merge_adapter` is False (then the base
    alone is loaded: the caller trains that adapter further).

    Weights go to this process's device (cuda:$LOCAL_RANK, or the CPU), typed by
    aft.loading.training_dtype; under ZeRO-3 call it after `sft_config` (see run_train).
    """
    from .loading import default_device, load_pretrained, sharding, training_dtype
    from .models import resolve

    spec = resolve(model)
    if spec.kind != "hf":
        raise AftError(f"{model}: training needs local weights (a model folder, adapter folder, hub id or the "
                       f"embedded model), not a {spec.kind} endpoint")
    device, shard = default_device(), sharding()
    lm, tok = load_pretrained(spec.path, adapter=spec.adapter if merge_adapter else None,
                              dtype=training_dtype(dtype, device, use_peft, shard), device=device,
                              load_in_4bit=load_in_4bit, shard=shard)
    if spec.adapter and not merge_adapter and (Path(spec.adapter) / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec.adapter)  # the chat template it was trained with
    eot = setup_chat_template(tok, chat_template)
    add_eos(lm, eot)
    base = model
    if spec.adapter:
        marker = Path(spec.adapter) / BASE_MARKER
        base = marker.read_text().strip() if marker.exists() else spec.path
    elif Path(model).expanduser().exists():
        base = str(Path(model).expanduser().resolve())
    return lm, tok, eot, base


def add_eos(lm, eot: int) -> None:
    """Make generation stop on the end-of-turn token too."""
    gc = lm.generation_config
    eos = gc.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if eot not in eos:
        gc.eos_token_id = [eot, *eos] if eos else eot


# ------------------------------------------------------------------------------------------------- train
@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict  # empty on every process but the first (multi-GPU / multi-node: rank 0 reports)
    merged_dir: Path | None = None
    trainer: object = None  # the SFTTrainer, its model still in memory
    finished_before: bool = False  # a rerun of a finished run: nothing trained, the saved metrics returned
    main_process: bool = True  # rank 0, which writes the outputs


def check_packages(cfg: TrainConfig) -> None:
    """Optional packages the config asks for, named with the extra that installs them (before any work)."""
    import importlib.util

    from .loading import sharding

    if "tensorboard" in cfg.report_to and not (importlib.util.find_spec("tensorboard")
                                               or importlib.util.find_spec("tensorboardX")):
        raise AftError("report_to tensorboard needs the tensorboard package: pip install 'aft[tensorboard]' "
                       "(or report_to: [none])")
    deepspeed = (sharding() or "").startswith("zero") or cfg.sft_args.get("deepspeed")
    if deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise AftError("a DeepSpeed config (configs/accelerate/zero*.yaml or deepspeed:) needs the deepspeed "
                       "package: pip install 'aft[deepspeed]'")


def checkpointing_args(cfg: TrainConfig, shard: str | None) -> dict:
    """SFTConfig fields for activation (gradient) checkpointing.

    LoRA under ZeRO-3 needs reentrant checkpointing. TRL sets it after the config is built, in
    `gradient_checkpointing_kwargs`, a fresh dict when none was given; transformers 5 reads
    `activation_checkpointing_kwargs` (default use_reentrant=False) and would never see it
    (CheckpointError at the first backward). So we say it ourselves, in the name transformers reads.
    """
    key = "activation_checkpointing" if "activation_checkpointing" in sft_config_fields() else "gradient_checkpointing"
    out: dict = {key: cfg.gradient_checkpointing}
    if cfg.gradient_checkpointing and cfg.use_peft and shard == "zero3":
        out[f"{key}_kwargs"] = {"use_reentrant": True}
    return out


def sft_config(cfg: TrainConfig):
    """The TRL SFTConfig of a run. Built before the model loads: it sets up the process's distributed
    state and registers a DeepSpeed config, which from_pretrained needs to see (ZeRO-3 init)."""
    import torch
    from trl import SFTConfig

    from .loading import sharding

    check_packages(cfg)
    on_gpu = _device() == "cuda"
    bf16 = cfg.bf16 if cfg.bf16 is not None else (on_gpu and torch.cuda.is_bf16_supported())
    eval_on = bool(cfg.eval_data)
    args = dict(
        output_dir=cfg.output_dir, learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps, per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, max_length=cfg.max_length,
        logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, save_total_limit=3, bf16=bf16,
        report_to=cfg.report_to, seed=cfg.seed,
        use_cpu=not on_gpu, completion_only_loss=True, lr_scheduler_type="cosine", warmup_steps=0.03,
        eval_strategy="steps" if eval_on else "no", eval_steps=cfg.save_steps if eval_on else None,
        dataloader_num_workers=0, save_only_model=False, logging_first_step=True,
        # Several processes (DDP): every trainable weight (LoRA on all linear layers, or all of them) is used in
        # each forward, so DDP need not search the graph for unused ones (and warn about it on every rank).
        ddp_find_unused_parameters=False,
        **checkpointing_args(cfg, sharding()),
    )
    args.update(cfg.sft_args)
    warmup = args.get("warmup_steps")
    if isinstance(warmup, float) and 0 < warmup < 1 and cfg.max_steps > 0:
        # transformers rounds a warmup ratio up: 0.05 of 4 steps = 1 step at learning rate 0. Round down instead.
        args["warmup_steps"] = int(warmup * cfg.max_steps)
        if args["warmup_steps"] == 0:
            log.info("warmup_steps %g of %d steps is under one step: no warmup", warmup, cfg.max_steps)
    try:
        return SFTConfig(**args)
    except (TypeError, ValueError) as e:
        raise AftError(f"invalid training arguments: {e}") from None


def build_trainer(cfg: TrainConfig, lm, tok, train_rows: list[dict], eval_rows: list[dict] | None = None,
                  base: str | None = None, args=None):
    """SFTTrainer on pre-tokenized rows (input_ids + labels); LoRA through peft_config.
    args: the run's SFTConfig (default: sft_config(cfg))."""
    from datasets import Dataset
    from trl import SFTTrainer

    sft_args = args if args is not None else sft_config(cfg)
    eval_on = bool(eval_rows)
    peft_config = None
    if cfg.use_peft and not hasattr(lm, "peft_config"):  # (a PeftModel already: a round goes on with its adapter)
        from peft import LoraConfig

        targets = cfg.lora_target_modules
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=targets[0] if targets == ["all-linear"] else targets,
                                 task_type="CAUSAL_LM")
    elif cfg.load_in_4bit:
        raise AftError("load_in_4bit needs use_peft (QLoRA trains an adapter on a 4-bit base)")
    train_ds = Dataset.from_list(train_rows)
    eval_ds = Dataset.from_list(eval_rows) if eval_on else None
    trainer_class = SFTTrainer
    if cfg.mode in WEIGHTED:
        from .bon import weighted_trainer as trainer_class
    score_loss_positions_only()  # changes the choice for CPU tensors only
    return trainer_class(model=lm, args=sft_args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
                         peft_config=peft_config,
                         callbacks=[_marker_callback(base)] if base and cfg.use_peft else None)


def score_loss_positions_only() -> None:
    """Make TRL's fused LM head project only the positions that carry a label, on CPU as on GPU.

    SFTTrainer's fused LM head (trl.trainer.utils.add_fused_lm_head) gathers the labelled positions before the
    vocabulary projection only where Triton runs; elsewhere it projects every position, to keep tile shapes
    fixed for compilers such as Neuron's. Eager CPU has no such constraint, and an AFT row is mostly prompt
    (4 proposals) with the loss on its aggregation alone (about a fifth of the positions), so the projection
    and its backward over the prompt were a third of a CPU training step (`benchmarks/bench_train.py
    --all_positions` measures it). The loss and gradients are the same either way (tests/test_train.py checks
    it). This sets the one module-level switch TRL reads for that choice; it changes nothing where TRL lacks it."""
    import trl.trainer.utils as trl_utils

    triton = getattr(trl_utils, "_use_triton", None)
    if triton is None or not hasattr(trl_utils, "add_fused_lm_head"):
        log.info("this TRL has no fused-LM-head position switch: every position is projected")
    elif not hasattr(triton, "__wrapped__"):

        def gather_on_cpu(device):  # read there only to decide whether to gather the labelled positions
            return device.type == "cpu" or triton(device)

        gather_on_cpu.__wrapped__ = triton
        trl_utils._use_triton = gather_on_cpu


def _marker_callback(base: str):
    """Write aft_base_model.txt into every adapter checkpoint, so `--model <checkpoint>` resolves."""
    from transformers import TrainerCallback

    class MarkerCallback(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and (ckpt / "adapter_config.json").exists():
                (ckpt / BASE_MARKER).write_text(base + "\n")

    return MarkerCallback()


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete checkpoint-N in output_dir. The Trainer writes trainer_state.json last, so a
    checkpoint without a readable one was cut off while saving (kill, full disk): skipped, and said so."""
    d = Path(output_dir)
    found = sorted((p for p in d.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True) if d.is_dir() else []
    for ckpt in found:
        try:
            json.loads((ckpt / "trainer_state.json").read_text())
            return str(ckpt)
        except (OSError, ValueError):
            log.warning("%s is incomplete (no readable trainer_state.json: the run was stopped while saving it); "
                        "skipped", ckpt)
    return None


def finished_run(out: Path, cfg: TrainConfig) -> dict | None:
    """The metrics of a finished run of this same config in `out` (None if there is none)."""
    import yaml

    try:
        metrics = json.loads((out / "metrics.json").read_text())
        saved = yaml.safe_load((out / "config.yaml").read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return None
    now = config_dict(cfg)
    # a key the saved config lacks (written before the key existed) counts as its default
    same = all(saved.get(k, DEFAULTS.get(k)) == v for k, v in now.items() if k != "resume")
    return metrics if same else None


def training_rows(cfg: TrainConfig) -> tuple[list[dict], dict]:
    """The rows of the mode (validated) and what was read: counts, or for the weighted modes aft.bon's stats."""
    files = data_files(cfg)
    if cfg.mode in WEIGHTED:
        from .bon import read_candidates, weighted_rows

        rows, stats = weighted_rows(read_candidates(files["candidates"]), cfg.mode, cfg.bon_n, cfg.min_score)
        return select_rows(cfg, {"candidates": rows}), stats
    rows = {kind: read_rows(p) for kind, p in files.items()}
    return select_rows(cfg, rows), {f"{k}_rows_read": len(v) for k, v in rows.items()}


def run_train(cfg: TrainConfig) -> TrainResult:
    """One training run; with --rounds R > 1, R on-policy rounds (`run_rounds`)."""
    if cfg.rounds > 1:
        return run_rounds(cfg)
    return train_once(cfg)


def run_rounds(cfg: TrainConfig) -> TrainResult:
    """Round 1 trains on --data's candidates; round r > 1 first samples the same prompts again with round r-1's
    model (`aft data build` with the settings --data was built with, seed + r - 1, into
    <output_dir>/round-<r>/data), then trains on those candidates, starting from round r-1's model (LoRA: its
    adapter, trained further). Rounds 1..R-1 write <output_dir>/round-<r>; the last writes <output_dir>. Each
    round and each sampling resumes on a rerun; a finished round is not run again."""
    from .data.build import load_config as data_config, run_build

    out = Path(cfg.output_dir)
    built = json.loads((Path(cfg.data) / "config.json").read_text())["config"]
    data, prev, res = cfg.data, None, None
    for r in range(1, cfg.rounds + 1):
        if r > 1:
            d = out / f"round-{r}" / "data"
            # every candidate is kept in candidates.jsonl whatever the target: the cheapest target will do
            flags = {**built, "model": str(prev), "out": str(d), "seed": built["seed"] + r - 1, "shard": "0/1",
                     "target": "best", "min_target_score": None, "no_proposals": False, "pseudo_aggregation": False}
            s = run_build(data_config(None, flags))
            log.info("round %d: sampled %s with %s (%d tokens in %.0fs)", r, d, prev, s.generated_tokens, s.seconds)
            data = str(d)
        last = r == cfg.rounds
        step = dataclasses.replace(cfg, rounds=1, data=data, candidates_file=None if r > 1 else cfg.candidates_file,
                                   output_dir=str(out if last else out / f"round-{r}"),
                                   model=cfg.model if (r == 1 or cfg.use_peft) else str(prev))
        res = train_once(step, init_adapter=str(prev) if (r > 1 and cfg.use_peft) else None, round_=(r, cfg.rounds))
        prev = res.output_dir
    return res


def train_once(cfg: TrainConfig, init_adapter: str | None = None, round_: tuple[int, int] | None = None) -> TrainResult:
    """One training run. init_adapter: a LoRA adapter (of cfg.model) to train further instead of a new one."""
    # 1-3: all data checked before any model is loaded.
    train, read_stats = training_rows(cfg)
    eval_raw = read_eval_rows(cfg.eval_data, cfg.mode) if cfg.eval_data else None
    log.info("mode %s: %d training rows (%s)", cfg.mode, len(train),
             ", ".join(f"{k}: {v}" for k, v in read_stats.items()))
    out = Path(cfg.output_dir)
    done = finished_run(out, cfg) if cfg.resume else None
    if done is not None:
        log.info("%s: this run already finished; its model and measurements are kept (--no-resume trains again)",
                 out)
        merged = out / "merged"
        return TrainResult(out, done, merged if merged.is_dir() else None, finished_before=True,
                           main_process=is_main_process())
    resume_from = last_checkpoint(out) if cfg.resume else None
    run = Manifest(out / "aft_run.json", out, run_settings(cfg), {"config": config_dict(cfg)})
    if resume_from:
        run.check(records=[Path(resume_from) / "trainer_state.json"])
        log.info("resuming from %s", resume_from)

    # 4-5
    import torch

    args = sft_config(cfg)  # first: ZeRO-3 init and this process's GPU need it at load time
    t_load = time.time()
    from .models import resolve

    adapter = resolve(cfg.model).adapter
    if cfg.use_peft and adapter and init_adapter is None:
        # LoRA from an adapter folder trains that adapter further. (Merging it into the base and adding a new
        # adapter would save only the new one, against the original base: the first adapter would be lost.)
        init_adapter = adapter
        log.info("--model is a LoRA adapter: training it further (its rank and target modules are kept)")
    lm, tok, eot, base = load_model(cfg.model, cfg.dtype, cfg.load_in_4bit, cfg.chat_template, cfg.use_peft,
                                    merge_adapter=not (cfg.use_peft and adapter))
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if init_adapter:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, init_adapter, is_trainable=True)
    enc = encode_rows(tok, train, eot, cfg.max_length)
    enc_eval = encode_rows(tok, eval_raw, eot, cfg.max_length, "eval") if eval_raw else None
    load_s = time.time() - t_load

    # Adapters and model cards name the base as another machine finds it (the embedded model by its hub id);
    # aft_base_model.txt keeps the --model string this machine resolves.
    lm.name_or_path = lm.config._name_or_path = portable_id(base) if not Path(base).is_dir() else base

    # 6: every process trains; the first alone (rank 0 of all machines) writes files, the trainer included
    main_process = is_main_process()
    make_folder(out)
    trainer = build_trainer(cfg, lm, tok, enc, enc_eval, base, args)
    if main_process:
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))
        run.write()
        write_json(out / "sft_config.json", json.loads(trainer.args.to_json_string()))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.time() - t0

    trainer.save_model(str(out))  # every rank takes part (ZeRO-3 / FSDP gather); rank 0 writes
    if not main_process:
        return TrainResult(out, {}, None, trainer, main_process=False)
    tok.save_pretrained(str(out))  # tokenizer + chat template (chat_template.jinja) + eos = end of turn
    if cfg.use_peft:
        (out / BASE_MARKER).write_text(base + "\n")
    else:
        add_eos(trainer.model, eot)
        trainer.model.generation_config.save_pretrained(str(out))

    merged_dir = merge(out, out / "merged", cfg.dtype) if cfg.merge and cfg.use_peft else None
    if cfg.merge and not cfg.use_peft:
        log.warning("--merge ignored: full fine-tuning already saved a complete model")

    metrics = _metrics(cfg, trainer, result, enc, wall, load_s, resume_from)
    metrics["rows_read"] = read_stats
    if cfg.mode in WEIGHTED:
        metrics["bon_n"] = cfg.bon_n if cfg.mode != "rft" else None
        metrics["round"] = list(round_) if round_ else [1, 1]
    write_json(out / "metrics.json", metrics)
    plot_loss(trainer.state.log_history, out / "loss.png", title=f"{cfg.mode} {'LoRA' if cfg.use_peft else 'full'}")
    return TrainResult(out, metrics, merged_dir, trainer)


def merge(adapter_dir: Path, merged_dir: Path, dtype: str = "auto") -> Path:
    """Base + adapter merged into one model folder (reloaded fresh, so it also works after QLoRA)."""
    from peft import PeftModel
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from .loading import load_pretrained, training_dtype
    from .models import resolve

    # Rank 0 merges alone, on the CPU: a ZeRO-3 config the trainer registered would make from_pretrained
    # partition the base across ranks that are not loading it (a hang), so it is dropped first.
    unset_hf_deepspeed_config()
    base = (adapter_dir / BASE_MARKER).read_text().strip()
    spec = resolve(base)
    lm, _ = load_pretrained(spec.path, adapter=spec.adapter, dtype=training_dtype(dtype, _device(), True),
                            device="cpu")
    merged = PeftModel.from_pretrained(lm, str(adapter_dir)).merge_and_unload()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(adapter_dir))
    add_eos(merged, tok.eos_token_id)
    merged.save_pretrained(str(merged_dir))
    tok.save_pretrained(str(merged_dir))
    log.info("merged model written to %s", merged_dir)
    return merged_dir


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _metrics(cfg, trainer, result, enc, wall, load_s, resume_from) -> dict:
    import torch

    hist = trainer.state.log_history
    losses = [(h["step"], h["loss"]) for h in hist if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h]
    steps = trainer.state.global_step
    # Tokens seen: every row is seen once per epoch; count what this run's steps covered.
    rows_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * trainer.args.world_size
    mean_len = sum(len(e["input_ids"]) for e in enc) / len(enc)
    mean_loss_tokens = sum(sum(1 for x in e["labels"] if x != -100) for e in enc) / len(enc)
    steps_run = steps - (int(Path(resume_from).name.split("-")[-1]) if resume_from else 0)
    tokens = steps_run * min(rows_per_step, len(enc)) * mean_len
    num_tokens = [h["num_tokens"] for h in hist if "num_tokens" in h]
    return {
        "mode": cfg.mode, "model": cfg.model, "method": "lora" if cfg.use_peft else "full",
        "train_rows": len(enc), "mean_tokens_per_row": round(mean_len, 1),
        "mean_loss_tokens_per_row": round(mean_loss_tokens, 1),
        "steps": steps, "steps_this_run": steps_run, "resumed_from": resume_from,
        "epochs": round(trainer.state.epoch or 0, 3),
        "wall_s": round(wall, 1), "load_and_tokenize_s": round(load_s, 1),
        "train_tokens_this_run": int(tokens),
        "tokens_per_s": round(tokens / wall, 1) if wall else None,
        "trl_num_tokens": num_tokens[-1] if num_tokens else None,
        "first_loss": losses[0][1] if losses else None, "last_loss": losses[-1][1] if losses else None,
        "train_loss_mean": result.training_loss if result else None,
        "eval_loss": evals[-1][1] if evals else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in trainer.model.parameters()),
        "device": _device(), "processes": trainer.args.world_size, "threads": torch.get_num_threads(),
        "bf16": bool(trainer.args.bf16),
        "losses": losses, "eval_losses": evals,
    }


def plot_loss(log_history: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and math.isfinite(h["loss"])]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (target tokens)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
