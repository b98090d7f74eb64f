"""Analyses of trained models. `perplexity`: the paper's section 6.1.

For each row id present in both <data>/aft.jsonl and <data>/sft.jsonl (same query, same target), the
target's token-level perplexity under a model is computed twice: conditioned the AFT way (aggregator
prompt: query + proposals) and the SFT way (query only). Tokens scored are exactly those `aft train`
puts loss on (target + end-of-turn; aft.train.encode_row), so the numbers are comparable to training
loss. Reported per model (or per checkpoint of a run):

  * aft_ppl / sft_ppl: the mean over rows of exp(mean token NLL of the row's target);
  * aft_token_ppl / sft_token_ppl: exp(total NLL / total target tokens) over all rows.

The paper's finding: after AFT, the target is much more predictable given the proposals
(aft_ppl < sft_ppl) — the model learned to use them.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from . import config as cfglib
from .errors import AftError
from .io import write_json

log = logging.getLogger(__name__)


@dataclass
class PerplexityConfig:
    model: list = cfglib.opt(["smollm2-135m"], "models to score: embedded name, model folder or adapter folder "
                             "(several: compare them)", flags=("-m",))
    data: str = cfglib.opt("", "folder with aft.jsonl and sft.jsonl (same ids and targets), e.g. held-out rows",
                           flags=("-d",))
    checkpoints: str | None = cfglib.opt(None, "an `aft train` output folder: score its base (step 0), every "
                                         "checkpoint-N and the final model, and plot along training")
    max_rows: int | None = cfglib.opt(None, "score only the first N paired rows", ge=1)
    batch_size: int = cfglib.opt(4, "rows per forward pass", ge=1)
    dtype: str = cfglib.opt("float32", "float32 (exact) or bfloat16 (faster on CPUs with bf16)",
                            choices=("auto", "float32", "bfloat16", "float16"))
    max_length: int = cfglib.opt(4096, "rows longer than this (tokens) are skipped in both conditions", ge=1)
    output_dir: str | None = cfglib.opt(None, "where perplexity.json / .png go (default: runs/analyze/perplexity)",
                                        flags=("-o",))

    def check(self) -> None:
        if not self.data:
            raise AftError("give --data: a folder with aft.jsonl and sft.jsonl")


def load_config(config_file: str | None, flags: dict) -> PerplexityConfig:
    return cfglib.from_sources(PerplexityConfig, config_file, flags)


def paired_rows(data: str | Path, max_rows: int | None = None) -> list[tuple[dict, dict]]:
    """(aft row, sft row) pairs with the same id; the targets must agree."""
    from .train import read_rows

    d = Path(data)
    if not d.is_dir():
        raise AftError(f"{d}: not a folder (expected aft.jsonl and sft.jsonl inside)")
    aft = read_rows(d / "aft.jsonl")
    sft = {r["id"]: r for r in read_rows(d / "sft.jsonl")}
    pairs = []
    for r in aft:
        s = sft.get(r["id"])
        if s is None:
            continue
        if s["completion"] != r["completion"]:
            raise AftError(f"{r['file']}:{r['line']}: row {r['id']!r} has a different target in sft.jsonl")
        pairs.append((r, s))
    if not pairs:
        raise AftError(f"{d}: no row id is in both aft.jsonl and sft.jsonl")
    return pairs[:max_rows] if max_rows is not None else pairs


def target_nll(lm, encoded: list[dict], batch_size: int = 4) -> list[tuple[float, int]]:
    """(sum of NLL, token count) of the label tokens of each encoded row (left padding: targets align at the end)."""
    import torch
    import torch.nn.functional as F

    out: list[tuple[float, int]] = []
    device = next(lm.parameters()).device
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        L = max(len(e["input_ids"]) for e in chunk)
        ids = torch.zeros((len(chunk), L), dtype=torch.long)
        labels = torch.full((len(chunk), L), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for b, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[b, L - n:] = torch.tensor(e["input_ids"])
            labels[b, L - n:] = torch.tensor(e["labels"])
            mask[b, L - n:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        first_label = min(next(i for i, x in enumerate(e["labels"]) if x != -100) + L - len(e["labels"])
                          for e in chunk)
        keep = L - first_label + 1  # logits from the token before the first target token onwards
        with torch.inference_mode():
            logits = lm(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                        logits_to_keep=keep).logits.float()
        tgt = labels[:, L - keep + 1:].to(device)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), tgt, ignore_index=-100, reduction="none")
        valid = tgt != -100
        for b in range(len(chunk)):
            out.append((nll[b][valid[b]].sum().item(), int(valid[b].sum())))
    return out


def score_model(model: str, pairs: list[tuple[dict, dict]], cfg: PerplexityConfig) -> dict:
    from .train import encode_row, load_model

    lm, tok, eot, _ = load_model(model, cfg.dtype)
    lm.eval()
    enc_a, enc_s, ids = [], [], []
    for a, s in pairs:
        ea = encode_row(tok, a["prompt"], a["completion"], eot)
        es = encode_row(tok, s["prompt"], s["completion"], eot)
        if max(len(ea["input_ids"]), len(es["input_ids"])) > cfg.max_length:
            continue
        enc_a.append(ea)
        enc_s.append(es)
        ids.append(a["id"])
    if not ids:
        raise AftError(f"every row is longer than max_length={cfg.max_length}")
    na = target_nll(lm, enc_a, cfg.batch_size)
    ns = target_nll(lm, enc_s, cfg.batch_size)
    del lm
    res = {"model": model, "rows": len(ids)}
    for name, scores in (("aft", na), ("sft", ns)):
        res[f"{name}_ppl"] = sum(math.exp(s / n) for s, n in scores) / len(scores)
        res[f"{name}_token_ppl"] = math.exp(sum(s for s, _ in scores) / sum(n for _, n in scores))
    res["per_row"] = [{"id": i, "aft_nll": a[0], "sft_nll": s[0], "tokens": a[1]} for i, a, s in zip(ids, na, ns)]
    log.info("%s: aft ppl %.3f, sft ppl %.3f over %d rows", model, res["aft_ppl"], res["sft_ppl"], len(ids))
    return res


def checkpoint_models(run_dir: str | Path) -> list[tuple[int, str]]:
    """(step, model) along a training run: its base at step 0, each checkpoint-N, and the final model."""
    import json

    import yaml

    d = Path(run_dir)
    if not (d / "config.yaml").exists():
        raise AftError(f"{d}: not an `aft train` output folder (no config.yaml)")
    base = (yaml.safe_load((d / "config.yaml").read_text()) or {}).get("model", "smollm2-135m")
    models = [(0, base)]
    ckpts = sorted((int(m.group(1)), p) for p in d.iterdir()
                   if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir())
    models += [(step, str(p)) for step, p in ckpts]
    final = d / "metrics.json"
    if final.exists() and ((d / "adapter_config.json").exists() or (d / "config.json").exists()):
        step = json.loads(final.read_text()).get("steps")
        if step not in {s for s, _ in models}:
            models.append((step, str(d)))
    return models


def run_perplexity(cfg: PerplexityConfig) -> dict:
    pairs = paired_rows(cfg.data, cfg.max_rows)
    if cfg.checkpoints:
        models = checkpoint_models(cfg.checkpoints)
    else:
        models = [(None, m) for m in cfg.model]
    results = []
    for step, model in models:
        r = score_model(model, pairs, cfg)
        r["step"] = step
        results.append(r)
    out = Path(cfg.output_dir or "runs/analyze/perplexity")
    out.mkdir(parents=True, exist_ok=True)
    summary = {"data": cfg.data, "rows": len(pairs), "results": results}
    write_json(out / "perplexity.json", summary)
    plot_perplexity(results, out / "perplexity.png", along_steps=bool(cfg.checkpoints))
    summary["output_dir"] = str(out)
    return summary


def table(results: list[dict]) -> str:
    head = f"{'model':<40} {'step':>5} {'rows':>5} {'AFT ppl':>9} {'SFT ppl':>9} {'AFT tok':>9} {'SFT tok':>9}"
    lines = [head, "-" * len(head)]
    for r in results:
        name = r["model"] if len(r["model"]) <= 40 else "..." + r["model"][-37:]
        step = "" if r.get("step") is None else str(r["step"])
        lines.append(f"{name:<40} {step:>5} {r['rows']:>5} {r['aft_ppl']:>9.3f} {r['sft_ppl']:>9.3f} "
                     f"{r['aft_token_ppl']:>9.3f} {r['sft_token_ppl']:>9.3f}")
    return "\n".join(lines)


def plot_perplexity(results: list[dict], path: Path, along_steps: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if along_steps:
        steps = [r["step"] for r in results]
        ax.plot(steps, [r["aft_ppl"] for r in results], "o-", label="AFT (query + proposals)")
        ax.plot(steps, [r["sft_ppl"] for r in results], "s-", label="SFT (query only)")
        ax.set_xlabel("training step")
    else:
        x = range(len(results))
        ax.bar([i - 0.2 for i in x], [r["aft_ppl"] for r in results], 0.4, label="AFT (query + proposals)")
        ax.bar([i + 0.2 for i in x], [r["sft_ppl"] for r in results], 0.4, label="SFT (query only)")
        ax.set_xticks(list(x), [Path(r["model"]).name or r["model"] for r in results], rotation=15)
    ax.set_ylabel("target perplexity (mean over rows)")
    ax.set_title("perplexity of the target response")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
