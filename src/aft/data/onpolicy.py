"""On-policy proposals: how the model to be trained is asked for candidates.

A chat model gets its own chat template over `prompts.proposer_messages` (the
exact prompt `aft infer` sends at layer 0). A base model (its tokenizer has no
chat template) gets an in-context prompt of demonstrations (a bundled default
set, or --demonstrations_file: JSONL of {"query", "response"}) rendered as raw
text, and generation stops at the next "# Query:". Engines are loaded here too.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import AftError
from ..io import read_jsonl
from ..prompts import PromptStyle, proposer_messages

log = logging.getLogger(__name__)

DEFAULT_DEMONSTRATIONS = Path(__file__).resolve().parent.parent / "resources" / "demonstrations.jsonl"
# Renders the messages' contents as they are: the in-context prompt goes out as raw text.
RAW_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
ICL_HEADER = ("Below are conversations between a user and a helpful, accurate assistant. The assistant answers "
              "the user's query well; when a question has a short final answer, it ends with a line "
              "'Answer: <answer>'.\n\n")
ICL_STOP = ("# Query:",)


def load_demonstrations(path: str | Path | None = None) -> list[dict]:
    path = Path(path) if path else DEFAULT_DEMONSTRATIONS
    demos = []
    for line, rec in read_jsonl(path):
        if not isinstance(rec.get("query"), str) or not isinstance(rec.get("response"), str):
            raise AftError(f"{path}:{line}: a demonstration needs text fields 'query' and 'response'")
        demos.append({"query": rec["query"], "response": rec["response"]})
    if not demos:
        raise AftError(f"{path}: no demonstrations")
    return demos


def _query_text(query: list[dict]) -> str:
    turns = [m for m in query if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


def demonstration_prompt(query: list[dict], demos: list[dict]) -> str:
    """The raw-text in-context prompt for a base model."""
    parts = [ICL_HEADER]
    for d in demos:
        parts.append(f"# Query:\n{d['query']}\n\n# Answer:\n{d['response']}\n\n")
    parts.append(f"# Query:\n{_query_text(query)}\n\n# Answer:\n")
    return "".join(parts)


def proposal_messages(query: list[dict], style: PromptStyle, demos: list[dict] | None) -> list[dict]:
    """Chat: the proposer messages of inference. Base model (`demos` given): one raw-text message."""
    if demos is None:
        return proposer_messages(query, style)
    return [{"role": "user", "content": demonstration_prompt(query, demos)}]


def clean_proposal(text: str, demos: list[dict] | None) -> str:
    """A chat model's proposal stays raw (as at inference); a base model's loses the ICL scaffolding."""
    if demos is None:
        return text
    for stop in ICL_STOP:
        text = text.split(stop)[0]
    return text.strip()


def base_engine(model, tokenizer, **kw):
    """An HFEngine whose prompts go out as raw text when the model has no chat template (a base model,
    for the demonstrations prompt); its `has_chat_template` says which."""
    from ..engines.hf import HFEngine

    return HFEngine(model, tokenizer, fallback_template=RAW_TEMPLATE, **kw)


def load_model_engine(args, model: str, engine: str = "auto", seed: int | None = None):
    """Any engine for a --model value, opened with `args` (EngineArgs). A local transformers model is loaded
    here so that a base model (no chat template) can be given raw prompts; other kinds open as usual."""
    from ..models import resolve

    spec = resolve(model, None if engine == "auto" else engine)
    if spec.kind != "hf":
        return args.open(model, engine, seed=seed)[0]
    from ..loading import load_pretrained

    lm, tok = load_pretrained(spec.path, adapter=spec.adapter, dtype=args.dtype, device=args.device)
    return args.configure(base_engine(lm, tok, display_name=spec.name or spec.path,
                                      max_batch_rows=args.max_batch_rows))
