"""JSONL in and out.

Reading: every error names the file, the line and the field. Writing: records
are appended one whole line at a time and flushed, so a crash (even kill -9)
loses at most the records in flight; a torn last line left by a crash is cut
off before the next run appends, and resuming skips the ids already written.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import AftError, where
from .prompts import validate_messages

log = logging.getLogger(__name__)


def read_text(path: str | Path, what: str = "file") -> str:
    """A whole UTF-8 text file; a missing, unreadable or non-UTF-8 file is an AftError naming it (and the line)."""
    path = Path(path)
    with _open(path, what) as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise AftError(f"{path}:{line}: {_not_utf8(data[e.start], column)}") from None


def _open(path: Path, what: str, folder_hint: str | None = None):
    """`path` opened for reading bytes; a missing, folder or unreadable path is an AftError naming it."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise AftError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise AftError(f"{path}: is a folder, not {folder_hint or 'a ' + what}") from None
    except OSError as e:
        raise AftError(f"{path}: cannot read: {e.strerror}") from None


def _not_utf8(byte: int, column: int) -> str:
    return f"not UTF-8 text (byte 0x{byte:02x} at column {column}); save the file as UTF-8"


def read_jsonl(path: str | Path, bad_lines: str = "raise") -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line.

    A line that is not UTF-8, not JSON or not an object is an AftError naming
    file:line; with bad_lines="yield" that error is yielded in place of the
    record (for callers that skip bad rows), and reading goes on.
    """
    path = Path(path)
    with _open(path, "file", "a JSONL file") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                rec = _parse_line(raw, lineno == 1)
            except ValueError as e:
                err = AftError(f"{where(path, lineno)}{e}")
                if bad_lines == "yield":
                    yield lineno, err
                    continue
                raise err from None
            if rec is not None:
                yield lineno, rec


def _parse_line(raw: bytes, first: bool) -> dict | None:
    """One JSONL line -> its object (None if blank); ValueError says what is wrong with it."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(_not_utf8(raw[e.start], e.start + 1)) from None
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    return rec


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


def record_id(value, loc: str) -> str | None:
    """An input record's id as text: a string or a number (a JSON object, list or bool is an error)."""
    if value is None:
        return None
    if isinstance(value, (dict, list, bool)):
        raise AftError(f'{loc}field "id": expected a string or a number, got {json.dumps(value)[:60]}')
    return str(value)


def read_queries(path: str | Path) -> list[QueryItem]:
    items, seen = [], set()
    for lineno, rec in read_jsonl(path):
        loc = where(path, lineno)
        query = parse_query(rec, loc)
        qid = record_id(rec.get("id", rec.get("question_id")), loc)
        qid = qid if qid is not None else str(len(items))
        if qid in seen:
            raise AftError(f'{loc}field "id": duplicate id {qid!r}')
        seen.add(qid)
        items.append(QueryItem(qid, query, rec, lineno))
    if not items:
        raise AftError(f"{path}: no records")
    return items


class JsonlAppender:
    """Append records to a JSONL file, one flushed line each; safe to resume after a crash.

    `failed(record)` tells a record of a failed query: with `retry` such records are removed
    when the file is opened (`retried` counts them), so the query is run again; without, they
    stay and count as done (`failed_before` counts them).
    """

    def __init__(self, path: str | Path, key: str = "id", failed=None, retry: bool = True):
        self.path = Path(path)
        self.key = key
        make_parent(self.path)
        self.done: set[str] = set()
        self.retried = self.failed_before = 0
        if self.path.exists():
            repair_torn_tail(self.path)
            records = [rec for _, rec in read_jsonl(self.path)]
            bad = [r for r in records if failed is not None and failed(r)]
            if bad and retry:
                records = [r for r in records if not failed(r)]
                rewrite_jsonl(self.path, records)
                self.retried = len(bad)
            else:
                self.failed_before = len(bad)
            self.done = {str(rec[key]) for rec in records if key in rec}
        self._f = open(self.path, "a", encoding="utf-8")

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


def done_ids(path: str | Path, key: str = "id", failed=None) -> set[str]:
    """The `key` values of the records already in an output (empty if none), after cutting a torn last line;
    records for which `failed(record)` is true are not done."""
    path = Path(path)
    if not path.exists():
        return set()
    repair_torn_tail(path)
    return {str(rec[key]) for _, rec in read_jsonl(path) if key in rec and not (failed and failed(rec))}


def repair_torn_tail(path: Path) -> None:
    """Cut a torn last line (no trailing newline, or not valid JSON) left by a crash."""
    data = path.read_bytes()
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
        log.warning("%s: cut a torn last line (%d bytes) left by an interrupted run", path, len(data) - end)
        with open(path, "r+b") as f:
            f.truncate(end)


def rewrite_jsonl(path: str | Path, records: list[dict]) -> None:
    """Replace a JSONL file's records at once (temp file + rename: a crash leaves the old or the new file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


def write_json(path: str | Path, obj) -> None:
    """Write a small JSON file atomically (temp file + rename; the temp file is this process's own)."""
    path = Path(path)
    make_parent(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def make_folder(folder: str | Path) -> Path:
    """mkdir -p, with a one-line AftError when a parent is a file or not writable."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        raise AftError(f"cannot create the folder {folder}: {blocker} is a file, not a folder") from None
    except OSError as e:
        raise AftError(f"cannot create the folder {folder}: {e.strerror}") from None
    return folder


def make_parent(path: str | Path) -> None:
    make_folder(Path(path).parent)


def lock_path(output: str | Path) -> Path:
    """The lock file of an output file or folder: beside it, named <output>.lock."""
    output = Path(output)
    return output.with_name(output.name + ".lock")


@contextmanager
def output_lock(output: str | Path):
    """Hold <output>.lock while writing `output`, so that a second writer is refused, not interleaved.

    The lock is an exclusive flock on a file that holds the holder's pid: the
    kernel drops the flock when the holder dies (even by kill -9), so a lock
    left behind by a dead run is stale and taken over (logged); a live holder
    makes this an AftError naming its pid.
    """
    path = lock_path(output)
    make_parent(path)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise AftError(f"{path}: cannot create the lock file: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AftError(f"{output} is being written by another aft process (pid {holder}); wait for it to "
                           f"finish or choose another output") from None
        try:  # the holder we waited on may have removed the file: lock the file now at the path
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = os.pread(fd, 32, 0).decode(errors="replace").strip()
    if stale:
        log.warning("%s: taking over a stale lock left by pid %s, which is no longer running", path, stale)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield path
    finally:
        os.unlink(path)
        os.close(fd)
