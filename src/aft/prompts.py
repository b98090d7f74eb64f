"""THE renderer of proposer and aggregator messages.

Training data (`aft data`), inference (`aft infer`), evaluation and serving all
take their messages from here, so the prompt a model is trained on and the
prompt it sees at test time are byte-identical by construction.

Style `aft` reproduces the released AFT checkpoints byte for byte (see
tests/fixtures/aft_prompts.json): the aggregator system message is

    template + "\\n" + "\\n".join(f"{i+1}. {p}" for i, p in enumerate(proposals))

with proposals raw (not stripped), and the proposer system message is "\\n".
The query's user/assistant turns follow unchanged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import AftError

AFT_AGGREGATOR_TEMPLATE = (
    "You are a helpful aggregator.\n"
    "You have been provided with a set of responses from various open-source models to the "
    "latest user query. Your task is to synthesize these responses into a single, high-quality "
    "response. It is crucial to critically evaluate the information provided in these responses, "
    "recognizing that some of it may be biased or incorrect. Your response should not simply "
    "replicate the given answers but should offer a refined, accurate, and comprehensive reply to "
    "the instruction. Ensure your response is well-structured, coherent, and adheres to the "
    "highest standards of accuracy and reliability.\n    \n    Responses from models:"
)
MOA_AGGREGATOR_TEMPLATE = (
    "You have been provided with a set of responses from various open-source models to the "
    "latest user query. Your task is to synthesize these responses into a single, high-quality "
    "response. It is crucial to critically evaluate the information provided in these responses, "
    "recognizing that some of it may be biased or incorrect. Your response should not simply "
    "replicate the given answers but should offer a refined, accurate, and comprehensive reply to "
    "the instruction. Ensure your response is well-structured, coherent, and adheres to the "
    "highest standards of accuracy and reliability.\n\nResponses from models:"
)
AFT_PROPOSER_SYSTEM = "\n"

STYLES = ("aft", "moa")
TRUNCATION_MARK = " [... truncated ...]"
ROLES = ("system", "user", "assistant")

Messages = list[dict]


@dataclass(frozen=True)
class PromptStyle:
    """How proposer and aggregator messages are rendered.

    `template` is the aggregator preamble; `proposer_system` is the proposer's
    system message (None: the query is sent as it is).
    """

    name: str = "aft"
    template: str = AFT_AGGREGATOR_TEMPLATE
    proposer_system: str | None = AFT_PROPOSER_SYSTEM

    @classmethod
    def get(cls, style: str = "aft", template_file: str | Path | None = None) -> "PromptStyle":
        if template_file is not None:
            from .io import read_text

            path = Path(template_file)
            text = read_text(path, "aggregator template file")
            if not text.strip():
                raise AftError(f"{path}: the aggregator template file is empty")
            return cls(name=f"file:{path.name}", template=text, proposer_system=AFT_PROPOSER_SYSTEM)
        if style == "aft":
            return cls()
        if style == "moa":
            return cls(name="moa", template=MOA_AGGREGATOR_TEMPLATE, proposer_system=None)
        raise AftError(f"unknown prompt style {style!r}; choose one of {', '.join(STYLES)} or give a template file")


def _split_system(query: Messages) -> tuple[str | None, Messages]:
    if query and query[0]["role"] == "system":
        return query[0]["content"], list(query[1:])
    return None, list(query)


def proposer_messages(query: Messages, style: PromptStyle = PromptStyle()) -> Messages:
    """Messages that ask for one proposal. A query's own system message wins over the style's."""
    own_system, turns = _split_system(query)
    system = own_system if own_system is not None else style.proposer_system
    return ([{"role": "system", "content": system}] if system is not None else []) + turns


def aggregator_system(proposals: list[str], style: PromptStyle = PromptStyle()) -> str:
    return style.template + "\n" + "\n".join(f"{i + 1}. {p}" for i, p in enumerate(proposals))


def aggregator_messages(query: Messages, proposals: list[str], style: PromptStyle = PromptStyle()) -> Messages:
    """Messages that ask to aggregate `proposals` into one answer to `query`.

    A query's own system message (not part of the released checkpoints' format)
    is kept: it goes before the aggregator text, separated by a blank line.
    """
    own_system, turns = _split_system(query)
    system = aggregator_system(proposals, style)
    if own_system is not None:
        system = own_system + "\n\n" + system
    return [{"role": "system", "content": system}] + turns


def shuffled(proposals: list[str], seed: int) -> tuple[list[str], list[int]]:
    """A seeded permutation of the proposals, and the original index of each position."""
    order = list(range(len(proposals)))
    random.Random(seed).shuffle(order)
    return [proposals[i] for i in order], order


@dataclass(frozen=True)
class Cut:
    """One proposal shortened to fit: its position in the prompt, its length before and after (in
    characters, TRUNCATION_MARK not counted). The text sent is `text[:to_chars] + TRUNCATION_MARK`."""

    index: int
    from_chars: int
    to_chars: int

    def to_dict(self) -> dict:
        return {"index": self.index, "from_chars": self.from_chars, "to_chars": self.to_chars}


def apply_cuts(proposals: list[str], cuts: list[Cut]) -> list[str]:
    """The proposals as `fit_proposals` sent them, from the originals and its cuts."""
    out = list(proposals)
    for c in cuts:
        out[c.index] = out[c.index][:c.to_chars] + TRUNCATION_MARK
    return out


@dataclass
class Fit:
    """The result of fitting proposals into a context budget."""

    proposals: list[str]
    truncated: list[Cut] = field(default_factory=list)
    prompt_tokens: int = 0


def fit_proposals(
    query: Messages,
    proposals: list[str],
    count_tokens: Callable[[Messages], int],
    budget: int,
    style: PromptStyle = PromptStyle(),
) -> Fit:
    """Shorten the longest proposals until the aggregator prompt fits `budget` tokens.

    Every proposal is kept (a cut one ends with TRUNCATION_MARK). Raises
    AftError when even the query with empty proposals, or with every proposal
    cut to its truncation mark, does not fit.
    """
    props = list(proposals)
    n = count_tokens(aggregator_messages(query, props, style))
    if n <= budget:
        return Fit(props, [], n)
    floor = count_tokens(aggregator_messages(query, [""] * len(props), style))
    if floor > budget:
        raise AftError(
            f"the query alone needs {floor} prompt tokens, more than the {budget} the context allows "
            f"(context window minus max_tokens)"
        )
    original = [len(p) for p in props]
    # Cut the longest proposal to the length of the next one (or by the excess),
    # re-count, repeat: few tokenizer calls, and the shortest answers survive whole.
    for _ in range(200):
        if n <= budget:
            break
        lengths = sorted({len(p) for p in props}, reverse=True)
        longest = lengths[0]
        if longest == 0:
            break
        excess_chars = max(16, int((n - budget) * 4 / max(1, sum(len(p) == longest for p in props))))
        target = max(lengths[1] if len(lengths) > 1 else 0, longest - excess_chars, 0)
        props = [p[:target] if len(p) == longest else p for p in props]
        n = count_tokens(aggregator_messages(query, _marked(props, original), style))
    if n > budget:  # even fully cut, the truncation marks themselves do not fit
        raise AftError(f"the proposals cannot be cut to fit {budget} prompt tokens (context window minus "
                       f"max_tokens): {n} with every proposal cut")
    props = _marked(props, original)
    truncated = [
        Cut(i, original[i], len(p) - len(TRUNCATION_MARK))
        for i, p in enumerate(props)
        if len(p) - len(TRUNCATION_MARK) < original[i] and p.endswith(TRUNCATION_MARK)
    ]
    return Fit(props, truncated, n)


def _marked(props: list[str], original: list[int]) -> list[str]:
    return [p + TRUNCATION_MARK if len(p) < original[i] else p for i, p in enumerate(props)]


def validate_messages(messages, where: str) -> Messages:
    """Check a chat message list; return it with only role/content kept."""
    if not isinstance(messages, list) or not messages:
        raise AftError(f"{where}expected a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise AftError(f"{where}message {i} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise AftError(f"{where}message {i} has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise AftError(f"{where}message {i} content must be a string")
        if m["role"] == "system" and i != 0:
            raise AftError(f"{where}message {i}: a system message may only come first")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise AftError(f"{where}the last message must be from the user (got {out[-1]['role']!r})")
    return out
