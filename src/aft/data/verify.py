"""Answer extraction and verification (importable by the evaluation stage).

    extract_answer(text)   the text after the last "Answer:" (its number when it
                           holds one), else the last number in the text
    parse_number(s)        "1,234" / "-3.5" / "3/4" / "$12." -> Fraction, or None
    is_correct(response, answer, task=None, entry=None)
                           numeric exact match of the extracted answer, or, for a
                           reasoning-gym task, its own score_answer >= 0.99
                           (some of its scorers give partial credit)

The embedded model rarely writes "Answer:", hence the last-number fallback.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from functools import lru_cache

RG_THRESHOLD = 0.99

_ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)
# a number: optional sign, digits with optional thousands commas, optional decimals, optional /denominator
_NUMBER = re.compile(r"(?<![\w.])[-−]?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+(?:\.\d+)?)?|[-−]?\.\d+")
_STRIP = " \t\n\r*`$\\.:;,!?\"'()[]{}"


def parse_number(s: str | None) -> Fraction | None:
    """The exact value of a number written as text, or None."""
    if s is None:
        return None
    t = s.strip().strip(_STRIP.replace("-", "").replace(".", "")).strip()
    t = t.rstrip(".").replace("−", "-").replace(" ", "")
    if t.startswith("$"):
        t = t[1:]
    if not t or not re.fullmatch(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:/(?:\d+)(?:\.\d+)?)?", t) \
            or not re.search(r"\d", t):
        return None
    t = t.replace(",", "")
    try:
        if "/" in t:
            num, den = t.split("/")
            den_v = Fraction(den)
            return Fraction(num) / den_v if den_v != 0 else None
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text or "")
    return found[-1].replace(" ", "").replace("−", "-") if found else None


def extract_answer(text: str | None) -> str | None:
    """The final answer in a response: after the last "Answer:", else the last number."""
    if not text:
        return None
    hits = list(_ANSWER.finditer(text))
    if hits:
        tail = text[hits[-1].end():].strip()
        segment = tail.splitlines()[0].strip() if tail else ""
        clean = segment
        for _ in range(3):  # "**42**." -> "42"
            clean = clean.strip(" \t*`$").rstrip(".")
        if clean:
            if parse_number(clean) is not None:
                return clean
            num = last_number(clean)
            return num if num is not None else clean
    return last_number(text)


def numeric_match(answer: str | None, reference: str | None) -> bool:
    a, r = parse_number(answer), parse_number(reference)
    return a is not None and r is not None and a == r


@lru_cache(maxsize=32)
def _rg_dataset(task: str, config_json: str):
    import reasoning_gym

    return reasoning_gym.create_dataset(task, size=1, seed=0, **json.loads(config_json))


def rg_score(task: str, answer: str | None, entry: dict, task_config: dict | None = None) -> float:
    """reasoning-gym's own score of an extracted answer (0..1)."""
    ds = _rg_dataset(task, json.dumps(task_config or {}, sort_keys=True))
    try:
        return float(ds.score_answer(answer, entry))
    except Exception:  # a scorer that chokes on odd text gives no credit
        return 0.0


def is_correct(response: str | None, answer: str | None, task: str | None = None, entry: dict | None = None,
               task_config: dict | None = None) -> bool:
    """Whether `response` answers correctly: numeric exact match, or reasoning-gym's scorer >= 0.99."""
    extracted = extract_answer(response)
    if extracted is None:
        return False
    if numeric_match(extracted, answer):
        return True
    if task is not None:
        e = entry if entry is not None else {"answer": answer, "metadata": {}}
        return rg_score(task, extracted, e, task_config) >= RG_THRESHOLD
    if parse_number(answer) is None and answer is not None:  # a non-numeric reference: normalised text match
        return _norm(extracted) == _norm(answer)
    return False


def _norm(s: str) -> str:
    return " ".join(s.lower().strip().strip(_STRIP).split())
