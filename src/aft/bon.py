"""Best-of-N-aware fine-tuning (Chow et al., "Inference-Aware Fine-Tuning for Best-of-N Sampling in Large
Language Models", arXiv 2412.15287): the per-sample weights, the weighted training rows, the weighted loss.

Inference is best-of-N with a verifier. With a binary reward r (verifier score >= min_score) and p(x) the
single-sample success rate of prompt x, best-of-N succeeds with J(p) = 1 - (1 - p)^N. Every mode trains on
the m candidates per prompt that `aft data build` keeps in candidates.jsonl, as a weighted NLL over samples:

    loss = (1/B) sum_i w_i * NLL_i          NLL_i = mean -log pi(token) over candidate i's completion tokens

    rft      w_i = r_i                      SFT on every correct sample (rejection-sampling fine-tuning);
                                            its gradient per prompt is m * grad p
    bon-sft  w_i = r_i * e_N(p_hat)         the gradient of log J (the BoN policy's log-likelihood of a
             e_N(p) = N p (1-p)^(N-1) / J   correct answer), with the model's own correct samples as the
                                            expert data; p_hat = c/m (plug-in). e_N is in (0, 1]: 1 at N=1
                                            (= rft) and for p -> 0, -> 0 as p -> 1 (BoN already solves x)
    bon-rl   w_i = W_-i * (r_i - b_-i)      the policy gradient of J itself, with positive and negative
             W_-i = N * C(w_-i, N-1) / C(m-1, N-1)    samples. From the m-1 OTHER samples of the prompt
             b_-i = c_-i / (m-1)            (c_-i correct, w_-i wrong): W_-i is unbiased for N (1-p)^(N-1)
                                            = dJ/dp (N <= m) and b_-i is the leave-one-out baseline, so
                                            E[sum_i w_i grad log pi(y_i)] = m dJ/dp grad p exactly. N=1 is
                                            RLOO. A prompt whose samples are all right or all wrong gets 0.

docs/train.md says where this may differ from the paper. The loss runs inside TRL's SFTTrainer
(`weighted_trainer`): the rows are tokenized as in the other modes and carry a "weight" column.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from .errors import AftError, where
from .io import read_jsonl, record_id
from .prompts import validate_messages

log = logging.getLogger(__name__)

WEIGHTINGS = ("rft", "bon-sft", "bon-rl")


# ---------------------------------------------------------------------------------------------- the weights
def all_wrong(n: int, wrong: int, k: int) -> float:
    """C(wrong, k) / C(n, k): the chance that k of n samples drawn without replacement are all wrong. With `wrong`
    of n samples wrong it is the unbiased estimator of (1 - p)^k (k <= n); 1 - all_wrong is pass@k's."""
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must be in 0..n={n}")
    return math.comb(wrong, k) / math.comb(n, k)


def bon_sft_weight(c: int, m: int, n: int) -> float:
    """e_N(c/m) = N p (1-p)^(N-1) / (1 - (1-p)^N): the BoN-SFT weight of each correct sample of a prompt with
    c of m samples correct (0 when c = 0: no correct sample to imitate)."""
    if c == 0:
        return 0.0
    p = c / m
    return n * p * (1 - p) ** (n - 1) / (1 - (1 - p) ** n)


def bon_rl_weights(rewards: list[int], n: int) -> list[float]:
    """The BoN-RL weight of each of a prompt's m samples (rewards 0/1 in sample order), see the module text.
    N > m has no unbiased estimator of (1-p)^(N-1) from m-1 samples: the plug-in (1 - b_-i)^(N-1) is used."""
    m = len(rewards)
    if m < 2:
        raise AftError(f"bon-rl needs at least 2 samples per prompt (leave-one-out), got {m}")
    total = sum(rewards)
    out = []
    for r in rewards:
        c = total - r  # correct among the other m-1
        b = c / (m - 1)
        if n <= m:
            w = n * all_wrong(m - 1, m - 1 - c, n - 1)
        else:
            w = n * (1 - b) ** (n - 1)
        out.append(w * (r - b))
    return out


def weights(rewards: list[int], mode: str, n: int) -> list[float]:
    """Per-sample weights of one prompt's samples for `mode` (one of WEIGHTINGS) and inference-time N."""
    if mode == "rft":
        return [float(r) for r in rewards]
    if mode == "bon-sft":
        w = bon_sft_weight(sum(rewards), len(rewards), n)
        return [w * r for r in rewards]
    if mode == "bon-rl":
        return bon_rl_weights(rewards, n)
    raise AftError(f"unknown weighting {mode!r}; choose one of {', '.join(WEIGHTINGS)}")


