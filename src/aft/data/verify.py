"""Answer extraction and verification: the one place answers are read, for data and evaluation.

    extract_answer(text, question=None)
        the final answer of a response, or None. In order of preference:
          1. an explicit answer: the last "Answer:" / "answer is" / \\boxed{x}
             (within it: the whole segment when it is one number, else its
             final "= x", else its last number that is not an operand)
          2. the last "= x" whose right side is one number
          3. the last number that is not an operand of an expression
        A number is an operand when a binary operator (+ - * / × ÷ ^) joins it
        to another number: "0 + 9" holds no answer, "0 - 3" is not -3 (a minus
        is a sign only where no number or ")" stands before it). A response
        that only restates (part of) the question has no answer.
    parse_number(s)        "1,234" / "-3.5" / "3/4" / "$12." -> Fraction, or None
    is_correct(response, answer, task=None, entry=None, task_config=None, question=None)
        numeric exact match of the extracted answer, or, for a reasoning-gym
        task, its own score_answer >= 0.99 (some of its scorers give partial credit)

The embedded model rarely writes "Answer:", hence the fallbacks; they never
credit a number that is an operand, such as those of a restated question.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from functools import lru_cache

RG_THRESHOLD = 0.99

# explicit answers: "Answer: x", "the answer is x", "final answer: x", \boxed{x}
_EXPLICIT = re.compile(r"answer\s*(?:is\s*:?|:|=)|\\boxed\{", re.IGNORECASE)
# an unsigned number: digits with optional thousands commas and decimals, or a bare decimal;
# a fraction only when written without spaces ("3/4"; "8 / 2" is a division)
_UNSIGNED = re.compile(r"(?<![\w.,])(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?(?![\w/])"
                       r"|(?<![\w.])\.\d+(?![\w])")
_MINUS = "-−"
_OPERATORS = "+-−*/×÷^"
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


def _prev_char(text: str, i: int) -> tuple[str, int]:
    """The last non-space character before position i (and its index), or ("", -1)."""
    j = i - 1
    while j >= 0 and text[j] in " \t":
        j -= 1
    return (text[j], j) if j >= 0 else ("", -1)


def _next_char(text: str, i: int) -> tuple[str, int]:
    j = i
    while j < len(text) and text[j] in " \t":
        j += 1
    return (text[j], j) if j < len(text) else ("", len(text))


def _ends_value(ch: str) -> bool:
    return ch.isdigit() or ch == ")"


def _operator_at(text: str, j: int) -> bool:
    """Whether text[j] is a binary-operator character ("**" is markdown bold, not one)."""
    if j < 0 or j >= len(text) or text[j] not in _OPERATORS:
        return False
    return not (text[j] == "*" and (text[j - 1:j] == "*" or text[j + 1:j + 2] == "*"))


def numbers(text: str) -> list[dict]:
    """Every number in `text`: {"text", "start", "end", "operand"}, signed where a minus is a sign.

    A minus directly before a number is its sign unless a number or ")" stands before the minus
    (then it is the binary operator: "0 - 3" is 0 minus 3). A number is an operand when a binary
    operator joins it to a value before it ("0 + 9", "2 + -1") or when an operator follows it
    ("9 + 3", "9 + (", or a restatement cut after "9 +").
    """
    text = text or ""
    out = []
    for m in _UNSIGNED.finditer(text):
        start, end = m.start(), m.end()
        if start > 0 and text[start - 1] in _MINUS and not _ends_value(_prev_char(text, start - 1)[0]):
            start -= 1  # "-3", "= -3", "+ -1": a sign
        prev, pj = _prev_char(text, start)
        operand = _operator_at(text, pj) and _ends_value(_prev_char(text, pj)[0])
        nxt, nj = _next_char(text, end)
        if not operand and _operator_at(text, nj):
            after, _ = _next_char(text, nj + 1)
            operand = after in ("", "\n", "(") or after.isdigit() or after in _MINUS
        out.append({"text": text[start:end].replace("−", "-"), "start": start, "end": end, "operand": operand})
    return out


def last_number(text: str) -> str | None:
    """The last number of `text` that is not an operand of an expression, or None."""
    for n in reversed(numbers(text)):
        if not n["operand"]:
            return n["text"]
    return None


def final_equals(text: str) -> str | None:
    """The right side of the last "= x" where x is one number (not the start of an expression)."""
    nums = numbers(text)
    for pos in reversed([m.start() for m in re.finditer(r"=", text or "")]):
        after = [n for n in nums if n["start"] > pos]
        if not after:
            continue
        first = after[0]
        between = text[pos + 1:first["start"]]
        if between.strip(" \t*$`") or first["operand"]:
            continue
        return first["text"]
    return None


def _norm_words(s: str) -> str:
    return " ".join(re.sub(r"[^\w+\-−*/×÷^=.]+", " ", s.lower()).replace("−", "-").split()).strip(" .")


def restates(text: str, question: str | None) -> bool:
    """Whether the response only repeats (part of) the question: its words are a piece of the question's."""
    if not question:
        return False
    r = _norm_words(text)
    return bool(r) and r in _norm_words(question)


def _explicit_segment(text: str) -> str | None:
    hits = list(_EXPLICIT.finditer(text))
    if not hits:
        return None
    hit = hits[-1]
    tail = text[hit.end():]
    if hit.group(0).startswith("\\boxed"):
        depth, end = 1, 0
        for end, ch in enumerate(tail):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if depth == 0:
                break
        return tail[:end].strip()
    tail = tail.strip()
    return tail.splitlines()[0].strip() if tail else ""


def _read_segment(segment: str) -> str | None:
    clean = segment
    for _ in range(3):  # "**42**." -> "42"
        clean = clean.strip(" \t*`$'\"").rstrip(".")
    if not clean:
        return None
    if parse_number(clean) is not None:
        return clean.replace("−", "-")
    found = final_equals(clean) or last_number(clean)
    if found is None and numbers(clean):
        return None  # only operands ("Answer: 0 + 9"): an expression, not its value
    return found or clean


def extract_answer(text: str | None, question: str | None = None) -> str | None:
    """The final answer in a response (see the module docstring); None when there is none."""
    if not text or not text.strip():
        return None
    if restates(text, question):
        return None
    segment = _explicit_segment(text)
    found = _read_segment(segment) if segment is not None else None
    return found or final_equals(text) or last_number(text)


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
               task_config: dict | None = None, question: str | None = None) -> bool:
    """Whether `response` answers correctly: numeric exact match, or reasoning-gym's scorer >= 0.99.
    `question` (default: entry["question"]) keeps a restatement of it from counting."""
    if question is None and entry is not None:
        question = entry.get("question")
    extracted = extract_answer(response, question)
    if extracted is None:
        return False
    if numeric_match(extracted, answer):
        return True
    if parse_number(extracted) is not None and parse_number(answer) is not None:
        return False  # two numbers that differ: no scorer may call them equal
    if task is not None:
        e = entry if entry is not None else {"answer": answer, "metadata": {}}
        return rg_score(task, extracted, e, task_config) >= RG_THRESHOLD
    if parse_number(answer) is None and answer is not None:  # a non-numeric reference: normalised text match
        return _norm(extracted) == _norm(answer)
    return False


def _norm(s: str) -> str:
    return " ".join(s.lower().strip().strip(_STRIP).split())
