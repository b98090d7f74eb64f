"""JSONL in and out.

Reading: every error names the file, the line and the field. Writing: records
are appended one whole line at a time and flushed, so a crash (even kill -9)
loses at most the records in flight; a torn last line left by a crash is cut
off before the next run appends, and resuming skips the ids already written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import AftError, where
from .prompts import validate_messages


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line; malformed JSON is an AftError naming file:line."""
    path = Path(path)
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise AftError(f"{path}: no such file") from None
    except OSError as e:
        raise AftError(f"{path}: cannot read: {e.strerror}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise AftError(f"{where(path, lineno)}malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise AftError(f"{where(path, lineno)}expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


@dataclass
class QueryItem:
    id: str
    query: list[dict]  # chat messages ending with a user turn
    record: dict  # the input record as read (kept in the output)
    line: int = 0


QUERY_FIELDS = ("query", "messages", "prompt", "instruction")


def parse_query(rec: dict, loc: str) -> list[dict]:
    """The chat messages of one input record: {"query": [...]}, {"messages": [...]}, {"prompt": "..."} or {"instruction": "..."}."""
    for key in QUERY_FIELDS:
        if key not in rec:
            continue
        value = rec[key]
        if isinstance(value, str):
            if not value.strip():
                raise AftError(f'{loc}field "{key}": empty text')
            text = value
            if key == "instruction" and isinstance(rec.get("input"), str) and rec["input"].strip():
                text = f"{value}\n\n{rec['input']}"  # Alpaca's instruction + input
            return [{"role": "user", "content": text}]
        return validate_messages(value, f'{loc}field "{key}": ')
    raise AftError(f"{loc}no usable query: expected one of the fields {', '.join(QUERY_FIELDS)}")


def read_queries(path: str | Path) -> list[QueryItem]:
    items, seen = [], set()
    for lineno, rec in read_jsonl(path):
        loc = where(path, lineno)
        query = parse_query(rec, loc)
        qid = rec.get("id", rec.get("question_id"))
        qid = str(qid) if qid is not None else str(len(items))
        if qid in seen:
            raise AftError(f'{loc}field "id": duplicate id {qid!r}')
        seen.add(qid)
        items.append(QueryItem(qid, query, rec, lineno))
    if not items:
        raise AftError(f"{path}: no records")
    return items


class JsonlAppender:
    """Append records to a JSONL file, one flushed line each; safe to resume after a crash."""

    def __init__(self, path: str | Path, key: str = "id"):
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()
        if self.path.exists():
            self._repair()
            for _, rec in read_jsonl(self.path):
                if key in rec:
                    self.done.add(str(rec[key]))
        self._f = open(self.path, "a", encoding="utf-8")

    def _repair(self) -> None:
        """Cut a torn last line (no trailing newline, or not valid JSON) left by a crash."""
        data = self.path.read_bytes()
        if not data:
            return
        end = len(data)
        if not data.endswith(b"\n"):
            end = data.rfind(b"\n") + 1
        else:
            last_start = data.rfind(b"\n", 0, len(data) - 1) + 1
            try:
                json.loads(data[last_start:])
            except ValueError:
                end = last_start
        if end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)

    def write(self, rec: dict) -> None:
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        if self.key in rec:
            self.done.add(str(rec[self.key]))

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_json(path: str | Path, obj) -> None:
    """Write a small JSON file atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