# ------------------------------------------------------------------------------------------------ the rows
def read_candidates(path: str | Path) -> list[dict]:
    """The prompts of a candidates.jsonl (written by `aft data build`), validated: id, prompt, candidates."""
    path = Path(path)
    groups, seen = [], set()
    for lineno, rec in read_jsonl(path):
        loc = where(path, lineno)
        for key in ("prompt", "candidates"):
            if key not in rec:
                raise AftError(f'{loc}missing field "{key}" (expected a candidates.jsonl row of `aft data build`: '
                               f'{{"id", "prompt": [messages], "candidates": [{{"text", "score", ...}}]}})')
        prompt = validate_messages(rec["prompt"], f'{loc}field "prompt": ')
        cands = rec["candidates"]
        if not isinstance(cands, list) or not cands:
            raise AftError(f'{loc}field "candidates": expected a non-empty list')
        for j, c in enumerate(cands):
            if not isinstance(c, dict) or not isinstance(c.get("text"), str):
                raise AftError(f'{loc}field "candidates": candidate {j} needs a text field "text"')
            s = c.get("score")
            if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))):
                raise AftError(f'{loc}field "candidates": candidate {j} has a non-numeric "score" {s!r}')
        rid = record_id(rec.get("id"), loc) or f"{path.name}:{lineno}"
        if rid in seen:
            raise AftError(f'{loc}field "id": duplicate id {rid!r}')
        seen.add(rid)
        groups.append({"id": rid, "prompt": prompt, "candidates": cands, "file": str(path), "line": lineno})
    if not groups:
        raise AftError(f"{path}: no rows")
    return groups


def weighted_rows(groups: list[dict], mode: str, n: int, min_score: float = 1.0) -> tuple[list[dict], dict]:
    """Training rows (prompt, completion, weight) of every candidate with a non-zero weight, and counts.

    A candidate is correct when its score >= min_score. Unscored candidates (score None) carry no reward and
    are left out, as are empty texts (nothing to train on); a prompt keeps the others."""
    rows: list[dict] = []
    stats = {"prompts": len(groups), "samples": 0, "correct": 0, "unscored": 0, "empty": 0, "rows": 0,
             "prompts_all_correct": 0, "prompts_none_correct": 0, "positive_weight": 0.0, "negative_weight": 0.0}
    for g in groups:
        cands = [c for c in g["candidates"] if c.get("score") is not None]
        stats["unscored"] += len(g["candidates"]) - len(cands)
        if not cands or (mode == "bon-rl" and len(cands) < 2):
            continue
        rewards = [int(c["score"] >= min_score) for c in cands]
        stats["samples"] += len(cands)
        stats["correct"] += sum(rewards)
        stats["prompts_all_correct"] += all(rewards)
        stats["prompts_none_correct"] += not any(rewards)
        for j, (c, w) in enumerate(zip(cands, weights(rewards, mode, n))):
            if w == 0:
                continue
            if not c["text"].strip():
                stats["empty"] += 1
                continue
            stats["positive_weight" if w > 0 else "negative_weight"] += w
            rows.append({"id": f"{g['id']}#{c.get('index', j)}", "prompt": g["prompt"],
                         "completion": [{"role": "assistant", "content": c["text"]}], "weight": w,
                         "file": g["file"], "line": g["line"]})
    stats["rows"] = len(rows)
    stats = {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}
    if not rows:
        raise AftError(f"mode {mode}: no candidate has a non-zero weight ({stats['samples']} scored samples, "
                       f"{stats['correct']} correct at min_score {min_score}): nothing to train on")
    return rows, stats


# -------------------------------------------------------------------------------------------------- the loss
def weighted_nll(log_probs, label_mask, weight):
    """(1/B) sum_i weight_i * (mean NLL over sample i's loss tokens). log_probs, label_mask: (B, T); weight: (B,)."""
    mask = label_mask.to(log_probs.dtype)
    per_sample = -(log_probs * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return (weight.to(per_sample.dtype) * per_sample).sum() / weight.numel()


def weighted_trainer(**kwargs):
    """TRL's SFTTrainer whose loss is `weighted_nll` over the rows' "weight" column (1 where a row has none,
    e.g. eval rows); everything else (tokenized rows, LoRA, checkpoints, resume, logging) is SFTTrainer's."""
    import torch
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    class WeightCollator(DataCollatorForLanguageModeling):
        def torch_call(self, examples):
            w = [float(e.get("weight", 1.0)) for e in examples]
            batch = super().torch_call([{k: v for k, v in e.items() if k != "weight"} for e in examples])
            batch["weight"] = torch.tensor(w, dtype=torch.float32)
            return batch

    class WeightedSFTTrainer(SFTTrainer):
        # the loss is a mean over this micro-batch's samples: the Trainer divides it by the accumulation steps
        loss_is_scaled_for_ga = False

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "weight" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "weight"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            weight = inputs.pop("weight")
            inputs["use_cache"] = False
            # the fused LM head SFTTrainer adds: per-token log-probs of the labels, no (B, T, vocab) logits
            outputs = model(**inputs, fused_lm_head=True)
            loss = weighted_nll(outputs.log_probs, outputs.label_mask, weight)
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["mean_weight"].append(weight.mean().item())
            return (loss, outputs) if return_outputs else loss

    tok = kwargs["processing_class"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return WeightedSFTTrainer(data_collator=WeightCollator(pad_token_id=pad), **kwargs)
