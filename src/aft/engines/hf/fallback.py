"""transformers' own `generate`, for model types the custom decode loop has not been checked on.

Slower (one `generate` per sample), but it runs whatever transformers runs. Each sample is generated with
torch's RNG seeded from its own seed (so a sample's text depends on its seed, as in the custom loop, but
the draws differ from the custom loop's); stop strings are cut as there. It does not stream (the engine
sends each completion's whole text to `on_text` at the end).
"""

from __future__ import annotations

import torch

from ..base import CANCELLED, Completion, Request, Result, sample_seeds
from .text import find_stop


@torch.inference_mode()
def generate_plain(engine, requests: list[Request], prompts: list[list[int]],
                   results: list[Result | None]) -> list[Result]:
    """Fill the unanswered `results` (failed ones stay) with `model.generate`, one sample at a time."""
    lm, tok = engine.lm, engine.tok
    for i, (req, prompt) in enumerate(zip(requests, prompts)):
        if results[i] is None and req.cancelled:  # (one request at a time: the next is not started)
            results[i] = Result.failed(CANCELLED, prompt_tokens=len(prompt))
        if results[i] is not None:
            continue
        sp = req.params
        res = Result(completions=[], prompt_tokens=len(prompt))
        ids = torch.tensor([prompt], device=engine.device)
        for seed in sample_seeds(sp):
            kw = ({"do_sample": True, "temperature": sp.temperature, "top_p": sp.top_p, "top_k": sp.top_k}
                  if sp.temperature else {"do_sample": False})
            devices = [engine.device] if engine.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                if seed is not None:
                    torch.manual_seed(seed)
                out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw,
                                  max_new_tokens=engine._max_new(sp, len(prompt)), pad_token_id=engine.pad_id,
                                  eos_token_id=engine.eos_ids, stop_strings=list(sp.stop) or None, tokenizer=tok)
            new = out[0, len(prompt):].tolist()
            end = next((k for k, t in enumerate(new) if t in engine.eos_ids), None)
            tokens = new if end is None else new[:end]
            text = tok.decode(tokens, skip_special_tokens=True)
            cut = find_stop(text, sp.stop)
            finish = "stop" if end is not None or cut is not None else "length"
            text = text if cut is None else text[:cut]
            res.completions.append(Completion(text=text, tokens=len(tokens), finish_reason=finish))
            res.seeds.append(seed)
        results[i] = res
    return results  # type: ignore[return-value]
