"""Run every ```bash block of README.md and docs/*.md, in order, on a fresh clone, shrunk.

    python benchmarks/check_docs.py                   # all files; a table of what passed
    python benchmarks/check_docs.py docs/train.md     # one file
    python benchmarks/check_docs.py --list            # the commands, with the flags added; nothing run

The repository is cloned (git clone of HEAD: only committed files, as a new
user gets them) into a temporary folder; each file's blocks run there in the
order they appear, so a command that needs what an earlier one wrote finds it,
and one that needs what no command writes fails. Each command runs as written,
with `aft` as `python -m aft` of the clone, plus flags that shrink it (fewer
prompts, steps, tokens; see SHRINK); `bash install.sh &&` before a command is
left out (the environment it runs in is installed already). A block the docs mark with
`<!-- docs-check: skip REASON -->` on the line above is listed as skipped with
its reason (hardware or services this machine lacks, or a measurement that
takes minutes by design). Exit code 1 if any command failed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"<!--\s*docs-check:\s*skip\s*(.*?)\s*-->")
# Flags appended to each command (argparse: the last value wins), by command prefix.
SHRINK = {
    "aft infer": "--max_tokens 8 -k 2 -l 1",
    "aft data build": "--n_prompts 3 --max_tokens 16 --teacher_max_tokens 16",
    "aft train": "--max_steps 1 --save_steps 1 --logging_steps 1",
    "aft eval run": "--limit 2 --max_tokens 8",
    "aft eval export": "--limit 1 --max_tokens 8",
    "aft analyze perplexity": "--max_rows 2",
}
# The environment this runs in is already installed: `bash install.sh ... &&` is left out (not reinstalled over it).
INSTALL = re.compile(r"^bash install\.sh(\s+--?[\w-]+)*\s*&&\s*")
NO_SHRINK = ("--dry-run", "aft view", "aft data merge", "aft data card", "aft eval report", "aft eval judge")


def blocks(path: Path):
    """(line number, skip reason or None, commands) of each ```bash block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            above = "\n".join(lines[max(0, i - 2):i])
            skip = SKIP.search(above)
            start, body = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            yield start, (skip.group(1) or "marked") if skip else None, commands(body)
        i += 1


def commands(body: list[str]) -> list[str]:
    """Whole commands: continuation lines joined, comments and blank lines dropped."""
    out, cur = [], ""
    for line in body:
        line = re.sub(r"(^|\s)#\s.*$", "", line).rstrip()  # a comment: '#' + space (not a URL's #model)
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        if cur.strip():
            out.append(" ".join(cur.split()))
        cur = ""
    return out


def shrink(cmd: str) -> str:
    cmd = INSTALL.sub("", cmd)
    plain = re.sub(r"^(\w+=\S*\s+)*(/usr/bin/time -v )?", "", cmd).replace("python -m aft ", "aft ")  # env, time
    if any(k in plain for k in NO_SHRINK):
        return cmd
    for prefix, flags in SHRINK.items():
        if plain.startswith(prefix):
            return f"{cmd} {flags}"
    return cmd


def run(files: list[str], list_only: bool, timeout: int) -> int:
    results = []
    with tempfile.TemporaryDirectory(prefix="aft-docs-") as tmp:
        clone = Path(tmp) / "aft"
        if not list_only:
            subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        bindir = Path(tmp) / "bin"
        bindir.mkdir()
        (bindir / "aft").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m aft "$@"\n')
        (bindir / "aft").chmod(0o755)
        env = {**os.environ, "PYTHONPATH": str(clone / "src"), "PATH": f"{bindir}:{os.environ['PATH']}",
               "AFT_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
        for name in files:
            for line, skip, cmds in blocks(ROOT / name):
                for cmd in cmds:
                    where = f"{name}:{line}"
                    if skip:
                        results.append((where, cmd, "skipped", skip))
                        continue
                    full = shrink(cmd)
                    if list_only:
                        print(f"{where}: {full}")
                        continue
                    t0 = time.time()
                    try:
                        r = subprocess.run(["bash", "-c", full], cwd=clone, env=env, capture_output=True, text=True,
                                           timeout=timeout)
                        ok, tail = r.returncode == 0, (r.stderr.strip().splitlines() or [""])[-1][:200]
                        status = "ok" if ok else f"FAILED ({r.returncode})"
                    except subprocess.TimeoutExpired:
                        status, tail = "FAILED (timeout)", f"over {timeout} s"
                    results.append((where, full, status, f"{time.time() - t0:.0f} s" if status == "ok" else tail))
                    print(f"{status:16s} {where}: {full}\n{'':17s}{results[-1][3]}", flush=True)
    if list_only:
        return 0
    failed = [r for r in results if r[2].startswith("FAILED")]
    print(f"\n{len(results)} commands: {sum(r[2] == 'ok' for r in results)} ok, {len(failed)} failed, "
          f"{sum(r[2] == 'skipped' for r in results)} skipped")
    for where, cmd, _, why in results:
        if _ == "skipped":
            print(f"  skipped {where}: {cmd}  ({why})")
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help="markdown files relative to the repository (default: README and docs/)")
    p.add_argument("--list", action="store_true", help="print the commands with their shrinking flags; run nothing")
    p.add_argument("--timeout", type=int, default=600, help="seconds per command (default: 600)")
    a = p.parse_args()
    return run(a.files or FILES, a.list, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
